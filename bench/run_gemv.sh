#!/usr/bin/env bash
# Issue 11 on ONE H200: the row-wise int4 GEMV (bench/bench_gemv.py: correctness vs float64 + kernel timings), then
# the 120b decode through `gptoss-jax bench` at batch 1 and 8 (prompt 1024, 64 new tokens, int4 g32 asymmetric)
# with the row-wise paths off (GPTOSS_GEMV_MAX_ROWS=0,0: the sorted grouped MoE and the fused dense kernel, as
# before) and on (default; profiled at batch 1: kernels per step), and on + XLA command buffers around while loops.
# Results under $OUT (default ./bench_out): gemv.json/.log, e2e_<variant>.json.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-$ROOT/bench_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}
STAGES=${STAGES:-"K OFF ON CB"}
for s in $STAGES; do
  case $s in
    K) BENCH_BUDGET_S=${BENCH_K_S:-170} timeout ${BENCH_K_TIMEOUT:-230} "$PY" bench/bench_gemv.py > "$OUT/gemv.stdout" 2>&1
       grep -v '^ROW' "$OUT/gemv.stdout" | tail -60 ;;
    OFF|ON|CB)
       env=(); prof=()
       [ "$s" = OFF ] && env=(GPTOSS_GEMV_MAX_ROWS=0,0)
       [ "$s" = ON ] && prof=(--profile 1)
       [ "$s" = CB ] && env=(XLA_FLAGS="--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,CONDITIONAL,WHILE")
       echo "=== e2e $s ${env[*]}"
       env "${env[@]}" timeout ${E2E_TIMEOUT:-150} "$PY" -m gptoss_jax.cli bench --preset gpt-oss-120b --random-weights \
         --dtype bfloat16 --group-size 32 --asymmetric --batch 1,8 --prompt-len 1024 --gen-len 64 "${prof[@]}" \
         --time-budget $(( ${E2E_TIMEOUT:-150} - 25 )) --json "$OUT/e2e_$s.json" --force > "$OUT/e2e_$s.log" 2>&1
       tail -12 "$OUT/e2e_$s.log" ;;
  esac
done
