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
Across the ``lax.fori_loop`` over iterations the registers hold X, the previous iterate, q, M and the per-row
coefficients; Triton keeps the loop-invariant dot operands H0, K and K^T in shared memory (in
``operand_dtype``). Offline compile for sm_90a (Triton 3.6), C = 64, D = 128: 255 registers per thread at
4 and at 8 warps; shared memory 64 KiB with bf16 operands, 160 KiB with fp32 (TF32) operands. 8 warps spill
~0.2 (bf16) / ~0.3 (TF32) KiB per thread and hold one program per SM; 4 warps spill ~1.2 / ~1.7 KiB but fit
two bf16 programs per SM. IEEE fp32 dots (HIGHEST with fp32 operands) run on FMA units and spill tens of
KiB: a numerics check, not a fast path.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from .pallas_chunk import Segmented, fixed_start
from .reference import HIGHEST, _chebyshev

try:  # the Triton lowering is deprecated in jax 0.11 and may disappear
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as pltriton
    AVAILABLE = True
except ImportError:  # pragma: no cover - depends on the installed jax
    pl = pltriton = None
    AVAILABLE = False


def _solve_kernel(q_ref, k_ref, beta_ref, g_ref, start_refs, alpha_ref, x_ref, mixed_ref=None, *, num_iter,
                  ridge_strength, precision, operand_dtype):
    """One (chunk, head, batch): q, k, x [C, D]; beta (or None), g [C]; start_refs the chunk-start h_kk
    [D, D] (``Segmented.kernel_inputs``); with ``mixed_ref`` [C, D] also q' = q + alpha (x - q) (alpha [C],
    or None: q' = x)."""
    f32 = jnp.float32

    def dot(a, b):  # operands in operand_dtype, fp32 accumulation
        return jnp.dot(a.astype(operand_dtype), b.astype(operand_dtype), precision=precision,
                       preferred_element_type=f32)

    chunk = q_ref.shape[0]
    q = q_ref[...].astype(f32)                                         # [C, D]
    k = k_ref[...].astype(f32)                                         # [C, D]
    if beta_ref is not None:
        k = k * beta_ref[...].astype(f32)[:, None]
    k_op = k.astype(operand_dtype)
    gcum = jnp.cumsum(g_ref[...].astype(f32))                          # [C]
    rows = lax.broadcasted_iota(jnp.int32, (chunk, chunk), 0)
    cols = lax.broadcasted_iota(jnp.int32, (chunk, chunk), 1)
    mask = jnp.exp(jnp.where(rows >= cols, gcum[:, None] - gcum[None, :], -jnp.inf))   # [C, C]
    start_decay = jnp.exp(gcum)                                        # [C]
    h0 = fixed_start(*start_refs).astype(f32)                          # [D, D]
    h0_op = h0.astype(operand_dtype)

    # ||H_t||_F^2, three non-negative terms.
    h0_sq = jnp.sum(jnp.sum(h0 * h0, axis=1), axis=0)                  # []
    k_h0_k = jnp.sum(dot(k_op, h0_op) * k, axis=1)                     # [C]
    gram = dot(k_op, k_op.T)                                           # [C, C]
    fro_sq = (start_decay * start_decay * h0_sq
              + 2.0 * start_decay * jnp.sum(mask * k_h0_k[None, :], axis=1)
              + jnp.sum(dot(mask, gram * gram) * mask, axis=1))
    fro = jnp.sqrt(jnp.maximum(fro_sq, 0.0))                           # [C]

    decay = start_decay[:, None]                                       # [C, 1]

    def apply_h(x):  # rows of H_t x_t
        scores = dot(x, k_op.T) * mask                                 # [C, C]
        return decay * dot(x, h0_op) + dot(scores, k_op)

    x = _chebyshev(apply_h, q, fro, num_iter=num_iter, ridge_strength=ridge_strength)   # [C, D] f32
    x_ref[...] = x.astype(x_ref.dtype)
    if mixed_ref is not None:
        mixed = x if alpha_ref is None else q + alpha_ref[...].astype(f32)[:, None] * (x - q)
        mixed_ref[...] = mixed.astype(mixed_ref.dtype)


def _default_num_warps(chunk_size: int, head_dim: int) -> int:
    """4: at C = 64, D = 128 two 4-warp programs share an SM and beat one 8-warp program despite more spills
    (3.6 against 6.6 ms at T = 16K on an H200, docs/benchmarks.md)."""
    del chunk_size, head_dim
    return 4


@functools.partial(jax.jit, static_argnames=(
    "num_iter", "ridge_strength", "chunk_size", "precision", "operand_dtype", "interpret", "num_warps",
    "num_stages", "x_dtype", "mixed_dtype"))
def chebyshev_solve(q, k, beta, g_kk, h_kk_starts, *, num_iter, ridge_strength, chunk_size=64, precision=HIGHEST,
                    operand_dtype=jnp.float32, interpret=False, num_warps=None, num_stages=None, alpha=None,
                    x_dtype=jnp.float32, mixed_dtype=None):
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
    Tunables: ``num_warps`` (default 4) and ``num_stages`` (default 1: the
    iteration loop loads nothing, so there is nothing to pipeline).
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

    kernel = functools.partial(_solve_kernel, num_iter=num_iter, ridge_strength=ridge_strength,
                               precision=precision, operand_dtype=jnp.dtype(operand_dtype))
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
