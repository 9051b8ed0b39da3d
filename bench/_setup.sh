# Sourced by the bench/run_*.sh scripts: repository root as cwd and on PYTHONPATH, $OUT (default ./bench_out),
# $PY, and XLA's allocator allowed most of the GPU (the 120b weights take ~65 GB and long prompts need room; jax's
# default pool is 75 % of it; bytes_limit in the JSON shows what was granted).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
OUT=${OUT:-$ROOT/bench_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}
