"""Tiling sweep of the row-wise int4 GEMV (``_gpu_gemv.GemvTiling``) at the gpt-oss-120b decode shapes, one GPU:

    python3 bench/sweep_gemv.py            # table on stdout, $OUT/gemv_sweep.json (+ gemv_best.json per op)

Ops (bf16 x, int4 g32 asymmetric weights, bias): MoE gate_up 2880→5760 + SwiGLU and down 2880→2880 at one token
(4 routed rows, random distinct experts each op), dense q+k+v 2880→4096+512+512 and o 4096→2880 at M = 1 (stacked
layers read in place). Every (op, tiling) program is compiled first, in parallel threads (16 host cores), then
timed one after the other (median of repeats of 8 ops inside one jit, so dispatch is amortized). Each variant's
output is compared with the default tiling's (the kernel's float64 checks are in bench_gemv.py and the CPU tests;
this guards a tiling that silently breaks). Bytes = touched weights' words + scales + zeros + activations.
BENCH_SMALL=1: a CPU dry run (interpret mode, tiny shapes, two variants).
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

import numpy as np  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import kernel_bench_util as _util  # noqa: E402
from gptoss_jax.kernels import _gpu_gemv  # noqa: E402

SMALL = os.environ.get("BENCH_SMALL") == "1"
OUT = os.environ.get("OUT") or os.path.join(ROOT, "bench_out")
E, H, I, Q, KV, NL = (8, 256, 256, 256, 64, 2) if SMALL else (128, 2880, 2880, 4096, 512, 8)
G, TOPK, R = 32, 4, 8
VARIANTS = [{}, dict(bn=64), dict(bn=256), dict(bn=32, num_warps=2), dict(bn=64, num_warps=2),
            dict(num_warps=8), dict(bn=256, num_warps=8), dict(num_warps=2), dict(step_words=8),
            dict(step_words=16), dict(step_words=64), dict(num_stages=2), dict(num_stages=4), dict(splits=1),
            dict(splits=2), dict(splits=4), dict(bn=64, splits=2), dict(bn=64, step_words=64),
            dict(bn=256, step_words=16), dict(bn=64, step_words=16, num_stages=4), dict(dequant="exact"),
            dict(bn=512, num_warps=8)]
if SMALL:
    VARIANTS = VARIANTS[:2]


def main():
    os.makedirs(OUT, exist_ok=True)
    t0 = time.time()
    dev = jax.devices()[0]
    bw = _util.copy_bw(SMALL)
    print(f"device {dev.device_kind}; jax {jax.__version__}; copy bandwidth {bw / 1e9:.0f} GB/s", flush=True)
    keys = jax.random.split(jax.random.PRNGKey(0), 12)
    rng = np.random.default_rng(0)
    w_gu = _util.rand_int4(keys[0], (E,), H, 2 * I, G)
    w_dn = _util.rand_int4(keys[1], (E,), I, H, G)
    b_gu = (jax.random.normal(keys[2], (E, 2 * I)) * 0.1).astype(jnp.bfloat16)
    b_dn = (jax.random.normal(keys[3], (E, H)) * 0.1).astype(jnp.bfloat16)
    wq, wk, wv = (_util.rand_int4(keys[4 + i], (NL,), H, n, G) for i, n in enumerate((Q, KV, KV)))
    wo = _util.rand_int4(keys[7], (NL,), Q, H, G)
    bq, bk, bv, bo = ((jax.random.normal(keys[8 + i], (NL, n)) * 0.1).astype(jnp.bfloat16)
                      for i, n in enumerate((Q, KV, KV, H)))
    interpret = SMALL

    def ids_rows():
        return (jnp.asarray(rng.choice(E, TOPK, replace=False).astype(np.int32)),
                jnp.zeros((TOPK,), jnp.int32))

    act = 2
    ops = {}
    sets = [(jnp.asarray(rng.standard_normal((1, H)), jnp.bfloat16), *ids_rows()) for _ in range(R)]
    ops["gate_up 1 token"] = (
        lambda t: lambda p, x, i, r: _gpu_gemv.routed_int4_gpu(
            x, p[0], i, r, p[1], out_dtype=jnp.bfloat16, epilogue="swiglu", alpha=1.702, limit=7.0, tiling=t,
            interpret=interpret),
        (w_gu, b_gu), sets, TOPK * w_gu.nbytes / E + (H + TOPK * I) * act)
    sets = [(jnp.asarray(rng.standard_normal((TOPK, I)), jnp.bfloat16), ids_rows()[0],
             jnp.arange(TOPK, dtype=jnp.int32)) for _ in range(R)]
    ops["down 1 token"] = (
        lambda t: lambda p, x, i, r: _gpu_gemv.routed_int4_gpu(
            x, p[0], i, r, p[1], out_dtype=jnp.bfloat16, tiling=t, interpret=interpret),
        (w_dn, b_dn), sets, TOPK * w_dn.nbytes / E + TOPK * (I + H) * act)
    lay = [jnp.int32(i % NL) for i in range(R)]
    sets = [(jnp.asarray(rng.standard_normal((1, H)), jnp.bfloat16), lay[i]) for i in range(R)]
    ops["q+k+v M=1"] = (
        lambda t: lambda p, x, l_: _gpu_gemv.dense_rowwise_gpu(x, p[0], p[1], out_dtype=jnp.bfloat16, layer=l_,
                                                               tiling=t, interpret=interpret),
        ((wq, wk, wv), (bq, bk, bv)), sets, sum(w.nbytes / NL for w in (wq, wk, wv)) + (H + Q + 2 * KV) * act)
    sets = [(jnp.asarray(rng.standard_normal((1, Q)), jnp.bfloat16), lay[i]) for i in range(R)]
    ops["o M=1"] = (
        lambda t: lambda p, x, l_: _gpu_gemv.dense_rowwise_gpu(x, [p[0]], [p[1]], out_dtype=jnp.bfloat16, layer=l_,
                                                               tiling=t, interpret=interpret),
        (wo, bo), sets, wo.nbytes / NL + (Q + H) * act)

    jobs = []
    for op, (make, params, arg_sets, nbytes) in ops.items():
        for v in VARIANTS:
            fn = make(_gpu_gemv.GemvTiling(**v))
            jf = jax.jit(lambda p, s, fn=fn: [fn(p, *a) for a in s])
            jobs.append((op, v, jf, params, arg_sets, nbytes))

    def compile_one(job):
        op, v, jf, params, arg_sets, _ = job
        try:
            return jf.lower(params, arg_sets).compile()
        except Exception as e:  # a tiling Triton rejects (e.g. too many registers): reported, not fatal
            return e

    with concurrent.futures.ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 2)) as ex:
        compiled = list(ex.map(compile_one, jobs))
    print(f"compiled {len(jobs)} programs in {time.time() - t0:.0f} s", flush=True)

    rows, refs = [], {}
    for (op, v, jf, params, arg_sets, nbytes), exe in zip(jobs, compiled):
        if isinstance(exe, Exception):
            rows.append(dict(op=op, tiling=v, error=f"{type(exe).__name__}: {str(exe)[:300]}"))
            print(f"{op:18s} {json.dumps(v):48s} ERROR {rows[-1]['error'][:120]}", flush=True)
            continue
        out = jax.block_until_ready(exe(params, arg_sets))
        y = np.stack([np.asarray(jnp.concatenate([jnp.ravel(a) for a in jax.tree.leaves(o)]), np.float32)
                      for o in out])
        if not v:
            refs[op] = y
        ref = refs.get(op)
        err = None if ref is None else float(np.max(np.abs(y - ref)) / max(np.max(np.abs(ref)), 1e-30))
        ok = bool(np.all(np.isfinite(y))) and (err is None or err <= 1e-2)
        samples = []
        for _ in range(5):
            t = time.perf_counter()
            outs = [exe(params, arg_sets) for _ in range(3)]
            jax.block_until_ready(outs)
            samples.append((time.perf_counter() - t) / (3 * R))
        us = statistics.median(samples) * 1e6
        rows.append(dict(op=op, tiling=v, us=us, gbps=nbytes / us / 1e3, pct_copy=100 * nbytes / (us * 1e-6) / bw,
                         err_vs_default=err, ok=ok))
        print(f"{op:18s} {json.dumps(v):48s} {us:8.1f} us {rows[-1]['pct_copy']:5.1f} % copy bw "
              f"{'OK' if ok else 'MISMATCH'} {'' if err is None else f'{err:.1e}'}", flush=True)
    best = {}
    for op in ops:
        cand = [r for r in rows if r["op"] == op and "us" in r and r["ok"]]
        if cand:
            b = min(cand, key=lambda r: r["us"])
            d = next((r for r in cand if not r["tiling"]), None)
            best[op] = dict(tiling=b["tiling"], us=b["us"], default_us=None if d is None else d["us"])
            dus = "-" if d is None else f"{d['us']:.1f}"
            print(f"BEST {op}: {json.dumps(b['tiling'])} {b['us']:.1f} us (default {dus} us)", flush=True)
    res = dict(device=dev.device_kind, jax=jax.__version__, copy_bw=bw, rows=rows, best=best,
               seconds=time.time() - t0)
    with open(os.path.join(OUT, "gemv_sweep.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
