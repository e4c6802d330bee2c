"""Gluon GPU kernels for the one-token GKA decode step: each item (batch, head) in one fused pass.

Per (batch b, query head h), with kv head j = h // (H // Hkv), k = beta k_j, v = beta v_j (as
``reference.gka_decode``):

    H  = exp(g_kk) H + k k^T                 (h_kk [D, D], written back in place)
    x  = Chebyshev(num_iter) solution of (H + ridge ||H||_F I) x = q   (``reference._chebyshev``)
    q' = q + alpha (x - q)                   (alpha None: q' = x; num_iter 0: x = q)
    S  = exp(g) S + k v^T                    (h_kv [D, Dv], written back in place)
    o  = scale S^T q'

Why Gluon: the step is a chain of num_iter matrix-vector products with the same [D, D] fp32 matrix, so its
speed is the latency of one product, and it must move H and S at memory speed in between. Gluon fixes the
register layout, which the Pallas kernels (``pallas_decode``) leave to the compiler. Here H is held in
registers as [BLOCKS, D / BLOCKS, D]: each of the program's D / 32 warps owns 32 columns, a thread holds
LANES adjacent columns (``LANES`` = 4: 16-byte loads and stores) in the rows of its row lane (LANES lanes
share a column block's rows). Then

    (H x)_c = sum_r H[r, c] x_r        (= (H^T x)_c: H is symmetric, see ``pallas_decode``'s "sym")

is a sum inside the thread (BLOCKS independent partial sums, so that the fused multiply-adds pipeline)
followed by log2(LANES) shuffle rounds across the row lanes. Each thread then computes its elements of the
next iterate, stores them to shared memory, and after one barrier reads back the iterate's elements of its
rows (broadcast reads) for the next product: one barrier and 2 x LANES shuffles per iteration, where the
Pallas solve needs a cross-warp reduction and two layout conversions (7 barriers). The two iterate buffers
alternate, so one barrier per iteration is enough.

Memory: every state element is read once and written once, in place (``input_output_aliases``; under
``jax.jit(..., donate_argnums=...)`` no copy is made), with 16-byte coalesced accesses. Two forms
(``FORMS``) schedule the items (b, h). (A third, one program per SM with the next item's states prefetched
during the current one, measured slower than both and was removed: docs/benchmarks.md.)

- "pipelined" (``_decode_ws_kernel``; the default at D = 128 when B H reaches the number of SMs,
  ``default_form``): one program per SM, warp-specialized. A loader warp copies each item's h_kk, then h_kv,
  by cp.async into a ring of ``slots`` [D, D] buffers in shared memory (by default three: h_kk's and one
  h_kv buffer per solver); two solver partitions of 4 warps take the items in turn and compute each item's
  step from the ring, H held as one block of rows (``PIPELINED_BLOCKS``: a chain of 32 FMAs per column and
  thread). Loads stream while the solvers compute, so the step runs near memory speed once every SM has
  several items (86-88% of the copy bandwidth at B = 128, num_iter 30, on an H200; 74-76% at B = 32, where
  the solves stay partly exposed: docs/kernels.md). Up to num_iter 10 (``default_mirror``) the loader copies
  only h_kk's upper triangle (16-byte chunks on or right of the diagonal: 52% of its bytes; h_kk is
  symmetric) and the solver that takes it writes the rest from the mirror image in shared memory
  (``_mirror_square``), so the step moves 12% fewer bytes; at num_iter 30 that made the step slower
  (docs/kernels.md). ``value_partition``: a third partition takes h_kv and o off the solvers.
- "item" (``_decode_kernel``): one program per item; S is copied to shared memory asynchronously when the
  program starts and read from there after the solve. ``MAXNREG`` caps the registers per thread (ptxas) so
  that three programs (64 KiB of shared memory each) share an SM.

Covers D = Dv in {32, 64, 128} (1 to 4 warps); ``supports`` says so, and the
dispatcher uses the Pallas kernels for other shapes. GPU only (Gluon has no interpreter); the Pallas decode
kernels are the interpret-mode and CI reference for the same math, and ``tests/test_gluon_decode.py``
checks this kernel against the pure-JAX path and float64 on a GPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from .gluon_call import AVAILABLE, GLUON, on_hopper, triton_call
from .reference import HIGHEST, GKAResult

HEAD_DIMS = (32, 64, 128)
DEFAULT_BLOCKS = 4        # row blocks of H: independent partial sums per thread in each product ("item" form)
PIPELINED_BLOCKS = 1      # the pipelined form's default: one chain of FMAs per column, fewest instructions
DEFAULT_LANES = 4         # columns per thread = lanes sharing a column's rows (4: 16-byte accesses)
LANES = (1, 2, 4)
DEFAULT_MAXNREG = 168     # 3 programs of 4 warps per SM (65536 registers); the loop needs no spills at 168
FORMS = ("item", "pipelined")
MIRROR_MAX_ITER = 10       # pipelined form: h_kk read as its upper triangle up to this num_iter (``default_mirror``)
DEFAULT_SLOTS = 3          # pipelined form: [D, D] fp32 buffers in shared memory (64 KiB each at D = 128)
DEFAULT_LOADER_WARPS = 1   # pipelined form: warps issuing the copies
LOADER_WARPS = (1, 4)
RING_SLOTS = (2, 3)        # 3 x 64 KiB fill the shared memory (the phase order: ``_decode_ws_kernel``)
PIPELINED_HEAD_DIMS = (128,)
SOLVER_REGS, LOADER_REGS = 192, 40   # pipelined form: registers per thread of the second solver, the loader
VALUE_REGS = 80           # pipelined form, value_partition: registers per thread of the value partition (4 warps)
VALUE_LOADER_WARPS = 4    # with the value partition: 4 warps per partition, none padded (16 warps)
VALUE_PARTITIONS = {None: 0, False: 0, True: 1, "resident": 1, "readback": 2}   # ``value_partition`` -> VALUE
SPREAD_PARTS = (0, 1, 2, 4, 8)   # pipelined form: h_kk' stored in this many parts over the solve (0: before it)
# The pipelined form's defaults for value_partition, spread_store and inputs_ahead: above MIRROR_MAX_ITER
# (h_kk read whole) the value partition, h_kk' stored in 4 parts over the solve and each solver's next inputs
# loaded an item ahead (79.4-79.7 against 83.8-84.7 us at B = 32, num_iter 30 on an H200, docs/benchmarks.md);
# up to it (the mirror's range, where they measured slower) none of them.
LONG_SOLVE = dict(value_partition=True, spread_store=4, inputs_ahead=True)
SHORT_SOLVE = dict(value_partition=False, spread_store=0, inputs_ahead=False)
MIRROR_LOADER_REGS = 64   # the loader's registers with the mirror (its masks spill at 40)

if GLUON:
    from .gluon_call import async_copy, gl, gluon, mbarrier

    @gluon.jit
    def _decode_kernel(q_ptr, k_ptr, v_ptr, beta_ptr, g_ptr, g_kk_ptr, alpha_ptr, h_kk_ptr, h_kv_ptr,
                       scale, ridge, num_items,
                       o_ptr, x_ptr, h_kk_out_ptr, h_kv_out_ptr,
                       NUM_HEADS: gl.constexpr, GROUP: gl.constexpr, D: gl.constexpr, NUM_ITER: gl.constexpr,
                       BLOCKS: gl.constexpr, HAS_BETA: gl.constexpr, HAS_ALPHA: gl.constexpr,
                       HAS_G_KK: gl.constexpr, LANES: gl.constexpr,
                       MAXNREG: gl.constexpr):
        W: gl.constexpr = gl.num_warps()
        RB: gl.constexpr = D // BLOCKS
        # H as [BLOCKS, RB, D]: a thread holds LANES adjacent columns (16-byte accesses at LANES = 4) in the
        # rows of its row lane (with D / 32 warps, LANES row lanes share the rows of a block).
        L3: gl.constexpr = _state_layout(D, BLOCKS, LANES, W)
        ROW: gl.constexpr = gl.SliceLayout(2, L3)                      # [BLOCKS, RB]: a thread's rows
        COL: gl.constexpr = gl.SliceLayout(0, gl.SliceLayout(0, L3))   # [D]: a thread's columns
        # Copies to shared memory: 16 bytes per thread and instruction, a warp over whole rows.
        VEC: gl.constexpr = 128 // h_kv_ptr.dtype.element_ty.primitive_bitwidth
        COPY: gl.constexpr = gl.BlockedLayout([1, VEC], [32 * VEC // D, D // VEC], [W, 1], [1, 0])
        PLAIN: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [1, 0])

        rows = (gl.expand_dims(gl.arange(0, BLOCKS, layout=gl.SliceLayout(1, ROW)), 1) * RB
                + gl.expand_dims(gl.arange(0, RB, layout=gl.SliceLayout(0, ROW)), 0))     # [BLOCKS, RB]
        cols = gl.arange(0, D, layout=COL)                                                # [D]
        square = gl.expand_dims(rows, 2) * D + gl.expand_dims(gl.expand_dims(cols, 0), 0)   # [BLOCKS, RB, D]
        copy_square = (gl.expand_dims(gl.arange(0, D, layout=gl.SliceLayout(1, COPY)), 1) * D
                       + gl.expand_dims(gl.arange(0, D, layout=gl.SliceLayout(0, COPY)), 0))   # [D, D]

        # This program's items are pid, pid + P, ... (one item when P = B H, as launched): each item's S is
        # copied to shared memory while its H is read into registers and the solve runs.
        first = gl.program_id(0)
        stride = gl.num_programs(0)
        s_shared = gl.allocate_shared_memory(h_kv_ptr.dtype.element_ty, [D, D], PLAIN)
        _copy_state(s_shared, h_kv_ptr, first, num_items, copy_square, D)
        iterate_a = gl.allocate_shared_memory(gl.float32, [D], gl.SwizzledSharedLayout(1, 1, 1, [0]))
        iterate_b = gl.allocate_shared_memory(gl.float32, [D], gl.SwizzledSharedLayout(1, 1, 1, [0]))

        for item in range(first, num_items, stride):         # item = b * H + h
            kv_row, state, beta, g, g_kk = _item_scalars(item, beta_ptr, g_ptr, g_kk_ptr, NUM_HEADS, GROUP, D,
                                                         HAS_BETA, HAS_G_KK)

            # H = exp(g_kk) H + k k^T, written back at once.
            h = gl.load(h_kk_ptr + state + square).to(gl.float32)                            # [BLOCKS, RB, D]
            k_rows = gl.load(k_ptr + kv_row * D + rows).to(gl.float32) * beta               # [BLOCKS, RB]
            k_cols = gl.load(k_ptr + kv_row * D + cols).to(gl.float32) * beta               # [D]
            h = _decay_add_outer(h, g_kk, k_rows, k_cols)                                   # H'
            gl.store(h_kk_out_ptr + state + square, h.to(h_kk_out_ptr.dtype.element_ty))

            q = gl.load(q_ptr + item * D + cols).to(gl.float32)                              # [D]
            x = _solve(h, q, ridge, iterate_a, iterate_b, NUM_ITER, BLOCKS, RB, ROW, h_kk_out_ptr, rows, 0)
            gl.store(x_ptr + item * D + cols, x.to(x_ptr.dtype.element_ty))
            mixed = x
            if HAS_ALPHA:
                mixed = q + gl.load(alpha_ptr + item).to(gl.float32) * (x - q)

            # S = exp(g) S + k v^T and o = scale S^T q', from the copy of S in shared memory.
            async_copy.wait_group(0)
            gl.thread_barrier()
            s = s_shared.reshape([BLOCKS, RB, D]).load(L3).to(gl.float32)           # [BLOCKS, RB, D]
            gl.thread_barrier()
            _copy_state(s_shared, h_kv_ptr, item + stride, num_items, copy_square, D)
            v_cols = gl.load(v_ptr + kv_row * D + cols).to(gl.float32) * beta               # [D]
            k_rows = gl.load(k_ptr + kv_row * D + rows).to(gl.float32) * beta   # read again: not held in the solve
            _value_and_output(s, g, k_rows, v_cols, mixed, iterate_b, h_kv_out_ptr + state + square,
                              o_ptr + item * D + cols, scale, BLOCKS, RB, ROW)
            gl.thread_barrier()                            # iterate buffers are reused by the next item

    @gluon.jit
    def _decode_ws_kernel(q_ptr, k_ptr, v_ptr, beta_ptr, g_ptr, g_kk_ptr, alpha_ptr, h_kk_ptr, h_kv_ptr,
                          scale, ridge, num_items,
                          o_ptr, x_ptr, h_kk_out_ptr, h_kv_out_ptr,
                          NUM_HEADS: gl.constexpr, GROUP: gl.constexpr, D: gl.constexpr, NUM_ITER: gl.constexpr,
                          BLOCKS: gl.constexpr, HAS_BETA: gl.constexpr, HAS_ALPHA: gl.constexpr,
                          HAS_G_KK: gl.constexpr, LANES: gl.constexpr, SLOTS: gl.constexpr,
                          COPY_ROWS: gl.constexpr, SOLVER_REGS: gl.constexpr, LOADER_REGS: gl.constexpr,
                          LOADER_WARPS: gl.constexpr, MIRROR: gl.constexpr, VALUE: gl.constexpr,
                          VALUE_REGS: gl.constexpr, SPREAD: gl.constexpr, AHEAD: gl.constexpr):
        """Persistent and warp-specialized: one program per SM walks the items pid, pid + P, ...; a loader
        partition streams their states (h_kk, then h_kv, of each item in turn) into a ring of SLOTS [D, D]
        buffers by cp.async, and two solver partitions (num_warps warps each) take the items in turn.

        Barriers: full[2 (j % 2) + 0 / 1] says that item j's h_kk / h_kv tile has landed (each loader lane
        arrives once its copies have); free[slot] that the solver which read the buffer is done with it. The
        loader waits for the uses of each buffer in order (``_slot`` maps tiles to buffers). A full barrier's
        phase n + 1 (item j + 2) cannot complete before its solver has waited for phase n (item j), because the
        loader fills tiles in order and a buffer only after its previous tile's release:
        - SLOTS = 2 (h_kk in buffer 0, h_kv in 1): item j + 1's h_kv, which precedes item j + 2's tiles,
          reuses item j's h_kv buffer, released after the solver's last wait for item j.
        - SLOTS = 3 (h_kk in buffer 0, item j's h_kv in buffer 1 + j % 2): item j + 2's h_kv reuses item j's
          h_kv buffer; item j + 2's h_kk needs item j + 1's h_kk released, so landed, so item j's h_kk
          released after its wait.
        (An mbarrier wait compares phase parities, so a waiter must never fall two phases behind.)

        MIRROR (fp32 states): the loader copies only h_kk's upper triangle; the solver that takes the tile
        first writes the rest from its mirror image. (The loader warp mirroring each tile once its copies land
        made the step slower, 98 against 88 us at B = 32, num_iter 30, as did a partition of its own for the
        mirror: 92-95 against 85 us; docs/benchmarks.md.)

        VALUE: a third partition of num_warps warps (``_ws_value``) takes each item's h_kv tile and computes
        S' and o, so that the solvers only hand it q' (through ``mixed``: mixed_full[s] says that solver s's
        q' is written, mixed_free[s] that the value partition has read it). Then the value partition, not
        the solver, waits for the h_kv tiles (in item order) and releases their buffers."""
        if MIRROR > 0:
            # 16-byte chunk c of row r at chunk c ^ (r % 8): row reads (the copies, the solvers) and the
            # mirror's column reads are both free of bank conflicts.
            VEC: gl.constexpr = 128 // h_kk_ptr.dtype.element_ty.primitive_bitwidth
            RING: gl.constexpr = gl.SwizzledSharedLayout(VEC, 1, 8, [1, 0])
        else:
            RING: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [1, 0])
        ring = gl.allocate_shared_memory(h_kk_ptr.dtype.element_ty, [SLOTS, D, D], RING)
        full = gl.allocate_shared_memory(gl.int64, [4, 1], mbarrier.MBarrierLayout())
        free = gl.allocate_shared_memory(gl.int64, [SLOTS, 1], mbarrier.MBarrierLayout())
        for index in gl.static_range(4):
            mbarrier.init(full.index(index), count=32 * LOADER_WARPS)
        for slot in gl.static_range(SLOTS):
            mbarrier.init(free.index(slot), count=1)
        # Each solver's two iterate buffers are allocations of their own: Triton's barrier analysis tells
        # allocations apart but not views of one, and would add a second barrier per iteration.
        VECTOR: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [0])
        iterate_0a = gl.allocate_shared_memory(gl.float32, [D], VECTOR)
        iterate_0b = gl.allocate_shared_memory(gl.float32, [D], VECTOR)
        iterate_1a = gl.allocate_shared_memory(gl.float32, [D], VECTOR)
        iterate_1b = gl.allocate_shared_memory(gl.float32, [D], VECTOR)
        key_0 = gl.allocate_shared_memory(gl.float32, [D], VECTOR)            # beta k of each solver's item (AHEAD)
        key_1 = gl.allocate_shared_memory(gl.float32, [D], VECTOR)
        mixed = gl.allocate_shared_memory(gl.float32, [2, D], VECTOR)        # q' of solver 0 / 1 (VALUE)
        mixed_full = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        mixed_free = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        if VALUE:
            for index in gl.static_range(2):
                mbarrier.init(mixed_full.index(index), count=1)
                mbarrier.init(mixed_free.index(index), count=1)
        first = gl.program_id(0)
        stride = gl.num_programs(0)
        count = (num_items - first + stride - 1) // stride       # this program's items
        # Both calls written out: Gluon's frontend holds neither a partition list (functions) nor an argument
        # tuple (constexprs lose their kind) in a variable, so the common partitions cannot be shared.
        if VALUE:
            gl.warp_specialize([
                (_ws_solver, (0, ring, full, free, iterate_0a, iterate_0b, key_0, mixed, mixed_full, mixed_free,
                              q_ptr, k_ptr, v_ptr, beta_ptr, g_ptr, g_kk_ptr, alpha_ptr, scale, ridge, first, stride,
                              count, o_ptr, x_ptr, h_kk_out_ptr, h_kv_out_ptr, NUM_HEADS, GROUP, D, NUM_ITER, BLOCKS,
                              HAS_BETA, HAS_ALPHA, HAS_G_KK, LANES, SLOTS, MIRROR, VALUE, SPREAD, AHEAD)),
                (_ws_solver, (1, ring, full, free, iterate_1a, iterate_1b, key_1, mixed, mixed_full, mixed_free,
                              q_ptr, k_ptr, v_ptr, beta_ptr, g_ptr, g_kk_ptr, alpha_ptr, scale, ridge, first, stride,
                              count, o_ptr, x_ptr, h_kk_out_ptr, h_kv_out_ptr, NUM_HEADS, GROUP, D, NUM_ITER, BLOCKS,
                              HAS_BETA, HAS_ALPHA, HAS_G_KK, LANES, SLOTS, MIRROR, VALUE, SPREAD, AHEAD)),
                (_ws_loader, (ring, full, free, h_kk_ptr, h_kv_ptr, first, stride, count, D, SLOTS, COPY_ROWS,
                              MIRROR, VALUE)),
                (_ws_value, (ring, full, free, mixed, mixed_full, mixed_free, k_ptr, v_ptr, beta_ptr, g_ptr, scale,
                             first, stride, count, o_ptr, h_kv_out_ptr, NUM_HEADS, GROUP, D, HAS_BETA, SLOTS,
                             MIRROR, VALUE))],
                [gl.num_warps(), LOADER_WARPS, gl.num_warps()], [SOLVER_REGS, LOADER_REGS, VALUE_REGS])
        else:
            gl.warp_specialize([
                (_ws_solver, (0, ring, full, free, iterate_0a, iterate_0b, key_0, mixed, mixed_full, mixed_free,
                              q_ptr, k_ptr, v_ptr, beta_ptr, g_ptr, g_kk_ptr, alpha_ptr, scale, ridge, first, stride,
                              count, o_ptr, x_ptr, h_kk_out_ptr, h_kv_out_ptr, NUM_HEADS, GROUP, D, NUM_ITER, BLOCKS,
                              HAS_BETA, HAS_ALPHA, HAS_G_KK, LANES, SLOTS, MIRROR, VALUE, SPREAD, AHEAD)),
                (_ws_solver, (1, ring, full, free, iterate_1a, iterate_1b, key_1, mixed, mixed_full, mixed_free,
                              q_ptr, k_ptr, v_ptr, beta_ptr, g_ptr, g_kk_ptr, alpha_ptr, scale, ridge, first, stride,
                              count, o_ptr, x_ptr, h_kk_out_ptr, h_kv_out_ptr, NUM_HEADS, GROUP, D, NUM_ITER, BLOCKS,
                              HAS_BETA, HAS_ALPHA, HAS_G_KK, LANES, SLOTS, MIRROR, VALUE, SPREAD, AHEAD)),
                (_ws_loader, (ring, full, free, h_kk_ptr, h_kv_ptr, first, stride, count, D, SLOTS, COPY_ROWS,
                              MIRROR, VALUE))],
                [gl.num_warps(), LOADER_WARPS], [SOLVER_REGS, LOADER_REGS])

    @gluon.jit
    def _ws_value(ring, full, free, mixed, mixed_full, mixed_free, k_ptr, v_ptr, beta_ptr, g_ptr, scale, first,
                  stride, count, o_ptr, h_kv_out_ptr, NUM_HEADS: gl.constexpr, GROUP: gl.constexpr,
                  D: gl.constexpr, HAS_BETA: gl.constexpr, SLOTS: gl.constexpr, MIRROR: gl.constexpr,
                  VALUE: gl.constexpr):
        """The value partition: for the program's items in order, S' = exp(g) S + k v^T from the h_kv tile
        (stored to h_kv_out) and o = scale S'^T q' once the item's solver has handed over q', in chunks of
        CHUNK rows (few registers: the solvers keep theirs). VALUE 1: one pass once q' is there, then the tile's
        buffer is released. VALUE 2 (readback): S' as soon as the tile lands (item j + 1's before item j's o),
        the buffer released at once, and o from S' read back from global memory (its own stores, mostly in L2)."""
        CHUNK: gl.constexpr = 32
        LAYOUT: gl.constexpr = gl.BlockedLayout([CHUNK // 4, 4], [4, 8], [1, gl.num_warps()], [1, 0])  # [CHUNK, D]
        ROWS: gl.constexpr = gl.SliceLayout(1, LAYOUT)
        COLS: gl.constexpr = gl.SliceLayout(0, LAYOUT)
        ORDER: gl.constexpr = _ring_order(SLOTS, MIRROR, VALUE)     # the loader's order (``_slot``)
        rows = gl.arange(0, CHUNK, layout=ROWS)
        cols = gl.arange(0, D, layout=COLS)
        piece = gl.expand_dims(rows, 1) * D + gl.expand_dims(cols, 0)                     # [CHUNK, D]
        if VALUE == 2:
            if count > 0:
                _value_update(ring, full, free, k_ptr, v_ptr, beta_ptr, g_ptr, first, stride, 0, h_kv_out_ptr, rows,
                              cols, piece, NUM_HEADS, GROUP, D, HAS_BETA, SLOTS, ORDER, CHUNK, LAYOUT)
            for j in range(count):
                if j + 1 < count:
                    _value_update(ring, full, free, k_ptr, v_ptr, beta_ptr, g_ptr, first, stride, j + 1, h_kv_out_ptr,
                                  rows, cols, piece, NUM_HEADS, GROUP, D, HAS_BETA, SLOTS, ORDER, CHUNK, LAYOUT)
                item = first + j * stride
                state = item.to(gl.int64) * (D * D)
                mbarrier.wait(mixed_full.index(j % 2), (j // 2) & 1)                        # q' written
                o = gl.zeros([D], gl.float32, COLS)
                for chunk in gl.static_range(D // CHUNK):
                    # the rows this thread stored in _value_update: its own writes, in program order
                    s = gl.load(h_kv_out_ptr + state + chunk * CHUNK * D + piece).to(gl.float32)   # [CHUNK, D]
                    mixed_rows = mixed.index(j % 2).slice(chunk * CHUNK, CHUNK).load(ROWS)
                    o += gl.sum(s * gl.expand_dims(mixed_rows, 1), axis=0)
                gl.thread_barrier()                          # every warp has read q'
                mbarrier.arrive(mixed_free.index(j % 2))
                gl.store(o_ptr + item * D + cols, (scale * o).to(o_ptr.dtype.element_ty))
        else:
            for j in range(count):
                item = first + j * stride
                kv_row, state, beta, g, _ = _item_scalars(item, beta_ptr, g_ptr, g_ptr, NUM_HEADS, GROUP, D,
                                                          HAS_BETA, False)
                v_cols = gl.load(v_ptr + kv_row * D + cols).to(gl.float32) * beta           # [D]
                decay = gl.exp(g)
                slot, _ = _slot(2 * j + 1, SLOTS, ORDER)
                mbarrier.wait(full.index(2 * (j % 2) + 1), (j // 2) & 1)                   # h_kv landed
                mbarrier.wait(mixed_full.index(j % 2), (j // 2) & 1)                        # q' written
                o = gl.zeros([D], gl.float32, COLS)
                for chunk in gl.static_range(D // CHUNK):
                    s = ring.index(slot).slice(chunk * CHUNK, CHUNK, 0).load(LAYOUT).to(gl.float32)   # [CHUNK, D]
                    k_rows = gl.load(k_ptr + kv_row * D + chunk * CHUNK + rows).to(gl.float32) * beta
                    s = decay * s + gl.expand_dims(k_rows, 1) * gl.expand_dims(v_cols, 0)   # S' rows
                    gl.store(h_kv_out_ptr + state + chunk * CHUNK * D + piece, s.to(h_kv_out_ptr.dtype.element_ty))
                    mixed_rows = mixed.index(j % 2).slice(chunk * CHUNK, CHUNK).load(ROWS)  # q' at the rows
                    o += gl.sum(s * gl.expand_dims(mixed_rows, 1), axis=0)
                gl.thread_barrier()                          # every warp has read the tile and q'
                mbarrier.arrive(free.index(slot))
                mbarrier.arrive(mixed_free.index(j % 2))
                gl.store(o_ptr + item * D + cols, (scale * o).to(o_ptr.dtype.element_ty))

    @gluon.jit
    def _value_update(ring, full, free, k_ptr, v_ptr, beta_ptr, g_ptr, first, stride, j, h_kv_out_ptr, rows, cols,
                      piece, NUM_HEADS: gl.constexpr, GROUP: gl.constexpr, D: gl.constexpr, HAS_BETA: gl.constexpr,
                      SLOTS: gl.constexpr, ORDER: gl.constexpr, CHUNK: gl.constexpr, LAYOUT: gl.constexpr):
        """VALUE 2: item j's S' = exp(g) S + k v^T from its h_kv tile (full barrier 2), stored to h_kv_out; the
        tile's buffer is released."""
        item = first + j * stride
        kv_row, state, beta, g, _ = _item_scalars(item, beta_ptr, g_ptr, g_ptr, NUM_HEADS, GROUP, D, HAS_BETA,
                                                  False)
        v_cols = gl.load(v_ptr + kv_row * D + cols).to(gl.float32) * beta                   # [D]
        decay = gl.exp(g)
        slot, _ = _slot(2 * j + 1, SLOTS, ORDER)
        mbarrier.wait(full.index(2), j & 1)                                                  # h_kv landed
        for chunk in gl.static_range(D // CHUNK):
            s = ring.index(slot).slice(chunk * CHUNK, CHUNK, 0).load(LAYOUT).to(gl.float32)  # [CHUNK, D]
            k_rows = gl.load(k_ptr + kv_row * D + chunk * CHUNK + rows).to(gl.float32) * beta
            s = decay * s + gl.expand_dims(k_rows, 1) * gl.expand_dims(v_cols, 0)           # S' rows
            gl.store(h_kv_out_ptr + state + chunk * CHUNK * D + piece, s.to(h_kv_out_ptr.dtype.element_ty))
        gl.thread_barrier()                                  # every warp has read the tile
        mbarrier.arrive(free.index(slot))

    @gluon.jit
    def _ws_loader(ring, full, free, h_kk_ptr, h_kv_ptr, first, stride, count, D: gl.constexpr,
                   SLOTS: gl.constexpr, COPY_ROWS: gl.constexpr, MIRROR: gl.constexpr, VALUE: gl.constexpr):
        """Tile t = 2 j (+1) is h_kk (h_kv) of the program's j-th item, copied into its buffer (``_slot``)
        once the solver (or the value partition) has released that buffer's previous tile, in the order of t;
        with three buffers and no mirror, the second item's h_kk comes second (before the first item's h_kv,
        ``_slot``). MIRROR: of h_kk only the 16-byte chunks that reach the diagonal or lie right of it (52% of
        the bytes at D = 128)."""
        VEC: gl.constexpr = 128 // h_kk_ptr.dtype.element_ty.primitive_bitwidth    # 16 bytes per copy
        COPY: gl.constexpr = gl.BlockedLayout([1, VEC], [32 * VEC // D, D // VEC], [gl.num_warps(), 1], [1, 0])
        rows = gl.arange(0, COPY_ROWS, layout=gl.SliceLayout(1, COPY))
        cols = gl.arange(0, D, layout=gl.SliceLayout(0, COPY))
        offsets = gl.expand_dims(rows, 1) * D + gl.expand_dims(cols, 0)                      # [COPY_ROWS, D]
        chunk_ends = gl.expand_dims(cols // VEC * VEC + VEC - 1, 0) - gl.expand_dims(rows, 1)  # [COPY_ROWS, D]
        ORDER: gl.constexpr = _ring_order(SLOTS, MIRROR, VALUE)
        if ORDER == 2:   # both solvers' first h_kk, then item j's h_kv and item j + 2's h_kk in turn
            for ahead in gl.static_range(2):
                if ahead < count:
                    _load_tile(ring, full.index(ahead), free, 2 * ahead,
                               h_kk_ptr + (first + ahead * stride).to(gl.int64) * (D * D), offsets, chunk_ends, D,
                               SLOTS, COPY_ROWS, False, ORDER)
        for j in range(count):
            state = (first + j * stride).to(gl.int64) * (D * D)
            if ORDER == 2:
                _load_tile(ring, full.index(2), free, 2 * j + 1, h_kv_ptr + state, offsets, chunk_ends, D, SLOTS,
                           COPY_ROWS, False, ORDER)
                if j + 2 < count:
                    _load_tile(ring, full.index(j % 2), free, 2 * j + 4, h_kk_ptr + state + 2 * stride * (D * D),
                               offsets, chunk_ends, D, SLOTS, COPY_ROWS, False, ORDER)
            elif ORDER != 1 or j != 1:
                _load_tile(ring, full.index(2 * (j % 2)), free, 2 * j, h_kk_ptr + state, offsets, chunk_ends, D,
                           SLOTS, COPY_ROWS, MIRROR == 1, ORDER)
            if ORDER == 1 and j == 0 and count > 1:        # item 1's h_kk, early
                _load_tile(ring, full.index(2), free, 2, h_kk_ptr + state + stride * (D * D), offsets, chunk_ends,
                           D, SLOTS, COPY_ROWS, MIRROR == 1, ORDER)
            if ORDER != 2:
                _load_tile(ring, full.index(2 * (j % 2) + 1), free, 2 * j + 1, h_kv_ptr + state, offsets,
                           chunk_ends, D, SLOTS, COPY_ROWS, False, ORDER)

    @gluon.jit
    def _mirror_square(buffer):
        """buffer [128, 128] fp32 holds a symmetric matrix's 16-byte chunks on or right of the diagonal; write
        the chunks left of it (c // 4 < r // 4) from their mirror images. In [32, 32 or 64] pieces of rows
        32 R..32 R + 31 over 4 warps: a lane per row, so that the column reads of the mirror images and the
        16-byte row writes are both free of bank conflicts in the ring's swizzle; the pieces are read in two
        batches before they are written (11 barriers in all)."""
        piece_0 = _mirror_piece(buffer, 0, 0, 32, True)
        piece_1 = _mirror_piece(buffer, 1, 0, 64, True)
        piece_2 = _mirror_piece(buffer, 2, 0, 64, False)
        _store_piece(buffer, 0, 0, piece_0)
        _store_piece(buffer, 1, 0, piece_1)
        _store_piece(buffer, 2, 0, piece_2)
        piece_3 = _mirror_piece(buffer, 2, 64, 32, True)
        piece_4 = _mirror_piece(buffer, 3, 0, 64, False)
        piece_5 = _mirror_piece(buffer, 3, 64, 64, True)
        _store_piece(buffer, 2, 64, piece_3)
        _store_piece(buffer, 3, 0, piece_4)
        _store_piece(buffer, 3, 64, piece_5)

    @gluon.jit
    def _mirror_piece(buffer, row_block: gl.constexpr, col_start: gl.constexpr, WIDTH: gl.constexpr,
                      DIAGONAL: gl.constexpr):
        """Rows 32 row_block.. and columns col_start.. (+ WIDTH) of the symmetric buffer, from the mirror
        image (a transposed read of the upper triangle); a piece that holds the diagonal keeps its own chunks
        on or right of it."""
        LAYOUT: gl.constexpr = gl.BlockedLayout([1, 4], [32, 1], [1, gl.num_warps()], [1, 0])  # a lane per row
        image = buffer.slice(col_start, WIDTH, 0).slice(row_block * 32, 32, 1)
        values = image.permute([1, 0]).load(LAYOUT)                                       # [32, WIDTH]
        if DIAGONAL:
            rows = row_block * 32 + gl.arange(0, 32, layout=gl.SliceLayout(1, LAYOUT))
            cols = col_start + gl.arange(0, WIDTH, layout=gl.SliceLayout(0, LAYOUT))
            below = gl.expand_dims(cols // 4, 0) < gl.expand_dims(rows // 4, 1)
            own = buffer.slice(row_block * 32, 32, 0).slice(col_start, WIDTH, 1).load(LAYOUT)
            values = gl.where(below, values, own)
        return values

    @gluon.jit
    def _store_piece(buffer, row_block: gl.constexpr, col_start: gl.constexpr, values):
        buffer.slice(row_block * 32, 32, 0).slice(col_start, values.shape[1], 1).store(values)

    @gluon.jit
    def _slot(tile, SLOTS: gl.constexpr, ORDER: gl.constexpr):
        """(buffer, its use number) of tile t = 2 j (+ 1: h_kv) of the program's j-th item. Two buffers: t % 2,
        t // 2. Three: h_kk in buffer 0 and item j's h_kv in 1 + j % 2, one h_kv buffer per solver, so that a
        solver's next h_kv can load during its own solve (the default: 84 against 88 us at B = 32, num_iter 30
        on an H200, docs/benchmarks.md). ORDER 1 (three buffers without the mirror, ``_ring_order``): item 1's
        h_kk goes to buffer 2 (before item 1's h_kv), so that both solvers' first h_kk load at once (83.7-83.9 against
        84.6-85.2 us at B = 32, 290.5 against 294.3 at B = 128, num_iter 30; with the mirror, 72.6 against 70.7
        at B = 32, num_iter 10).

        ORDER 2 (``value_partition="readback"``): each solver's h_kk in a buffer of its own (j % 2), every h_kv
        in buffer 2 (the value partition releases it as soon as h_kv' is written).

        Phases stay safe (a full barrier's waiter never falls two phases behind): item j + 2's h_kk needs item
        j + 1's released, which was loaded after item j's release (or, for item 3, after item 1's h_kv, which
        needs item 1's h_kk released); item j + 2's h_kv needs item j's h_kv released. ORDER 2 (full barriers
        0 / 1 for the solvers' h_kk, 2 for h_kv): item j + 2's h_kk needs item j's taken, item j + 1's h_kv
        item j's released. tests/test_decode_ring_protocol.py model-checks these orders (and the partitions'
        waits) under random interleavings."""
        if SLOTS == 2:
            return tile % 2, tile // 2
        else:
            j = tile // 2
            if ORDER == 2:
                if tile % 2 == 0:
                    return j % 2, j // 2
                else:
                    return 2 + 0 * j, j
            elif ORDER == 0:
                if tile % 2 == 0:
                    return 0, j
                else:
                    return 1 + j % 2, j // 2
            elif tile % 2 == 0:
                return 2 * (j == 1).to(gl.int32), j - 1 + (j == 0).to(gl.int32)
            else:
                return 1 + j % 2, j // 2 + j % 2

    @gluon.jit
    def _load_tile(ring, full, free, tile, source, offsets, chunk_ends, D: gl.constexpr, SLOTS: gl.constexpr,
                   COPY_ROWS: gl.constexpr, UPPER: gl.constexpr, ORDER: gl.constexpr):
        """Copy tile ``tile`` (at ``source``) into its buffer (``_slot``), then arrive on ``full`` when it
        lands. UPPER: only the 16-byte chunks whose last element is on or right of the diagonal (the others
        are zero-filled, reading nothing)."""
        slot, use = _slot(tile, SLOTS, ORDER)
        mbarrier.wait(free.index(slot), (use + 1) & 1, pred=use > 0)   # the previous tile's release
        buffer = ring.index(slot)
        for row in gl.static_range(0, D, COPY_ROWS):
            if UPPER:
                async_copy.async_copy_global_to_shared(buffer.slice(row, COPY_ROWS), source + row * D + offsets,
                                                       mask=chunk_ends >= row)
            else:
                async_copy.async_copy_global_to_shared(buffer.slice(row, COPY_ROWS), source + row * D + offsets)
        async_copy.mbarrier_arrive(full, increment_count=False)

    @gluon.jit
    def _take_tile(ring, full, phase, free, tile, layout: gl.constexpr, BLOCKS: gl.constexpr, RB: gl.constexpr,
                   D: gl.constexpr, SLOTS: gl.constexpr, MIRROR: gl.constexpr, ORDER: gl.constexpr):
        """Wait for tile ``tile`` (phase ``phase`` of ``full``), load it into registers as [BLOCKS, RB, D] and
        release its buffer; MIRROR: the buffer holds the upper triangle, mirrored first."""
        slot, _ = _slot(tile, SLOTS, ORDER)
        mbarrier.wait(full, phase & 1)
        if MIRROR == 1:
            _mirror_square(ring.index(slot))
            gl.thread_barrier()
        values = ring.index(slot).reshape([BLOCKS, RB, D]).load(layout)
        gl.thread_barrier()                              # every warp of this partition has read the buffer
        mbarrier.arrive(free.index(slot))
        return values

    @gluon.jit
    def _ws_solver(which: gl.constexpr, ring, full, free, iterate_a, iterate_b, key_shared, mixed_shared, mixed_full,
                   mixed_free, q_ptr, k_ptr, v_ptr, beta_ptr,
                   g_ptr, g_kk_ptr, alpha_ptr, scale, ridge, first, stride, count, o_ptr, x_ptr, h_kk_out_ptr,
                   h_kv_out_ptr, NUM_HEADS: gl.constexpr, GROUP: gl.constexpr, D: gl.constexpr,
                   NUM_ITER: gl.constexpr, BLOCKS: gl.constexpr, HAS_BETA: gl.constexpr, HAS_ALPHA: gl.constexpr,
                   HAS_G_KK: gl.constexpr, LANES: gl.constexpr, SLOTS: gl.constexpr, MIRROR: gl.constexpr,
                   VALUE: gl.constexpr, SPREAD: gl.constexpr, AHEAD: gl.constexpr):
        """Items j = which, which + 2, ... of this program: the step of ``_decode_kernel`` on tiles from the
        ring (S stays in its buffer until o is computed). VALUE: up to q', which goes to the value partition
        (``_ws_value``) through ``mixed_shared``."""
        RB: gl.constexpr = D // BLOCKS
        L3: gl.constexpr = _state_layout(D, BLOCKS, LANES, gl.num_warps())
        ROW: gl.constexpr = gl.SliceLayout(2, L3)
        COL: gl.constexpr = gl.SliceLayout(0, gl.SliceLayout(0, L3))
        ORDER: gl.constexpr = _ring_order(SLOTS, MIRROR, VALUE)     # the loader's order (``_slot``)
        KK_FULL: gl.constexpr = which if ORDER == 2 else 2 * which   # the full barrier of this solver's h_kk
        rows = (gl.expand_dims(gl.arange(0, BLOCKS, layout=gl.SliceLayout(1, ROW)), 1) * RB
                + gl.expand_dims(gl.arange(0, RB, layout=gl.SliceLayout(0, ROW)), 0))     # [BLOCKS, RB]
        cols = gl.arange(0, D, layout=COL)                                                # [D]
        square = gl.expand_dims(rows, 2) * D + gl.expand_dims(gl.expand_dims(cols, 0), 0)   # [BLOCKS, RB, D]
        if AHEAD:    # the inputs of the solver's first item (an item that exists: first < num_items)
            ahead = _item_inputs(first + gl.minimum(which, gl.maximum(count - 1, 0)) * stride, q_ptr, k_ptr, v_ptr,
                                 beta_ptr, g_ptr, g_kk_ptr, alpha_ptr, cols, NUM_HEADS, GROUP, D, HAS_BETA,
                                 HAS_G_KK, HAS_ALPHA)
        for j in range(which, count, 2):
            item = first + j * stride                   # item = b * H + h
            if AHEAD:    # this item's inputs were loaded an item ahead; now the next item's (the last: again)
                beta, g, g_kk, alpha, q_in, k_in, v_in = ahead
                ahead = _item_inputs(first + gl.minimum(j + 2, count - 1) * stride, q_ptr, k_ptr, v_ptr, beta_ptr,
                                     g_ptr, g_kk_ptr, alpha_ptr, cols, NUM_HEADS, GROUP, D, HAS_BETA, HAS_G_KK,
                                     HAS_ALPHA)
                kv_row = (item // NUM_HEADS) * (NUM_HEADS // GROUP) + (item % NUM_HEADS) // GROUP
                state = item.to(gl.int64) * (D * D)
                q = q_in.to(gl.float32)                                                      # [D]
                k_cols = k_in.to(gl.float32) * beta                                          # [D]
                key_shared.store(k_cols)             # k at each thread's rows, through shared memory
                gl.thread_barrier()
                k_rows = key_shared.reshape([BLOCKS, RB]).load(ROW)                          # [BLOCKS, RB]
            else:
                kv_row, state, beta, g, g_kk = _item_scalars(item, beta_ptr, g_ptr, g_kk_ptr, NUM_HEADS, GROUP, D,
                                                             HAS_BETA, HAS_G_KK)
                q = gl.load(q_ptr + item * D + cols).to(gl.float32)                              # [D]
                k_rows = gl.load(k_ptr + kv_row * D + rows).to(gl.float32) * beta               # [BLOCKS, RB]
                k_cols = gl.load(k_ptr + kv_row * D + cols).to(gl.float32) * beta               # [D]

            h = _take_tile(ring, full.index(KK_FULL), j // 2, free, 2 * j, L3, BLOCKS, RB, D, SLOTS,
                           MIRROR, ORDER).to(gl.float32)
            h = _decay_add_outer(h, g_kk, k_rows, k_cols)                                   # H'
            if SPREAD == 0:
                gl.store(h_kk_out_ptr + state + square, h.to(h_kk_out_ptr.dtype.element_ty))
            x = _solve(h, q, ridge, iterate_a, iterate_b, NUM_ITER, BLOCKS, RB, ROW, h_kk_out_ptr + state + square,
                       rows, SPREAD)
            gl.store(x_ptr + item * D + cols, x.to(x_ptr.dtype.element_ty))
            mixed = x
            if HAS_ALPHA:
                if AHEAD:
                    mixed = q + alpha * (x - q)
                else:
                    mixed = q + gl.load(alpha_ptr + item).to(gl.float32) * (x - q)

            if VALUE:    # q' to the value partition, once it has read this solver's previous one
                mbarrier.wait(mixed_free.index(which), ((j // 2) + 1) & 1, pred=j >= 2)
                mixed_shared.index(which).store(mixed)
                gl.thread_barrier()
                mbarrier.arrive(mixed_full.index(which))
            else:
                if AHEAD:
                    v_cols = v_in.to(gl.float32) * beta                                          # [D]
                    k_rows = key_shared.reshape([BLOCKS, RB]).load(ROW)          # again: not held in the solve
                else:
                    v_cols = gl.load(v_ptr + kv_row * D + cols).to(gl.float32) * beta           # [D]
                    k_rows = gl.load(k_ptr + kv_row * D + rows).to(gl.float32) * beta   # again: not held in the solve
                s = _take_tile(ring, full.index(2 * (j % 2) + 1), j // 2, free, 2 * j + 1, L3, BLOCKS, RB, D,
                               SLOTS, False, ORDER).to(gl.float32)                                # [BLOCKS, RB, D]
                _value_and_output(s, g, k_rows, v_cols, mixed, iterate_b, h_kv_out_ptr + state + square,
                                  o_ptr + item * D + cols, scale, BLOCKS, RB, ROW)
            gl.thread_barrier()                            # the iterate buffers are reused by the next item

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
    def _item_scalars(item, beta_ptr, g_ptr, g_kk_ptr, NUM_HEADS: gl.constexpr, GROUP: gl.constexpr,
                      D: gl.constexpr, HAS_BETA: gl.constexpr, HAS_G_KK: gl.constexpr):
        """(kv row, state offset, beta, g, g_kk) of item = b H + h (beta 1 and g_kk = g when absent)."""
        head = item % NUM_HEADS
        kv_row = (item // NUM_HEADS) * (NUM_HEADS // GROUP) + head // GROUP
        state = item.to(gl.int64) * (D * D)
        beta = 1.0
        if HAS_BETA:
            beta = gl.load(beta_ptr + item).to(gl.float32)
        g = gl.load(g_ptr + item).to(gl.float32)
        g_kk = g
        if HAS_G_KK:
            g_kk = gl.load(g_kk_ptr + item).to(gl.float32)
        return kv_row, state, beta, g, g_kk

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

    @gluon.constexpr_function
    def _ring_order(SLOTS, MIRROR, VALUE):
        """How the pipelined form maps tiles to buffers (``_slot``): 0 in turn (two buffers, or three with the
        mirror), 1 item 1's h_kk early (three buffers), 2 two h_kk buffers and one h_kv (VALUE 2)."""
        if VALUE == 2:
            return 2
        return 1 if SLOTS == 3 and MIRROR == 0 else 0

    @gluon.constexpr_function
    def _state_layout(D, BLOCKS, LANES, WARPS):
        """[BLOCKS, D / BLOCKS, D] over WARPS warps: a thread holds LANES adjacent columns in some rows of each
        row block; a warp's threads span D / (WARPS LANES) column groups and the rest of 32 row lanes."""
        column_lanes = D // (WARPS * LANES)
        row_lanes = 32 // column_lanes
        return gl.BlockedLayout([BLOCKS, D // BLOCKS // row_lanes, LANES], [1, row_lanes, column_lanes],
                                [1, 1, WARPS], [2, 1, 0])

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
    def _copy_state(buffer, state_ptr, item, num_items, copy_square, D: gl.constexpr):
        """Start the asynchronous copy of state ``item`` [D, D] into ``buffer`` (nothing past the last item)."""
        async_copy.async_copy_global_to_shared(buffer, state_ptr + item.to(gl.int64) * (D * D) + copy_square,
                                               mask=(copy_square >= 0) & (item < num_items))
        async_copy.commit_group()

    @gluon.jit
    def _reciprocal(value):
        """1 / value by the SFU (rcp.approx.ftz.f32, within 1 ulp): two instructions with the multiply-add
        before it. An IEEE-range division is a dozen dependent instructions, which ptxas placed ahead of the
        iterate loads in some builds (offline sm_90a SASS: 374-378 instructions per two iterations, 363 with
        this one and the loads first)."""
        return gl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=r,r", [value], dtype=gl.float32,
                                         is_pure=True, pack=1)

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


def supports(q, k, v, h_kk, h_kv) -> bool:
    """Shapes the kernel covers: D = Dv in ``HEAD_DIMS``, whole GQA groups."""
    d, dv = q.shape[-1], v.shape[-1]
    return d == dv and d in HEAD_DIMS and q.shape[1] % k.shape[1] == 0 and h_kk.shape[-2:] == (d, d) \
        and h_kv.shape[-2:] == (d, dv)


def default_form(d: int, num_items: int, multiprocessors: int, hopper: bool) -> str:
    """The pipelined form on a Hopper GPU where it covers D and every SM gets an item (B H >= #SMs): on an
    H200 it took 0.085 / 0.294 ms against 0.111 / 0.357 for one program per item at B = 32 / 128, num_iter
    30; with fewer items than SMs each program has one item and nothing to overlap, so one program per item
    (docs/benchmarks.md). Other GPUs run one program per item: the pipelined form's warp specialization
    (setmaxnreg) is Hopper's, and it was measured on Hopper only."""
    return "pipelined" if hopper and d in PIPELINED_HEAD_DIMS and num_items >= multiprocessors else "item"


def default_mirror(form: str, slots: int, fp32_states: bool, num_iter: int) -> bool:
    """Read h_kk as its upper triangle (``mirror``) in the pipelined form with 3 buffers and fp32 states, up to
    ``MIRROR_MAX_ITER`` iterations. On an H200 (docs/benchmarks.md) it made the step faster where the loads
    bound it: 70-72 against 77-78 us at B = 32 and 261-266 against 287-289 at B = 128, num_iter 10; and slower
    where the solves do: 88-93 against 84-85 and 322-334 against 293-297 at num_iter 30."""
    return form == "pipelined" and slots == 3 and fp32_states and num_iter <= MIRROR_MAX_ITER


def _multiprocessors() -> int:
    """Streaming multiprocessors of the first GPU (132 on an H100/H200 SXM when jax does not say)."""
    try:
        return int(jax.local_devices(backend="gpu")[0].core_count)
    except (RuntimeError, AttributeError, IndexError, TypeError, ValueError):
        return 132


def gka_decode(q, k, v, beta, g, alpha, h_kk, h_kv, *, num_iter, ridge_strength, scale, g_kk=None,
               precision=HIGHEST, form=None, blocks=None, lanes=None, maxnreg=None, slots=None,
               loader_warps=None, mirror=None, value_partition=None, spread_store=None,
               inputs_ahead=None) -> GKAResult:
    """One GKA token with the semantics of ``reference.gka_decode``, as one Gluon kernel.

    q [B, H, D]; k [B, Hkv, D]; v [B, Hkv, Dv]; beta, g, alpha, g_kk [B, H] (beta, alpha, g_kk may be None);
    h_kk [B, H, D, D], h_kv [B, H, D, Dv] states (computed in float32, returned in their own dtype, written
    in place when donated). ``precision`` is accepted for signature compatibility: every product is an fp32
    multiply-add. Tuning:
    - ``form`` (``FORMS``; default ``default_form``): "item" (one program per (b, h), S prefetched, several
      programs per SM) or "pipelined" (Hopper, D = 128: persistent and warp-specialized; a loader of
      ``loader_warps`` warps, ``LOADER_WARPS``, streams the states through ``slots`` (``RING_SLOTS``, default
      ``DEFAULT_SLOTS``) shared-memory buffers to two solver partitions);
    - ``blocks`` (partial sums per thread, a power of 2 dividing D; default ``PIPELINED_BLOCKS`` in the
      pipelined form, ``DEFAULT_BLOCKS`` in the other); ``lanes``
      (``LANES``: columns per thread, default ``DEFAULT_LANES``);
    - ``maxnreg`` (the "item" form's register cap per thread; default ``DEFAULT_MAXNREG``; 0 for none);
    - ``mirror`` (pipelined form, 3 slots, fp32 states; default ``default_mirror``): read only h_kk's upper triangle
      (16-byte chunks on or right of the diagonal) and let the solver that takes it mirror the rest in shared
      memory. It relies on h_kk being symmetric, as every state this package writes is (the kernel then
      writes h_kk' exactly symmetric).
    - ``value_partition`` (pipelined form; ``VALUE_PARTITIONS``; default ``LONG_SOLVE`` / ``SHORT_SOLVE``, by
      num_iter, and off with ``loader_warps`` = 1): a third partition of 4 warps
      updates h_kv and computes o from the solvers' q' (``_ws_value``), which takes that work off the
      solvers' path; it needs ``loader_warps`` = 4 (the default then). True / "resident": h_kv's tile stays
      in its buffer until o; "readback" (three buffers, no mirror): h_kv' is written as soon as the tile
      lands and o computed from it read back, so that one h_kv buffer is enough and each solver gets an h_kk
      buffer of its own ("readback" measured slower, docs/benchmarks.md).
    - ``spread_store`` (pipelined form; ``SPREAD_PARTS``; default as ``value_partition``'s): h_kk' stored in
      this many parts, one before each run of the solve's iterations (``_solve``), rather than all before it.
    - ``inputs_ahead`` (pipelined form; default as ``value_partition``'s): each solver loads its next item's q,
      k, v, beta, g, g_kk and alpha while the current item runs, so that no global load waits on its path
      (beta k reaches each thread's rows through shared memory).
    Returns GKAResult(o [B, H, Dv] and x [B, H, D] in q's dtype, h_kk, h_kv).
    """
    del precision
    if not AVAILABLE:
        raise RuntimeError("the Gluon decode kernel needs jax-triton and triton with Gluon")
    if not supports(q, k, v, h_kk, h_kv):
        raise ValueError(f"the Gluon decode kernel covers D = Dv in {HEAD_DIMS} and whole GQA groups; got "
                         f"q {q.shape}, k {k.shape}, v {v.shape}, h_kk {h_kk.shape}, h_kv {h_kv.shape}")
    batch, num_heads, d = q.shape
    num_items = batch * num_heads
    form = form or default_form(d, num_items, _multiprocessors(), on_hopper())
    blocks = blocks or (PIPELINED_BLOCKS if form == "pipelined" else DEFAULT_BLOCKS)
    lanes, slots = lanes or DEFAULT_LANES, slots or DEFAULT_SLOTS
    if form not in FORMS:
        raise ValueError(f"form={form!r} is not one of {FORMS}")
    if lanes not in LANES:
        raise ValueError(f"lanes={lanes} is not one of {LANES}")
    if blocks & (blocks - 1) or d % (blocks * lanes):
        raise ValueError(f"blocks={blocks} must be a power of 2 with blocks * lanes ({lanes}) dividing D={d}")
    if form == "pipelined" and not on_hopper():
        raise ValueError("the pipelined form needs a Hopper GPU (compute capability 9.x: warp specialization "
                         "with setmaxnreg)")
    if form == "pipelined" and h_kk.dtype != h_kv.dtype:
        raise ValueError(f"the pipelined form needs h_kk and h_kv of one dtype; got {h_kk.dtype}, {h_kv.dtype}")
    if form == "pipelined" and d not in PIPELINED_HEAD_DIMS:
        raise ValueError(f"the pipelined form covers D in {PIPELINED_HEAD_DIMS} (warp-specialized partitions of "
                         f"4 warps); got D={d}")
    if slots not in RING_SLOTS:
        raise ValueError(f"slots={slots} is not one of {RING_SLOTS}")
    if not any(value_partition is mode or (isinstance(value_partition, str) and value_partition == mode)
               for mode in VALUE_PARTITIONS):
        raise ValueError(f"value_partition={value_partition!r} is not one of {tuple(VALUE_PARTITIONS)}")
    long_solve = form == "pipelined" and int(num_iter) > MIRROR_MAX_ITER
    defaults = LONG_SOLVE if long_solve and loader_warps in (None, VALUE_LOADER_WARPS) else SHORT_SOLVE
    value_partition = defaults["value_partition"] if value_partition is None else value_partition
    spread_store = (LONG_SOLVE if long_solve else SHORT_SOLVE)["spread_store"] if spread_store is None else spread_store
    inputs_ahead = (LONG_SOLVE if long_solve else SHORT_SOLVE)["inputs_ahead"] if inputs_ahead is None else inputs_ahead
    value = VALUE_PARTITIONS[value_partition]          # 0 none, 1 resident, 2 readback
    if value and form != "pipelined":
        raise ValueError(f"value_partition=True needs the pipelined form; got form={form!r}")
    loader_warps = loader_warps or (VALUE_LOADER_WARPS if value else DEFAULT_LOADER_WARPS)
    fp32_states = h_kk.dtype == jnp.float32 and h_kv.dtype == jnp.float32
    if mirror is None:
        mirror = value != 2 and default_mirror(form, slots, fp32_states, int(num_iter))
    if not isinstance(mirror, (bool, np.bool_)):
        raise ValueError(f"mirror={mirror!r} is not a bool")
    if mirror and (form != "pipelined" or slots != 3 or not fp32_states):
        raise ValueError(f"mirror=True (h_kk read as its upper triangle) needs the pipelined form with slots=3 "
                         f"and float32 states; got form={form!r}, slots={slots}, {h_kk.dtype} states")
    if loader_warps not in LOADER_WARPS:
        raise ValueError(f"loader_warps={loader_warps} is not one of {LOADER_WARPS}")
    if value == 2 and (slots != 3 or mirror):
        raise ValueError(f"value_partition='readback' needs slots=3 without the mirror; got slots={slots}, "
                         f"mirror={mirror}")
    if spread_store not in SPREAD_PARTS or isinstance(spread_store, bool):
        raise ValueError(f"spread_store={spread_store!r} is not one of {SPREAD_PARTS}")
    if spread_store and form != "pipelined":
        raise ValueError(f"spread_store={spread_store} needs the pipelined form; got form={form!r}")
    if not isinstance(inputs_ahead, (bool, np.bool_)):
        raise ValueError(f"inputs_ahead={inputs_ahead!r} is not a bool")
    if inputs_ahead and form != "pipelined":
        raise ValueError(f"inputs_ahead=True needs the pipelined form; got form={form!r}")
    if value and loader_warps != VALUE_LOADER_WARPS:
        raise ValueError(f"value_partition=True needs loader_warps={VALUE_LOADER_WARPS} (4 + 4 + 4 + 4 warps fill "
                         f"the register file exactly); got loader_warps={loader_warps}")
    programs = num_items if form == "item" else min(num_items, _multiprocessors())
    g = g.astype(jnp.float32)
    present = lambda a: g if a is None else a  # noqa: E731  (an absent input's pointer is never read)
    if form == "pipelined":
        kernel = _decode_ws_kernel
        tuning = dict(SLOTS=slots, COPY_ROWS=8, SOLVER_REGS=SOLVER_REGS,
                      LOADER_REGS=MIRROR_LOADER_REGS if mirror else LOADER_REGS, LOADER_WARPS=loader_warps,
                      MIRROR=int(mirror), VALUE=value, VALUE_REGS=VALUE_REGS, SPREAD=spread_store,
                      AHEAD=int(inputs_ahead))
    else:
        kernel = _decode_kernel
        tuning = dict(MAXNREG=DEFAULT_MAXNREG if maxnreg is None else maxnreg)
    o, x, h_kk, h_kv = triton_call(
        q, k, v, present(beta), g, present(g_kk), present(alpha), h_kk, h_kv,
        np.float32(scale), np.float32(ridge_strength), num_items,   # fp32 scalars (a Python float is fp64)
        kernel=kernel,
        out_shape=[jax.ShapeDtypeStruct((batch, num_heads, d), q.dtype),
                   jax.ShapeDtypeStruct((batch, num_heads, d), q.dtype),
                   jax.ShapeDtypeStruct(h_kk.shape, h_kk.dtype),
                   jax.ShapeDtypeStruct(h_kv.shape, h_kv.dtype)],
        grid=(programs,),
        num_warps=d // 32,          # the pipelined form's solver partitions have as many
        input_output_aliases={7: 2, 8: 3},   # h_kk -> new h_kk, h_kv -> new h_kv (array operands 7, 8)
        name="gka_gluon_decode",
        NUM_HEADS=num_heads, GROUP=num_heads // k.shape[1], D=d, NUM_ITER=int(num_iter), BLOCKS=blocks,
        HAS_BETA=beta is not None, HAS_ALPHA=alpha is not None, HAS_G_KK=g_kk is not None, LANES=lanes,
        **tuning)
    return GKAResult(o, x, h_kk, h_kv)
