"""The row-wise int4 GEMV kernel (``_gpu_gemv``) against the kernels it replaces at decode, gpt-oss-120b shapes, in
ONE run on one GPU (from the repo root):

    python3 bench/bench_gemv.py          # log + gemv.json under $OUT (or ./bench_out)

1. Same-run copy bandwidth (``a + 1`` on 2 GiB of bf16: read + write).
2. Correctness against float64 numpy (exact int4 codes), compiled: the MoE straight from router ids
   (``routed_matmul``: gate_up +bias +SwiGLU, down +bias) at 1 and 8 tokens with one dead id, and dense q/k/v fused
   and o at M = 1 through ``dense_matmul_fused`` / ``dense_matmul`` (layer-stacked weights, ``layer=``), bf16 and
   f32. bf16 passes within 2x the XLA path's own error + 1e-3; f32 within 1e-4; NaN never passes.
3. Timing (median of repeats of R ops inside one jit): MoE at 1 / 2 / 4 / 8 tokens (top-4 random routing, different
   experts every op): the row-wise kernel (a tiling sweep at 1 token) vs the sort + grouped nibble-plane kernel +
   un-sort path it replaces (``GPTOSS_GEMV_MAX_ROWS=0,0``: what the model ran before); dense q+k+v and o at M = 1:
   row-wise vs the fused dense kernel; the router matmul variants at M = 1 and 64.
   Bytes = packed words + scales + zeros of what the op must read (touched experts) + activations in/out.
BENCH_SMALL=1: a CPU dry run (interpret mode, tiny shapes).
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

from gptoss_jax.kernels import dense_matmul, dense_matmul_fused, routed_matmul  # noqa: E402
from gptoss_jax.kernels import _gpu_gemv  # noqa: E402
from gptoss_jax.kernels.reference import dequantize_f64, max_rel_err, routed_matmul_f64  # noqa: E402

OUT = os.environ.get("OUT") or os.path.join(ROOT, "bench_out")
os.makedirs(OUT, exist_ok=True)
T0 = time.time()
BUDGET = float(os.environ.get("BENCH_BUDGET_S", "300"))
SMALL = os.environ.get("BENCH_SMALL") == "1"
LOG = open(os.path.join(OUT, "gemv.log"), "w")
RES: dict = dict(rows=[], checks=[], errors=[])
E, H, I, Q, KV, NL = (8, 256, 192, 256, 64, 2) if SMALL else (128, 2880, 2880, 4096, 512, 8)
GROUP, TOPK = 32, 4
KIMPL = dict(implementation="gpu", interpret=True) if SMALL else dict(implementation="gpu")
# Tiling sweep of the row-wise kernel at 1 token (gate_up); the fastest (with the default) is written to
# $OUT/gemv_best.json as a JSON object of GemvTiling fields (bench/run_gemv.sh passes it on as GPTOSS_GEMV_TILING).
SWEEP = [dict(dequant="exact"), dict(bn=64), dict(bn=256), dict(num_warps=8), dict(bn=256, num_warps=8),
         dict(step_words=64), dict(num_stages=4), dict(splits=2), dict(splits=12)]
BEST: dict = {}


def log(*a):
    s = " ".join(str(x) for x in a)
    print(s, flush=True)
    LOG.write(s + "\n")
    LOG.flush()


def err(tag, e):
    msg = f"{tag}: {type(e).__name__}: {str(e)[:1500]}"
    log("ERROR", msg)
    LOG.write(traceback.format_exc() + "\n")
    RES["errors"].append(msg)









def rand_int4(key, lead, k, n, g=GROUP, sym=False):
    return _util.rand_int4(key, lead, k, n, g, sym)


def copy_bw():
    return _util.copy_bw(SMALL)


def row(**kw):
    RES["rows"].append(kw)
    log("ROW", json.dumps(kw))


def main():
    dev = jax.devices()[0]
    RES.update(device=dev.device_kind, jax=jax.__version__,
               date=datetime.datetime.now(datetime.timezone.utc).isoformat(), group=GROUP)
    log(f"device {dev.device_kind}; jax {jax.__version__}; {RES['date']}")
    bw = copy_bw()
    RES["copy_bw"] = bw
    log(f"copy bandwidth {bw / 1e9:.0f} GB/s")
    rng = np.random.default_rng(0)
    keys = jax.random.split(jax.random.PRNGKey(0), 12)
    wq, wk, wv = (rand_int4(keys[i], (NL,), H, n) for i, n in ((0, Q), (1, KV), (2, KV)))
    wo = rand_int4(keys[3], (NL,), Q, H)
    bq, bk_, bv, bo = (jax.random.normal(keys[4 + i], (NL, n), jnp.float32).astype(jnp.bfloat16) * 0.1
                       for i, n in enumerate((Q, KV, KV, H)))
    w_gu, w_dn = rand_int4(keys[8], (E,), H, 2 * I), rand_int4(keys[9], (E,), I, H)
    b_gu = (jax.random.normal(keys[10], (E, 2 * I)) * 0.1).astype(jnp.bfloat16)
    b_dn = (jax.random.normal(keys[11], (E, H)) * 0.1).astype(jnp.bfloat16)

    def route(tokens):
        ids = np.stack([rng.choice(E, TOPK, replace=False) for _ in range(tokens)]).reshape(-1).astype(np.int32)
        return ids, (np.arange(tokens * TOPK) // TOPK).astype(np.int32)

    def check(name, dt, y, ref, y_xla=None):
        e = max_rel_err(y, ref)
        ex = None if y_xla is None else max_rel_err(y_xla, ref)
        tol = 1e-4 if dt == jnp.float32 else 2 * (ex or 0) + 1e-3
        ok = e <= tol
        RES["checks"].append(dict(op=name, dtype=jnp.dtype(dt).name, err=e, xla_err=ex, tol=tol, ok=ok))
        log(f"CHECK {name} {jnp.dtype(dt).name}: err {e:.2e} (xla {ex if ex is None else f'{ex:.2e}'}) tol "
            f"{tol:.1e} -> {'OK' if ok else 'FAIL'}")

    # ------------------------------------------------------------------ correctness (compiled, vs float64)
    f64 = lambda a: np.asarray(jnp.asarray(a).astype(jnp.float32), np.float64)  # noqa: E731

    def ref_of(x, w, ids, rows, b, epi):
        # dequantize only the touched experts (all 128 in float64 would be ~17 GB)
        touched = sorted({int(i) for i in ids if i >= 0})
        sub = jax.tree.map(lambda a: a[np.asarray(touched)], w)
        remap = np.array([touched.index(int(i)) if i >= 0 else -1 for i in ids], np.int32)
        return routed_matmul_f64(f64(x), dequantize_f64(sub), remap, rows, f64(b)[np.asarray(touched)], epi)
    for dt in (jnp.bfloat16, jnp.float32):
        for tokens in ((1, 8) if dt == jnp.bfloat16 else (1,)):
            try:
                ids, rows = route(tokens)
                ids[1] = -1  # a dead row (an expert on another shard)
                x = jnp.asarray(rng.standard_normal((tokens, H)), dt)
                fn = jax.jit(lambda x_, w_, i_, r_, b_: routed_matmul(x_, w_, i_, rows=r_, bias=b_,
                                                                      epilogue="swiglu", **KIMPL))
                y = fn(x, w_gu, jnp.asarray(ids), jnp.asarray(rows), b_gu)
                ref = ref_of(x, w_gu, ids, rows, b_gu, "swiglu")
                yx = jax.jit(lambda x_, w_, i_, r_, b_: routed_matmul(x_, w_, i_, rows=r_, bias=b_, epilogue="swiglu",
                                                                      implementation="xla"))(
                    x, w_gu, jnp.asarray(ids), jnp.asarray(rows), b_gu)
                check(f"routed gate_up tokens={tokens}", dt, y, ref, yx)
                h = jnp.asarray(rng.standard_normal((tokens * TOPK, I)), dt)
                y = jax.jit(lambda h_, w_, i_, b_: routed_matmul(h_, w_, i_, bias=b_, **KIMPL))(
                    h, w_dn, jnp.asarray(ids), b_dn)
                ref = ref_of(h, w_dn, ids, None, b_dn, None)
                yx = jax.jit(lambda h_, w_, i_, b_: routed_matmul(h_, w_, i_, bias=b_, implementation="xla"))(
                    h, w_dn, jnp.asarray(ids), b_dn)
                check(f"routed down tokens={tokens}", dt, y, ref, yx)
            except Exception as e:
                err(f"routed check {dt} tokens={tokens}", e)
        if dt == jnp.float32:
            continue
        try:
            layer = NL - 1
            x = jnp.asarray(rng.standard_normal((1, H)), dt)
            ys = jax.jit(lambda x_, ws, bs, l_: dense_matmul_fused(x_, ws, bs, layer=l_, **KIMPL))(
                x, (wq, wk, wv), (bq, bk_, bv), jnp.int32(layer))
            for nm, y, w, b in zip("qkv", ys, (wq, wk, wv), (bq, bk_, bv)):
                wl = jax.tree.map(lambda a: a[layer], w)
                check(f"dense fused {nm} M=1", dt, y, f64(x) @ dequantize_f64(wl) + f64(b[layer]),
                      dense_matmul(x, wl, b[layer], implementation="xla"))
            xo = jnp.asarray(rng.standard_normal((1, Q)), dt)
            wl = jax.tree.map(lambda a: a[layer], wo)
            y = jax.jit(lambda x_, w_, b_, l_: dense_matmul(x_, w_, b_, layer=l_, **KIMPL))(
                xo, wo, bo, jnp.int32(layer))
            check("dense o M=1", dt, y, f64(xo) @ dequantize_f64(wl) + f64(bo[layer]),
                  dense_matmul(xo, wl, bo[layer], implementation="xla"))
        except Exception as e:
            err(f"dense check {dt}", e)

    # ------------------------------------------------------------------ timing
    act = 2
    per_expert = {id(w_gu): w_gu.nbytes / E, id(w_dn): w_dn.nbytes / E}

    def moe_rows(tokens, sweep):
        for name, w, b, epi, k_in in (("gate_up 2880->5760 +swiglu", w_gu, b_gu, "swiglu", H),
                                      ("down 2880->2880", w_dn, b_dn, None, I)):
            sets, touched = [], []
            for _ in range(8):
                ids, rows = route(tokens)
                touched.append(len(set(ids.tolist())))
                m_in = tokens if epi else tokens * TOPK
                sets.append((jnp.asarray(rng.standard_normal((m_in, k_in)), jnp.bfloat16), jnp.asarray(ids),
                             jnp.asarray(rows if epi else np.arange(tokens * TOPK, dtype=np.int32))))
            n_out = w.shape[2] // 2 if epi else w.shape[2]
            by = per_expert[id(w)] * float(np.mean(touched)) + tokens * TOPK * (k_in + n_out) * act

            def mk(**kw):
                return lambda p, x, i, r: routed_matmul(x, p[0], i, rows=r, bias=p[1], epilogue=epi, **kw)

            variants = [("sort + grouped kernel + unsort (before)", mk()),
                        ("row-wise kernel", mk(**KIMPL))]
            if sweep and epi:
                for tl in SWEEP:
                    variants.append((f"row-wise {json.dumps(tl)}", mk(tiling=_gpu_gemv.GemvTiling(**tl), **KIMPL)))
            if BEST and not (sweep and epi):
                variants.append((f"row-wise best {json.dumps(BEST)}", mk(tiling=_gpu_gemv.GemvTiling(**BEST), **KIMPL)))
            for vname, fn in variants:
                if time.time() - T0 > BUDGET:
                    log("budget: skipped", name, tokens, vname)
                    continue
                try:
                    if vname.endswith("(before)"):
                        os.environ[_gpu_gemv.ENV_VAR] = "0,0"  # auto = the sorted grouped path
                    t = time_op(fn, (w, b), sets)
                    row(op=name, tokens=tokens, variant=vname, us=t * 1e6, gbps=by / t / 1e9,
                        pct_copy=100 * by / t / bw, touched=float(np.mean(touched)))
                except Exception as e:
                    err(f"time {name} {vname} tokens={tokens}", e)
                finally:
                    os.environ.pop(_gpu_gemv.ENV_VAR, None)

    def dense_rows():
        lay = jnp.arange(NL, dtype=jnp.int32)
        sets = [(jnp.asarray(rng.standard_normal((1, H)), jnp.bfloat16), lay[i]) for i in range(NL)]
        qkv_bytes = sum(w.nbytes / NL for w in (wq, wk, wv)) + H * act + (Q + 2 * KV) * act
        p = ((wq, wk, wv), (bq, bk_, bv))
        variants = [("fused dense kernel (before)", "16,0", None), ("row-wise", "16,1", None)]
        if BEST:
            variants.append((f"row-wise best {json.dumps(BEST)}", "16,1", BEST))
        for vname, env, tl in variants:
            if tl is None:
                fn = lambda p_, x, l_: dense_matmul_fused(x, p_[0], p_[1], layer=l_)  # noqa: E731
            else:
                fn = (lambda p_, x, l_, tl=tl: _gpu_gemv.dense_rowwise_gpu(  # noqa: E731
                    x, p_[0], p_[1], out_dtype=jnp.float32, layer=l_, tiling=_gpu_gemv.GemvTiling(**tl),
                    interpret=SMALL))
            timed("dense q+k+v 2880->4096+512+512", vname, env, fn, p, sets, qkv_bytes)
        sets_o = [(jnp.asarray(rng.standard_normal((1, Q)), jnp.bfloat16), lay[i]) for i in range(NL)]
        o_bytes = wo.nbytes / NL + (Q + H) * act
        for vname, env in (("dense kernel (before)", "16,0"), ("row-wise", "16,1")):
            timed("dense o 4096->2880", vname, env, lambda p_, x, l_: dense_matmul(x, p_[0], p_[1], layer=l_),
                  (wo, bo), sets_o, o_bytes)

    def timed(op, vname, env, fn, params, sets, nbytes):
        """One M = 1 row of the table, with GPTOSS_GEMV_MAX_ROWS=env while the op is traced."""
        try:
            os.environ[_gpu_gemv.ENV_VAR] = env
            t = time_op(fn, params, sets)
            row(op=op, m=1, variant=vname, us=t * 1e6, gbps=nbytes / t / 1e9, pct_copy=100 * nbytes / t / bw)
        except Exception as e:
            err(f"time {op} {vname}", e)
        finally:
            os.environ.pop(_gpu_gemv.ENV_VAR, None)

    def router_rows():
        w = jax.random.normal(keys[0], (NL, H, E), jnp.float32).astype(jnp.bfloat16)
        for m in (1, 64):
            sets = [(jnp.asarray(rng.standard_normal((m, H)), jnp.bfloat16), jnp.int32(i)) for i in range(NL)]
            variants = (
                ("f32 HIGHEST (model today)", lambda w_, x, l_: jnp.dot(
                    x.astype(jnp.float32), w_[l_].astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)),
                ("bf16 dot, f32 accumulation", lambda w_, x, l_: jnp.dot(
                    x, w_[l_], preferred_element_type=jnp.float32)),
                ("f32 multiply + reduce", lambda w_, x, l_: jnp.sum(
                    x.astype(jnp.float32)[:, :, None] * w_[l_].astype(jnp.float32)[None], axis=1)),
            )
            for vname, fn in variants:
                try:
                    t = time_op(fn, w, sets)
                    by = H * E * 2 + m * H * 2 + m * E * 4
                    row(op="router 2880->128", m=m, variant=vname, us=t * 1e6, gbps=by / t / 1e9,
                        pct_copy=100 * by / t / bw)
                except Exception as e:
                    err(f"time router {vname} m={m}", e)

    moe_rows(1, sweep=True)
    sweep = [r for r in RES["rows"] if r["op"].startswith("gate_up") and r["tokens"] == 1 and
             r["variant"].startswith("row-wise")]
    if sweep:
        best = min(sweep, key=lambda r: r["us"])
        BEST.update({} if best["variant"] == "row-wise kernel" else json.loads(best["variant"][len("row-wise "):]))
        RES["best_tiling"] = dict(BEST)
        log(f"best row-wise tiling at 1 token: {BEST or 'default'} ({best['us']:.1f} us)")
        with open(os.path.join(OUT, "gemv_best.json"), "w") as f:
            json.dump(BEST, f)
    dense_rows()
    for tokens in ((2,) if SMALL else (4, 8)):
        moe_rows(tokens, sweep=False)
    router_rows()

    log("\n| op | M / tokens | variant | µs | GB/s | % copy bw |\n|---|---|---|---|---|---|")
    for r in RES["rows"]:
        log(f"| {r['op']} | {r.get('m', r.get('tokens'))} | {r['variant']} | {r['us']:.1f} | {r['gbps']:.0f} | "
            f"{r['pct_copy']:.0f} % |")
    log(f"checks: {sum(c['ok'] for c in RES['checks'])}/{len(RES['checks'])} OK; errors: {len(RES['errors'])}; "
        f"{time.time() - T0:.0f} s")
    with open(os.path.join(OUT, "gemv.json"), "w") as f:
        json.dump(RES, f, indent=1, default=str)


if __name__ == "__main__":
    main()
