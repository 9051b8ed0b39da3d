"""Correctness + timing of gptoss_jax.kernels.attention at gpt-oss-120b attention shapes (one GPU, from the repo root).

    python3 bench/bench_attention.py          # JSON summary on stdout (last line) and in $OUT/attention.json

Shapes: 64 query heads, 8 KV heads (group size 8), head_dim 64, bf16, batch 1; sliding window 128 or full causal.

1. Correctness: each implementation ("gpu" flash kernel, "xla" reference = scores materialized, "xla-chunked" =
   the O(T) jnp loop) against a float64 numpy reference: prefill T = 1000 (a padded row: the last 100 keys -1),
   window 128 and full, bf16 and float32; decode over a 4096-slot cache with 1000 filled slots. Pass: finite and
   relative error (max |y - ref| / max |ref|) ≤ 2× the xla reference's own error + 1e-3 (bf16), ≤ 1e-5 (fp32).
2. Prefill timing, T = 2k / 8k / 32k, window 128 and full: median of 5 timed calls after a compile call; the xla
   reference only where its [H, T, T] f32 scores fit (T ≤ 8k). FLOPs counted = 4·H·D·(visible pairs).
   Peak temporary memory from XLA's compiled memory analysis where available.
3. Decode timing: one query token, KV cache with 131072 allocated slots, 1k vs 64k filled (full-attention layer),
   R = 32 decode calls inside one jit (different queries), time per call = wall / R, median of 5.
   Bytes = K + V of the filled slots (what a decode step must read).

Every item is wrapped in try/except so one failure does not lose the rest; BENCH_BUDGET_S (default 250) skips what
does not fit. BENCH_SMALL=1 runs tiny shapes in interpret mode (a CPU dry run of the script itself).
"""

from __future__ import annotations

import datetime
import json
import os
import statistics
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from gptoss_jax.kernels import attention as A  # noqa: E402
from gptoss_jax.kernels.reference import attention_f64, max_rel_err  # noqa: E402

OUT = os.environ.get("OUT") or os.path.join(ROOT, "bench_out")
os.makedirs(OUT, exist_ok=True)
T0 = time.time()
BUDGET = float(os.environ.get("BENCH_BUDGET_S", "250"))
SMALL = os.environ.get("BENCH_SMALL") == "1"
H, KV, D = (64, 8, 64) if not SMALL else (8, 2, 16)
WINDOW = 128 if not SMALL else 8
PREFILL_T = [2048, 8192, 32768] if not SMALL else [64, 128]
DECODE_SLOTS = 131072 if not SMALL else 512
DECODE_FILLED = [1024, 65536] if not SMALL else [32, 256]
CHECK_T = 1000 if not SMALL else 40
CHECK_SLOTS, CHECK_FILLED = (4096, 1000) if not SMALL else (256, 100)
R_DECODE = 32 if not SMALL else 2
INTERPRET = jax.default_backend() not in ("gpu", "cuda")
RESULTS: dict = dict(checks=[], prefill=[], decode=[], errors=[])
LOG = open(os.path.join(OUT, "attention.log"), "w")


def log(*a):
    s = " ".join(str(x) for x in a)
    print(s, flush=True)
    LOG.write(s + "\n")
    LOG.flush()


def left() -> float:
    return BUDGET - (time.time() - T0)


def impl_fn(name, window):
    if name == "gpu":
        return lambda q, k, v, qp, kp, s: A.attention(q, k, v, qp, kp, s, window, implementation="gpu",
                                                      interpret=INTERPRET)
    if name == "xla":
        return lambda q, k, v, qp, kp, s: A.attention_reference(q, k, v, qp, kp, s, window)
    return lambda q, k, v, qp, kp, s: A.attention_chunked(q, k, v, qp, kp, s, window)


def inputs(rng, t, s, dtype):
    q = jnp.asarray(rng.standard_normal((1, t, H, D)), dtype)
    k = jnp.asarray(rng.standard_normal((1, s, KV, D)), dtype)
    v = jnp.asarray(rng.standard_normal((1, s, KV, D)), dtype)
    sinks = jnp.asarray(2 * rng.standard_normal(H), jnp.float32)
    return q, k, v, sinks


def guarded(label, fn):
    if left() < 10:
        log(f"SKIP {label}: budget")
        RESULTS["errors"].append(dict(item=label, error="skipped: time budget"))
        return None
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - the bench must report every item
        log(f"ERROR {label}: {type(e).__name__}: {str(e)[:400]}")
        traceback.print_exc(file=LOG)
        RESULTS["errors"].append(dict(item=label, error=f"{type(e).__name__}: {str(e)[:400]}"))
        return None


