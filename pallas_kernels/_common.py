"""Shared helpers for the grouped-matmul kernels: group metadata, tile choice, argument checks.

Group metadata (megablox style, computed once per call by a few tiny XLA ops and scalar-prefetched / read by the
kernels). Rows of ``x`` are sorted by group; group ``e`` owns rows ``[off_e, off_e + size_e)``. We append one
*virtual* group ``E`` that owns the rows at or beyond ``sum(group_sizes)`` (they must come out as zeros) so every
row belongs to exactly one group. A *work item* is a pair (group, m-tile) with a non-empty intersection; items are
ordered by group, hence by m-tile (non-decreasing), which both kernels rely on (TPU: an output block is only
revisited on consecutive grid steps; GPU: items of one tile write disjoint rows).

The number of items is bounded statically by ``tiles_m + min(E + 1, M) - 1`` (every non-empty group adds at most one
partial tile), so kernels use a static grid of that size and idle items (index >= num_items) do nothing. For a
batch-1 decode step (M = 4 rows, 4 distinct experts) that is 4 items: only the 4 touched experts' weights are read.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from collections.abc import Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl


class GroupMeta(NamedTuple):
    group_ids: jax.Array  # int32 [W]: group of each item (E = virtual zero group)
    m_tiles: jax.Array  # int32 [W]: m-tile of each item
    row_starts: jax.Array  # int32 [W]: first row of the item (absolute)
    row_ends: jax.Array  # int32 [W]: one past the last row (absolute); == row_starts for idle items
    weight_ids: jax.Array  # int32 [W]: expert whose weights the item reads (virtual/idle: the previous one)
    is_real: jax.Array  # int32 [W]: 1 when the item computes a real group, else 0
    num_items: jax.Array  # int32 []: number of items (<= W)


def num_work_items(m: int, tm: int, num_groups: int) -> int:
    tiles_m = -(-m // tm)
    return max(1, tiles_m + min(num_groups + 1, m) - 1)


def _inclusive_cumsum(v: jax.Array) -> jax.Array:
    """Cumulative sum of a short vector as one masked reduction ([n, n] compare + sum) — a single fusion on GPU
    instead of XLA's scan lowering (several kernels; at ~2 us each they dominated a decode step)."""
    n = v.shape[0]
    idx = jnp.arange(n, dtype=jnp.int32)
    return jnp.sum(jnp.where(idx[None, :] <= idx[:, None], v[None, :], 0), axis=1, dtype=jnp.int32)


