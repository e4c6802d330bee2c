"""Pallas (Triton lowering) GPU kernel for the chunked Chebyshev ridge solve of the GKA prefill.

For every token t it computes x_t, the Chebyshev(num_iter) solution of (H_t + ridge ||H_t||_F I) x = q_t,
exactly as ``reference.chebyshev_chunked``. One program handles one chunk of C tokens of one (batch, head).
Let H0 be the state at the chunk start, G the in-chunk inclusive cumsum of the log-decay g_kk, and
M[t, s] = exp(G_t - G_s) for s <= t (else 0). K [C, D] holds the keys as rows (beta_s times key s of kv head
h // group) and X [C, D] the iterates x_t. Then

    rows of H_t x_t = exp(G_t) (X H0)_t + (((X K^T) * M) K)_t           (X H0 = (H0 X^T)^T: H0 is symmetric)
    ||H_t||_F^2     = exp(2 G_t) ||H0||_F^2 + 2 exp(G_t) (M kHk)_t + sum_u (M (K K^T)^2)_{t,u} M_{t,u}
                      with kHk_s = k_s^T H0 k_s                         (three non-negative terms)

The Frobenius norms are computed once, before the iteration loop; the recurrence and the fro == 0 guard are
``reference._chebyshev``'s. Grid (N, H, B), blocks q, x [C, D], k [C, D] (read in place from kv head
h // group: no expanded copy), beta, g [C], H0 [D, D]. Per program: one read of each block, one write of x.
Triton keeps the loop-invariant dot operands (H0, K) in shared memory, in ``operand_dtype``.

Two forms of the iteration loop (``loop``; ``default_loop`` picks by operand dtype):
  * masked: the reference's recurrence and products as written above. Across the loop the registers hold
    X, the previous iterate, q, M and the per-row coefficients: five tiles, more than 255 registers per
    thread at 4 warps (it spills ~1.2 KiB per thread, 134 spill loads/stores per iteration).
  * factored (``_factored_loop``, "auto"): M[t, s] = a_t b_s, so the decay mask folds into row scalings
    of the dot operands, and the iteration carries (x, step, residual) with the matrix product accumulated
    into the residual tile: three fp32 tiles (43 spill loads/stores per iteration), and the lean preamble
    keeps H0 and K in ``operand_dtype`` only. A chunk whose decay span exceeds ``FACTORED_SPAN`` (exp(G)
    out of fp32 range) runs the masked loop instead (``lax.cond`` per program).
Register figures from an offline compile for sm_90a (Triton 3.6, C = 64, D = 128, bf16 operands, 4 warps;
XLA's Triton build may differ). On an H200 at T = 16K, num_iter 30 (docs/benchmarks.md): 3.35 ms factored
against 3.60 for the masked kernel (0.087 against 0.11 ms per iteration, 0.67 against 0.99 ms outside
the loop). 8 warps split every tile's columns across two warpgroups and convert the dot operands through
shared memory each iteration (33 barriers per iteration): slower. IEEE fp32 dots (HIGHEST with fp32
operands) run on FMA units and spill tens of KiB: a numerics check, not a fast path.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from .pallas_chunk import Segmented, fixed_start
from .reference import HIGHEST, _chebyshev, chebyshev_coefficients

_LN2 = 0.6931471805599453

try:  # the Triton lowering is deprecated in jax 0.11 and may disappear
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as pltriton
    AVAILABLE = True
except ImportError:  # pragma: no cover - depends on the installed jax
    pl = pltriton = None
    AVAILABLE = False


def _solve_kernel(q_ref, k_ref, beta_ref, g_ref, start_refs, alpha_ref, x_ref, mixed_ref=None, *, num_iter,
                  ridge_strength, precision, operand_dtype, loop):
    """One (chunk, head, batch): q, k, x [C, D]; beta (or None), g [C]; start_refs the chunk-start h_kk
    [D, D] (``Segmented.kernel_inputs``); with ``mixed_ref`` [C, D] also q' = q + alpha (x - q) (alpha [C],
    or None: q' = x)."""
    f32 = jnp.float32

    def dot(a, b):  # operands in operand_dtype, fp32 accumulation
        return jnp.dot(a.astype(operand_dtype), b.astype(operand_dtype), precision=precision,
                       preferred_element_type=f32)

    chunk = q_ref.shape[0]

    def keys(row_scale=None):  # rows beta_s k_s [C, D] in fp32, times row_scale [C, 1]; read again per use
        k = k_ref[...].astype(f32)
        if beta_ref is not None:
            k = k * beta_ref[...].astype(f32)[:, None]
        return k if row_scale is None else k * row_scale

    # The factored loop runs fastest after a lean preamble (q read where it is used, H0 and K held in
    # operand_dtype only), the masked loop after one that holds q, fp32 K and fp32 H0 (H200, T=16K: solve
    # 3.35 / 3.60 ms that way; the masked loop behind the lean preamble took 5.27 ms, and the factored loop
    # behind the held one lost to the masked loop, 4.66 against 4.32 ms for the whole prefill).
    held = loop == "masked"
    q = q_ref[...].astype(f32) if held else None                       # [C, D]
    k = keys()                                                         # [C, D]
    k_op = k.astype(operand_dtype)
    gcum = jnp.cumsum(g_ref[...].astype(f32))                          # [C]
    rows = lax.broadcasted_iota(jnp.int32, (chunk, chunk), 0)
    cols = lax.broadcasted_iota(jnp.int32, (chunk, chunk), 1)
    mask = jnp.exp(jnp.where(rows >= cols, gcum[:, None] - gcum[None, :], -jnp.inf))   # [C, C]
    start_decay = jnp.exp(gcum)                                        # [C]
    h0 = fixed_start(*start_refs)                                      # [D, D]
    h0 = h0.astype(f32) if held else h0.astype(operand_dtype)
    h0_op = h0.astype(operand_dtype)
    k_norm = k if held else k_op.astype(f32)                           # the keys' second factor in k^T H0 k

    # ||H_t||_F^2, three non-negative terms.
    h0_sq = jnp.sum(jnp.sum(jnp.square(h0.astype(f32)), axis=1), axis=0)   # []
    k_h0_k = jnp.sum(dot(k_op, h0_op) * k_norm, axis=1)                # [C]
    gram = dot(k_op, k_op.T)                                           # [C, C]
    fro_sq = (start_decay * start_decay * h0_sq
              + 2.0 * start_decay * jnp.sum(mask * k_h0_k[None, :], axis=1)
              + jnp.sum(dot(mask, gram * gram) * mask, axis=1))
    fro = jnp.sqrt(jnp.maximum(fro_sq, 0.0))                           # [C]

    loop_args = (k_op, gcum, h0_op, fro)
    loop_kwargs = dict(q_ref=q_ref, keys=keys, num_iter=num_iter, ridge_strength=ridge_strength, dot=dot,
                       operand_dtype=operand_dtype)
    masked = functools.partial(_masked_loop, mask=mask, start_decay=start_decay, q=q, **loop_kwargs)
    if num_iter == 0:
        x = chebyshev_coefficients(fro, ridge_strength)[1] * q_ref[...].astype(f32)   # the initial iterate
    elif loop == "masked":
        x = masked(*loop_args)
    else:
        # The factored loop needs every exp(+-(G_t - R)) in fp32 range; chunks with a larger decay span
        # (log-decays summing past FACTORED_SPAN within the chunk) take the masked loop.
        top = jnp.maximum(jnp.max(gcum), 0.0)
        bottom = jnp.minimum(jnp.min(gcum), 0.0)
        factored = functools.partial(_factored_loop, top=top, bottom=bottom, **loop_kwargs)
        x = lax.cond(top - bottom <= FACTORED_SPAN, factored, masked, *loop_args)
    x_ref[...] = x.astype(x_ref.dtype)
    if mixed_ref is not None:
        if q is None:                # loaded again (after the store) rather than held through the loop
            q = q_ref[...].astype(f32)
        mixed = x if alpha_ref is None else q + alpha_ref[...].astype(f32)[:, None] * (x - q)
        mixed_ref[...] = mixed.astype(mixed_ref.dtype)


