"""Gluon GPU kernel for the chunked Chebyshev ridge solve of the GKA prefill, with asynchronous wgmma.

Same math and signature as ``pallas_solve.chebyshev_solve`` with bf16 dot operands (the DEFAULT precision
path); read that module's docstring for the products, the Frobenius norms and the factored loop. One
program (4 warps, one warpgroup) per chunk of C = 64 tokens of one (batch, head):

    every global read issued first (q, k, beta, G, the chunk-start H0);
    -2^m H0, K (beta k) and K_b (b beta k) to shared memory once, in bf16;
    ||H_t||_F from three wgmma products (K H0, K K^T, M (K K^T)^2), as pallas_solve;
    x = step q, s = q - A x, then num_iter times (A = H_t + lambda I row by row, a_t b_s = M[t, s]):
        omega' = 1 / (1 - rho^2/4 omega)
        e' = bf16(a omega' step s + (omega' - 1) e)        (e = a d: the step, scaled by rows, in bf16)
        x' = x + b e',   s' = s - lambda b e' - [e' (2^m H0) + causal(e' K_b^T) K]

The step is carried as e = a d in bf16 because that is the dot operand itself: x, the residual and the
products all see the same rounded step, so s stays the residual of x (a CPU simulation against float64 gave
the same x error as an fp32 step). Registers then hold x, s (fp32) and e (bf16) across the loop.

Why Gluon: Triton (and so the Pallas lowering) waits for every wgmma right after issuing it and spills the
loop's tiles. Here each iteration issues e' K_b^T and e' H0 together, as asynchronous wgmma with e' from
registers; it masks the scores while e' H0 still runs, then issues the scores' product (also from
registers) into the same accumulator, which is s itself, and waits once. No barrier and no spill in the
loop (offline sm_90a compile: 255 registers, 72 KiB of shared memory, so two programs share an SM).

A chunk whose decay span passes ``FACTORED_SPAN`` (exp(G) out of fp32 range) runs the masked form (a = b = 1,
m = 0): the products e^{G_t} (E H0)_t and ((E K^T) * M) K with the mask recomputed from G in every
iteration, as pallas_solve's masked loop (a runtime branch per program).

GPU only (Gluon has no interpreter). ``tests/test_gluon_solve.py`` checks it on a GPU against the pure-JAX
path, float64 and the Pallas solve; the Pallas solve, which CI runs in interpret mode, computes the same math.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from .gluon_call import AVAILABLE, GLUON, on_hopper, triton_call
from .pallas_chunk import Segmented
from .pallas_solve import FACTORED_SPAN

CHUNK = 64
HEAD_DIMS = (64, 128)

if GLUON:
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, warpgroup_mma,
                                                                   warpgroup_mma_wait)

    from .gluon_call import gl, gluon

    @gluon.jit
    def _solve_kernel(q_ptr, k_ptr, beta_ptr, gcum_ptr, start_ptr, alpha_ptr, ridge, seq_len, num_chunks,
                      x_ptr, mixed_ptr,
                      NUM_HEADS: gl.constexpr, GROUP: gl.constexpr, C: gl.constexpr, D: gl.constexpr,
                      NUM_ITER: gl.constexpr, HAS_BETA: gl.constexpr, HAS_ALPHA: gl.constexpr,
                      HAS_MIXED: gl.constexpr, SPAN: gl.constexpr):
        chunk = gl.program_id(0)
        head = gl.program_id(1)
        batch = gl.program_id(2)
        # One warpgroup; every accumulator ([C, D] and [C, C]) in the wgmma layout with n = 64 instructions,
        # so that all the products share one A-operand register layout.
        MMA: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, 64, 16])
        DOT_A: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=2)
        ROWV: gl.constexpr = gl.SliceLayout(1, MMA)            # [C]: per-token values
        COLV: gl.constexpr = gl.SliceLayout(0, MMA)            # [D] or [C]: per-column values
        LOAD: gl.constexpr = gl.BlockedLayout([1, 8], [32 * 8 // D, D // 8], [4, 1], [1, 0])   # 16-byte bf16 rows
        TILE: gl.constexpr = gl.NVMMASharedLayout.get_default_for([C, D], gl.bfloat16)
        SQUARE: gl.constexpr = gl.NVMMASharedLayout.get_default_for([D, D], gl.bfloat16)
        SCORES: gl.constexpr = gl.NVMMASharedLayout.get_default_for([C, C], gl.bfloat16)

        t = gl.arange(0, C, layout=ROWV)                                       # [C]
        s = gl.arange(0, C, layout=COLV)                                       # [C] (score columns)
        cols = gl.arange(0, D, layout=COLV)                                    # [D]
        token = chunk * C + t
        valid = token < seq_len
        rows_at = (batch * seq_len + token).to(gl.int64)                       # [C] index into [B, T]
        causal = gl.expand_dims(t, 1) >= gl.expand_dims(s, 0)                  # [C, C]

        # Every global read is issued first (their latencies overlap), then used.
        g_row = gl.load(gcum_ptr + ((batch * NUM_HEADS + head) * num_chunks + chunk).to(gl.int64) * C + t)
        lt = gl.arange(0, C, layout=gl.SliceLayout(1, LOAD))
        lc = gl.arange(0, D, layout=gl.SliceLayout(0, LOAD))
        l_token = chunk * C + lt
        l_valid = l_token < seq_len
        l_rows = (batch * seq_len + l_token).to(gl.int64)
        k_at = (gl.expand_dims(l_rows * (NUM_HEADS // GROUP) + head // GROUP, 1) * D + gl.expand_dims(lc, 0))
        keys = gl.load(k_ptr + k_at, mask=gl.expand_dims(l_valid, 1), other=0.0)             # [C, D]
        if HAS_BETA:
            beta = gl.load(beta_ptr + l_rows * NUM_HEADS + head, mask=l_valid, other=0.0)    # [C]
        start = ((batch * NUM_HEADS + head) * num_chunks + chunk).to(gl.int64) * (D * D)
        square_at = start + gl.expand_dims(lt, 1) * D + gl.expand_dims(lc, 0)               # rows 0..C-1 of H0
        h_top = gl.load(start_ptr + square_at)                                             # [C, D]
        if D > C:   # D = 2 C
            h_bottom = gl.load(start_ptr + square_at + C * D)                              # [C, D]
        at = gl.expand_dims(rows_at * NUM_HEADS + head, 1) * D + gl.expand_dims(cols, 0)   # [C, D] into [B, T, H, D]
        row_ok = gl.expand_dims(valid, 1)
        q_in = gl.load(q_ptr + at, mask=row_ok, other=0.0)                                 # [C, D]

        # Decay: G (in-chunk inclusive cumsum of g_kk, computed in XLA), the factored form's row scalings
        # a = e^{G - R}, b = e^{R - G} with R = m ln 2; the masked form takes m = 0, a = b = 1.
        top = gl.maximum(gl.max(g_row, axis=0), 0.0)
        bottom = gl.minimum(gl.min(g_row, axis=0), 0.0)
        factored = top - bottom <= SPAN
        shift = gl.where(factored, gl.floor((top + bottom) * (0.5 / 0.6931471805599453) + 0.5), 0.0)
        a = gl.where(factored, gl.exp(g_row - shift * 0.6931471805599453), 1.0)        # [C]
        b = gl.where(factored, gl.exp(shift * 0.6931471805599453 - g_row), 1.0)        # [C]
        g_col = gl.convert_layout(g_row, COLV)
        mask = gl.exp(gl.where(causal, gl.expand_dims(g_row, 1) - gl.expand_dims(g_col, 0), -float("inf")))

        # Keys beta k (of kv head h // GROUP) and b beta k, bf16, in shared memory.
        k_shared = gl.allocate_shared_memory(gl.bfloat16, [C, D], TILE)
        kb_shared = gl.allocate_shared_memory(gl.bfloat16, [C, D], TILE)
        keys = keys.to(gl.float32)
        if HAS_BETA:
            keys = keys * gl.expand_dims(beta.to(gl.float32), 1)
        keys = keys.to(gl.bfloat16).to(gl.float32)
        k_shared.store(keys.to(gl.bfloat16))
        kb_shared.store((keys * gl.expand_dims(gl.convert_layout(b, gl.SliceLayout(1, LOAD)), 1)).to(gl.bfloat16))

        # -2^m H0 in bf16 in shared memory (its square norm from the bf16 values).
        h_shared = gl.allocate_shared_memory(gl.bfloat16, [D, D], SQUARE)
        h_top = h_top.to(gl.bfloat16).to(gl.float32)
        h0_sq = gl.sum(gl.sum(h_top * h_top, axis=1), axis=0)
        h_shared.slice(0, C, dim=0).store((h_top * -gl.exp2(shift)).to(gl.bfloat16))
        if D > C:
            h_bottom = h_bottom.to(gl.bfloat16).to(gl.float32)
            h0_sq += gl.sum(gl.sum(h_bottom * h_bottom, axis=1), axis=0)
            h_shared.slice(C, C, dim=0).store((h_bottom * -gl.exp2(shift)).to(gl.bfloat16))
        fence_async_shared()
        gl.thread_barrier()

        # ||H_t||_F^2 = e^{2G} ||H0||^2 + 2 e^G (M kHk)_t + sum_s (M (K K^T)^2)_{t,s} M_{t,s}.
        k_h0 = warpgroup_mma(k_shared, h_shared, gl.zeros([C, D], gl.float32, MMA), use_acc=False)   # -2^m K H0
        k_h0_k = gl.sum(k_h0 * k_shared.load(MMA).to(gl.float32), axis=1) * -gl.exp2(-shift)         # [C]
        gram = warpgroup_mma(k_shared, k_shared.permute((1, 0)), gl.zeros([C, C], gl.float32, MMA), use_acc=False)
        gram_sq_shared = gl.allocate_shared_memory(gl.bfloat16, [C, C], SCORES)
        gram_sq_shared.store((gram * gram).to(gl.bfloat16))
        fence_async_shared()
        gl.thread_barrier()
        mask_gram = warpgroup_mma(gl.convert_layout(mask.to(gl.bfloat16), DOT_A), gram_sq_shared,
                                  gl.zeros([C, C], gl.float32, MMA), use_acc=False)           # [C, C]
        decay0 = gl.exp(g_row)
        fro_sq = (decay0 * decay0 * h0_sq
                  + 2.0 * decay0 * gl.sum(mask * gl.expand_dims(gl.convert_layout(k_h0_k, COLV), 0), axis=1)
                  + gl.sum(mask_gram * mask, axis=1))
        fro = gl.sqrt(gl.maximum(fro_sq, 0.0))
        fro = gl.where(fro > 0, fro, 1.0)        # H_t == 0 (no key yet): as reference._chebyshev
        lam = ridge * fro
        step = 2.0 / (2.0 * lam + fro)
        rho = fro / (2.0 * lam + fro) / 2.0
        rho_sq_4 = rho * rho

        q = q_in.to(gl.float32)
        x = gl.expand_dims(step, 1) * q
        if NUM_ITER > 0:
            if factored:
                x = _iterate(x, q, k_shared, kb_shared, h_shared, a, b, decay0, lam, step, rho_sq_4, causal,
                             g_row, g_col, NUM_ITER, False, MMA, DOT_A, C)
            else:
                x = _iterate(x, q, k_shared, kb_shared, h_shared, a, b, decay0, lam, step, rho_sq_4, causal,
                             g_row, g_col, NUM_ITER, True, MMA, DOT_A, C)
        # The output offsets and row mask are formed again here, in another form than before the loop, so that
        # they are not held (common-subexpression merged) through the loop.
        at = gl.expand_dims((rows_at * NUM_HEADS + head) * D, 1) + gl.expand_dims(cols, 0)
        row_ok = gl.expand_dims(rows_at < (batch + 1) * seq_len, 1)
        gl.store(x_ptr + at, x.to(x_ptr.dtype.element_ty), mask=row_ok)
        if HAS_MIXED:
            mixed = x
            if HAS_ALPHA:   # q is held (ptxas spills it outside the loop; reading it again spilled in the loop)
                alpha = gl.load(alpha_ptr + rows_at * NUM_HEADS + head, mask=valid, other=0.0).to(gl.float32)
                mixed = q + gl.expand_dims(alpha, 1) * (x - q)
            gl.store(mixed_ptr + at, mixed.to(mixed_ptr.dtype.element_ty), mask=row_ok)

    @gluon.jit
    def _iterate(x, q, k_shared, kb_shared, h_shared, a, b, decay0, lam, step, rho_sq_4, causal, g_row, g_col,
                 NUM_ITER: gl.constexpr, MASKED: gl.constexpr, MMA: gl.constexpr, DOT_A: gl.constexpr,
                 C: gl.constexpr):
        """The Chebyshev loop from x = step q, carried as (x, the scaled step a d in bf16, the residual s);
        returns x after NUM_ITER iterations."""
        scaled_step = (x * gl.expand_dims(a, 1)).to(gl.bfloat16)                   # a x_0 (d_0 = x_0)
        residual = _minus_h_times(scaled_step, q - gl.expand_dims(lam, 1) * x, k_shared, kb_shared, h_shared,
                                 decay0, causal, g_row, g_col, MASKED, MMA, DOT_A, C)
        omega = gl.full_like(step, 2.0)
        lam_b = lam * b
        for _ in range(NUM_ITER):
            omega = 1.0 / (1.0 - rho_sq_4 * omega)
            scaled_step = (gl.expand_dims(a * omega * step, 1) * residual
                           + gl.expand_dims(omega - 1.0, 1) * scaled_step.to(gl.float32)).to(gl.bfloat16)
            rounded = scaled_step.to(gl.float32)                                     # [C, D] a d, as rounded
            x = x + gl.expand_dims(b, 1) * rounded                                   # b = 1 / a
            residual = _minus_h_times(scaled_step, residual - gl.expand_dims(lam_b, 1) * rounded, k_shared, kb_shared,
                                     h_shared, decay0, causal, g_row, g_col, MASKED, MMA, DOT_A, C)
        return x

    @gluon.jit
    def _minus_h_times(scaled, acc, k_shared, kb_shared, h_shared, decay0, causal, g_row, g_col,
                      MASKED: gl.constexpr, MMA: gl.constexpr, DOT_A: gl.constexpr, C: gl.constexpr):
        """acc - H_t y (rows t) for ``scaled`` = a y in bf16 [C, D] and acc [C, D] fp32 (wgmma layout), with
        h_shared = -2^m H0 and kb_shared = b K. The operands go to the tensor cores from registers."""
        y = gl.convert_layout(scaled, DOT_A)
        scores = warpgroup_mma(y, kb_shared.permute((1, 0)), gl.zeros([C, C], gl.float32, MMA), use_acc=False,
                               is_async=True)                               # [C, C] = (a Y) (b K)^T
        if MASKED:   # a = 1: the start's decay e^{G_t} goes on the rows of Y
            y_h = gl.convert_layout((scaled.to(gl.float32) * gl.expand_dims(decay0, 1)).to(gl.bfloat16), DOT_A)
        else:        # a_t 2^m = e^{G_t}
            y_h = y
        acc = warpgroup_mma(y_h, h_shared, acc, is_async=True)              # acc - e^{G_t} (Y H0)_t
        scores, y = warpgroup_mma_wait(num_outstanding=1, deps=(scores, y))
        if MASKED:
            scores = -scores * gl.exp(gl.where(causal, gl.expand_dims(g_row, 1) - gl.expand_dims(g_col, 0),
                                               -float("inf")))
        else:
            scores = gl.where(causal, -scores, 0.0)
        scores_op = gl.convert_layout(scores.to(gl.bfloat16), DOT_A)
        acc = warpgroup_mma(scores_op, k_shared, acc, is_async=True)
        acc, y, y_h, scores_op = warpgroup_mma_wait(num_outstanding=0, deps=(acc, y, y_h, scores_op))
        return acc


def _plain_starts(h_kk_starts):
    """The chunk starts [B, H, N, D, D] as an array, or None for segmented starts that need a fix-up."""
    starts = Segmented.of(h_kk_starts)
    return starts.starts if starts.carry is None and starts.starts.shape[2] == starts.num_chunks else None


def supports(q, k, h_kk_starts, *, chunk_size: int) -> bool:
    """Shapes the kernel covers: C = 64, D in ``HEAD_DIMS``, plain (one-segment) chunk starts, whole GQA groups."""
    d = q.shape[-1]
    starts = _plain_starts(h_kk_starts)
    return (chunk_size == CHUNK and d in HEAD_DIMS and q.shape[2] % k.shape[2] == 0
            and starts is not None and starts.shape[-2:] == (d, d))


@functools.partial(jax.jit, static_argnames=("num_iter", "ridge_strength", "chunk_size", "x_dtype", "mixed_dtype"))
def chebyshev_solve(q, k, beta, g_kk, h_kk_starts, *, num_iter, ridge_strength, chunk_size=CHUNK, alpha=None,
                    x_dtype=jnp.float32, mixed_dtype=None):
    """``pallas_solve.chebyshev_solve`` with bf16 dot operands (fp32 accumulation and elementwise math), as
    one Gluon kernel: x [B, T, H, D] in ``x_dtype``, and with ``mixed_dtype`` (x, q' = q + alpha (x - q)).

    q [B, T, H, D]; k [B, T, Hkv, D] (not expanded); beta, g_kk, alpha [B, T, H] (beta, alpha may be None);
    h_kk_starts [B, H, N, D, D] (fp32 or bf16; rounded to bf16 as the dot operand; or a one-segment
    ``Segmented``). T need not be a multiple
    of 64: the kernel masks the last chunk's rows.
    """
    if not (AVAILABLE and on_hopper()):
        raise RuntimeError("the Gluon solve kernel needs jax-triton 0.3 and triton 3.6 with Gluon, on a Hopper GPU")
    if not supports(q, k, h_kk_starts, chunk_size=chunk_size):
        raise ValueError(f"the Gluon solve covers chunk_size={CHUNK}, D in {HEAD_DIMS}, unsegmented starts; got "
                         f"chunk_size={chunk_size}, q {q.shape}, k {k.shape}, "
                         f"starts {Segmented.of(h_kk_starts).starts.shape}")
    h_kk_starts = _plain_starts(h_kk_starts)
    batch, seq_len, num_heads, d = q.shape
    num_chunks = -(-seq_len // chunk_size)
    if h_kk_starts.shape != (batch, num_heads, num_chunks, d, d):
        raise ValueError(f"h_kk_starts has shape {h_kk_starts.shape}, expected {(batch, num_heads, num_chunks, d, d)}")
    padded = num_chunks * chunk_size
    # G, the in-chunk inclusive cumsum of the log-decays, as [B, H, N, C] fp32 (padded tokens: no decay).
    g = jnp.pad(g_kk.astype(jnp.float32), [(0, 0), (0, padded - seq_len), (0, 0)])
    gcum = jnp.cumsum(g.reshape(batch, num_chunks, chunk_size, num_heads), axis=2).transpose(0, 3, 1, 2)
    present = lambda a: gcum if a is None else a  # noqa: E731  (an absent input's pointer is never read)
    out_dtypes = [x_dtype] if mixed_dtype is None else [x_dtype, mixed_dtype]
    outs = triton_call(
        q, k, present(beta), gcum, h_kk_starts, present(alpha),
        np.float32(ridge_strength), seq_len, num_chunks,
        kernel=_solve_kernel,
        out_shape=[jax.ShapeDtypeStruct(q.shape, dt) for dt in out_dtypes] + ([] if mixed_dtype else
                                                                             [jax.ShapeDtypeStruct((1,), x_dtype)]),
        grid=(num_chunks, num_heads, batch),
        num_warps=4,
        name="gka_gluon_solve",
        NUM_HEADS=num_heads, GROUP=num_heads // k.shape[2], C=chunk_size, D=d, NUM_ITER=int(num_iter),
        HAS_BETA=beta is not None, HAS_ALPHA=alpha is not None, HAS_MIXED=mixed_dtype is not None,
        SPAN=float(FACTORED_SPAN))
    return outs[0] if mixed_dtype is None else (outs[0], outs[1])
