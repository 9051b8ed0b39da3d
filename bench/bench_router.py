"""The decode router kernels (``_gpu_router``: logits GEMV + top-k/softmax) and the decode RMSNorm kernel
(``_gpu_norm``) vs the XLA ops they replace, gpt-oss-120b shape (H 2880, E 128, top-4), bf16, on one GPU:

    python3 bench/bench_router.py        # lines on stdout, $OUT/router.json

Correctness (compiled, against float64 numpy: ids exactly where the logits have no near-tie, weights ≤ 1e-5) at
1, 4 and 16 tokens, then the median time per op (8 layers' weights stacked and read in place, 8 ops per jit) of
the kernels and of the XLA op (dot with float32 accumulation, lax.top_k, softmax).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from gptoss_jax.kernels import rms_norm, router_top_k  # noqa: E402
from gptoss_jax.kernels.reference import router_top_k_f64  # noqa: E402

H, E, K, NL = 2880, 128, 4, 8


def main():
    out_dir = os.environ.get("OUT") or os.path.join(ROOT, "bench_out")
    os.makedirs(out_dir, exist_ok=True)
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.standard_normal((NL, H, E)) * 0.02, jnp.bfloat16)
    b = jnp.asarray(rng.standard_normal((NL, E)) * 0.1, jnp.bfloat16)
    b_norm = jnp.asarray(rng.standard_normal((NL, H)), jnp.bfloat16)
    res = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "checks": [], "times": []}
    for n in (1, 4, 16):
        x = jnp.asarray(rng.standard_normal((n, H)), jnp.bfloat16)
        layer = NL - 1
        ids, wts = jax.jit(lambda x_, w_, b_, l_: router_top_k(x_, w_, b_, K, layer=l_, implementation="gpu"))(
            x, w, b, jnp.int32(layer))
        f64 = lambda a: np.asarray(jnp.asarray(a).astype(jnp.float32), np.float64)  # noqa: E731
        ref_ids, ref_w, logits = router_top_k_f64(f64(x), f64(w[layer]), f64(b[layer]), K)
        srt = np.sort(logits, -1)[:, ::-1]
        clear = np.min(np.abs(np.diff(srt[:, :K + 1], axis=-1)), -1) > 1e-4 * np.max(np.abs(logits))
        ids, wts = np.asarray(ids), np.asarray(wts)
        ok = bool(np.all(ids[clear] == ref_ids[clear]) and np.all(np.isfinite(wts))
                  and np.max(np.abs(wts[clear] - ref_w[clear]), initial=0) <= 1e-5)
        res["checks"].append({"tokens": n, "ok": ok, "clear_rows": int(clear.sum())})
        print(f"CHECK router tokens={n}: {'OK' if ok else 'FAIL'} ({int(clear.sum())}/{n} rows without near-ties)",
              flush=True)
    for n in (1, 16):  # the norm kernel, compiled, vs float64 (stacked scales read in place)
        x = jnp.asarray(rng.standard_normal((n, H)) * 3, jnp.bfloat16)
        y = jax.jit(lambda x_, s_, l_: rms_norm(x_, s_, 1e-5, layer=l_, implementation="gpu"))(x, b_norm, jnp.int32(3))
        xf = np.asarray(x.astype(jnp.float32), np.float64)
        ref = xf / np.sqrt(np.mean(xf * xf, -1, keepdims=True) + 1e-5) * np.asarray(
            b_norm[3].astype(jnp.float32), np.float64)
        err = float(np.max(np.abs(np.asarray(y.astype(jnp.float32), np.float64) - ref)) / np.max(np.abs(ref)))
        ok = bool(np.isfinite(err) and err <= 8e-3)
        res["checks"].append({"op": "rms_norm", "tokens": n, "ok": ok, "rel_err": err})
        print(f"CHECK rms_norm rows={n}: {'OK' if ok else 'FAIL'} (rel err {err:.1e}, bf16 output)", flush=True)
    for n in (1, 8):
        sets = [(jnp.asarray(rng.standard_normal((n, H)), jnp.bfloat16), jnp.int32(i)) for i in range(NL)]
        for impl in ("xla", "gpu"):
            jf = jax.jit(lambda w_, b_, s, impl=impl: [router_top_k(x_, w_, b_, K, layer=l_, implementation=impl)
                                                       for x_, l_ in s])
            jax.block_until_ready(jf(w, b, sets))
            ts = []
            for _ in range(7):
                t = time.perf_counter()
                jax.block_until_ready([jf(w, b, sets) for _ in range(3)])
                ts.append((time.perf_counter() - t) / (3 * NL))
            us = statistics.median(ts) * 1e6
            res["times"].append({"tokens": n, "implementation": impl, "us": us})
            print(f"router tokens={n} {impl}: {us:.1f} us per op", flush=True)
    with open(os.path.join(out_dir, "router.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
