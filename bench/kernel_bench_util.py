"""Helpers shared by the GPU kernel benchmark scripts (bench_decode_kernels.py, bench_gemv.py): random int4 weights
generated on the device, a timing loop over several ops in one jit, the same-run copy bandwidth."""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp

from gptoss_jax.kernels import Int4Tensor


def rand_int4(key, lead, k, n, g, sym=False):
    """A random int4 weight [*lead, k, n]: uniform codes, bf16 scales ~0.01, uint8 zero points (None if sym)."""
    k1, k2, k3 = jax.random.split(key, 3)
    packed = jax.lax.bitcast_convert_type(jax.random.bits(k1, (*lead, k // 8, n), jnp.uint32), jnp.int32)
    scales = (jax.random.uniform(k2, (*lead, k // g, n), jnp.float32, 0.5, 1.5) * 0.01).astype(jnp.bfloat16)
    zeros = None if sym else jax.random.randint(k3, (*lead, k // g, n), 0, 16, jnp.int32).astype(jnp.uint8)
    return Int4Tensor(packed, scales, zeros, g)


def time_op(fn, params, arg_sets, calls=3, repeats=5):
    """Median seconds per op of ``fn(params, *args)`` over the arg sets, all of them inside one jit (R ops per
    call, `calls` calls queued per sample) so per-call dispatch is amortized."""
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


def copy_bw(small: bool = False) -> float:
    """Bytes/s of ``a + 1`` on 2 GiB of bf16 (read + write); 8 MiB when small (CPU dry runs)."""
    n = (1 << 22) if small else (1 << 30)
    a = jnp.zeros((n,), jnp.bfloat16)
    f = jax.jit(lambda v: v + jnp.bfloat16(1))
    jax.block_until_ready(f(a))
    ts = []
    for _ in range(10):
        t = time.perf_counter()
        jax.block_until_ready(f(a))
        ts.append(time.perf_counter() - t)
    return 4 * n / statistics.median(ts)
