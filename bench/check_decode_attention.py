"""The one-launch decode attention kernel (``_gpu_decode_attention``: RoPE + KV-cache write + attention with sinks),
compiled on the GPU, against float64 numpy (``reference.decode_attention_update_f64``) at gpt-oss-120b's attention
shape (64 query heads, 8 KV heads, head_dim 64), and timed against the base op it replaces (RoPE, scatter, the flash
decode kernel as separate XLA/Pallas kernels):

    python3 bench/check_decode_attention.py      # lines on stdout, $OUT/decode_attention.json
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

from gptoss_jax.kernels import decode_attention_update  # noqa: E402
from gptoss_jax.kernels.reference import decode_attention_update_f64, max_rel_err  # noqa: E402

H, KV, D, NB = 64, 8, 64, 3


def problem(rng, b, s, fill_to):
    q = jnp.asarray(rng.standard_normal((b, H, D)), jnp.bfloat16)
    k = jnp.asarray(rng.standard_normal((b, KV, D)), jnp.bfloat16)
    v = jnp.asarray(rng.standard_normal((b, KV, D)), jnp.bfloat16)
    pos = rng.integers(max(1, fill_to // 2), fill_to + 1, size=b).astype(np.int32)
    ang = pos[:, None] * (1.0 / 150000 ** (np.arange(D // 2) / (D // 2)))
    cos, sin = jnp.asarray(np.cos(ang) * 1.2, jnp.float32), jnp.asarray(np.sin(ang) * 1.2, jnp.float32)
    kc = jnp.asarray(rng.standard_normal((NB, b, s, KV, D)), jnp.bfloat16)
    vc = jnp.asarray(rng.standard_normal((NB, b, s, KV, D)), jnp.bfloat16)
    slots = np.arange(s)[None, :]
    newest = pos[:, None] - 1 - ((pos[:, None] - 1 - slots) % s)
    pc = np.broadcast_to(np.where(newest >= 0, newest, -1)[None], (NB, b, s)).astype(np.int32)
    valid = np.ones(b, bool)
    valid[-1] = b == 1  # the last row of a batch is padding (writes nothing)
    return [q, k, v, cos, sin, jnp.asarray(pos), jnp.asarray(valid), kc, vc, jnp.asarray(pc)]


def timed(fn, args, reps=50):
    out = fn(*args)
    jax.block_until_ready(out)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main():
    out_dir = os.environ.get("OUT") or os.path.join(ROOT, "bench_out")
    os.makedirs(out_dir, exist_ok=True)
    rng = np.random.default_rng(0)
    res = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "checks": [], "times": []}
    sinks = jnp.asarray(rng.standard_normal((4, H)), jnp.float32)
    for b, s, window, fill in ((1, 128, 128, 600), (1, 256, None, 200), (64, 128, 128, 300), (64, 256, None, 255),
                               (1, 8192, None, 8000), (4, 32768, None, 20000)):
        args = problem(rng, b, s, fill)
        for impl in ("gpu", "xla"):
            fn = jax.jit(lambda *a, impl=impl: decode_attention_update(*a, sinks, window, block=jnp.int32(1),
                                                                        sink_layer=jnp.int32(2),
                                                                        implementation=impl))
            out, kc, vc, pc = fn(*args)
            ref, rkc, rvc, rpc = decode_attention_update_f64(*args, sinks, window, 1, 2, compute_dtype=jnp.bfloat16,
                                                             cache_dtype=jnp.bfloat16)
            err = max_rel_err(out, ref)
            cache_ok = bool(np.array_equal(np.asarray(pc), rpc)
                            and np.array_equal(np.asarray(vc.astype(jnp.float32)), rvc.astype(np.float32))
                            and max_rel_err(kc[1], rkc[1]) <= 1e-2)
            ok = err <= 2e-2 and cache_ok
            t = timed(fn, args)
            res["checks"].append({"impl": impl, "batch": b, "slots": s, "window": window, "ok": ok, "max_rel_err": err,
                                  "cache_ok": cache_ok, "median_us": t * 1e6})
            print(f"CHECK {impl} batch={b} slots={s} window={window}: {'OK' if ok else 'FAIL'} "
                  f"rel_err={err:.2e} cache={'ok' if cache_ok else 'WRONG'} median {t * 1e6:.1f} us/call", flush=True)
    with open(os.path.join(out_dir, "decode_attention.json"), "w") as fh:
        json.dump(res, fh, indent=1)


if __name__ == "__main__":
    main()