def make_group_meta(group_sizes: jax.Array, m: int, tm: int) -> GroupMeta:
    """Work-item metadata for rows [0, m) split in tiles of tm rows (see module docstring).

    Written as a handful of broadcast-compare-reduce expressions over [W, E + 1] so that XLA emits few, fused
    kernels (no scans, no cummax)."""
    e = group_sizes.shape[0]
    gs = jnp.maximum(group_sizes.astype(jnp.int32), 0)
    # Groups are clipped to rows [0, m): when sum(group_sizes) > m the group crossing m keeps only its rows below m
    # (as ragged_dot and the float64 reference do) and later groups are empty.
    incl = _inclusive_cumsum(gs) if e else jnp.zeros((0,), jnp.int32)
    real_ends = jnp.minimum(incl, m)
    real_starts = jnp.minimum(incl - gs, m)
    total = real_ends[-1] if e else jnp.int32(0)
    ext_starts = jnp.concatenate([real_starts, jnp.reshape(total, (1,))])
    ext_ends = jnp.concatenate([real_ends, jnp.full((1,), m, jnp.int32)])
    ext_sizes = ext_ends - ext_starts
    first_tile = ext_starts // tm
    ntiles = jnp.where(ext_sizes > 0, (ext_ends + tm - 1) // tm - first_tile, 0)
    cum = _inclusive_cumsum(ntiles)
    num_items = cum[-1]
    w = num_work_items(m, tm, e)
    items = jnp.arange(w, dtype=jnp.int32)
    # group of item i = number of groups whose cumulative tile count is <= i (idle items clamp to the last item).
    last = jnp.maximum(num_items - 1, 0)
    it = jnp.minimum(items, last)
    g = jnp.minimum(jnp.sum((cum[None, :] <= it[:, None]).astype(jnp.int32), axis=1), e)
    valid = items < num_items
    m_tile = first_tile[g] + it - (cum[g] - ntiles[g])
    m_tile = jnp.clip(m_tile, 0, -(-m // tm) - 1)
    rs = jnp.maximum(ext_starts[g], m_tile * tm)
    re = jnp.minimum(ext_ends[g], (m_tile + 1) * tm)
    re = jnp.where(valid, re, rs)  # idle items own no rows (and repeat the last item's tile)
    is_real = jnp.logical_and(valid, g < e)
    # virtual/idle items keep the weights of the last touched expert (no new DMA on TPU; never read on GPU)
    last_touched = jnp.max(jnp.where(gs > 0, jnp.arange(e, dtype=jnp.int32), 0)) if e else jnp.int32(0)
    wid = jnp.where(g < e, g, last_touched)
    return GroupMeta(g.astype(jnp.int32), m_tile.astype(jnp.int32), rs.astype(jnp.int32), re.astype(jnp.int32),
                     wid.astype(jnp.int32), is_real.astype(jnp.int32), num_items.astype(jnp.int32))


def row_group_ids(group_sizes: jax.Array, m: int) -> jax.Array:
    """int32 [m]: the group of each row; E for rows at or beyond sum(group_sizes)."""
    ends = _inclusive_cumsum(group_sizes.astype(jnp.int32))
    rows = jnp.arange(m, dtype=jnp.int32)
    return jnp.sum((ends[None, :] <= rows[:, None]).astype(jnp.int32), axis=1)


def largest_divisor(n: int, target: int, multiple_of: int = 1) -> int | None:
    """Largest d <= target with d | n and multiple_of | d, or None."""
    best = None
    for d in range(multiple_of, min(n, target) + 1, multiple_of):
        if n % d == 0:
            best = d
    return best


def pow2_divisor(n: int, target: int, minimum: int = 16) -> int | None:
    """Largest power of two p with minimum <= p <= target and p | n, or None."""
    p = 1 << int(math.log2(max(target, 1)))
    while p >= minimum:
        if n % p == 0:
            return p
        p //= 2
    return None


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def coerce_tiling(cls, tiling, name):
    """A tiling dataclass ``cls`` from None, an instance, or a mapping of its field names (legacy dict tilings);
    ValueError naming the unknown fields or the wrong type otherwise."""
    if tiling is None:
        return cls()
    if isinstance(tiling, cls):
        return tiling
    if isinstance(tiling, Mapping):
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(tiling) - fields)
        if unknown:
            raise ValueError(f"{name} tiling: unknown field(s) {unknown}; {cls.__name__} has {sorted(fields)}")
        return cls(**dict(tiling))
    raise ValueError(f"{name} tiling must be a {cls.__name__}, a dict or None, got {type(tiling).__name__}")


def for_weight_tile(nt, starts, tiles, compute) -> None:
    """Inside a kernel that runs several weights in one launch (their N tiles laid end to end on one grid axis):
    calls ``compute(i, nt - starts[i])`` for the weight ``i`` whose static tile range ``[starts[i], starts[i] +
    tiles[i])`` holds program ``nt`` — one ``pl.when`` branch per weight, none for a single weight."""
    if len(starts) == 1:
        compute(0, nt)
        return
    for i, (lo, count) in enumerate(zip(starts, tiles)):
        @pl.when(jnp.logical_and(nt >= lo, nt < lo + count))
        def _(i=i, lo=lo):
            compute(i, nt - lo)


# ---------------------------------------------------------------------------------------------- platform branches
# Every op binds its per-platform implementations with jax.lax.platform_dependent, so the platform a function is
# *lowered for* decides (a CPU host exporting for TPU gets Mosaic kernels). The price is tracing: every branch of
# every op is traced (a TPU kernel, a Triton kernel and the XLA op for one matmul) although one is lowered — about
# half the trace time of a decode step. A caller that knows the platform its jitted function will run on (the
# generation engine: its model's devices, a static argument of its jitted functions) declares it with
# ``tracing_for(platform)`` and each op then traces only that platform's branch.
_TRACE_PLATFORM: contextvars.ContextVar = contextvars.ContextVar("gptoss_trace_platform", default=None)


@contextlib.contextmanager
def tracing_for(platform: str | None):
    """Within the block, :func:`platform_switch` calls only the branch for ``platform`` (a lowering platform name:
    "cuda", "rocm", "tpu", "cpu"; None: every branch, via platform_dependent). Only for functions that will be
    lowered for that platform alone — make the platform part of their jit cache key (a static argument)."""
    token = _TRACE_PLATFORM.set(platform)
    try:
        yield
    finally:
        _TRACE_PLATFORM.reset(token)


def platform_switch(*args, default, **branches):
    """``jax.lax.platform_dependent(*args, default=default, **branches)``, or inside ``tracing_for(p)`` the branch
    for ``p`` (``default`` when there is none) called directly."""
    platform = _TRACE_PLATFORM.get()
    if platform is None:
        return jax.lax.platform_dependent(*args, default=default, **branches)
    return branches.get(platform, default)(*args)


def lowering_platform(arrays) -> str | None:
    """The lowering platform name ("cuda", "rocm", "tpu", "cpu", ...) of the devices holding the first jax array
    in ``arrays`` (None when none is a placed array)."""
    for a in arrays:
        sharding = getattr(a, "sharding", None)
        if sharding is None:
            continue
        device = next(iter(sharding.device_set))
        if device.platform != "gpu":
            return device.platform
        version = str(getattr(device.client, "platform_version", "")).lower()
        return "rocm" if "rocm" in version else "cuda"
    return None


def pow2_at_least(v: int) -> int:
    """The smallest power of two >= v (>= 1): Triton block shapes must be powers of two."""
    return 1 << max(0, int(v) - 1).bit_length()


def env_limit(name: str, default: int) -> int:
    """An integer limit from the environment variable ``name`` (read at trace time; unset or empty: ``default``).
    Raises ValueError naming the variable for anything else than an integer."""
    import os  # noqa: PLC0415

    value = (os.environ.get(name) or "").strip()
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r}: expected an integer, e.g. {default} (0: never)") from None