LOOPS = ("auto", "masked")   # auto: the factored loop where FACTORED_SPAN allows, else the masked loop
FACTORED_SPAN = 150.0   # max - min of {0, G_t} over a chunk for the factored loop (fp32 exp range: +-87)


def default_loop(operand_dtype) -> str:
    """"auto" for 16-bit dot operands; "masked" for fp32 operands (TF32 / IEEE), whose fp32 step tile
    the factored loop would hold as the dot operand (measured slower: 19.7 against 14.2 ms for the TF32
    prefill at T=16K on an H200)."""
    return "auto" if jnp.dtype(operand_dtype).itemsize == 2 else "masked"


def _masked_loop(k_op, gcum, h0_op, fro, *, q_ref, q, keys, mask, start_decay, num_iter, ridge_strength, dot,
                 operand_dtype):
    """``reference._chebyshev`` with rows of H_t x_t = exp(G_t) (X H0)_t + (((X K^T) * M) K)_t (q: the
    queries [C, D] fp32 if already read, else None)."""
    del keys, gcum, operand_dtype
    decay = start_decay[:, None]                                       # [C, 1]

    def apply_h(x):
        scores = dot(x, k_op.T) * mask                                 # [C, C]
        return decay * dot(x, h0_op) + dot(scores, k_op)

    q = q_ref[...].astype(jnp.float32) if q is None else q             # [C, D]
    return _chebyshev(apply_h, q, fro, num_iter=num_iter, ridge_strength=ridge_strength)


