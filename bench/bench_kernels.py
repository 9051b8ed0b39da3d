"""Correctness + timing of the grouped/dense int4 kernels at gpt-oss-120b shapes (run on one GPU from the repo root).

    python3 bench/bench_kernels.py            # logs and results.json under $OUT (or ./bench_out)

1. HBM roofline: median time of a large jnp copy (read + write) in the same run.
2. Correctness at 120b shapes (128 experts; grouped 2880->5760 (+bias, fused swiglu) and 2880->2880 (+bias);
   dense 2880->4096/512/512 and 4096->2880), bf16 activations: the "gpu" kernel and the "xla" path against a
   float64 numpy reference built from the exact int4 codes; the kernel must be finite and within 2x the XLA
   path's own error (+1e-3 of max|ref|). Also a float32 run (tolerance 1e-4 relative).
3. Timing for batch 1, 8, 64, 256 tokens (top-4 random routing -> M = 4 x tokens rows, different experts for
   every call so that L2 (50 MB) does not serve repeated experts): each variant is run R times inside one jit
   (distinct routings/inputs), several jit calls are queued back to back, time per op = wall / (calls x R),
   median over repeats. Bytes = what the op must move: packed words + scales + zeros of the TOUCHED experts
   (+ bias rows) + activations in + out; bf16 ragged_dot: touched experts' bf16 weights + activations.
   % roofline = (bytes / time) / copy bandwidth.
Every variant is wrapped in try/except so one failure does not lose the rest; a global time budget
(BENCH_BUDGET_S, default 400 s) skips what does not fit. The table is printed last.
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

from gptoss_jax.kernels import GpuTiling, Int4Tensor, clamped_swiglu, dense_matmul, grouped_matmul  # noqa: E402
from gptoss_jax.kernels.reference import grouped_matmul_f64, max_rel_err  # noqa: E402
from gptoss_jax.kernels.int4_layout import dequantize, unpack  # noqa: E402

OUT = os.environ.get("OUT") or os.path.join(ROOT, "bench_out")
os.makedirs(OUT, exist_ok=True)
T0 = time.time()
BUDGET = float(os.environ.get("BENCH_BUDGET_S", "400"))
QUICK = os.environ.get("BENCH_QUICK") == "1"
LOG = open(os.path.join(OUT, "bench.log"), "w")
RESULTS: dict = dict(rows=[], checks=[], errors=[])

E, H, I = 128, 2880, 2880  # experts, hidden, intermediate
SMALL = os.environ.get("BENCH_SMALL") == "1"  # CPU dry run of the script itself (interpret mode, tiny shapes)
if SMALL:
    E, H, I = 8, 256, 192
TOPK = 4
GROUP = int(os.environ.get("BENCH_GROUP", "32"))
SYM = os.environ.get("BENCH_SYM") == "1"
BATCHES = [1, 8, 64, 256]


def log(*a):
    s = " ".join(str(x) for x in a)
    print(s, flush=True)
    LOG.write(s + "\n")
    LOG.flush()


def elapsed():
    return time.time() - T0


def over_budget(margin=0.0):
    return elapsed() > BUDGET - margin


def err(tag, e):
    msg = f"{tag}: {type(e).__name__}: {str(e)[:1500]}"
    log("ERROR", msg)
    LOG.write(traceback.format_exc() + "\n")
    RESULTS["errors"].append(msg)


# --------------------------------------------------------------------------------------------------- data
def rand_int4(key, e, k, n, g=GROUP, sym=SYM, scale=0.01):
    k1, k2, k3 = jax.random.split(key, 3)
    packed = jax.lax.bitcast_convert_type(jax.random.bits(k1, (e, k // 8, n), jnp.uint32), jnp.int32)
    scales = (jax.random.uniform(k2, (e, k // g, n), jnp.float32, 0.5, 1.5) * scale).astype(jnp.bfloat16)
    zeros = None if sym else jax.random.randint(k3, (e, k // g, n), 0, 16, jnp.int32).astype(jnp.uint8)
    return Int4Tensor(packed, scales, zeros, g)


def int4_bytes(w: Int4Tensor, experts: float) -> float:
    e = w.packed.shape[0]
    return w.nbytes / e * experts


def routing(rng, tokens, e=E, k=TOPK):
    """Sorted top-k assignment of `tokens` tokens -> group_sizes [e] (sum = tokens * k)."""
    ids = np.stack([rng.choice(e, k, replace=False) for _ in range(tokens)]).reshape(-1)
    return np.bincount(ids, minlength=e).astype(np.int32)


def np_dequant(w: Int4Tensor, ids):
    out = {}
    for i in ids:
        q = np.asarray(unpack(np.asarray(w.packed[i]))).astype(np.float64)
        s = np.repeat(np.asarray(w.scales[i].astype(jnp.float32)).astype(np.float64), w.group_size, axis=0)
        z = 8.0 if w.zeros is None else np.repeat(np.asarray(w.zeros[i]).astype(np.float64), w.group_size, axis=0)
        out[int(i)] = (q - z) * s
    return out


# --------------------------------------------------------------------------------------------------- timing
def time_op(fn, params, arg_sets, *, calls=3, repeats=5):
    """fn(params, *args) one op; params (weights) are jit ARGUMENTS (never captured constants); arg_sets: R tuples.
    Returns median seconds per op."""
    r = len(arg_sets)
    jf = jax.jit(lambda p, sets: [fn(p, *a) for a in sets])
    jax.block_until_ready(jf(params, arg_sets))
    samples = []
    for _ in range(repeats):
        t = time.perf_counter()
        outs = [jf(params, arg_sets) for _ in range(calls)]
        jax.block_until_ready(outs)
        samples.append((time.perf_counter() - t) / (calls * r))
    return statistics.median(samples)


def hbm_copy_bw():
    n = (1 << 30) if not SMALL else (1 << 22)  # 2 GiB of bf16
    a = jnp.zeros((n,), jnp.bfloat16)
    f = jax.jit(lambda v: v + jnp.bfloat16(1))
    jax.block_until_ready(f(a))
    ts = []
    for _ in range(10):
        t = time.perf_counter()
        jax.block_until_ready(f(a))
        ts.append(time.perf_counter() - t)
    sec = statistics.median(ts)
    del a
    return 2 * n * 2 / sec, sec


def add_row(**kw):
    RESULTS["rows"].append(kw)
    log("ROW", json.dumps(kw))


# --------------------------------------------------------------------------------------------------- main
def main():
    dev = jax.devices()[0]
    log(f"device: {dev.device_kind} ({dev.platform}); jax {jax.__version__}; jaxlib "
        f"{getattr(jax.lib, '__version__', '?')}; date {datetime.datetime.now(datetime.timezone.utc).isoformat()}")
    RESULTS.update(device=dev.device_kind, jax=jax.__version__, group_size=GROUP, symmetric=SYM)
    try:
        bw, sec = hbm_copy_bw()
    except Exception as e:  # pragma: no cover
        err("hbm copy", e)
        bw, sec = 2.7e12, float("nan")
    RESULTS["copy_bw"] = bw
    log(f"HBM copy bandwidth: {bw / 1e9:.0f} GB/s (2 GiB read + 2 GiB write in {sec * 1e3:.2f} ms)")

    key = jax.random.PRNGKey(0)
    kgu, kdn, kb1, kb2, kq, kk, kv, ko = jax.random.split(key, 8)
    w_gu = rand_int4(kgu, E, H, 2 * I)
    w_dn = rand_int4(kdn, E, I, H)
    b_gu = (jax.random.normal(kb1, (E, 2 * I), jnp.float32) * 0.1).astype(jnp.bfloat16)
    b_dn = (jax.random.normal(kb2, (E, H), jnp.float32) * 0.1).astype(jnp.bfloat16)
    dense_ws = {
        "q 2880->4096": (rand_int4(kq, 1, H, 4096)[0], 4096),
        "k 2880->512": (rand_int4(kk, 1, H, 512)[0], 512),
        "v 2880->512": (rand_int4(kv, 1, H, 512)[0], 512),
        "o 4096->2880": (rand_int4(ko, 1, 4096, H)[0], H),
    } if not SMALL else {"q 2880->4096": (rand_int4(kq, 1, H, 128)[0], 128)}
    rng = np.random.default_rng(0)

    # ---------------------------------------------------------------- correctness at 120b shapes
    gpu_ok = {}
    for name, w, b, epi in [("gate_up 2880->5760 +swiglu", w_gu, b_gu, "swiglu"), ("down 2880->2880", w_dn, b_dn, None)]:
        for dt, ntok in ((jnp.bfloat16, 8), (jnp.float32, 8), (jnp.bfloat16, 1)):
            try:
                gs = routing(rng, ntok)
                m = int(gs.sum()) + 3  # 3 trailing rows past sum(group_sizes) must come out as 0
                x = (rng.standard_normal((m, w.shape[1]))).astype(np.float32)
                xj = jnp.asarray(x, dt)
                x64 = np.asarray(xj.astype(jnp.float32)).astype(np.float64)
                wd = np_dequant(w, np.nonzero(gs)[0])
                bn = np.asarray(b.astype(jnp.float32)).astype(np.float64)
                ref = grouped_matmul_f64(x64, wd, gs, bn, epi)
                gsj = jnp.asarray(gs)
                res = {}
                for impl in ("xla", "gpu"):
                    y = jax.jit(lambda x_, g_, w_, b_: grouped_matmul(x_, w_, g_, bias=b_, epilogue=epi,
                                                                      implementation=impl))(xj, gsj, w, b)
                    res[impl] = max_rel_err(y, ref)
                    tail_zero = bool(np.all(np.asarray(y[int(gs.sum()):].astype(jnp.float32)) == 0))
                    res[impl + "_tail0"] = tail_zero
                tol = 1e-4 if dt == jnp.float32 else 2 * res["xla"] + 1e-3
                ok = res["gpu"] <= tol and res["gpu_tail0"]
                gpu_ok[name] = gpu_ok.get(name, True) and ok
                RESULTS["checks"].append(dict(op=name, dtype=jnp.dtype(dt).name, m=m, **res, tol=tol, ok=ok))
                log(f"CHECK {name} {jnp.dtype(dt).name} M={m}: rel err gpu {res['gpu']:.2e} xla {res['xla']:.2e} "
                    f"tol {tol:.1e} tail0 {res['gpu_tail0']} -> {'OK' if ok else 'FAIL'}")
            except Exception as e:
                gpu_ok[name] = False
                err(f"check {name} {dt}", e)
    for name, (w, n) in dense_ws.items():
        try:
            x = jnp.asarray(rng.standard_normal((8, w.shape[0])), jnp.bfloat16)
            bias = jnp.asarray(rng.standard_normal((n,)) * 0.1, jnp.bfloat16)
            x64 = np.asarray(x.astype(jnp.float32)).astype(np.float64)
            wd = np_dequant(Int4Tensor(w.packed[None], w.scales[None], None if w.zeros is None else w.zeros[None],
                                       w.group_size), [0])[0]
            ref = x64 @ wd + np.asarray(bias.astype(jnp.float32))
            res = {impl: max_rel_err(jax.jit(lambda x_, w_, b_: dense_matmul(x_, w_, b_, implementation=impl))(x, w, bias),
                                 ref) for impl in ("xla", "gpu")}
            ok = res["gpu"] <= 2 * res["xla"] + 1e-3
            gpu_ok[name] = ok
            RESULTS["checks"].append(dict(op="dense " + name, dtype="bfloat16", m=8, **res, ok=ok))
            log(f"CHECK dense {name}: rel err gpu {res['gpu']:.2e} xla {res['xla']:.2e} -> {'OK' if ok else 'FAIL'}")
        except Exception as e:
            gpu_ok[name] = False
            err(f"check dense {name}", e)

    # ---------------------------------------------------------------- timing
    w_gu_bf16 = w_dn_bf16 = None
    try:
        w_gu_bf16 = jax.random.normal(kgu, (E, H, 2 * I), jnp.bfloat16) * 0.02
        w_dn_bf16 = jax.random.normal(kdn, (E, I, H), jnp.bfloat16) * 0.02
    except Exception as e:
        err("bf16 weights", e)

    w_alt = {}
    try:
        w_alt["gate_up 2880->5760 +swiglu"] = rand_int4(kq, E, H, 2 * I, g=64, sym=True)
        w_alt["down 2880->2880"] = rand_int4(kk, E, I, H, g=64, sym=True)
    except Exception as e:
        err("g64 weights", e)

    def grouped_variants(opname, w, b, wbf, epi):
        n_out = w.shape[2] // 2 if epi else w.shape[2]

        def kern(tiling=None):
            return lambda p, x, gs: grouped_matmul(x, p[0], gs, bias=p[1], epilogue=epi, implementation="gpu",
                                                   tiling=tiling)

        def xla(p, x, gs):
            return grouped_matmul(x, p[0], gs, bias=p[1], epilogue=epi, implementation="xla")

        def naive(p, x, gs):
            y = jax.lax.ragged_dot(x, dequantize(p[0], jnp.bfloat16), gs, preferred_element_type=jnp.float32)
            y = y + jnp.repeat(p[1], gs, axis=0, total_repeat_length=x.shape[0]).astype(jnp.float32)
            return (clamped_swiglu(y) if epi else y).astype(jnp.bfloat16)

        def bf16(p, x, gs):
            y = jax.lax.ragged_dot(x, p[0], gs, preferred_element_type=jnp.float32)
            y = y + jnp.repeat(p[1], gs, axis=0, total_repeat_length=x.shape[0]).astype(jnp.float32)
            return (clamped_swiglu(y) if epi else y).astype(jnp.bfloat16)

        variants = [
            ("pallas-gpu int4 (default tiling: bn=128, auto split-K)", kern(), w, (w, b), 16),
            ("pallas-gpu int4 splits=1 (no split-K)", kern(GpuTiling(splits=1)), w, (w, b), 16),
            ("pallas-gpu int4 bn=64", kern(GpuTiling(bn=64)), w, (w, b), 16),
            ("pallas-gpu int4 bn=32", kern(GpuTiling(bn=32)), w, (w, b), 16),
            ("pallas-gpu int4 splits=9", kern(GpuTiling(splits=9)), w, (w, b), 16),
        ]
        if opname in w_alt:
            variants.append(("pallas-gpu int4 g=64 sym (default tiling)", kern(), w_alt[opname], (w_alt[opname], b),
                             16))
        return n_out, variants + [
            ("xla int4 (touched experts, ragged_dot)", xla, w, (w, b), 8),
            ("naive xla (dequant ALL + ragged_dot)", naive, w, (w, b), 2),
            ("bf16 ragged_dot (XLA)", bf16, "bf16", (wbf, b), 8),
        ]

    ops = [("gate_up 2880->5760 +swiglu", w_gu, b_gu, w_gu_bf16, "swiglu"),
           ("down 2880->2880", w_dn, b_dn, w_dn_bf16, None)]
    batches = [1, 8] if SMALL else [1, 64] if QUICK else BATCHES
    for tokens in batches:
        for opname, w, b, wbf, epi in ops:
            n_out, variants = grouped_variants(opname, w, b, wbf, epi)
            k, n = w.shape[1], w.shape[2]
            for vname, fn, wkind, params, r in variants:
                if over_budget(60):
                    log(f"SKIP (budget) {opname} B={tokens} {vname}")
                    continue
                if vname.startswith("pallas") and not gpu_ok.get(opname, False):
                    log(f"SKIP (failed check) {opname} {vname}")
                    continue
                if ("bn=" in vname or "g=64" in vname or "splits=" in vname) and \
                        tokens not in (1, 64):
                    continue
                if wkind == "bf16" and wbf is None:
                    continue
                try:
                    sets, touched = [], []
                    for _ in range(r):
                        gs = routing(rng, tokens)
                        m = int(gs.sum())
                        touched.append(int(np.count_nonzero(gs)))
                        sets.append((jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16), jnp.asarray(gs)))
                    sec = time_op(fn, params, sets, calls=3 if r > 2 else 2, repeats=5 if r > 2 else 3)
                    t_avg = float(np.mean(touched))
                    act = m * k * 2 + m * n_out * 2
                    if isinstance(wkind, Int4Tensor):
                        nbytes = int4_bytes(wkind, t_avg) + t_avg * n * 2 + act
                    else:
                        nbytes = t_avg * k * n * 2 + t_avg * n * 2 + act
                    add_row(op=opname, tokens=tokens, m=m, variant=vname, touched=t_avg, us=sec * 1e6,
                            mb=nbytes / 1e6, gbs=nbytes / sec / 1e9, pct=100 * nbytes / sec / bw)
                except Exception as e:
                    err(f"time {opname} B={tokens} {vname}", e)

    for tokens in batches:
        for name, (w, n) in dense_ws.items():
            k = w.shape[0]
            wbf = jax.random.normal(kq, (k, n), jnp.bfloat16) * 0.02
            bias = jnp.zeros((n,), jnp.bfloat16)
            variants = [
                ("pallas-gpu int4", lambda p, x: dense_matmul(x, p[0], p[1], implementation="gpu"), "int4", (w, bias)),
                ("pallas-gpu int4 splits=1", lambda p, x: dense_matmul(x, p[0], p[1], implementation="gpu",
                                                                    tiling=GpuTiling(splits=1)), "int4", (w, bias)),
                ("pallas-gpu int4 splits=22", lambda p, x: dense_matmul(x, p[0], p[1], implementation="gpu",
                                                                     tiling=GpuTiling(splits=22)), "int4", (w, bias)),
                ("xla int4 (dequant + dot)", lambda p, x: dense_matmul(x, p[0], p[1], implementation="xla"), "int4",
                 (w, bias)),
                ("bf16 dot (XLA)", lambda p, x: dense_matmul(x, p[0], p[1], implementation="xla"), "bf16", (wbf, bias)),
            ]
            for vname, fn, wkind, params in variants:
                if "splits=" in vname and tokens not in (1, 64):
                    continue
                if over_budget(30):
                    log(f"SKIP (budget) dense {name} B={tokens} {vname}")
                    continue
                if vname.startswith("pallas") and not gpu_ok.get(name, False):
                    continue
                try:
                    sets = [(jnp.asarray(rng.standard_normal((tokens, k)), jnp.bfloat16),) for _ in range(16)]
                    sec = time_op(fn, params, sets)
                    act = tokens * k * 2 + tokens * n * 2
                    nbytes = (w.nbytes if wkind == "int4" else k * n * 2) + n * 2 + act
                    add_row(op="dense " + name, tokens=tokens, m=tokens, variant=vname, touched=1, us=sec * 1e6,
                            mb=nbytes / 1e6, gbs=nbytes / sec / 1e9, pct=100 * nbytes / sec / bw)
                except Exception as e:
                    err(f"time dense {name} B={tokens} {vname}", e)

    # The group metadata alone (the small XLA ops in front of every kernel call), batch 1 and 64.
    from gptoss_jax.kernels import _common
    for tokens in (1, 64):
        try:
            sets = [(jnp.asarray(routing(rng, tokens)),) for _ in range(16)]
            sec = time_op(lambda p, gs: _common.make_group_meta(gs, tokens * TOPK, 16), None, sets)
            add_row(op="group metadata (XLA)", tokens=tokens, m=tokens * TOPK, variant="make_group_meta only",
                    touched=0, us=sec * 1e6, mb=0.0, gbs=0.0, pct=0.0)
        except Exception as e:
            err("metadata", e)

    # Mosaic GPU bf16 ragged_dot from jax's examples, for the backend choice (bf16, reads only touched groups).
    if not over_budget(40):
        try:
            from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu
            for tokens in (1, 64):
                if over_budget(30):
                    break
                sets = []
                for _ in range(4):
                    gs = routing(rng, tokens)
                    sets.append((jnp.asarray(rng.standard_normal((int(gs.sum()), H)), jnp.bfloat16), jnp.asarray(gs)))
                fn = lambda p, x, gs: ragged_dot_mgpu.ragged_dot(x, p, group_sizes=gs, block_m=64, block_n=128,
                                                                 block_k=64, max_concurrent_steps=4, grid_block_n=1)
                sec = time_op(fn, w_gu_bf16, sets, calls=2, repeats=3)
                m = tokens * TOPK
                t_avg = float(np.mean([np.count_nonzero(np.asarray(s[1])) for s in sets]))
                nbytes = t_avg * H * 2 * I * 2 + m * H * 2 + m * 2 * I * 2
                add_row(op="gate_up 2880->5760 (no epilogue)", tokens=tokens, m=m,
                        variant="mosaic-gpu bf16 ragged_dot (jax example)", touched=t_avg, us=sec * 1e6,
                        mb=nbytes / 1e6, gbs=nbytes / sec / 1e9, pct=100 * nbytes / sec / bw)
        except Exception as e:
            err("mosaic-gpu ragged_dot", e)

    with open(os.path.join(OUT, "results.json"), "w") as f:
        json.dump(RESULTS, f, indent=1, default=str)
    table = ["| op | tokens | M | variant | experts touched | bytes (MB) | time (us) | GB/s | % of copy BW |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in RESULTS["rows"]:
        table.append(f"| {r['op']} | {r['tokens']} | {r['m']} | {r['variant']} | {r['touched']:.1f} | "
                     f"{r['mb']:.1f} | {r['us']:.1f} | {r['gbs']:.0f} | {r['pct']:.1f} |")
    text = "\n".join(table)
    with open(os.path.join(OUT, "table.md"), "w") as f:
        f.write(text + "\n")
    log(f"\nerrors: {len(RESULTS['errors'])}; elapsed {elapsed():.0f} s")
    for c in RESULTS["checks"]:
        log("CHECK", json.dumps(c, default=str))
    log(f"device {RESULTS['device']} jax {RESULTS['jax']} copy BW {bw / 1e9:.0f} GB/s group {GROUP} "
        f"{'sym' if SYM else 'asym'}")
    log(text)


if __name__ == "__main__":
    main()
