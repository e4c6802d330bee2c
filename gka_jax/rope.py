"""Rotary position embedding with the Hugging Face frequency rules (default, linear, dynamic NTK, yarn).

For head_dim D the rotation pairs channel i with channel i + D/2 (HF ``rotate_half``):
``out[:D/2] = x1 cos - x2 sin``, ``out[D/2:] = x2 cos + x1 sin`` with angle ``pos * inv_freq[i]``.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from .config import RopeConfig


def _base_exponents(head_dim: int) -> np.ndarray:
    return np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / head_dim  # [D/2]


def _yarn(rope: RopeConfig, head_dim: int, max_position_embeddings: int) -> tuple[np.ndarray, float]:
    factor = rope.factor
    original = rope.original_max_position_embeddings
    if original is not None:
        # HF: checkpoints that raise max_position_embeddings keep the pretrained length here and the
        # ratio of the two is the scale used for the attention factor.
        factor = max_position_embeddings / original
    else:
        original = max_position_embeddings

    def get_mscale(scale, mscale=1.0):
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    attention_factor = rope.attention_factor
    if attention_factor is None:
        if rope.mscale and rope.mscale_all_dim:
            attention_factor = get_mscale(factor, rope.mscale) / get_mscale(factor, rope.mscale_all_dim)
        else:
            attention_factor = get_mscale(factor)

    def correction_dim(rotations):
        return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(rope.theta))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(head_dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    extrapolation_weight = 1 - ramp
    pos_freqs = np.float32(rope.theta) ** _base_exponents(head_dim)
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation_weight) + (1.0 / pos_freqs) * extrapolation_weight
    return inv_freq.astype(np.float32), float(attention_factor)


def static_inv_freq(rope: RopeConfig, head_dim: int, max_position_embeddings: int) -> tuple[np.ndarray, float]:
    """(inv_freq [D/2] float32, attention scaling) for the kinds that do not depend on sequence length."""
    if rope.kind == "yarn":
        return _yarn(rope, head_dim, max_position_embeddings)
    inv_freq = 1.0 / (np.float32(rope.theta) ** _base_exponents(head_dim))
    if rope.kind == "linear":
        inv_freq = inv_freq / rope.factor
    return inv_freq.astype(np.float32), 1.0


def rope_cos_sin(rope: RopeConfig, head_dim: int, max_position_embeddings: int, positions: jnp.ndarray):
    """cos, sin [B, T, D/2] float32 for integer ``positions`` [B, T]."""
    pos = positions.astype(jnp.float32)
    if rope.kind == "dynamic":
        # Dynamic NTK: the base grows once the sequence outgrows the pretrained length, computed
        # from the longest position seen in this call (HF recomputes inv_freq per forward).
        original = rope.original_max_position_embeddings or max_position_embeddings
        seq_len = jnp.maximum(jnp.max(positions).astype(jnp.float32) + 1, original)
        base = rope.theta * ((rope.factor * seq_len / original) - (rope.factor - 1)) ** (head_dim / (head_dim - 2))
        inv_freq = 1.0 / (base ** jnp.asarray(_base_exponents(head_dim)))
        scaling = 1.0
    else:
        inv_freq_np, scaling = static_inv_freq(rope, head_dim, max_position_embeddings)
        inv_freq = jnp.asarray(inv_freq_np)
    angles = pos[..., None] * inv_freq  # [B, T, D/2]
    return jnp.cos(angles) * scaling, jnp.sin(angles) * scaling


def apply_rope(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    """Rotate ``x`` [B, T, H, D] by cos/sin [B, T, D/2] (cast to x's dtype first, as HF does)."""
    cos = cos.astype(x.dtype)[:, :, None, :]
    sin = sin.astype(x.dtype)[:, :, None, :]
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
