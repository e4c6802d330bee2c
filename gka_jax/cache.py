"""Inference caches: one pytree per model, one entry per layer, preallocated for a batch and a length.

* attention layer: K and V ``[B, S, Hkv, D]`` in the model dtype (S = max length);
* GKA layer: the last ``conv_size`` raw q/k/v projections (oldest first) ``[B, W, heads, D]`` and the
  recurrent states ``h_kk [B, H, D, D]``, ``h_kv [B, H, D, D]`` (float32 by default);
* ``lengths [B]``: tokens already in the cache per row (the position of the next token).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from .config import ATTENTION, ModelConfig


def _pytree(cls):
    fields = [f.name for f in dataclasses.fields(cls)]
    return jax.tree_util.register_dataclass(cls, data_fields=fields, meta_fields=[])


@_pytree
@dataclasses.dataclass
class AttentionCache:
    k: jax.Array  # [B, S, Hkv, D]
    v: jax.Array  # [B, S, Hkv, D]


@_pytree
@dataclasses.dataclass
class GKACache:
    conv_q: jax.Array         # [B, W, Hq, D] last W raw q_proj outputs, oldest first
    conv_k: jax.Array         # [B, W, Hkv, D]
    conv_v: jax.Array | None  # [B, W, Hkv, D], None without the v convolution
    h_kk: jax.Array           # [B, H, D, D] key-key state (symmetric)
    h_kv: jax.Array           # [B, H, D, D] key-value state, K index first


@_pytree
@dataclasses.dataclass
class Cache:
    layers: tuple            # AttentionCache | GKACache per layer
    lengths: jax.Array       # [B] int32

    @property
    def batch_size(self) -> int:
        return self.lengths.shape[0]

    @property
    def max_length(self) -> int:
        for layer in self.layers:
            if isinstance(layer, AttentionCache):
                return layer.k.shape[1]
        return 2**31 - 1  # no attention layer: GKA state is constant-size


def cache_shapes(cfg: ModelConfig, batch: int, max_length: int, dtype, state_dtype=jnp.float32) -> Cache:
    """The cache as ``jax.ShapeDtypeStruct`` leaves (for memory estimates and sharding)."""
    return jax.eval_shape(lambda: init_cache(cfg, batch, max_length, dtype, state_dtype))


def init_cache(cfg: ModelConfig, batch: int, max_length: int, dtype, state_dtype=jnp.float32) -> Cache:
    """An empty cache: zeros everywhere, lengths 0."""
    layers = []
    d, w = cfg.head_dim, cfg.gka.conv_size
    for kind in cfg.layer_types:
        if kind == ATTENTION:
            shape = (batch, max_length, cfg.num_kv_heads, d)
            layers.append(AttentionCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)))
        else:
            kv_conv = (batch, w, cfg.num_kv_heads, d)
            layers.append(GKACache(
                conv_q=jnp.zeros((batch, w, cfg.num_heads, d), state_dtype),
                conv_k=jnp.zeros(kv_conv, state_dtype),
                conv_v=jnp.zeros(kv_conv, state_dtype) if cfg.gka.use_v_conv else None,
                h_kk=jnp.zeros((batch, cfg.num_heads, d, d), state_dtype),
                h_kv=jnp.zeros((batch, cfg.num_heads, d, d), state_dtype),
            ))
    return Cache(tuple(layers), jnp.zeros((batch,), jnp.int32))


def cache_bytes(cfg: ModelConfig, batch: int, max_length: int, dtype, state_dtype=jnp.float32) -> int:
    shapes = cache_shapes(cfg, batch, max_length, dtype, state_dtype)
    return sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(shapes))
