"""The per-item math of the Gluon decode kernels (``gluon_decode``), shared by both forms: the register layout
of H, the Chebyshev solve from registers, the state updates and the output.

Per (batch b, query head h), with kv head j = h // (H // Hkv), k = beta k_j, v = beta v_j (as
``reference.gka_decode``):

    H  = exp(g_kk) H + k k^T                 (h_kk [D, D], written back in place)
    x  = Chebyshev(num_iter) solution of (H + ridge ||H||_F I) x = q   (``reference._chebyshev``)
    q' = q + alpha (x - q)                   (alpha None: q' = x; num_iter 0: x = q)
    S  = exp(g) S + k v^T                    (h_kv [D, Dv], written back in place)
    o  = scale S^T q'

The step is a chain of num_iter matrix-vector products with the same [D, D] fp32 matrix, so its speed is the
latency of one product. H is held in registers as [BLOCKS, D / BLOCKS, D] (``_state_layout``): each of the
program's D / 32 warps owns 32 columns, a thread holds LANES adjacent columns (LANES = 4: 16-byte loads and
stores) in the rows of its row lane (LANES lanes share a column block's rows). Then

    (H x)_c = sum_r H[r, c] x_r        (= (H^T x)_c: H is symmetric, see ``pallas_decode``'s "sym")

is a sum inside the thread (BLOCKS independent partial sums, so that the fused multiply-adds pipeline)
followed by log2(LANES) shuffle rounds across the row lanes. Each thread then computes its elements of the
next iterate, stores them to shared memory, and after one barrier reads back the iterate's elements of its
rows (broadcast reads) for the next product: one barrier and 2 x LANES shuffles per iteration, where the
Pallas solve needs a cross-warp reduction and two layout conversions (7 barriers). The two iterate buffers
alternate, so one barrier per iteration is enough.
"""

from __future__ import annotations

from .gluon_call import GLUON

