"""Pallas (Triton lowering) GPU kernel for the one-token GKA decode step.

Per (batch b, query head h), with kv head j = h // (H // Hkv), k = beta k_j, v = beta v_j:

    H  = exp(g_kk) H + k k^T                 (h_kk [D, D], updated in place)
    S  = exp(g) S + k v^T                    (h_kv [D, Dv], updated in place)
    x  = Chebyshev(num_iter) solution of (H + ridge ||H||_F I) x = q   (``reference._chebyshev``)
    q' = q + alpha (x - q)                   (alpha None: q' = x; num_iter 0: x = q' = q)
    o  = scale S^T q'

One program per (b, h) (grid (B, H)). The decode step is memory-bound: each program reads its H and S blocks
once, keeps H in registers for all Chebyshev matrix-vector products (elementwise multiply + row sums, exact
fp32, no dot), and writes H and S once, into the input buffers (``input_output_aliases``: under
``jax.jit(..., donate_argnums=...)`` no state copy is made). S is loaded only after the solve so that H and S
are never both live in registers.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from ..numerics import upcast
from .reference import HIGHEST, GKAResult, _chebyshev

try:  # the Triton lowering is deprecated in jax 0.11 and may disappear
    from jax.experimental.pallas import triton as pltriton
    AVAILABLE = True
except ImportError:  # pragma: no cover - depends on the installed jax
    pltriton = None
    AVAILABLE = False

DEFAULT_NUM_WARPS = 8  # for D = Dv = 128: H [128, 128] fp32 is 64 registers per thread at 8 warps


def _decode_kernel(q_ref, k_ref, v_ref, h_kk_ref, h_kv_ref, g_ref, g_kk_ref, beta_ref, alpha_ref,
                   o_ref, x_ref, h_kk_out_ref, h_kv_out_ref, *, num_iter, ridge_strength, scale):
    """One (b, h): vectors [D] / [Dv], states [D, D] / [D, Dv], per-head scalars [] (None when absent)."""
    k = upcast(k_ref[...])                                    # [D]
    v = upcast(v_ref[...])                                    # [Dv]
    if beta_ref is not None:
        beta = upcast(beta_ref[...])
        k, v = beta * k, beta * v
    g = upcast(g_ref[...])
    g_kk = g if g_kk_ref is None else upcast(g_kk_ref[...])
    q = upcast(q_ref[...])                                    # [D]

    h_kk = jnp.exp(g_kk) * upcast(h_kk_ref[...]) + k[:, None] * k[None, :]   # [D, D]
    h_kk_out_ref[...] = h_kk.astype(h_kk_out_ref.dtype)

    if num_iter > 0:
        fro = jnp.sqrt(jnp.sum(jnp.sum(h_kk * h_kk, axis=1), axis=0))

        def apply_h(x):  # (H x)_i = sum_j H_ij x_j, from registers
            return jnp.sum(h_kk * x[None, :], axis=1)

        x = _chebyshev(apply_h, q, fro, num_iter=num_iter, ridge_strength=ridge_strength)
        q_mixed = x if alpha_ref is None else q + upcast(alpha_ref[...]) * (x - q)
    else:
        x = q
        q_mixed = q
    x_ref[...] = x.astype(x_ref.dtype)

    h_kv = jnp.exp(g) * upcast(h_kv_ref[...]) + k[:, None] * v[None, :]      # [D, Dv]
    h_kv_out_ref[...] = h_kv.astype(h_kv_out_ref.dtype)
    o = scale * jnp.sum(h_kv * q_mixed[:, None], axis=0)                       # [Dv]
    o_ref[...] = o.astype(o_ref.dtype)


def gka_decode(q, k, v, beta, g, alpha, h_kk, h_kv, *, num_iter, ridge_strength, scale, g_kk=None,
               precision=HIGHEST, interpret=False, num_warps=None) -> GKAResult:
    """One GKA token with the semantics of ``reference.gka_decode``, as one Pallas-Triton kernel.

    q [B, H, D]; k [B, Hkv, D]; v [B, Hkv, Dv]; beta, g, alpha, g_kk [B, H] (beta, alpha, g_kk may be None);
    h_kk [B, H, D, D], h_kv [B, H, D, Dv] states (computed in float32, returned in their own dtype, written
    in place when donated). D and Dv must be powers of 2 (Triton block rule). ``precision`` is accepted for
    signature compatibility: the kernel has no dot, its products are elementwise fp32. ``num_warps`` defaults
    to ``DEFAULT_NUM_WARPS``. Returns GKAResult(o [B, H, Dv], x [B, H, D] in q's dtype, h_kk, h_kv).
    """
    del precision
    if not AVAILABLE:
        raise RuntimeError("the Pallas Triton lowering is not available in this jax")
    batch, num_heads, d = q.shape
    num_kv_heads, dv = k.shape[1], v.shape[-1]
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads are not a multiple of {num_kv_heads} kv heads")
    for name, size in (("D", d), ("Dv", dv)):
        if size & (size - 1):
            raise ValueError(f"{name}={size} is not a power of 2 (Triton block rule)")
    group = num_heads // num_kv_heads

    def head_block(*tail):  # one (b, h) block of an array [B, H, *tail]
        return pl.BlockSpec((None, None, *tail), lambda b, h: (b, h) + (0,) * len(tail))

    def kv_block(size):     # the kv head serving query head h, read in place (no expansion)
        return pl.BlockSpec((None, None, size), lambda b, h: (b, h // group, 0))

    def scalar_block(a):
        return None if a is None else head_block()

    kernel = functools.partial(_decode_kernel, num_iter=num_iter, ridge_strength=ridge_strength, scale=scale)
    o, x, h_kk, h_kv = pl.pallas_call(
        kernel,
        grid=(batch, num_heads),
        in_specs=[head_block(d), kv_block(d), kv_block(dv), head_block(d, d), head_block(d, dv),
                  head_block(), scalar_block(g_kk), scalar_block(beta), scalar_block(alpha)],
        out_specs=[head_block(dv), head_block(d), head_block(d, d), head_block(d, dv)],
        out_shape=[jax.ShapeDtypeStruct((batch, num_heads, dv), q.dtype),
                   jax.ShapeDtypeStruct((batch, num_heads, d), q.dtype),
                   jax.ShapeDtypeStruct(h_kk.shape, h_kk.dtype),
                   jax.ShapeDtypeStruct(h_kv.shape, h_kv.dtype)],
        input_output_aliases={3: 2, 4: 3},   # h_kk -> new h_kk, h_kv -> new h_kv
        compiler_params=pltriton.CompilerParams(num_warps=num_warps or DEFAULT_NUM_WARPS, num_stages=1),
        interpret=interpret,
        name="gka_decode",
    )(q, k, v, h_kk, h_kv, g, g_kk, beta, alpha)
    return GKAResult(o, x, h_kk, h_kv)
