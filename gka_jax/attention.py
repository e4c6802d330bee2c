"""Qwen3 self-attention: GQA, per-head RMSNorm of q and k before RoPE, causal softmax in float32."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from .cache import AttentionCache
from .config import ModelConfig
from .layers import param, rms_norm
from .numerics import acc_dtype
from .rope import apply_rope, rope_cos_sin

_MASKED = float(jnp.finfo(jnp.float32).min)


def attention_core(q, k, v, mask, precision):
    """softmax(q k^T / sqrt(D) + mask) v with grouped kv heads.

    q [B, T, Hq, D]; k, v [B, S, Hkv, D]; mask [B, T, S] bool (True = attend) -> [B, T, Hq, D].
    """
    b, t, num_heads, d = q.shape
    num_kv = k.shape[2]
    q = q.reshape(b, t, num_kv, num_heads // num_kv, d)
    logits = jnp.einsum("btkgd,bskd->bkgts", q, k, precision=precision,
                        preferred_element_type=acc_dtype(q.dtype)) * (d ** -0.5)
    logits = jnp.where(mask[:, None, None], logits, _MASKED)
    probs = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(v.dtype), v, precision=precision,
                     preferred_element_type=acc_dtype(v.dtype))
    return out.reshape(b, t, num_heads, d).astype(q.dtype)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype, precision, rngs: nnx.Rngs | None = None):
        self.cfg = cfg
        self.precision = precision
        e, h, kv, d = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        # Weights keep the checkpoint's [out, in] orientation with heads split out: [H, D, E], [E, H, D].
        self.q_proj = param(rngs, (h, d, e), ("heads", "head_dim", "embed"), dtype)
        self.k_proj = param(rngs, (kv, d, e), ("kv_heads", "head_dim", "embed"), dtype)
        self.v_proj = param(rngs, (kv, d, e), ("kv_heads", "head_dim", "embed"), dtype)
        self.o_proj = param(rngs, (e, h, d), ("embed", "heads", "head_dim"), dtype, fan_in=h * d)
        self.q_norm = param(rngs, (d,), ("head_dim",), dtype, init="ones")
        self.k_norm = param(rngs, (d,), ("head_dim",), dtype, init="ones")
        if cfg.attention_bias:
            self.q_bias = param(rngs, (h, d), ("heads", "head_dim"), dtype, init="zeros")
            self.k_bias = param(rngs, (kv, d), ("kv_heads", "head_dim"), dtype, init="zeros")
            self.v_bias = param(rngs, (kv, d), ("kv_heads", "head_dim"), dtype, init="zeros")
            self.o_bias = param(rngs, (e,), ("embed",), dtype, init="zeros")

    def __call__(self, x, positions, valid, cache: AttentionCache, *, fresh: bool):
        """x [B, T, E]; positions [B, T] int; valid [B, T] bool (False = padding, not written).

        ``fresh``: the cache holds nothing before these tokens, so attend only among them.
        Returns (y [B, T, E], updated cache).
        """
        cfg, p = self.cfg, self.precision
        q = jnp.einsum("bte,hde->bthd", x, self.q_proj[...], precision=p)
        k = jnp.einsum("bte,hde->bthd", x, self.k_proj[...], precision=p)
        v = jnp.einsum("bte,hde->bthd", x, self.v_proj[...], precision=p)
        if cfg.attention_bias:
            q, k, v = q + self.q_bias[...], k + self.k_bias[...], v + self.v_bias[...]
        q = rms_norm(q, self.q_norm[...], cfg.rms_norm_eps)
        k = rms_norm(k, self.k_norm[...], cfg.rms_norm_eps)
        cos, sin = rope_cos_sin(cfg.rope, cfg.head_dim, cfg.max_position_embeddings, positions)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

        # Write the new keys/values at their positions; padding goes out of bounds and is dropped.
        max_len = cache.k.shape[1]
        slots = jnp.where(valid, positions, max_len)                    # [B, T]
        rows = jnp.arange(x.shape[0])[:, None]
        new_cache = AttentionCache(
            k=cache.k.at[rows, slots].set(k.astype(cache.k.dtype), mode="drop"),
            v=cache.v.at[rows, slots].set(v.astype(cache.v.dtype), mode="drop"),
        )
        if fresh:
            t = x.shape[1]
            mask = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (x.shape[0], t, t))
            out = attention_core(q, k, v, mask, p)
        else:
            key_pos = jnp.arange(max_len)
            mask = key_pos[None, None, :] <= positions[:, :, None]      # [B, T, S]
            out = attention_core(q, new_cache.k.astype(q.dtype), new_cache.v.astype(q.dtype), mask, p)
        y = jnp.einsum("bthd,ehd->bte", out, self.o_proj[...], precision=p)
        if cfg.attention_bias:
            y = y + self.o_bias[...]
        return y, new_cache