if GLUON:
    from .gluon_call import async_copy, gl, gluon

    @gluon.constexpr_function
    def _state_layout(D, BLOCKS, LANES, WARPS):
        """[BLOCKS, D / BLOCKS, D] over WARPS warps: a thread holds LANES adjacent columns in some rows of each
        row block; a warp's threads span D / (WARPS LANES) column groups and the rest of 32 row lanes."""
        column_lanes = D // (WARPS * LANES)
        row_lanes = 32 // column_lanes
        return gl.BlockedLayout([BLOCKS, D // BLOCKS // row_lanes, LANES], [1, row_lanes, column_lanes],
                                [1, 1, WARPS], [2, 1, 0])

    @gluon.jit
    def _item_rows(item, NUM_HEADS: gl.constexpr, GROUP: gl.constexpr, D: gl.constexpr):
        """(kv row of k and v, offset of the [D, D] states) of item = b H + h."""
        kv_row = (item // NUM_HEADS) * (NUM_HEADS // GROUP) + (item % NUM_HEADS) // GROUP
        return kv_row, item.to(gl.int64) * (D * D)

    @gluon.jit
    def _item_scalars(item, beta_ptr, g_ptr, g_kk_ptr, NUM_HEADS: gl.constexpr, GROUP: gl.constexpr,
                      D: gl.constexpr, HAS_BETA: gl.constexpr, HAS_G_KK: gl.constexpr):
        """(kv row, state offset, beta, g, g_kk) of item = b H + h (beta 1 and g_kk = g when absent)."""
        kv_row, state = _item_rows(item, NUM_HEADS, GROUP, D)
        beta = 1.0
        if HAS_BETA:
            beta = gl.load(beta_ptr + item).to(gl.float32)
        g = gl.load(g_ptr + item).to(gl.float32)
        g_kk = g
        if HAS_G_KK:
            g_kk = gl.load(g_kk_ptr + item).to(gl.float32)
        return kv_row, state, beta, g, g_kk

    @gluon.jit
    def _item_inputs(item, q_ptr, k_ptr, v_ptr, beta_ptr, g_ptr, g_kk_ptr, alpha_ptr, cols, NUM_HEADS: gl.constexpr,
                     GROUP: gl.constexpr, D: gl.constexpr, HAS_BETA: gl.constexpr, HAS_G_KK: gl.constexpr,
                     HAS_ALPHA: gl.constexpr):
        """Item's (beta, g, g_kk, alpha, q, k, v) as loaded (fp32 scalars; q, k, v [D] at ``cols`` in their
        dtype); alpha 0 when absent."""
        kv_row, _, beta, g, g_kk = _item_scalars(item, beta_ptr, g_ptr, g_kk_ptr, NUM_HEADS, GROUP, D, HAS_BETA,
                                                 HAS_G_KK)
        alpha = 0.0
        if HAS_ALPHA:
            alpha = gl.load(alpha_ptr + item).to(gl.float32)
        return (beta, g, g_kk, alpha, gl.load(q_ptr + item * D + cols), gl.load(k_ptr + kv_row * D + cols),
                gl.load(v_ptr + kv_row * D + cols))

    @gluon.jit
    def _decay_add_outer(state, decay, rows, cols):
        """exp(decay) state + rows cols^T for state [BLOCKS, RB, D], rows [BLOCKS, RB], cols [D]."""
        return gl.exp(decay) * state + gl.expand_dims(rows, 2) * gl.expand_dims(gl.expand_dims(cols, 0), 0)

    @gluon.jit
    def _value_and_output(s, g, k_rows, v_cols, mixed, iterate, s_out, o_out, scale, BLOCKS: gl.constexpr,
                          RB: gl.constexpr, ROW: gl.constexpr):
        """S' = exp(g) S + k v^T stored at ``s_out``; o = scale S'^T q' stored at ``o_out`` (q' = ``mixed``
        goes through ``iterate`` so that each thread reads it at its rows)."""
        s = _decay_add_outer(s, g, k_rows, v_cols)                                          # [BLOCKS, RB, D]
        gl.store(s_out, s.to(s_out.dtype.element_ty))
        iterate.store(mixed)
        mixed_all = iterate.reshape([BLOCKS, RB]).load(ROW)
        o = gl.sum(gl.sum(s * gl.expand_dims(mixed_all, 2), axis=0), axis=0)                # [D]
        gl.store(o_out, (scale * o).to(o_out.dtype.element_ty))

    @gluon.jit
    def _solve(h, q, ridge, iterate_a, iterate_b, NUM_ITER: gl.constexpr, BLOCKS: gl.constexpr,
               RB: gl.constexpr, ROW: gl.constexpr, h_out, rows, SPREAD: gl.constexpr):
        """x = Chebyshev(NUM_ITER) solution of (h + ridge ||h||_F I) x = q (``reference._chebyshev``).

        SPREAD > 0: h is also stored at ``h_out`` [BLOCKS, RB, D] in SPREAD parts, one before each of SPREAD
        runs of the iterations, so that the stores drain while the loop runs instead of stalling the solver
        before it (part s: the rows r with (r mod 32) // (32 / SPREAD) = s, which at D = 128 are 32 / SPREAD
        rows of each thread's 32, so the masks are constants). SPREAD 0: the caller stores h."""
        x = q
        if SPREAD > 0:
            part = gl.expand_dims((rows % 32) // (32 // SPREAD), 2)                          # [BLOCKS, RB, 1]
        if NUM_ITER == 0 and SPREAD > 0:
            for s in gl.static_range(SPREAD):
                gl.store(h_out, h.to(h_out.dtype.element_ty), mask=part == s)
        if NUM_ITER > 0:
            fro = gl.sqrt(gl.sum(gl.sum(gl.sum(h * h, axis=0), axis=0), axis=0))
            fro = gl.where(fro > 0, fro, 1.0)       # H == 0 (no key yet): as reference._chebyshev
            lam = ridge * fro
            step = 2.0 / (2.0 * lam + fro)
            rho = fro / (2.0 * lam + fro) / 2.0
            rho_sq_4 = rho * rho
            x = step * q
            x_prev = gl.zeros_like(x)
            omega = 2.0
            iterate_a.store(x)
            if SPREAD == 0:
                for _ in range(NUM_ITER // 2):     # two iterations: a -> b, b -> a
                    x, x_prev, omega = _chebyshev_step(h, iterate_a, iterate_b, x, x_prev, omega, q, lam, step,
                                                       rho_sq_4, BLOCKS, RB, ROW)
                    x, x_prev, omega = _chebyshev_step(h, iterate_b, iterate_a, x, x_prev, omega, q, lam, step,
                                                       rho_sq_4, BLOCKS, RB, ROW)
            else:
                for s in gl.static_range(SPREAD):   # part s of h, then its share of the iteration pairs
                    gl.store(h_out, h.to(h_out.dtype.element_ty), mask=part == s)
                    for _ in range(NUM_ITER // 2 // SPREAD + (s < (NUM_ITER // 2) % SPREAD)):
                        x, x_prev, omega = _chebyshev_step(h, iterate_a, iterate_b, x, x_prev, omega, q, lam,
                                                           step, rho_sq_4, BLOCKS, RB, ROW)
                        x, x_prev, omega = _chebyshev_step(h, iterate_b, iterate_a, x, x_prev, omega, q, lam,
                                                           step, rho_sq_4, BLOCKS, RB, ROW)
            if NUM_ITER % 2 == 1:
                x, x_prev, omega = _chebyshev_step(h, iterate_a, iterate_b, x, x_prev, omega, q, lam, step,
                                                   rho_sq_4, BLOCKS, RB, ROW)
        return x

    @gluon.jit
    def _chebyshev_step(h, iterate_in, iterate_out, x, x_prev, omega, q, lam, step, rho_sq_4,
                        BLOCKS: gl.constexpr, RB: gl.constexpr, ROW: gl.constexpr):
        """One ``reference._chebyshev`` iteration: reads the iterate x from ``iterate_in`` (each thread the
        elements of its rows), writes the next one to ``iterate_out``; returns (x', x, omega')."""
        x_all = iterate_in.reshape([BLOCKS, RB]).load(ROW)                            # [BLOCKS, RB]
        h_x = gl.sum(gl.sum(h * gl.expand_dims(x_all, 2), axis=0), axis=0)   # [D]: blocks first, then the rows
        omega = _reciprocal(1.0 - rho_sq_4 * omega)
        residual = h_x + lam * x - q
        x_next = omega * x - step * omega * residual - (omega - 1.0) * x_prev
        iterate_out.store(x_next)
        return x_next, x, omega

    @gluon.jit
    def _reciprocal(value):
        """1 / value by the SFU (rcp.approx.ftz.f32, within 1 ulp): two instructions with the multiply-add
        before it. An IEEE-range division is a dozen dependent instructions, which ptxas placed ahead of the
        iterate loads in some builds (offline sm_90a SASS: 374-378 instructions per two iterations, 363 with
        this one and the loads first)."""
        return gl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=r,r", [value], dtype=gl.float32,
                                         is_pure=True, pack=1)

    @gluon.jit
    def _copy_state(buffer, state_ptr, item, num_items, copy_square, D: gl.constexpr):
        """Start the asynchronous copy of state ``item`` [D, D] into ``buffer`` (nothing past the last item)."""
        async_copy.async_copy_global_to_shared(buffer, state_ptr + item.to(gl.int64) * (D * D) + copy_square,
                                               mask=(copy_square >= 0) & (item < num_items))
        async_copy.commit_group()
