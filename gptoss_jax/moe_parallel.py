"""gpt-oss MoE under shard_map: experts split over mesh axes, tokens brought to them and back, weighted.

Which mesh axes split the experts and which split the tokens comes from the rules table in
:mod:`gptoss_jax.sharding` (``experts`` and ``batch``). Each expert shard holds E / n_shards whole experts (packed
int4 or float) and runs the same :class:`gptoss_jax.model.Experts` code — hence the same grouped (int4) kernel — on
its local experts. Routing (router matmul, top-k, softmax) happens before the shard_map, exactly as on one device.

Two strategies:

* ``replicated`` (decode-friendly). Every shard sees all tokens of its data slice (tokens are replicated over the
  expert axes; expert axes that also split the batch are all-gathered first). Each shard sorts the N·k
  (token, expert) assignments so that those of its local experts come first, runs the grouped matmul over its
  local experts, weights and sums its part per token, then ``psum`` (``psum_scatter`` over gathered axes) adds the
  shards' parts. Communication: one all-reduce of [N, H] per layer.
* ``dispatch`` (large token counts). Each shard takes a 1/n slice of the tokens, sends every assignment row to the
  shard that owns its expert with a ragged all-to-all, runs the grouped matmul over what it received, sends the
  results back with the reverse ragged all-to-all, weights and sums per token, and all-gathers the slices.
  Communication: 2 · N·k/n rows per shard instead of an [N, H] all-reduce, and no shard materialises N·k rows.
  ``jax.lax.ragged_all_to_all`` is used on GPU/TPU; XLA:CPU lacks it, so there an all-gather-based stand-in with
  the same semantics runs (tests the bookkeeping, not the speed). The receive buffer is sized for the worst case
  (all assignments to one shard), so nothing is ever dropped: results equal the single-device model's.

``auto`` picks dispatch when a call has at least ``dispatch_min_tokens`` tokens (prefill), else replicated.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from gptoss_jax import params as P_
from gptoss_jax import sharding
from gptoss_jax.kernels._common import platform_switch

STRATEGIES = ("auto", "replicated", "dispatch")
DEFAULT_DISPATCH_MIN_TOKENS = 4096


@dataclasses.dataclass(frozen=True)
class MoEParallel:
    """How the MoE layers run on a mesh (static: part of the model's graph definition, hashable)."""
    mesh: Mesh
    expert_axes: tuple[str, ...]  # mesh axes splitting the experts (major to minor)
    batch_axes: tuple[str, ...]  # mesh axes splitting the tokens' batch dim
    strategy: str = "auto"
    dispatch_min_tokens: int = DEFAULT_DISPATCH_MIN_TOKENS
    ragged_a2a: str = "auto"  # "native" (jax.lax.ragged_all_to_all), "emulated" (all-gather stand-in), "auto"
    head_axes: tuple[str, ...] = ()  # mesh axes splitting the attention heads (the int4 q/k/v projections' columns)

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ValueError(f"moe strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if self.ragged_a2a not in ("auto", "native", "emulated"):
            raise ValueError(f"ragged_a2a must be auto, native or emulated, got {self.ragged_a2a!r}")

    @classmethod
    def from_rules(cls, mesh: Mesh, rules: Mapping, *, strategy: str = "auto", dispatch_min_tokens: int | None = None,
                   ragged_a2a: str = "auto") -> "MoEParallel":
        for logical in (P_.MLP, P_.EXPERT_EMBED):
            if sharding.mesh_axes_of(logical, rules):
                raise NotImplementedError(f"the MoE shard_map keeps experts whole; rules map {logical!r} to "
                                          f"{rules[logical]!r} — set it to None")
        keep = lambda axes: tuple(a for a in axes if mesh.shape.get(a, 1) > 1)  # noqa: E731
        return cls(mesh, keep(sharding.mesh_axes_of(P_.EXPERTS, rules)),
                   keep(sharding.mesh_axes_of(sharding.BATCH, rules)), strategy,
                   DEFAULT_DISPATCH_MIN_TOKENS if dispatch_min_tokens is None else int(dispatch_min_tokens),
                   ragged_a2a, keep(sharding.mesh_axes_of(P_.Q_HEADS, rules)))

    @property
    def num_shards(self) -> int:
        return math.prod(self.mesh.shape[a] for a in self.expert_axes)

    def strategy_for(self, num_tokens: int) -> str:
        if self.strategy != "auto":
            return self.strategy
        return "dispatch" if num_tokens >= self.dispatch_min_tokens else "replicated"


def _num_local_experts(experts_mod) -> int:
    """Experts this module holds (its arrays may be stacked over layers: [L, E, ...])."""
    return experts_mod.gate_up_bias[...].shape[-2]


def moe_forward(experts_mod, x, experts, weights, par: MoEParallel, layer=None):
    """Routed tokens through experts split over the mesh: x [B, T, H], experts / weights [B, T, k] (the router's
    top-k ids and weights, computed before, exactly as on one device) → [B, T, H]. layer: None, or the index into
    expert arrays stacked over layers ([L, E, ...], split over the mesh on the expert axis, read in place)."""
    b, t, h = x.shape
    graphdef, state = nnx.split(experts_mod)
    num_experts = _num_local_experts(experts_mod)
    if num_experts % par.num_shards:
        raise ValueError(f"{num_experts} experts cannot be split over mesh axes {par.expert_axes} "
                         f"({par.num_shards} shards)")
    strategy = par.strategy_for(b * t)
    body = _replicated if strategy == "replicated" else _dispatch

    stacked = layer is not None

    def local(x, experts, weights, state, layer_):
        return body(nnx.merge(graphdef, state), x, experts, weights, par, layer_ if stacked else None)

    tok = P(par.batch_axes or None)
    experts_spec = P(par.expert_axes or None) if layer is None else P(None, par.expert_axes or None)
    fn = jax.shard_map(local, mesh=par.mesh, in_specs=(tok, tok, tok, experts_spec, P()), out_specs=tok,
                       check_vma=False)
    return fn(x, experts, weights, state, jnp.int32(0) if layer is None else layer)


def local_experts_forward(experts_mod, x, expert_ids, weights, first=0, layer=None):
    """The MoE on the experts [first, first + count) this device holds (all of them on one device, ``first=0``).

    x [N, H]; expert_ids, weights [N, k] → [N, H] float32: each token's weighted sum over its assignments to local
    experts (assignments to other shards' experts contribute 0). The N·k assignments are sorted by expert (stable)
    so the local experts run as two grouped matmuls over only the rows they received. layer: as in moe_forward."""
    n, h = x.shape
    k = expert_ids.shape[-1]
    count = _num_local_experts(experts_mod)

    def grouped(x):
        order, group_sizes, is_local = _local_groups(expert_ids.reshape(n * k), first, count)
        y_sorted = experts_mod(x[order // k], group_sizes, layer=layer)
        return _combine(y_sorted, order, is_local, weights.reshape(n, k), n, k, h)

    if not experts_mod.routed_eligible(n * k):
        return grouped(x)
    # Decode on cuda: the row-wise kernel straight from the router's ids (routed_experts_forward)
    return platform_switch(
        x, cuda=lambda x: routed_experts_forward(experts_mod, x, expert_ids, weights, first, layer), default=grouped)


def routed_experts_forward(experts_mod, x, expert_ids, weights, first=0, layer=None, interpret=False):
    """:func:`local_experts_forward` without grouping: the row-wise int4 kernel reads each (token, expert)
    assignment's expert straight from the router's ids — no sort, bincount, group metadata, gather or un-sort
    (≈15 small kernels per layer at batch 1 on the GPU). Same arguments and result; ``interpret`` runs the kernel
    in Pallas' interpreter (tests). Used by local_experts_forward when lowering for cuda at decode sizes."""
    n, h = x.shape
    k = expert_ids.shape[-1]
    count = _num_local_experts(experts_mod)
    ids = expert_ids.reshape(n * k).astype(jnp.int32)
    if not (isinstance(first, int) and first == 0):
        ids = ids - first  # other shards' experts fall outside [0, count): zero rows (the kernel checks the range)
    # rows = k: row r reads token r // k, computed in the kernel (no index arrays: no XLA kernels before the launch)
    # the combine (router weights, sum over k) happens in the down kernel: its output is [n, h] float32 already
    return experts_mod.routed(x, ids, k, layer=layer, interpret=interpret,
                              combine_weights=weights.reshape(n, k).astype(jnp.float32))


def dense_int4_forward(x, w, bias, par: MoEParallel, *, split_out: bool, layer=None):
    """x [M, K] @ int4 W [K, N] (+ bias [N]) → [M, N] float32 with the Pallas kernel run per device under shard_map.

    A Mosaic (TPU) kernel cannot be partitioned automatically by XLA, so on a mesh the dense int4 projections run
    under shard_map like the experts do: rows split like the batch, W's columns split over the head axes when
    `split_out` (q/k/v: whole heads per device, as the sharding rules place them) or replicated (o_proj, whose int4
    rows are not split: see gptoss_jax.params)."""
    from gptoss_jax.kernels import dense_matmul
    from gptoss_jax.kernels.int4_layout import Int4Tensor

    n = w.packed.shape[-1]
    n_shards = math.prod(par.mesh.shape[a] for a in par.head_axes)
    out_axes = par.head_axes if split_out and par.head_axes and n % n_shards == 0 else ()
    rows = P(par.batch_axes or None, None)
    lead = () if layer is None else (None,)  # weights stacked over layers: the layer axis is never split
    cols = P(*lead, None, out_axes or None)
    out = P(par.batch_axes or None, out_axes or None)
    group = w.group_size

    def local(x, packed, scales, zeros, bias, layer_):
        return dense_matmul(x, Int4Tensor(packed, scales, zeros, group), bias, out_dtype=jnp.float32,
                            layer=None if layer is None else layer_)

    zeros_spec = None if w.zeros is None else cols
    bias_spec = None if bias is None else P(*lead, out_axes or None)
    fn = jax.shard_map(local, mesh=par.mesh, in_specs=(rows, cols, cols, zeros_spec, bias_spec, P()), out_specs=out,
                       check_vma=False)
    return fn(x, w.packed, w.scales, w.zeros, bias, jnp.int32(0) if layer is None else layer)


def attention_forward(q, k, v, q_pos, k_pos, sinks, window, par: MoEParallel, layer=None):
    """Attention (gptoss_jax.kernels.attention.attention semantics and shapes) run per device under shard_map.

    A Pallas attention kernel is not partitioned by XLA, so on a mesh each device runs it on its part: rows split
    like the batch (when the batch divides), query and KV heads split over the head axes (whole GQA groups: with
    contiguous splits, query head h and its KV head h // G land on the same device; used when both head counts
    divide), sinks with their heads. Everything not split is replicated, e.g. on an expert-only mesh every device
    computes all heads of its rows. No communication inside: heads and rows are independent. layer: None, or the
    index into k, v [L, B, S, KV, D] / k_pos [L, B, S] stacked over cache blocks (the layer axis is not split)."""
    from gptoss_jax.kernels.attention import attention, per_device_implementation

    size = lambda axes: math.prod(par.mesh.shape[a] for a in axes)  # noqa: E731
    b, h, kv = q.shape[0], q.shape[2], k.shape[2]
    rows = par.batch_axes if par.batch_axes and b % size(par.batch_axes) == 0 else ()
    heads = par.head_axes if par.head_axes and h % size(par.head_axes) == 0 and kv % size(par.head_axes) == 0 else ()
    qkv = P(rows or None, None, heads or None, None)
    pos = P(rows or None, None)
    lead = () if layer is None else (None,)
    kv_spec, kpos_spec = P(*lead, *qkv), P(*lead, *pos)
    impl = per_device_implementation()

    def local(q, k, v, q_pos, k_pos, sinks, layer_):
        return attention(q, k, v, q_pos, k_pos, sinks, window, implementation=impl,
                         layer=None if layer is None else layer_)

    fn = jax.shard_map(local, mesh=par.mesh, in_specs=(qkv, kv_spec, kv_spec, pos, kpos_spec, P(heads or None), P()),
                       out_specs=qkv, check_vma=False)
    return fn(q, k, v, q_pos, k_pos, sinks, jnp.int32(0) if layer is None else layer)


def _local_groups(expert_ids, first, count):
    """Assignments sorted so local experts [first, first+count) come first, grouped by expert.

    Returns (order, group_sizes [count], is_local) — rows past sum(group_sizes) belong to other shards."""
    local = expert_ids - first
    is_local = (local >= 0) & (local < count)
    key = jnp.where(is_local, local, count)
    order = jnp.argsort(key, stable=True)
    group_sizes = jnp.bincount(key, length=count + 1)[:count].astype(jnp.int32)
    return order, group_sizes, is_local


def _combine(y_rows, order, keep, weights, n, k, h):
    """Rows in sorted order → per-token weighted sum in float32 [n, h] (rows not kept contribute 0)."""
    y = jnp.zeros_like(y_rows).at[order].set(y_rows)
    y = jnp.where(keep[:, None], y, 0).reshape(n, k, h)  # where, not *: other shards' rows may hold anything
    return jnp.einsum("nkh,nk->nh", y.astype(jnp.float32), weights.astype(jnp.float32))


def _replicated(experts_mod, x, expert_ids, weights, par: MoEParallel, layer=None):
    gather_axes = tuple(a for a in par.expert_axes if a in par.batch_axes)
    if gather_axes:  # tokens split over an expert axis: every shard needs them all
        x, expert_ids, weights = (jax.lax.all_gather(a, gather_axes, axis=0, tiled=True)
                                  for a in (x, expert_ids, weights))
    b, t, h = x.shape
    k = expert_ids.shape[-1]
    n = b * t
    local_count = _num_local_experts(experts_mod)
    shard = jax.lax.axis_index(par.expert_axes) if par.expert_axes else 0
    out = local_experts_forward(experts_mod, x.reshape(n, h), expert_ids.reshape(n, k), weights.reshape(n, k),
                                shard * local_count, layer=layer)
    if gather_axes:
        out = jax.lax.psum_scatter(out, gather_axes, scatter_dimension=0, tiled=True)
        b = b // math.prod(par.mesh.shape[a] for a in gather_axes)
    rest = tuple(a for a in par.expert_axes if a not in gather_axes)
    if rest:
        out = jax.lax.psum(out, rest)
    return out.astype(x.dtype).reshape(b, t, h)


def _dispatch(experts_mod, x, expert_ids, weights, par: MoEParallel, layer=None):
    axes = par.expert_axes
    if not axes:
        return _replicated(experts_mod, x, expert_ids, weights, par, layer)
    b, t, h = x.shape
    k = expert_ids.shape[-1]
    n = b * t
    n_shards = par.num_shards
    local_count = _num_local_experts(experts_mod)
    me = jax.lax.axis_index(axes)

    # 1. Each shard takes its slice of the tokens it shares with the other shards (padding to a multiple).
    slice_axes = tuple(a for a in axes if a not in par.batch_axes)
    n_slices = math.prod(par.mesh.shape[a] for a in slice_axes)
    n_pad = -(-n // n_slices) * n_slices
    per = n_pad // n_slices
    xf = jnp.pad(x.reshape(n, h), ((0, n_pad - n), (0, 0)))
    ids = jnp.pad(expert_ids.reshape(n, k), ((0, n_pad - n), (0, 0)))
    w = jnp.pad(weights.reshape(n, k), ((0, n_pad - n), (0, 0)))
    real = jnp.arange(n_pad) < n
    sl = jax.lax.axis_index(slice_axes) if slice_axes else 0
    xs, ids_s, ws, real_s = (jax.lax.dynamic_slice_in_dim(a, sl * per, per, axis=0) for a in (xf, ids, w, real))

    # 2. Assignments sorted by global expert = grouped by destination shard, then by local expert.
    m = per * k
    flat = ids_s.reshape(m)
    sendable = jnp.repeat(real_s, k)
    num_experts = local_count * n_shards
    order = jnp.argsort(jnp.where(sendable, flat, num_experts), stable=True)
    sorted_ids = flat[order]
    dest = jnp.where(sendable, flat // local_count, n_shards)
    send_sizes = jnp.bincount(dest, length=n_shards + 1)[:n_shards].astype(jnp.int32)
    input_offsets = (jnp.cumsum(send_sizes) - send_sizes).astype(jnp.int32)
    rows = xs[order // k]

    # 3. Everyone's send sizes [src, dst] → where my chunks land and what I receive.
    sizes = jax.lax.all_gather(send_sizes, axes, axis=0, tiled=False).reshape(n_shards, n_shards)
    output_offsets = (jnp.cumsum(sizes, axis=0) - sizes)[me].astype(jnp.int32)  # rows before mine on each dst
    recv_sizes = sizes[:, me].astype(jnp.int32)
    capacity = m * n_shards  # worst case: every assignment of every shard comes here — nothing dropped
    a2a = _ragged_all_to_all_fn(par)
    recv_x = a2a(rows, jnp.zeros((capacity, h), rows.dtype), input_offsets, send_sizes, output_offsets,
                 recv_sizes, axes)
    recv_ids = a2a(sorted_ids[:, None], jnp.full((capacity, 1), -1, sorted_ids.dtype), input_offsets, send_sizes,
                   output_offsets, recv_sizes, axes)[:, 0]

    # 4. Local grouped matmul over what arrived (rows of all sources, grouped by local expert).
    total = jnp.sum(recv_sizes)
    arrived = jnp.arange(capacity) < total
    local_ids = jnp.where(arrived, recv_ids, -1)
    order2, group_sizes, is_local = _local_groups(local_ids, me * local_count, local_count)
    y2 = experts_mod(recv_x[order2], group_sizes, layer=layer)
    y_recv = jnp.where(is_local[:, None], jnp.zeros_like(y2).at[order2].set(y2), 0)

    # 5. Back to the senders, into the slots the rows came from.
    back_input_offsets = (jnp.cumsum(recv_sizes) - recv_sizes).astype(jnp.int32)
    back_output_offsets = (jnp.cumsum(sizes, axis=1) - sizes)[:, me].astype(jnp.int32)
    y_back = a2a(y_recv, jnp.zeros((m, h), y_recv.dtype), back_input_offsets, recv_sizes, back_output_offsets,
                 send_sizes, axes)

    # 6. Weighted sum per token, then everyone gets every slice back.
    out = _combine(y_back, order, sendable, ws, per, k, h).astype(x.dtype)
    if slice_axes:
        out = jax.lax.all_gather(out, slice_axes, axis=0, tiled=True)
    return out[:n].reshape(b, t, h)


def _ragged_all_to_all_fn(par: MoEParallel):
    mode = par.ragged_a2a
    if mode == "auto":
        mode = "emulated" if jax.default_backend() == "cpu" else "native"
    if mode == "native":
        return lambda op, out, io, ss, oo, rs, axes: jax.lax.ragged_all_to_all(op, out, io, ss, oo, rs,
                                                                                axis_name=axes)
    return ragged_all_to_all_emulated


def ragged_all_to_all_emulated(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, axes):
    """jax.lax.ragged_all_to_all's semantics from all-gathers (for backends without the op, e.g. XLA:CPU).

    Sender j's chunk for receiver i is operand_j[input_offsets_j[i] : + send_sizes_j[i]], written to
    output_i[output_offsets_j[i] : + same size]; other rows of `output` are kept."""
    me = jax.lax.axis_index(axes)
    all_operands = jax.lax.all_gather(operand, axes, axis=0, tiled=False)  # [n, M, ...]
    gather = lambda a: jax.lax.all_gather(a, axes, axis=0, tiled=False)  # noqa: E731  [n(src), n(dst)]
    starts_in = gather(input_offsets)[:, me]
    sizes = gather(send_sizes)[:, me]
    starts_out = gather(output_offsets)[:, me]
    rows = jnp.arange(output.shape[0])
    inside = (rows[None, :] >= starts_out[:, None]) & (rows[None, :] < starts_out[:, None] + sizes[:, None])
    src = jnp.argmax(inside, axis=0)
    src_row = jnp.clip(starts_in[src] + rows - starts_out[src], 0, operand.shape[0] - 1)
    values = all_operands[src, src_row]
    has = jnp.any(inside, axis=0).reshape((-1,) + (1,) * (output.ndim - 1))
    return jnp.where(has, values, output)