def _factored_loop(k_op, gcum, h0_op, fro, *, q_ref, keys, top, bottom, num_iter, ridge_strength, dot,
                   operand_dtype):
    """``reference._chebyshev`` in a form that holds three [C, D] fp32 tiles in registers instead of five.

    Decay mask: with a = exp(G - R), b = exp(R - G) (R = m ln 2, m the integer nearest (top + bottom) /
    (2 ln 2), so |G_t - R| <= FACTORED_SPAN / 2 + 1), M[t, s] = a_t b_s for s <= t and exp(G_t) = a_t 2^m.
    So for Y [C, D] whose row t is to be multiplied by H_t:
        H_t Y = (a Y) (2^m H0) + causal((a Y) (b K)^T) K        (a Y: rows of Y scaled by a)
    two dots that accumulate into one tile, with no [C, C] mask. The causal select (not a product) drops
    the s > t entries, whose a_t b_s may overflow.

    Iteration: the reference's x' = omega (x - step r) + (1 - omega) x_prev, r = A x - q, A = H_t + lambda I,
    carried as x, the step d = x' - x and the residual s = q - A x instead of x, x_prev and q:
        d' = omega step s + (omega - 1) d,   x' = x + d',   s' = s - A d'
    from x_0 = step q (the reference's first iterate), d = x_0 (x_prev = 0) and s = q - A x_0 (one extra
    product). A d' accumulates into s in place. The iterates are the same in exact arithmetic; in floating
    point the residual is updated rather than recomputed, so the operand rounding falls on the shrinking
    steps d' rather than on the iterates x.
    """
    chunk = k_op.shape[0]
    shift = jnp.floor((top + bottom) * (0.5 / _LN2) + 0.5)              # m
    a = jnp.exp(gcum - shift * _LN2)[:, None]                          # [C, 1]
    b = jnp.exp(shift * _LN2 - gcum)[:, None]                          # [C, 1]
    h0_op = (h0_op * jnp.exp2(shift).astype(h0_op.dtype)).astype(operand_dtype)   # [D, D] (exact: 2^m)
    kb_op = keys(b).astype(operand_dtype)                              # [C, D]
    rows = lax.broadcasted_iota(jnp.int32, (chunk, chunk), 0)
    causal = rows >= lax.broadcasted_iota(jnp.int32, (chunk, chunk), 1)
    lam, step, rho_sq_4 = chebyshev_coefficients(fro, ridge_strength)  # [C, 1] each

    def minus_a_times(y, acc):  # acc - A y
        y_op = (y * -a).astype(operand_dtype)                          # [C, D] rows -a_t y_t
        acc = acc - lam * y
        scores = dot(y_op, kb_op.T)                                    # [C, C]
        acc = acc + dot(y_op, h0_op)
        scores = jnp.where(causal, scores, 0.0)
        return acc + dot(scores, k_op)

    q = q_ref[...].astype(jnp.float32)                                 # [C, D]
    x = step * q
    residual = minus_a_times(x, q)

    def body(_, carry):
        x, d, residual, omega = carry
        omega = 1.0 / (1.0 - rho_sq_4 * omega)
        d = (omega * step) * residual + (omega - 1.0) * d
        return x + d, d, minus_a_times(d, residual), omega

    x, _, _, _ = lax.fori_loop(0, num_iter, body, (x, x, residual, jnp.full_like(step, 2.0)))
    return x


