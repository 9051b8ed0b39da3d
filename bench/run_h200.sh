#!/usr/bin/env bash
# The acceptance benchmarks of issues 10 and 11 on ONE H200, through `gptoss-jax bench`, in one go (≈9 min wall).
#
#   bench/run_h200.sh            # every stage: A C D B (in this order of priority)
#   bench/run_h200.sh A D        # some stages only
#
# Results: $OUT/bench_<stage>.json (rewritten after every run, "complete": true at the end of a stage), the table
# in $OUT/bench_<stage>.txt, progress in $OUT/bench_<stage>.log; at the end every stage's table on stdout (printed
# from its JSON by `python -m gptoss_jax.bench FILE.json`, so a stage ended by its timeout shows its finished runs).
# ($OUT defaults to ./bench_out.)
#
# Stages (random weights generated on the GPU; bf16 compute; greedy; no stop tokens):
#   A  gpt-oss-120b, int4 g32 asymmetric: batch 1 / 64 / 256, prompt 1024, 64 new tokens; profiled at batch 1
#      (kernels per decode step). Issue 11: ms/token, tokens/s, % of the same-run decode roofline.
#   C  gpt-oss-120b, int4 g64 symmetric: batch 64, prompt 1024, 64 new tokens (the other weight scheme, issue 11).
#   D  gpt-oss-20b, int4 g32 asymmetric AND bf16 (--bf16-baseline): batch 1, prompt 1024, 64 new tokens, so the int4
#      gain is a ratio. The 20b preset because the 120b in bf16 (≈234 GB) does not fit one 141 GB H200.
#   B  gpt-oss-120b, int4 g32 asymmetric, max_seq_len 131072 (issue 10): batch 1 prompts of 2k / 8k / 32k tokens
#      (prefill only: TTFT, prefill tokens/s, peak HBM), then 64k and 128k − 64 (= 131008, so prompt + 64 new
#      tokens fit 131072) with 64 new tokens (TTFT + decode ms/token at long context), then 1k with 64 new tokens
#      (decode at short context with the same max_seq_len). Runs go in growing size so each peak-HBM figure is that
#      run's own (the device's high-water mark cannot be reset).
#
# Time: each stage has a wall budget (seconds; override with BENCH_A_S ... BENCH_D_S) and the whole script
# BENCH_TOTAL_S (default 540 = 9 min). Inside a stage, runs that would start in its last BENCH_MARGIN_S seconds
# are skipped (recorded in the JSON as "skipped"); `timeout` ends a stage at its budget at the latest, and the JSON
# already holds every finished run.
. "$(dirname "$0")/_setup.sh"
TOTAL=${BENCH_TOTAL_S:-540}
MARGIN=${BENCH_MARGIN_S:-40}
START=$(date +%s)
STAGES=("$@")
[ ${#STAGES[@]} -eq 0 ] && STAGES=(A C D B)

budget_of() {
  case $1 in
    A) echo "${BENCH_A_S:-160}" ;;
    B) echo "${BENCH_B_S:-190}" ;;
    C) echo "${BENCH_C_S:-80}" ;;
    D) echo "${BENCH_D_S:-110}" ;;
  esac
}

args_of() {
  local common=(--random-weights --dtype bfloat16 --gen-len 64)
  case $1 in
    A) echo --preset gpt-oss-120b "${common[@]}" --group-size 32 --asymmetric --batch 1,64,256 --prompt-len 1024 \
         --profile 1 ;;
    C) echo --preset gpt-oss-120b "${common[@]}" --group-size 64 --symmetric --batch 64 --prompt-len 1024 ;;
    D) echo --preset gpt-oss-20b "${common[@]}" --group-size 32 --asymmetric --batch 1 --prompt-len 1024 \
         --bf16-baseline ;;
    B) echo --preset gpt-oss-120b --random-weights --dtype bfloat16 --group-size 32 --asymmetric \
         --max-seq-len 131072 --runs 1x2048x1,1x8192x1,1x32768x1,1x65536x64,1x131008x64,1x1024x64 ;;
  esac
}

"$PY" -c "import jax; print('jax', jax.__version__, jax.devices())" 2>&1 | tail -1
for stage in "${STAGES[@]}"; do
  case $stage in A|B|C|D) ;; *) echo "unknown stage $stage (A, B, C or D)" >&2; exit 2 ;; esac
  now=$(date +%s)
  left=$((TOTAL - (now - START)))
  budget=$(budget_of "$stage")
  [ "$budget" -gt "$left" ] && budget=$left
  if [ "$budget" -le "$MARGIN" ]; then
    echo "stage $stage: skipped (${left}s of the ${TOTAL}s total left)" | tee -a "$OUT/bench_skipped.txt"
    continue
  fi
  echo "=== stage $stage: budget ${budget}s: gptoss-jax bench $(args_of "$stage")"
  # shellcheck disable=SC2046
  timeout --signal=TERM --kill-after=15 "$budget" "$PY" -m gptoss_jax.cli bench $(args_of "$stage") \
    --time-budget $((budget - MARGIN)) --json "$OUT/bench_$stage.json" --force \
    > "$OUT/bench_$stage.txt" 2> "$OUT/bench_$stage.log"
  rc=$?
  echo "stage $stage: exit $rc after $(( $(date +%s) - now ))s"
  tail -n 3 "$OUT/bench_$stage.log"
done
echo
for stage in "${STAGES[@]}"; do  # tables from the JSON: also those of a stage its timeout ended
  [ -s "$OUT/bench_$stage.json" ] && { echo "=== stage $stage"; "$PY" -m gptoss_jax.bench "$OUT/bench_$stage.json"; echo; }
done
echo "total $(( $(date +%s) - START ))s; results in $OUT/bench_*.json"
