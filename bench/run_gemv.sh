#!/usr/bin/env bash
# Issues 11 and 15 on ONE H200 in one call (≈ 8 min): the row-wise int4 GEMV, the 120b decode, the server.
#   K  bench/bench_gemv.py: correctness vs float64 (compiled) + kernel timings + a tiling sweep at 1 token; the
#      fastest tiling goes on as GPTOSS_GEMV_TILING for the next stages ($OUT/gemv_best.json)
#   A  gptoss-jax bench, gpt-oss-120b random int4 g32 asymmetric: batch 1 at prompt 1024 + 64 new tokens (profiled:
#      kernels per step), batch 64 and 256 at prompt 128 + 128 new tokens (the serve benchmark's shape)
#   S  bench/bench_serve.py, the same weights scheme: 64 and 256 concurrent streaming clients, 256 slots
#   OFF  stage A's batch-1 run with the row-wise paths off (GPTOSS_GEMV_MAX_ROWS=0,0), for a same-run ratio
# STAGES="K A S" by default; results under $OUT (default ./bench_out).
. "$(dirname "$0")/_setup.sh"
BENCH=(--preset gpt-oss-120b --random-weights --dtype bfloat16 --group-size 32 --asymmetric)
for s in ${STAGES:-K A S}; do
  echo "=== stage $s ($(date +%T))"
  case $s in
    K) BENCH_BUDGET_S=${BENCH_K_S:-75} timeout "${BENCH_K_TIMEOUT:-100}" "$PY" bench/bench_gemv.py \
         > "$OUT/gemv.stdout" 2>&1
       grep -v '^ROW' "$OUT/gemv.stdout" | tail -45
       if [ -s "$OUT/gemv_best.json" ]; then export GPTOSS_GEMV_TILING; GPTOSS_GEMV_TILING=$(cat "$OUT/gemv_best.json"); fi
       echo "GPTOSS_GEMV_TILING=${GPTOSS_GEMV_TILING:-}" ;;
    A) # the optimized HLO of the decode programs too (which small XLA kernels remain: for the next profile-driven fix)
       XLA_FLAGS="${XLA_FLAGS:-} --xla_dump_to=$OUT/hlo --xla_dump_hlo_as_text --xla_dump_hlo_module_re=.*decode.*" \
       timeout "${BENCH_A_TIMEOUT:-200}" "$PY" -m gptoss_jax.cli bench "${BENCH[@]}" \
         --runs 1x1024x64,64x128x128,256x128x128 --profile 1,256 --time-budget $(( ${BENCH_A_TIMEOUT:-200} - 20 )) \
         --json "$OUT/e2e_A.json" --force > "$OUT/e2e_A.log" 2>&1
       tail -8 "$OUT/e2e_A.log"
       # keep one decode program's optimized HLO (batch 1), gzipped: the device tool returns a limited file count
       first=$(ls "$OUT"/hlo/*after_optimizations.txt 2>/dev/null | head -1)
       [ -n "$first" ] && gzip -c "$first" > "$OUT/decode_hlo_after_optimizations.txt.gz"
       rm -rf "$OUT/hlo" ;;
    OFF) GPTOSS_GEMV_MAX_ROWS=0,0 timeout 120 "$PY" -m gptoss_jax.cli bench "${BENCH[@]}" --runs 1x1024x64 \
         --time-budget 100 --json "$OUT/e2e_OFF.json" --force > "$OUT/e2e_OFF.log" 2>&1
       tail -4 "$OUT/e2e_OFF.log" ;;
    S) if [ -d devwheels ]; then  # the device image lacks the server stack: wheels carried in the working tree
         "$PY" -m pip install -q --no-index --find-links devwheels fastapi uvicorn openai httpx prometheus-client \
           2>&1 | tail -2
       fi
       timeout "${BENCH_S_TIMEOUT:-220}" "$PY" bench/bench_serve.py --random-preset gpt-oss-120b --group-size 32 \
         --asymmetric --clients 64,256 --max-batch 256 --prompt-len 128 --max-tokens 128 \
         > "$OUT/serve.log" 2>&1
       tail -15 "$OUT/serve.log" ;;
    *) echo "unknown stage $s" >&2 ;;
  esac
done