# ------------------------------------------------------------------------------------------------- correctness
def check_prefill(rng, dtype, window):
    t = CHECK_T
    q, k, v, sinks = inputs(rng, t, t, dtype)
    qp = jnp.arange(t, dtype=jnp.int32)[None]
    kp = jnp.where(qp < t - t // 10, qp, -1)
    ref = attention_f64(q, k, v, qp, kp, sinks, window)
    errs = {}
    for name in ("xla", "xla-chunked", "gpu"):
        errs[name] = guarded(f"check {name}", lambda: max_rel_err(jax.jit(impl_fn(name, window))(q, k, v, qp, kp,
                                                                                                 sinks), ref))
    tol = 1e-5 if dtype == jnp.float32 else 2 * (errs["xla"] or 0) + 1e-3
    ok = {n: (e is not None and e <= tol) for n, e in errs.items()}
    row = dict(kind="prefill", T=t, dtype=jnp.dtype(dtype).name, window=window, errors=errs, tol=tol, ok=ok)
    RESULTS["checks"].append(row)
    log(json.dumps(row))


def check_decode(rng, dtype):
    s, n = CHECK_SLOTS, CHECK_FILLED
    q, k, v, sinks = inputs(rng, 1, s, dtype)
    kp = jnp.where(jnp.arange(s) < n, jnp.arange(s), -1).astype(jnp.int32)[None]
    qp = jnp.asarray([[n - 1]], jnp.int32)
    ref = attention_f64(q, k, v, qp, kp, sinks, None)
    errs = {name: guarded(f"check decode {name}", lambda: max_rel_err(
        jax.jit(impl_fn(name, None))(q, k, v, qp, kp, sinks), ref)) for name in ("xla", "gpu")}
    tol = 1e-5 if dtype == jnp.float32 else 2 * (errs["xla"] or 0) + 1e-3
    row = dict(kind="decode", slots=s, filled=n, dtype=jnp.dtype(dtype).name, errors=errs, tol=tol,
               ok={nm: (e is not None and e <= tol) for nm, e in errs.items()})
    RESULTS["checks"].append(row)
    log(json.dumps(row))


# ------------------------------------------------------------------------------------------------------ timing
def median_time(f, args, reps=5):
    jax.block_until_ready(f(*args))  # compile + warm
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(f(*args))
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def temp_bytes(f, args):
    try:
        mem = f.lower(*args).compile().memory_analysis()
        return None if mem is None else int(mem.temp_size_in_bytes)
    except Exception:  # noqa: BLE001
        return None


def time_prefill(rng, t, window, name):
    q, k, v, sinks = inputs(rng, t, t, jnp.bfloat16)
    pos = jnp.arange(t, dtype=jnp.int32)[None]
    f = jax.jit(impl_fn(name, window))
    args = (q, k, v, pos, pos, sinks)
    tmp = temp_bytes(f, args)
    sec = median_time(f, args)
    w = t if window is None else min(window, t)
    pairs = sum(min(i + 1, w) for i in range(0, t, 1)) if t <= 8192 else (
        t * (t + 1) // 2 if window is None else t * w - w * (w - 1) // 2)
    flops = 4 * H * D * pairs
    row = dict(T=t, window=window, impl=name, ms=sec * 1e3, tflops=flops / sec / 1e12, tokens_per_s=t / sec,
               temp_bytes=tmp)
    RESULTS["prefill"].append(row)
    log(json.dumps(row))


def time_decode(rng, filled, name):
    s = DECODE_SLOTS
    _, k, v, sinks = inputs(rng, 1, s, jnp.bfloat16)
    qs = jnp.asarray(rng.standard_normal((R_DECODE, 1, 1, H, D)), jnp.bfloat16)
    kp = jnp.where(jnp.arange(s) < filled, jnp.arange(s), -1).astype(jnp.int32)[None]
    qp = jnp.asarray([[filled - 1]], jnp.int32)
    one = impl_fn(name, None)

    @jax.jit
    def f(qs, k, v, qp, kp, sinks):
        return jax.lax.map(lambda q: one(q, k, v, qp, kp, sinks), qs)

    sec = median_time(f, (qs, k, v, qp, kp, sinks)) / R_DECODE
    nbytes = 2 * filled * KV * D * 2
    row = dict(slots=s, filled=filled, impl=name, us=sec * 1e6, gb_per_s_filled=nbytes / sec / 1e9)
    RESULTS["decode"].append(row)
    log(json.dumps(row))


def main():
    rng = np.random.default_rng(0)
    dev = jax.devices()[0]
    RESULTS.update(device=getattr(dev, "device_kind", str(dev)), backend=jax.default_backend(),
                   jax=jax.__version__, date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                   shape=dict(q_heads=H, kv_heads=KV, head_dim=D, window=WINDOW, batch=1))
    log(f"device {RESULTS['device']} jax {jax.__version__}")
    for dtype in (jnp.bfloat16, jnp.float32):
        for window in (WINDOW, None):
            guarded(f"check prefill {dtype} {window}", lambda: check_prefill(rng, dtype, window))
    guarded("check decode bf16", lambda: check_decode(rng, jnp.bfloat16))
    for filled in DECODE_FILLED:
        for name in ("gpu", "xla"):
            guarded(f"decode {filled} {name}", lambda: time_decode(rng, filled, name))
    for t in PREFILL_T:
        for window in (WINDOW, None):
            for name in ("gpu", "xla-chunked", "xla"):
                if name == "xla" and t > 8192:
                    continue  # [H, T, T] f32 scores: 256 GiB at 32k
                guarded(f"prefill {t} {window} {name}", lambda: time_prefill(rng, t, window, name))
    RESULTS["wall_s"] = time.time() - T0
    with open(os.path.join(OUT, "attention.json"), "w") as fh:
        json.dump(RESULTS, fh, indent=1)
    print(json.dumps(RESULTS))


if __name__ == "__main__":
    main()
