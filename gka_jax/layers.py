"""Small building blocks: parameter creation with logical axes, RMSNorm, SwiGLU MLP, embedding.

Every parameter is an ``nnx.Param`` carrying ``axes``: one logical axis name per dimension. The sharding
table in ``sharding.py`` maps those names to mesh axes; nothing else in the package names mesh axes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .numerics import acc_dtype, upcast


def param(rngs: nnx.Rngs | None, shape, axes, dtype, init="normal", fan_in: int | None = None) -> nnx.Param:
    """A parameter of ``shape`` with logical ``axes``; ``init`` is 'normal' (std 1/sqrt(fan_in), fan_in
    defaulting to the last dimension: weights are stored [out..., in] as in PyTorch), 'ones',
    'zeros', or the GKA gate inits 'a_log' / 'dt_bias'. ``rngs`` may be None for non-random inits."""
    assert len(shape) == len(axes), (shape, axes)
    if init == "ones":
        value = jnp.ones(shape, dtype)
    elif init == "zeros":
        value = jnp.zeros(shape, dtype)
    elif init == "a_log":  # GKA decay rates: A = U(1, 16)
        value = jnp.log(jax.random.uniform(rngs.params(), shape, jnp.float32, 1.0, 16.0)).astype(dtype)
    elif init == "dt_bias":  # inverse softplus of dt ~ logU(1e-3, 1e-1)
        dt = jnp.exp(jax.random.uniform(rngs.params(), shape, jnp.float32, jnp.log(1e-3), jnp.log(1e-1)))
        value = (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)
    elif init == "normal":
        std = (fan_in or shape[-1]) ** -0.5
        value = (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
    else:
        raise ValueError(f"unknown init {init!r}")
    return nnx.Param(value, axes=tuple(axes), init=init, fan_in=fan_in or shape[-1])


def host_init(init: str, shape, fan_in: int, rng: np.random.Generator) -> np.ndarray:
    """The same initialisations as ``param``, drawn on the host with NumPy (float32)."""
    if init == "ones":
        return np.ones(shape, np.float32)
    if init == "zeros":
        return np.zeros(shape, np.float32)
    if init == "a_log":
        return np.log(rng.uniform(1.0, 16.0, shape)).astype(np.float32)
    if init == "dt_bias":
        dt = np.exp(rng.uniform(np.log(1e-3), np.log(1e-1), shape))
        return (dt + np.log(-np.expm1(-dt))).astype(np.float32)
    if init == "normal":
        return (rng.standard_normal(shape) * fan_in ** -0.5).astype(np.float32)
    raise ValueError(f"unknown init {init!r}")


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """HF Qwen3 RMSNorm: normalise in float32, cast back to x's dtype, then scale by the weight."""
    x32 = upcast(x)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight * normed.astype(x.dtype)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, axis_name: str, dtype, rngs: nnx.Rngs | None = None):
        self.eps = eps
        self.weight = param(rngs, (dim,), (axis_name,), dtype, init="ones")

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_norm(x, self.weight[...], self.eps)


class MLP(nnx.Module):
    """SwiGLU: down(silu(x W_gate^T) * (x W_up^T)); weights [out, in] like the HF checkpoint."""

    def __init__(self, hidden: int, intermediate: int, dtype, precision, rngs: nnx.Rngs | None = None):
        self.precision = precision
        self.gate_proj = param(rngs, (intermediate, hidden), ("mlp", "embed"), dtype)
        self.up_proj = param(rngs, (intermediate, hidden), ("mlp", "embed"), dtype)
        self.down_proj = param(rngs, (hidden, intermediate), ("embed", "mlp"), dtype)

    def __call__(self, x: jax.Array) -> jax.Array:  # x [B, T, E]
        p = self.precision
        gate = jnp.einsum("bte,fe->btf", x, self.gate_proj[...], precision=p)
        up = jnp.einsum("bte,fe->btf", x, self.up_proj[...], precision=p)
        return jnp.einsum("btf,ef->bte", jax.nn.silu(gate) * up, self.down_proj[...], precision=p)


class Embedding(nnx.Module):
    def __init__(self, vocab: int, hidden: int, dtype, rngs: nnx.Rngs | None = None):
        self.embedding = param(rngs, (vocab, hidden), ("vocab", "embed"), dtype, fan_in=1)

    def __call__(self, tokens: jax.Array) -> jax.Array:  # [B, T] int -> [B, T, E]
        return jnp.take(self.embedding[...], tokens, axis=0)

    def attend(self, x: jax.Array, precision) -> jax.Array:  # tied lm_head: [B, T, E] -> [B, T, V]
        return jnp.einsum("bte,ve->btv", x, self.embedding[...], precision=precision,
                          preferred_element_type=acc_dtype(x.dtype))
