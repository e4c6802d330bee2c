"""Accumulation dtype: float32 for 16/32-bit inputs, float64 for float64 (x64 runs used as an oracle)."""

import jax.numpy as jnp


def acc_dtype(dtype):
    return jnp.promote_types(dtype, jnp.float32)


def upcast(x):
    """x in its accumulation dtype (float32, or float64 when x is float64)."""
    return x.astype(acc_dtype(x.dtype))
