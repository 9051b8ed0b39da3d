"""Decode-speed int4 kernels at gpt-oss-120b shapes, old vs new, in ONE run (one GPU, from the repo root):

    python3 bench/bench_decode_kernels.py        # log + results.json under $OUT (or ./bench_out)

1. Same-run copy bandwidth (``a + 1`` on 2 GiB of bf16: read + write).
2. Correctness against float64 numpy (exact int4 codes), compiled on the GPU: dense q/k/v fused in one launch and o
   (bf16 and f32, layer-stacked weights read in place with ``layer=``), grouped gate_up (+bias, SwiGLU) and down
   (+bias) at 1 and 8 tokens for the new nibble-plane kernel and the old one. bf16 passes within 2x the XLA path's
   own error + 1e-3; f32 within 1e-4; the trailing rows must be exactly 0; NaN never passes.
3. Timing (median of repeats of R ops inside one jit, several calls queued): dense q+k+v (XLA int4 x3 | kernel x3 |
   fused kernel) and o (XLA | kernel) at M = 1, 8, 64 over R distinct layers of a stacked weight (so L2 does not
   serve the weights); grouped gate_up / down, old kernel vs new (and a small tiling sweep of the new one at 1 token)
   at 1 / 8 / 64 / 256 tokens, top-4 random routing (different experts every op).
   Bytes = packed words + scales + zeros of what the op must read (touched experts) + activations in/out.
   % copy bw = (bytes / time) / same-run copy bandwidth.
BENCH_SMALL=1: a CPU dry run of this script (interpret mode, tiny shapes).
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

import numpy as np  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import kernel_bench_util as _util  # noqa: E402
from kernel_bench_util import time_op  # noqa: E402

from gptoss_jax.kernels import GpuTiling, Int4Tensor, dense_matmul, dense_matmul_fused, grouped_matmul  # noqa: E402
from gptoss_jax.kernels import _gpu, _gpu_grouped  # noqa: E402
from gptoss_jax.kernels.reference import dequantize_f64, grouped_matmul_f64, max_rel_err  # noqa: E402

OUT = os.environ.get("OUT") or os.path.join(ROOT, "bench_out")
os.makedirs(OUT, exist_ok=True)
T0 = time.time()
BUDGET = float(os.environ.get("BENCH_BUDGET_S", "420"))
SMALL = os.environ.get("BENCH_SMALL") == "1"
INTERP = SMALL  # kernels interpreted on CPU in the dry run
LOG = open(os.path.join(OUT, "decode_kernels.log"), "w")
RES: dict = dict(rows=[], checks=[], errors=[])
E, H, I, Q, KV, NL = (8, 256, 192, 256, 64, 2) if SMALL else (128, 2880, 2880, 4096, 512, 8)
GROUP, TOPK = 32, 4


def log(*a):
    s = " ".join(str(x) for x in a)
    print(s, flush=True)
    LOG.write(s + "\n")
    LOG.flush()


def err(tag, e):
    msg = f"{tag}: {type(e).__name__}: {str(e)[:1200]}"
    log("ERROR", msg)
    LOG.write(traceback.format_exc() + "\n")
    RES["errors"].append(msg)




def nbytes1(w: Int4Tensor, lead: int) -> float:
    return w.nbytes / lead







def rand_int4(key, lead, k, n, g=GROUP, sym=False):
    return _util.rand_int4(key, lead, k, n, g, sym)


def copy_bw():
    return _util.copy_bw(SMALL)


def row(**kw):
    RES["rows"].append(kw)
    log("ROW", json.dumps(kw))


def routing(rng, tokens):
    ids = np.stack([rng.choice(E, TOPK, replace=False) for _ in range(tokens)]).reshape(-1)
    return np.bincount(ids, minlength=E).astype(np.int32)


def old_grouped(x, w, gs, b, epi):
    return _gpu.grouped_matmul_gpu(x, w.packed, w.scales, w.zeros, w.group_size, gs, b, epilogue=epi, alpha=1.702,
                                   limit=7.0, out_dtype=x.dtype, interpret=INTERP)


def new_grouped(x, w, gs, b, epi, tiling=None):
    return _gpu_grouped.grouped_int4_gpu(x, w.packed, w.scales, w.zeros, w.group_size, gs, b, epilogue=epi,
                                         alpha=1.702, limit=7.0, out_dtype=x.dtype, tiling=tiling, interpret=INTERP)


def main():
    dev = jax.devices()[0]
    RES.update(device=dev.device_kind, jax=jax.__version__,
               date=datetime.datetime.now(datetime.timezone.utc).isoformat(), group=GROUP)
    log(f"device {dev.device_kind}; jax {jax.__version__}; {RES['date']}")
    bw = copy_bw()
    RES["copy_bw"] = bw
    log(f"copy bandwidth {bw / 1e9:.0f} GB/s")
    rng = np.random.default_rng(0)
    keys = jax.random.split(jax.random.PRNGKey(0), 10)
    # attention projections stacked over NL layers (g32 asym), as the scanned model holds them
    wq, wk, wv = (rand_int4(keys[i], (NL,), H, n) for i, n in ((0, Q), (1, KV), (2, KV)))
    wo = rand_int4(keys[3], (NL,), Q, H)
    bq, bk_, bv, bo = (jax.random.normal(keys[4 + i], (NL, n), jnp.float32).astype(jnp.bfloat16) * 0.1
                       for i, n in enumerate((Q, KV, KV, H)))
    w_gu, w_dn = rand_int4(keys[8], (E,), H, 2 * I), rand_int4(keys[9], (E,), I, H)
    b_gu = (jax.random.normal(keys[4], (E, 2 * I)) * 0.1).astype(jnp.bfloat16)
    b_dn = (jax.random.normal(keys[5], (E, H)) * 0.1).astype(jnp.bfloat16)
    kimpl = dict(implementation="gpu", interpret=True) if INTERP else {}

    # ------------------------------------------------------------------ correctness (compiled, vs float64)
    def check(name, dt, y, ref, y_xla=None, tail=None):
        e = max_rel_err(y, ref)
        ex = None if y_xla is None else max_rel_err(y_xla, ref)
        tol = 1e-4 if dt == jnp.float32 else 2 * (ex or 0) + 1e-3
        ok = e <= tol and (tail is None or bool(np.all(np.asarray(y[tail:].astype(jnp.float32)) == 0)))
        RES["checks"].append(dict(op=name, dtype=jnp.dtype(dt).name, err=e, xla_err=ex, tol=tol, ok=ok))
        log(f"CHECK {name} {jnp.dtype(dt).name}: err {e:.2e} (xla {ex if ex is None else f'{ex:.2e}'}) tol "
            f"{tol:.1e} -> {'OK' if ok else 'FAIL'}")

    layer = NL - 1
    for dt in (jnp.bfloat16, jnp.float32):
        try:
            for m in (1, 8):
                x = jnp.asarray(rng.standard_normal((m, H)), dt)
                x64 = np.asarray(x.astype(jnp.float32), np.float64)
                f = jax.jit(lambda x_, ws, bs, l_: dense_matmul_fused(x_, ws, bs, layer=l_, **kimpl))
                ys = f(x, (wq, wk, wv), (bq, bk_, bv), jnp.int32(layer))
                for nm, y, w, b in zip("qkv", ys, (wq, wk, wv), (bq, bk_, bv)):
                    wl = jax.tree.map(lambda a: a[layer], w)
                    ref = x64 @ dequantize_f64(wl) + np.asarray(b[layer].astype(jnp.float32), np.float64)
                    yx = dense_matmul(x, wl, b[layer], implementation="xla")
                    check(f"dense fused {nm} M={m}", dt, y, ref, yx)
                xo = jnp.asarray(rng.standard_normal((m, Q)), dt)
                wl = jax.tree.map(lambda a: a[layer], wo)
                ref = (np.asarray(xo.astype(jnp.float32), np.float64) @ dequantize_f64(wl)
                       + np.asarray(bo[layer].astype(jnp.float32), np.float64))
                y = jax.jit(lambda x_, w_, b_, l_: dense_matmul(x_, w_, b_, layer=l_, **kimpl))(
                    xo, wo, bo, jnp.int32(layer))
                check(f"dense o M={m}", dt, y, ref, dense_matmul(xo, wl, bo[layer], implementation="xla"))
        except Exception as e:
            err(f"dense check {dt}", e)
        for name, w, b, epi in (("gate_up", w_gu, b_gu, "swiglu"), ("down", w_dn, b_dn, None)):
            for tokens in (1, 8):
                try:
                    gs = routing(rng, tokens)
                    m = int(gs.sum()) + 3
                    x = jnp.asarray(rng.standard_normal((m, w.shape[1])), dt)
                    x64 = np.asarray(x.astype(jnp.float32), np.float64)
                    ids = np.nonzero(gs)[0]
                    wd = {int(i): dequantize_f64(jax.tree.map(lambda a: a[int(i)], w)) for i in ids}
                    ref = grouped_matmul_f64(x64, wd, gs, np.asarray(b.astype(jnp.float32), np.float64), epi)
                    gsj = jnp.asarray(gs)
                    yx = grouped_matmul(x, w, gsj, bias=b, epilogue=epi, implementation="xla")
                    for tag, fn in (("new", new_grouped), ("old", old_grouped)):
                        y = jax.jit(lambda x_, w_, g_, b_: fn(x_, w_, g_, b_, epi))(x, w, gsj, b)
                        check(f"grouped {name} {tag} tokens={tokens}", dt, y, ref, yx, tail=int(gs.sum()))
                except Exception as e:
                    err(f"grouped check {name} {dt}", e)

    # ------------------------------------------------------------------ timing
    act = 2  # bf16 bytes

    def dense_rows(m):
        lay = jnp.arange(NL, dtype=jnp.int32)
        sets = [(jnp.asarray(rng.standard_normal((m, H)), jnp.bfloat16), lay[i]) for i in range(NL)]
        qkv_bytes = sum(nbytes1(w, NL) for w in (wq, wk, wv)) + m * H * act + m * (Q + 2 * KV) * act
        p = ((wq, wk, wv), (bq, bk_, bv))
        variants = [
            ("xla int4 x3 (before)", lambda p_, x, l_: tuple(dense_matmul(x, w, b, implementation="xla", layer=l_)
                                                          for w, b in zip(*p_))),
            ("kernel x3", lambda p_, x, l_: tuple(dense_matmul(x, w, b, layer=l_, **kimpl) for w, b in zip(*p_))),
            ("fused kernel, one launch", lambda p_, x, l_: dense_matmul_fused(x, p_[0], p_[1], layer=l_, **kimpl)),
        ]
        for vname, fn in variants:
            try:
                t = time_op(fn, p, sets)
                row(op="dense q+k+v 2880->4096+512+512", m=m, variant=vname, us=t * 1e6, gbps=qkv_bytes / t / 1e9,
                    pct_copy=100 * qkv_bytes / t / bw)
            except Exception as e:
                err(f"time qkv {vname} m={m}", e)
        sets_o = [(jnp.asarray(rng.standard_normal((m, Q)), jnp.bfloat16), lay[i]) for i in range(NL)]
        o_bytes = nbytes1(wo, NL) + m * (Q + H) * act
        for vname, kw in (("xla int4 (before)", dict(implementation="xla")), ("kernel", kimpl)):
            try:
                t = time_op(lambda p_, x, l_: dense_matmul(x, p_[0], p_[1], layer=l_, **kw), (wo, bo), sets_o)
                row(op="dense o 4096->2880", m=m, variant=vname, us=t * 1e6, gbps=o_bytes / t / 1e9,
                    pct_copy=100 * o_bytes / t / bw)
            except Exception as e:
                err(f"time o {vname} m={m}", e)

    def grouped_rows(tokens, sweep):
        for name, w, b, epi in (("gate_up 2880->5760 +swiglu", w_gu, b_gu, "swiglu"),
                                ("down 2880->2880", w_dn, b_dn, None)):
            sets = []
            touched = []
            for _ in range(8 if tokens <= 8 else 4):
                gs = routing(rng, tokens)
                touched.append(int(np.count_nonzero(gs)))
                sets.append((jnp.asarray(rng.standard_normal((int(gs.sum()), w.shape[1])), jnp.bfloat16),
                             jnp.asarray(gs)))
            m = tokens * TOPK
            n_out = w.shape[2] // 2 if epi else w.shape[2]
            by = (nbytes1(w, E) + b.shape[1] * 2) * float(np.mean(touched)) + m * (w.shape[1] + n_out) * act
            variants = [("old kernel (_gpu.py)", lambda p, x, g: old_grouped(x, p[0], g, p[1], epi)),
                        ("new kernel (nibble planes)", lambda p, x, g: new_grouped(x, p[0], g, p[1], epi))]
            if sweep:
                for tl in (dict(bn=64), dict(bn=256), dict(bk=512), dict(bk=128), dict(num_warps=8),
                           dict(num_stages=2), dict(num_stages=4)):
                    variants.append((f"new {tl}", lambda p, x, g, tl=tl: new_grouped(x, p[0], g, p[1], epi,
                                                                                     GpuTiling(**tl))))
            for vname, fn in variants:
                if time.time() - T0 > BUDGET:
                    log("budget: skipped", name, tokens, vname)
                    continue
                try:
                    t = time_op(fn, (w, b), sets)
                    row(op=name, tokens=tokens, variant=vname, us=t * 1e6, gbps=by / t / 1e9,
                        pct_copy=100 * by / t / bw)
                except Exception as e:
                    err(f"time {name} {vname} tokens={tokens}", e)

    for m in (1, 8, 64):
        dense_rows(m)
    grouped_rows(1, sweep=not SMALL)
    for tokens in ((8,) if SMALL else (8, 64, 256)):
        grouped_rows(tokens, sweep=False)

    # ------------------------------------------------------------------ table
    log("\n| op | M / tokens | variant | µs | GB/s | % copy bw |\n|---|---|---|---|---|---|")
    for r in RES["rows"]:
        log(f"| {r['op']} | {r.get('m', r.get('tokens'))} | {r['variant']} | {r['us']:.1f} | {r['gbps']:.0f} | "
            f"{r['pct_copy']:.0f} % |")
    log(f"checks: {sum(c['ok'] for c in RES['checks'])}/{len(RES['checks'])} OK; errors: {len(RES['errors'])}; "
        f"{time.time() - T0:.0f} s")
    with open(os.path.join(OUT, "decode_kernels.json"), "w") as f:
        json.dump(RES, f, indent=1, default=str)


if __name__ == "__main__":
    main()
