#!/usr/bin/env bash
# Decode probes on ONE H200 in one call (issues 9 and 11), stages (STAGES="W P C" by default), results under $OUT:
#   W  bench/sweep_gemv.py: tiling sweep of the row-wise int4 GEMV at the 120b decode shapes (gemv_sweep.json)
#   P  bench/bench_decode_profile.py, gpt-oss-120b random int4 g32, batch 1, prompt 64 + 65 new tokens, profiled:
#      the early-exit while loop vs the fixed-trip-count loop (GPTOSS_DECODE_EARLY_EXIT=1 / 0), then the fixed loop
#      with every command-buffer kind XLA has (WHILE included); per-kernel tables as JSON, and the fixed run's
#      optimized decode HLO, gzipped (the names of the small kernels that remain)
#   C  bench/bench_compile.py: compile seconds cold and in a second process with the persistent cache
#   R  bench/bench_router.py: the decode router kernels vs float64 (compiled) and vs the XLA op (timing)
#   T  the batch-1 decode profile (as P, fixed loop) under GPTOSS_GEMV_TILING candidates per role ($TILINGS: lines
#      "name=gemv json[;router json]", the second part GPTOSS_ROUTER_TILING), to pick the row-wise kernel's per-role
#      defaults (and the router's) from in-model kernel times; e.g. the default against the "mant" dequantization
#      (GemvTiling.dequant, pallas_kernels/_gpu_gemv.py docstring) for the MoE matmuls:
#        STAGES=T TILINGS=$'default=\nmant={"gate_up":{"dequant":"mant"},"down":{"dequant":"mant"}}' bench/run_probe.sh
#   E  the batch-1 decode profile (as T) under environment variants ($ENVS: lines "name=VAR=value VAR2=value"), an
#      A/B of kernels behind their auto-mode switches in one run, e.g.
#        STAGES=E ENVS=$'new=\nold_attention=GPTOSS_DECODE_ATTENTION_MAX_ROWS=0' bench/run_probe.sh
#   K  bench/check_decode_attention.py: the one-launch decode attention kernel vs float64 (compiled) and timed
. "$(dirname "$0")/_setup.sh"
CB_ALL="FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL"
for s in ${STAGES:-W P C}; do
  echo "=== stage $s ($(date +%T))"
  case $s in
    W) timeout "${BENCH_W_TIMEOUT:-170}" "$PY" bench/sweep_gemv.py > "$OUT/sweep.log" 2>&1
       grep -E "^(BEST|device|compiled)|ERROR" "$OUT/sweep.log" | cut -c1-200 | head -30 ;;
    P) for v in while fixed fixed_cb; do
         case $v in
           while) env=(GPTOSS_DECODE_EARLY_EXIT=1) ;;
           fixed) env=(GPTOSS_DECODE_EARLY_EXIT=0 "XLA_FLAGS=--xla_dump_to=$OUT/hlo --xla_dump_hlo_as_text --xla_dump_hlo_module_re=.*decode.*") ;;
           fixed_cb) env=(GPTOSS_DECODE_EARLY_EXIT=0 "XLA_FLAGS=--xla_gpu_enable_command_buffer=$CB_ALL --xla_gpu_graph_min_graph_size=1") ;;
         esac
         echo "--- $v"
         env "${env[@]}" PROFILE_TAG="profile_$v" timeout "${BENCH_P_TIMEOUT:-100}" "$PY" bench/bench_decode_profile.py \
           --top 45 > "$OUT/profile_$v.log" 2>&1
         head -2 "$OUT/profile_$v.log" | cut -c1-400
         [ "$v" = while ] && sed -n 3,40p "$OUT/profile_$v.log" | cut -c1-160
         [ "$v" = while ] || tail -3 "$OUT/profile_$v.log" | cut -c1-300
       done
       first=$(ls "$OUT"/hlo/*decode*after_optimizations.txt 2>/dev/null | head -1)
       [ -n "$first" ] && gzip -c "$first" > "$OUT/decode_hlo_after_optimizations.txt.gz"
       rm -rf "$OUT/hlo" ;;
    R) timeout "${BENCH_R_TIMEOUT:-90}" "$PY" bench/bench_router.py > "$OUT/router.log" 2>&1
       tail -8 "$OUT/router.log" | cut -c1-300 ;;
    T) while IFS= read -r line; do
         [ -z "$line" ] && continue
         name=${line%%=*}; tiling=${line#*=}; router=""
         case $tiling in *";"*) router=${tiling#*;}; tiling=${tiling%%;*} ;; esac
         echo "--- $name $tiling $router"
         GPTOSS_GEMV_TILING="$tiling" GPTOSS_ROUTER_TILING="$router" PROFILE_TAG="tiling_$name" timeout "${BENCH_P_TIMEOUT:-100}" "$PY" \
           bench/bench_decode_profile.py --top 8 > "$OUT/tiling_$name.log" 2>&1
         head -2 "$OUT/tiling_$name.log" | cut -c1-200
         grep -E "rowwise|router" "$OUT/tiling_$name.log" | cut -c1-120
       done <<< "${TILINGS:-default=}" ;;
    E) while IFS= read -r line; do
         [ -z "$line" ] && continue
         name=${line%%=*}; vars=${line#*=}
         echo "--- $name $vars"
         env $vars PROFILE_TAG="env_$name" timeout "${BENCH_P_TIMEOUT:-100}" "$PY" \
           bench/bench_decode_profile.py --top 30 > "$OUT/env_$name.log" 2>&1
         head -2 "$OUT/env_$name.log" | cut -c1-300
         sed -n 3,14p "$OUT/env_$name.log" | cut -c1-140
       done <<< "${ENVS:-default=}" ;;
    K) timeout "${BENCH_K_TIMEOUT:-150}" "$PY" bench/check_decode_attention.py > "$OUT/decode_attention.log" 2>&1
       grep -E "CHECK|Error|error" "$OUT/decode_attention.log" | cut -c1-200 | head -20 ;;
    C) timeout "${BENCH_C_TIMEOUT:-170}" "$PY" bench/bench_compile.py > "$OUT/compile.log" 2>&1
       tail -3 "$OUT/compile.log" | cut -c1-900 ;;
    *) echo "unknown stage $s" >&2 ;;
  esac
done
