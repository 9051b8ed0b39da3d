"""The KV cache: one ring buffer per layer, keyed by absolute positions.

Each layer keeps ``k, v [B, S, KV, D]`` and ``pos [B, S]`` (the absolute position held in each slot, -1 when empty).
Full-attention layers have ``S = max_len`` slots; sliding-window layers only ``S = min(window, max_len)``, written
round-robin (slot = position mod S), since no query ever sees further back. Because every slot carries its
position, attention masks are computed from positions alone and padding (pos -1) is never visible.

The model scans over blocks of ``p`` layers (:func:`gptoss_jax.params.layer_period`), so the cache is a tuple of
``p`` LayerCache, one per block position, each stacked over the ``L / p`` blocks: ``k, v [L/p, B, S_j, KV, D]``,
``pos [L/p, B, S_j]``. Layer ``i`` lives in ``cache[i % p]`` at index ``i // p``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from gptoss_jax.config import GptOssConfig
from gptoss_jax.params import layer_period


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LayerCache:
    k: jax.Array  # [B, S, KV, D]
    v: jax.Array  # [B, S, KV, D]
    pos: jax.Array  # [B, S] int32, -1 = empty

    @property
    def slots(self) -> int:
        return self.pos.shape[-1]


def init_cache(config: GptOssConfig, batch: int, max_len: int, dtype=jnp.bfloat16) -> tuple[LayerCache, ...]:
    """An empty cache for `batch` rows of up to `max_len` positions: p stacked LayerCache (see the module doc)."""
    p = layer_period(config)
    blocks = config.num_hidden_layers // p
    caches = []
    for j in range(p):
        slots = min(config.sliding_window, max_len) if config.is_sliding(j) else max_len
        shape = (blocks, batch, slots, config.num_key_value_heads, config.head_dim)
        caches.append(LayerCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype),
                                 jnp.full((blocks, batch, slots), -1, jnp.int32)))
    return tuple(caches)


def layer_cache(cache: tuple[LayerCache, ...], layer: int) -> LayerCache:
    """The cache of one layer (k, v [B, S, KV, D], pos [B, S]) out of the stacked cache."""
    p = len(cache)
    return jax.tree.map(lambda a: a[layer // p], cache[layer % p])


def update_layer_cache(cache: LayerCache, k, v, positions, valid) -> LayerCache:
    """Writes the new keys/values k, v [B,T,KV,D] at positions [B,T] (valid [B,T] a prefix of each row)."""
    b, t = positions.shape
    slots = cache.slots
    k, v = k.astype(cache.k.dtype), v.astype(cache.v.dtype)
    if t == 1:
        # Decode: one scatter per row (in place when the cache is donated). Invalid rows write out of bounds: dropped.
        slot = jnp.where(valid[:, 0], positions[:, 0] % slots, slots)
        rows = jnp.arange(b)
        return LayerCache(cache.k.at[rows, slot].set(k[:, 0], mode="drop"),
                          cache.v.at[rows, slot].set(v[:, 0], mode="drop"),
                          cache.pos.at[rows, slot].set(positions[:, 0], mode="drop"))
    # Several tokens: each slot s takes the newest new position p with p ≡ s (mod S), if there is one.
    start = positions[:, :1]  # [B,1]
    count = jnp.sum(valid, axis=1, keepdims=True).astype(jnp.int32)  # [B,1]
    last = start + count - 1
    s = jnp.arange(slots, dtype=jnp.int32)[None, :]
    newest = last - jnp.mod(last - s, slots)  # [B,S]: the newest position ≤ last landing in slot s
    take = (newest >= start) & (count > 0)
    idx = jnp.clip(newest - start, 0, t - 1)
    new_k = jnp.take_along_axis(k, idx[:, :, None, None], axis=1)
    new_v = jnp.take_along_axis(v, idx[:, :, None, None], axis=1)
    return LayerCache(jnp.where(take[:, :, None, None], new_k, cache.k),
                      jnp.where(take[:, :, None, None], new_v, cache.v),
                      jnp.where(take, newest, cache.pos))


def update_stacked_cache(cache: LayerCache, block, k, v, positions, valid) -> LayerCache:
    """:func:`update_layer_cache` for block `block` (int32 scalar, may be traced) of a cache stacked over blocks
    (k, v [L/p, B, S, KV, D], pos [L/p, B, S]), returning the whole stacked cache.

    Decode (T = 1) scatters each row's new entry at (block, row, slot): written in place when the cache is a loop
    carry or donated, so a step costs O(B) writes, not a copy of the cache. Several tokens (prefill chunks) rebuild
    the block's slice (O(S) per layer, like the one-shot prefill) and write it back."""
    b, t = positions.shape
    if t == 1:
        slots = cache.slots
        slot = jnp.where(valid[:, 0], positions[:, 0] % slots, slots)  # invalid rows write out of bounds: dropped
        rows = jnp.arange(b)
        return LayerCache(cache.k.at[block, rows, slot].set(k[:, 0].astype(cache.k.dtype), mode="drop"),
                          cache.v.at[block, rows, slot].set(v[:, 0].astype(cache.v.dtype), mode="drop"),
                          cache.pos.at[block, rows, slot].set(positions[:, 0], mode="drop"))
    one = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, block, 0, keepdims=False), cache)
    new = update_layer_cache(one, k, v, positions, valid)
    return jax.tree.map(lambda a, x: jax.lax.dynamic_update_index_in_dim(a, x, block, 0), cache, new)
