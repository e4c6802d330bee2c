"""Pallas (Triton lowering) GPU kernels for the one-token GKA decode step.

Per (batch b, query head h), with kv head j = h // (H // Hkv), k = beta k_j, v = beta v_j:

    H  = exp(g_kk) H + k k^T                 (h_kk [D, D], updated in place)
    S  = exp(g) S + k v^T                    (h_kv [D, Dv], updated in place)
    x  = Chebyshev(num_iter) solution of (H + ridge ||H||_F I) x = q   (``reference._chebyshev``)
    q' = q + alpha (x - q)                   (alpha None: q' = x; num_iter 0: x = q' = q)
    o  = scale S^T q'

On a GPU with jax-triton the dispatcher runs the Gluon kernel (``gluon_decode``: one fused kernel with an
explicit register layout, 2x faster at B=128 on an H200, docs/kernels.md) and these kernels are the fallback
for shapes it does not cover and the interpret-mode reference in CI.

The step is memory-bound: H and S are each read once and written once, into the input buffers
(``input_output_aliases``: under ``jax.jit(..., donate_argnums=...)`` no state copy is made). Two
implementations:

``split=False``: one fused kernel, one program per (b, h) (grid (B, H)). It keeps H in registers for all
  Chebyshev matrix-vector products, then loads S (H and S are never both live). It needs so many registers
  that an SM holds one program, so each program's serial Chebyshev chain does not overlap memory traffic.
``split=True``: two kernels.
  * "solve" (grid (B, H)): H update, Frobenius norm and the Chebyshev solve from registers; writes x and
    q' ([B, H, D] fp32). Without S it fits two 4-warp programs per SM (H [128, 128] fp32 is 128 registers
    per thread at 4 warps), whose solves overlap each other's loads and stores.
  * "value" (grid (B, H, Dv / value_block)): streams S in [D, value_block] column blocks, S update and
    o = scale S^T q' (a column sum over D: inside a thread, then across warps), many programs per SM.

The matrix-vector product H x of the solve (``matvec``):
  * ``"sum"``: (H x)_i = sum_j H_ij x_j as an elementwise product and row sums (exact fp32). A coalesced
    load spreads each row of H over the 32 lanes of a warp, so every row sum costs 5 rounds of warp
    shuffles (80 shuffles per thread and iteration at 8 warps).
  * ``"sym"``: column sums sum_i H_ij x_i = (H^T x)_j, which is H x because H is symmetric: a decayed sum of
    k k^T (exactly symmetric when the input state is, since the update keeps symmetry; states from a
    chunked prefill are symmetric to rounding, which moves x by rounding only). The sum runs down the rows
    a thread holds, then across warps through shared memory (12 shuffles per thread and iteration at 8
    warps instead of 80). Exact fp32 products and sums.
  * ``"dot"``: a tensor-core product H [x 0 .. 0] (x in column 0 of a [D, 16] operand: dots need
    dimensions >= 16) with the 3xTF32 algorithm (``DotAlgorithmPreset.TF32_TF32_F32_X3``: each fp32
    operand split into two TF32 parts, about 22 significant bits, close to fp32), then the row sum of the
    [D, 16] product, which adds exact zeros. Triton keeps both TF32 parts of H in shared memory (128 KiB:
    one program per SM) and the 16-wide operand does 16 times the useful tensor-core work.
  (Single-pass TF32 and bf16 tensor-core forms of "dot" were tried at c279edd+: at B=128, num_iter 30 on an
  H200 they took 1.13 / 1.10 ms against 0.75 for "sym", and rounded x; they were removed.)
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

MATVECS = ("sum", "sym", "dot")
# Fused kernel: H [128, 128] fp32 is 64 registers per thread at 8 warps.
DEFAULT_NUM_WARPS = 8
DEFAULT_MATVEC = "sum"
# Split solve: at 4 warps H is 128 registers per thread and the kernel fits 2 programs per SM.
DEFAULT_SOLVE_NUM_WARPS = 4
DEFAULT_SOLVE_MATVEC = "sym"
# Split value kernel: an S block [128, 32] fp32 is 32 registers per thread at 4 warps.
DEFAULT_VALUE_NUM_WARPS = 4
DEFAULT_VALUE_BLOCK = 32
_DOT_WIDTH = 16                # the smallest dot dimension the Triton lowering accepts


def _scaled_kv(k_ref, v_ref, beta_ref):
    """k = beta k_j [D] and v = beta v_j [Dv or block] in fp32 (``v_ref`` None: k only)."""
    k = upcast(k_ref[...])
    v = None if v_ref is None else upcast(v_ref[...])
    if beta_ref is not None:
        beta = upcast(beta_ref[...])
        k = beta * k
        v = None if v is None else beta * v
    return k, v


def _apply_h(h_kk, x, matvec, interpret):
    """H x for H [D, D] held in registers; see the module docstring for the three forms."""
    if matvec == "sum":
        return jnp.sum(h_kk * x[None, :], axis=1)
    if matvec == "sym":
        return jnp.sum(h_kk * x[:, None], axis=0)
    first_column = jax.lax.broadcasted_iota(jnp.int32, (1, _DOT_WIDTH), 1) == 0
    x_wide = jnp.where(first_column, x[:, None], 0.0)                           # [D, 16]: x, then zeros
    # XLA:CPU (interpret mode) has no 3xTF32 algorithm: there the dot is plain fp32.
    precision = HIGHEST if interpret else jax.lax.DotAlgorithmPreset.TF32_TF32_F32_X3
    product = jnp.dot(h_kk, x_wide, precision=precision, preferred_element_type=jnp.float32)   # [D, 16]
    return jnp.sum(product, axis=1)


def _solve(h_kk, q, alpha_ref, *, num_iter, ridge_strength, matvec, interpret):
    """(x, q') from the updated H [D, D] (registers) and q [D]; num_iter 0: x = q' = q."""
    if num_iter == 0:
        return q, q
    fro = jnp.sqrt(jnp.sum(jnp.sum(h_kk * h_kk, axis=0), axis=0))   # rows first: cheap (see "sym")
    x = _chebyshev(functools.partial(_apply_h, h_kk, matvec=matvec, interpret=interpret), q, fro,
                   num_iter=num_iter, ridge_strength=ridge_strength)
    q_mixed = x if alpha_ref is None else q + upcast(alpha_ref[...]) * (x - q)
    return x, q_mixed


def _kk_step(q_ref, k, h_kk_ref, g_kk, alpha_ref, h_kk_out_ref, x_ref, solve_args):
    """H = exp(g_kk) H + k k^T written back, then x (written) and q' (returned) from the updated H."""
    h_kk = jnp.exp(g_kk) * upcast(h_kk_ref[...]) + k[:, None] * k[None, :]   # [D, D]
    h_kk_out_ref[...] = h_kk.astype(h_kk_out_ref.dtype)
    x, q_mixed = _solve(h_kk, upcast(q_ref[...]), alpha_ref, **solve_args)
    x_ref[...] = x.astype(x_ref.dtype)
    return q_mixed


def _kv_step(q_mixed, k, v, h_kv_ref, g, h_kv_out_ref, o_ref, scale):
    """S = exp(g) S + k v^T written back, then o = scale S^T q' (a column sum over D) written."""
    h_kv = jnp.exp(g) * upcast(h_kv_ref[...]) + k[:, None] * v[None, :]      # [D, Dv or block]
    h_kv_out_ref[...] = h_kv.astype(h_kv_out_ref.dtype)
    o = scale * jnp.sum(h_kv * q_mixed[:, None], axis=0)                       # [Dv or block]
    o_ref[...] = o.astype(o_ref.dtype)


def _decode_kernel(q_ref, k_ref, v_ref, h_kk_ref, h_kv_ref, g_ref, g_kk_ref, beta_ref, alpha_ref,
                   o_ref, x_ref, h_kk_out_ref, h_kv_out_ref, *, scale, **solve_args):
    """Fused step for one (b, h): vectors [D] / [Dv], states [D, D] / [D, Dv], per-head scalars []
    (None when absent). H and S are never both live."""
    k, v = _scaled_kv(k_ref, v_ref, beta_ref)                 # [D], [Dv]
    g = upcast(g_ref[...])
    g_kk = g if g_kk_ref is None else upcast(g_kk_ref[...])
    q_mixed = _kk_step(q_ref, k, h_kk_ref, g_kk, alpha_ref, h_kk_out_ref, x_ref, solve_args)
    _kv_step(q_mixed, k, v, h_kv_ref, g, h_kv_out_ref, o_ref, scale)


def _solve_kernel(q_ref, k_ref, h_kk_ref, g_kk_ref, beta_ref, alpha_ref, x_ref, q_mixed_ref, h_kk_out_ref,
                  **solve_args):
    """Split "solve" for one (b, h): H update, x and q' = q + alpha (x - q)."""
    k, _ = _scaled_kv(k_ref, None, beta_ref)                  # [D]
    q_mixed_ref[...] = _kk_step(q_ref, k, h_kk_ref, upcast(g_kk_ref[...]), alpha_ref, h_kk_out_ref, x_ref,
                                solve_args)


def _value_kernel(q_mixed_ref, k_ref, v_ref, h_kv_ref, g_ref, beta_ref, o_ref, h_kv_out_ref, *, scale):
    """Split "value" for one (b, h, column block): S block [D, block] update and o block [block]."""
    k, v = _scaled_kv(k_ref, v_ref, beta_ref)                 # [D], [block]
    _kv_step(q_mixed_ref[...], k, v, h_kv_ref, upcast(g_ref[...]), h_kv_out_ref, o_ref, scale)


def gka_decode(q, k, v, beta, g, alpha, h_kk, h_kv, *, num_iter, ridge_strength, scale, g_kk=None,
               precision=HIGHEST, interpret=False, split=True, matvec=None, num_warps=None,
               value_num_warps=None, value_block=None) -> GKAResult:
    """One GKA token with the semantics of ``reference.gka_decode``, as Pallas-Triton kernels.

    q [B, H, D]; k [B, Hkv, D]; v [B, Hkv, Dv]; beta, g, alpha, g_kk [B, H] (beta, alpha, g_kk may be None);
    h_kk [B, H, D, D], h_kv [B, H, D, Dv] states (computed in float32, returned in their own dtype, written
    in place when donated). D and Dv must be powers of 2 (Triton block rule), D >= 16 for ``matvec="dot"``.
    ``precision`` is accepted for signature compatibility: the products are fp32 (``matvec="dot"``: 3xTF32).

    ``split`` picks the two-kernel form (module docstring; the default: on an H200 at B=128, num_iter=30 it
    took 0.80 ms against 1.29 ms for the fused kernel, docs/kernels.md). Tuning, each None for its default:
    ``matvec`` (one of ``MATVECS``; ``DEFAULT_MATVEC`` / ``DEFAULT_SOLVE_MATVEC``) and ``num_warps``
    (``DEFAULT_NUM_WARPS`` / ``DEFAULT_SOLVE_NUM_WARPS``) for the fused kernel / the split solve;
    ``value_num_warps`` (``DEFAULT_VALUE_NUM_WARPS``) and ``value_block`` (``DEFAULT_VALUE_BLOCK``, capped
    at Dv) for the split value kernel. Returns GKAResult(o [B, H, Dv], x [B, H, D] in q's dtype, h_kk, h_kv).
    """
    del precision
    if not AVAILABLE:
        raise RuntimeError("the Pallas Triton lowering is not available in this jax")
    matvec = matvec or (DEFAULT_SOLVE_MATVEC if split else DEFAULT_MATVEC)
    num_warps = num_warps or (DEFAULT_SOLVE_NUM_WARPS if split else DEFAULT_NUM_WARPS)
    if matvec not in MATVECS:
        raise ValueError(f"matvec={matvec!r} is not one of {MATVECS}")
    batch, num_heads, d = q.shape
    num_kv_heads, dv = k.shape[1], v.shape[-1]
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads are not a multiple of {num_kv_heads} kv heads")
    value_block = min(value_block or DEFAULT_VALUE_BLOCK, dv)
    for name, size in (("D", d), ("Dv", dv)) + ((("value_block", value_block),) if split else ()):
        if size & (size - 1):
            raise ValueError(f"{name}={size} is not a power of 2 (Triton block rule)")
    if matvec == "dot" and d < _DOT_WIDTH:
        raise ValueError(f"matvec='dot' needs D >= {_DOT_WIDTH}, got {d}")
    group = num_heads // num_kv_heads

    def head_block(*tail):  # one (b, h) block of an array [B, H, *tail] (a further grid axis is ignored)
        return pl.BlockSpec((None, None, *tail), lambda b, h, *_: (b, h) + (0,) * len(tail))

    def kv_block(size):     # the kv head serving query head h, read in place (no expansion)
        return pl.BlockSpec((None, None, size), lambda b, h, *_: (b, h // group, 0))

    def scalar_block(a):
        return None if a is None else head_block()

    def call(kernel, grid, in_specs, out_specs, out_shape, aliases, warps, name):
        return pl.pallas_call(kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
                              input_output_aliases=aliases, interpret=interpret, name=name,
                              compiler_params=pltriton.CompilerParams(num_warps=warps, num_stages=1))

    solve_args = {"num_iter": num_iter, "ridge_strength": ridge_strength, "matvec": matvec, "interpret": interpret}
    o_shape = jax.ShapeDtypeStruct((batch, num_heads, dv), q.dtype)
    x_shape = jax.ShapeDtypeStruct((batch, num_heads, d), q.dtype)
    h_kk_shape, h_kv_shape = (jax.ShapeDtypeStruct(a.shape, a.dtype) for a in (h_kk, h_kv))
    if not split:
        o, x, h_kk, h_kv = call(
            functools.partial(_decode_kernel, scale=scale, **solve_args), (batch, num_heads),
            [head_block(d), kv_block(d), kv_block(dv), head_block(d, d), head_block(d, dv), head_block(),
             scalar_block(g_kk), scalar_block(beta), scalar_block(alpha)],
            [head_block(dv), head_block(d), head_block(d, d), head_block(d, dv)],
            [o_shape, x_shape, h_kk_shape, h_kv_shape],
            {3: 2, 4: 3},                        # h_kk -> new h_kk, h_kv -> new h_kv
            num_warps, "gka_decode",
        )(q, k, v, h_kk, h_kv, g, g_kk, beta, alpha)
        return GKAResult(o, x, h_kk, h_kv)

    x, q_mixed, h_kk = call(
        functools.partial(_solve_kernel, **solve_args), (batch, num_heads),
        [head_block(d), kv_block(d), head_block(d, d), head_block(), scalar_block(beta), scalar_block(alpha)],
        [head_block(d), head_block(d), head_block(d, d)],
        [x_shape, jax.ShapeDtypeStruct((batch, num_heads, d), jnp.float32), h_kk_shape],   # q' in fp32
        {2: 2},                                  # h_kk -> new h_kk
        num_warps, "gka_decode_solve",
    )(q, k, h_kk, g if g_kk is None else g_kk, beta, alpha)

    state_columns = pl.BlockSpec((None, None, d, value_block), lambda b, h, c: (b, h, 0, c))   # S block
    value_columns = pl.BlockSpec((None, None, value_block), lambda b, h, c: (b, h // group, c))  # v_j block
    out_columns = pl.BlockSpec((None, None, value_block), lambda b, h, c: (b, h, c))             # o block
    o, h_kv = call(
        functools.partial(_value_kernel, scale=scale), (batch, num_heads, dv // value_block),
        [head_block(d), kv_block(d), value_columns, state_columns, head_block(), scalar_block(beta)],
        [out_columns, state_columns],
        [o_shape, h_kv_shape],
        {3: 1},                                  # h_kv -> new h_kv
        value_num_warps or DEFAULT_VALUE_NUM_WARPS, "gka_decode_value",
    )(q_mixed, k, v, h_kv, g, beta)
    return GKAResult(o, x, h_kk, h_kv)
