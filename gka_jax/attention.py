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


QUERY_BLOCK = 512  # queries per step of the XLA path: logits stay [B, Hkv, G, 512, S]


def attention_core(q, k, v, query_pos, precision):
    """softmax(q k^T / sqrt(D) + mask) v with grouped kv heads; key slot s is visible to query t when
    s <= query_pos[b, t].

    q [B, T, Hq, D]; k, v [B, S, Hkv, D]; query_pos [B, T] int -> [B, T, Hq, D]. Long query blocks are
    processed QUERY_BLOCK at a time (``lax.map``) so the logits never take [B, H, T, S] memory.
    """
    b, t, num_heads, d = q.shape
    num_kv = k.shape[2]
    key_slot = jnp.arange(k.shape[1])

    def attend(q_blk, pos_blk):                                         # [B, t, Hq, D], [B, t]
        tb = q_blk.shape[1]
        q_blk = q_blk.reshape(b, tb, num_kv, num_heads // num_kv, d)
        logits = jnp.einsum("btkgd,bskd->bkgts", q_blk, k, precision=precision,
                            preferred_element_type=acc_dtype(q.dtype)) * (d ** -0.5)
        mask = key_slot[None, None, :] <= pos_blk[:, :, None]           # [B, t, S]
        logits = jnp.where(mask[:, None, None], logits, _MASKED)
        probs = jax.nn.softmax(logits, axis=-1)
        out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(v.dtype), v, precision=precision,
                         preferred_element_type=acc_dtype(v.dtype))
        return out.reshape(b, tb, num_heads, d).astype(q.dtype)

    if t <= QUERY_BLOCK or t % QUERY_BLOCK:
        return attend(q, query_pos)
    blocks = t // QUERY_BLOCK
    q_blocks = jnp.moveaxis(q.reshape(b, blocks, QUERY_BLOCK, num_heads, d), 1, 0)
    pos_blocks = jnp.moveaxis(query_pos.reshape(b, blocks, QUERY_BLOCK), 1, 0)
    out = jax.lax.map(lambda xs: attend(*xs), (q_blocks, pos_blocks))  # [N, B, block, Hq, D]
    return jnp.moveaxis(out, 0, 1).reshape(b, t, num_heads, d)


def use_flash_attention(q) -> bool:
    """cuDNN's fused causal attention (jax.nn.dot_product_attention) serves fresh prefill on GPU in
    16-bit dtypes; float32 models keep the exact XLA path."""
    return (jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16)
            and q.shape[-1] % 8 == 0 and q.shape[-1] <= 128)


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
        if fresh and use_flash_attention(q):
            # Rows are right-padded, so causal attention never lets a real token see padding.
            out = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
        elif fresh:
            local = jnp.broadcast_to(jnp.arange(x.shape[1], dtype=jnp.int32), positions.shape)
            out = attention_core(q, k, v, local, p)
        else:
            out = attention_core(q, new_cache.k.astype(q.dtype), new_cache.v.astype(q.dtype), positions, p)
        y = jnp.einsum("bthd,ehd->bte", out, self.o_proj[...], precision=p)
        if cfg.attention_bias:
            y = y + self.o_bias[...]
        return y, new_cache