def _default_num_warps(chunk_size: int, head_dim: int) -> int:
    """4: at C = 64, D = 128 two 4-warp programs share an SM and beat one 8-warp program despite more spills
    (3.6 against 6.6 ms at T = 16K on an H200, docs/benchmarks.md)."""
    del chunk_size, head_dim
    return 4


@functools.partial(jax.jit, static_argnames=(
    "num_iter", "ridge_strength", "chunk_size", "precision", "operand_dtype", "interpret", "num_warps",
    "num_stages", "x_dtype", "mixed_dtype", "loop"))
def chebyshev_solve(q, k, beta, g_kk, h_kk_starts, *, num_iter, ridge_strength, chunk_size=64, precision=HIGHEST,
                    operand_dtype=jnp.float32, interpret=False, num_warps=None, num_stages=None, alpha=None,
                    x_dtype=jnp.float32, mixed_dtype=None, loop=None):
    """Chebyshev solutions x_t of (H_t + ridge ||H_t||_F I) x = q_t, one Pallas-Triton program per chunk.

    Semantics of ``reference.chebyshev_chunked(q, expand_heads(k, .., beta, H)[0], g_kk, h_kk_starts, ...)``
    (num_iter 0 gives the initial iterate x = step q, as there).
    q [B, T, H, D] unit-norm queries (any float dtype); k [B, T, Hkv, D] unit-norm keys, not expanded (query
    head h reads kv head h // (H // Hkv)); beta [B, T, H] key multiplier or None; g_kk [B, T, H] log-decay
    of h_kk; h_kk_starts [B, H, N, D, D] the state at the start of each chunk (``chunk_state_pass``,
    N = ceil(T / chunk_size)), or the ``Segmented`` h_kk starts of ``pallas_chunk.state_pass_segmented``
    (each program fixes its start block up as it loads it). Returns x [B, T, H, D] in ``x_dtype`` (float32 by default).
    With ``mixed_dtype`` set it returns (x, q') with the GKA query mix q' = q + alpha (x - q) (alpha
    [B, T, H], or None for q' = x) computed in fp32 in the kernel and stored in ``mixed_dtype``, which saves
    the GLA a separate elementwise pass over x.

    Matmul numerics: every dot casts its operands to ``operand_dtype`` (float32, or bfloat16 as in the
    PyTorch kernels) and accumulates in fp32; ``precision`` picks the fp32 dot algorithm in the Triton
    lowering (HIGHEST: IEEE fp32 on FMA units; DEFAULT: TF32 tensor cores; other ``lax.DotAlgorithmPreset``
    values pass through, but TF32_TF32_F32_X3 needs 320 KiB of shared memory at C = 64, D = 128, more than an
    SM has). Elementwise math is fp32 throughout.
    Tunables: ``num_warps`` (default 4), ``num_stages`` (default 1: the iteration loop loads nothing, so
    there is nothing to pipeline) and ``loop`` (``LOOPS``: "masked" forces the reference's form everywhere).
    chunk_size and D must be powers of 2 and >= 16 (Triton block and dot rules); T is zero-padded to a
    multiple of chunk_size (padded keys come after every real token, so they change nothing).
    """
    if not AVAILABLE:
        raise RuntimeError("the Pallas Triton lowering is not available in this jax")
    batch, seq_len, num_heads, d = q.shape
    num_kv_heads = k.shape[2]
    num_chunks = -(-seq_len // chunk_size)
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads are not a multiple of {num_kv_heads} kv heads")
    for name, size in (("chunk_size", chunk_size), ("D", d)):
        if size < 16 or size & (size - 1):
            raise ValueError(f"{name}={size} must be a power of 2 and >= 16 (Triton block and dot rules)")
    starts = Segmented.of(h_kk_starts)
    stored = starts.starts.shape
    if starts.num_chunks != num_chunks or stored[:2] != (batch, num_heads) or stored[2] < num_chunks \
            or stored[3:] != (d, d):
        raise ValueError(f"h_kk_starts has shape {stored} ({starts.num_chunks} chunks), expected "
                         f"{(batch, num_heads, num_chunks, d, d)} for chunk_size={chunk_size}")
    group = num_heads // num_kv_heads

    padded_len = num_chunks * chunk_size
    if padded_len != seq_len:
        def pad(a):
            return None if a is None else jnp.pad(a, [(0, 0), (0, padded_len - seq_len)] + [(0, 0)] * (a.ndim - 2))
        q, k, beta, g_kk, alpha = pad(q), pad(k), pad(beta), pad(g_kk), pad(alpha)

    rows_block = pl.BlockSpec((None, chunk_size, None, d), lambda n, h, b: (b, n, h, 0))          # [C, D]
    kv_block = pl.BlockSpec((None, chunk_size, None, d), lambda n, h, b: (b, n, h // group, 0))   # [C, D]
    gate_block = pl.BlockSpec((None, chunk_size, None), lambda n, h, b: (b, n, h))                # [C]
    start_arrays, start_specs = starts.kernel_inputs(d, d, lambda n, h, b: (b, h, n, 0, 0))       # [D, D]

    loop = loop or default_loop(operand_dtype)
    if loop not in LOOPS:
        raise ValueError(f"loop={loop!r} is not one of {LOOPS}")
    kernel = functools.partial(_solve_kernel, num_iter=num_iter, ridge_strength=ridge_strength,
                               precision=precision, operand_dtype=jnp.dtype(operand_dtype), loop=loop)
    params = pltriton.CompilerParams(
        num_warps=_default_num_warps(chunk_size, d) if num_warps is None else num_warps,
        num_stages=1 if num_stages is None else num_stages)
    out_dtypes = [x_dtype] if mixed_dtype is None else [x_dtype, mixed_dtype]
    outs = pl.pallas_call(
        kernel,
        grid=(num_chunks, num_heads, batch),
        in_specs=[rows_block, kv_block, None if beta is None else gate_block, gate_block, tuple(start_specs),
                  None if alpha is None or mixed_dtype is None else gate_block],
        out_specs=[rows_block] * len(out_dtypes),
        out_shape=[jax.ShapeDtypeStruct((batch, padded_len, num_heads, d), dt) for dt in out_dtypes],
        compiler_params=params,
        interpret=interpret,
        name="gka_chebyshev_solve",
    )(q, k, beta, g_kk, tuple(start_arrays), None if mixed_dtype is None else alpha)
    outs = [o[:, :seq_len] for o in outs]
    return outs[0] if mixed_dtype is None else tuple(outs)
