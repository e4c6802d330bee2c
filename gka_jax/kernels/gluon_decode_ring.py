"""The pipelined form of the Gluon decode (``gluon_decode``'s "pipelined", the default at D = 128 when B H reaches
the number of SMs): one persistent, warp-specialized program per SM.

A loader partition copies each item's h_kk, then h_kv, by cp.async into a ring of ``SLOTS`` [D, D] buffers in
shared memory (by default three: h_kk's and one h_kv buffer per solver; ``_slot`` maps tiles to buffers and
``tests/test_decode_ring_protocol.py`` model-checks the order on CPU); two solver partitions of 4 warps take
the items in turn and compute each item's step from the ring (``gluon_decode_math``), H held as one block of
rows (a chain of 32 FMAs per column and thread). Loads stream while the solvers compute, so the step runs near
memory speed once every SM has several items (88% of the copy bandwidth at B = 128, num_iter 30, on an H200;
79-80% at B = 32, where the solves stay partly exposed: docs/kernels.md).

Options (constexprs, chosen by ``gluon_decode.gka_decode``):
- MIRROR (up to num_iter 10, fp32 states): the loader copies only h_kk's upper triangle (16-byte chunks on or
  right of the diagonal: 52% of its bytes; h_kk is symmetric) and the solver that takes it writes the rest from
  the mirror image in shared memory (``_mirror_square``), so the step moves 12% fewer bytes.
- VALUE: a third partition (``_ws_value``) takes h_kv and o off the solvers, which hand it q'.
- SPREAD: h_kk' stored in parts over the solve (``gluon_decode_math._solve``).
- AHEAD: each solver loads its next item's inputs during the current item.
- TMA (an option, measured slower): the loader copies each tile with one TMA tensor copy, through descriptors
  made on the device in ``scratch_ptr`` (``gluon_call.route_global_scratch``).

The grid (``gluon_decode.pipelined_programs``): one program per SM, or fewer when most programs would take one
item more than the rest (B = 32, H = 32 on 132 SMs: 128 programs of 8 items).
"""

from __future__ import annotations

from .gluon_call import GLUON

if GLUON:
    from .gluon_call import async_copy, gl, gluon, mbarrier, tma
    from .gluon_decode_math import _decay_add_outer, _item_inputs, _item_rows, _item_scalars, _solve, _state_layout
    from .gluon_decode_math import _value_and_output

    @gluon.jit
    def _decode_ws_kernel(q_ptr, k_ptr, v_ptr, beta_ptr, g_ptr, g_kk_ptr, alpha_ptr, h_kk_ptr, h_kv_ptr,
                          scale, ridge, num_items,
                          o_ptr, x_ptr, h_kk_out_ptr, h_kv_out_ptr, scratch_ptr,
                          NUM_HEADS: gl.constexpr, GROUP: gl.constexpr, D: gl.constexpr, NUM_ITER: gl.constexpr,
                          BLOCKS: gl.constexpr, HAS_BETA: gl.constexpr, HAS_ALPHA: gl.constexpr,
                          HAS_G_KK: gl.constexpr, LANES: gl.constexpr, SLOTS: gl.constexpr,
                          COPY_ROWS: gl.constexpr, SOLVER_REGS: gl.constexpr, LOADER_REGS: gl.constexpr,
                          LOADER_WARPS: gl.constexpr, MIRROR: gl.constexpr, VALUE: gl.constexpr,
                          VALUE_REGS: gl.constexpr, SPREAD: gl.constexpr, AHEAD: gl.constexpr,
                          TMA: gl.constexpr, SCRATCH_BYTES: gl.constexpr):
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
        the solver, waits for the h_kv tiles (in item order) and releases their buffers.

        TMA: the loader copies each tile with one bulk tensor copy (the Tensor Memory Accelerator) instead of
        16-byte cp.async per lane, and a full barrier completes on the copy's bytes (its descriptors are made
        on the device, in ``scratch_ptr``: ``gluon_call``)."""
        if TMA:
            RING: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=0,
                                                      element_bitwidth=h_kk_ptr.dtype.element_ty.primitive_bitwidth,
                                                      rank=2)
        elif MIRROR > 0:
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
            mbarrier.init(full.index(index), count=1 if TMA else 32 * LOADER_WARPS)
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
                (_ws_loader, (ring, full, free, h_kk_ptr, h_kv_ptr, first, stride, count, num_items, D, SLOTS,
                              COPY_ROWS, MIRROR, VALUE, TMA)),
                (_ws_value, (ring, full, free, mixed, mixed_full, mixed_free, k_ptr, v_ptr, beta_ptr, g_ptr, h_kv_ptr,
                             scale, first, stride, count, o_ptr, h_kv_out_ptr, NUM_HEADS, GROUP, D, HAS_BETA, SLOTS,
                             MIRROR, VALUE, COPY_ROWS))],
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
                (_ws_loader, (ring, full, free, h_kk_ptr, h_kv_ptr, first, stride, count, num_items, D, SLOTS,
                              COPY_ROWS, MIRROR, VALUE, TMA))],
                [gl.num_warps(), LOADER_WARPS], [SOLVER_REGS, LOADER_REGS])

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
                kv_row, state = _item_rows(item, NUM_HEADS, GROUP, D)
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
    def _ws_value(ring, full, free, mixed, mixed_full, mixed_free, k_ptr, v_ptr, beta_ptr, g_ptr, h_kv_ptr, scale,
                  first, stride, count, o_ptr, h_kv_out_ptr, NUM_HEADS: gl.constexpr, GROUP: gl.constexpr,
                  D: gl.constexpr, HAS_BETA: gl.constexpr, SLOTS: gl.constexpr, MIRROR: gl.constexpr,
                  VALUE: gl.constexpr, COPY_ROWS: gl.constexpr):
        """The value partition: for the program's items in order, S' = exp(g) S + k v^T from the h_kv tile
        (stored to h_kv_out) and o = scale S'^T q' once the item's solver has handed over q', in chunks of
        CHUNK rows (few registers: the solvers keep theirs). VALUE 1: one pass once q' is there, then the tile's
        buffer is released. VALUE 2 (readback): S' as soon as the tile lands (item j + 1's before item j's o),
        the buffer released at once, and o from S' read back from global memory (its own stores, mostly in L2).
        VALUE 3: as 1, but this partition copies the h_kv tiles itself (cp.async, item j + 2's into item j's
        buffer once read; the loader copies only h_kk), so that h_kk's copies neither wait for an h_kv buffer
        nor land behind h_kv's (a loader lane's cp.async arrival tracks all its earlier copies). VALUE 4
        ("single"): as 1, with every h_kv tile in one buffer (ring order 2, as VALUE 2's)."""
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
            if VALUE == 3:   # this partition copies the h_kv tiles: items 0 and 1's now (1's once h_kk 1 is read)
                VEC: gl.constexpr = 128 // h_kv_ptr.dtype.element_ty.primitive_bitwidth
                COPY: gl.constexpr = gl.BlockedLayout([1, VEC], [32 * VEC // D, D // VEC], [gl.num_warps(), 1],
                                                      [1, 0])
                offsets = (gl.expand_dims(gl.arange(0, COPY_ROWS, layout=gl.SliceLayout(1, COPY)), 1) * D
                           + gl.expand_dims(gl.arange(0, D, layout=gl.SliceLayout(0, COPY)), 0))   # [COPY_ROWS, D]
                for ahead in gl.static_range(2):
                    if ahead < count:
                        slot, use = _slot(2 * ahead + 1, SLOTS, ORDER)
                        mbarrier.wait(free.index(slot), 0, pred=use > 0)      # buffer 2: item 1's h_kk read
                        _copy_rows(ring.index(slot), h_kv_ptr + (first + ahead * stride).to(gl.int64) * (D * D),
                                   offsets, offsets, D, COPY_ROWS, False)
                        async_copy.commit_group()
            for j in range(count):
                item = first + j * stride
                kv_row, state, beta, g, _ = _item_scalars(item, beta_ptr, g_ptr, g_ptr, NUM_HEADS, GROUP, D,
                                                          HAS_BETA, False)
                v_cols = gl.load(v_ptr + kv_row * D + cols).to(gl.float32) * beta           # [D]
                decay = gl.exp(g)
                slot, _ = _slot(2 * j + 1, SLOTS, ORDER)
                if VALUE == 3:     # its own copies: item j's landed (item j + 1's may still be in flight)
                    if j + 1 < count:
                        async_copy.wait_group(1)
                    else:
                        async_copy.wait_group(0)
                    gl.thread_barrier()
                elif ORDER == 2:   # (VALUE 4: one h_kv buffer, every h_kv tile on full barrier 2)
                    mbarrier.wait(full.index(2), j & 1)                                     # h_kv landed
                else:
                    mbarrier.wait(full.index(2 * (j % 2) + 1), (j // 2) & 1)               # h_kv landed
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
                if VALUE != 3:
                    mbarrier.arrive(free.index(slot))
                mbarrier.arrive(mixed_free.index(j % 2))
                gl.store(o_ptr + item * D + cols, (scale * o).to(o_ptr.dtype.element_ty))
                if VALUE == 3:
                    if j + 2 < count:      # item j + 2's h_kv into the buffer just read
                        _copy_rows(ring.index(slot), h_kv_ptr + (item + 2 * stride).to(gl.int64) * (D * D), offsets,
                                   offsets, D, COPY_ROWS, False)
                        async_copy.commit_group()

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
    def _ws_loader(ring, full, free, h_kk_ptr, h_kv_ptr, first, stride, count, num_items, D: gl.constexpr,
                   SLOTS: gl.constexpr, COPY_ROWS: gl.constexpr, MIRROR: gl.constexpr, VALUE: gl.constexpr,
                   TMA: gl.constexpr):
        """Tile t = 2 j (+1) is h_kk (h_kv) of the program's j-th item, copied into its buffer (``_slot``)
        once the solver (or the value partition) has released that buffer's previous tile, in the order of t;
        with three buffers and no mirror, the second item's h_kk comes second (before the first item's h_kv,
        ``_slot``). MIRROR: of h_kk only the 16-byte chunks that reach the diagonal or lie right of it (52% of
        the bytes at D = 128). TMA: each tile is one tensor copy, through descriptors of the states seen as
        [num_items D, D] matrices (made here, once)."""
        VEC: gl.constexpr = 128 // h_kk_ptr.dtype.element_ty.primitive_bitwidth    # 16 bytes per copy
        COPY: gl.constexpr = gl.BlockedLayout([1, VEC], [32 * VEC // D, D // VEC], [gl.num_warps(), 1], [1, 0])
        rows = gl.arange(0, COPY_ROWS, layout=gl.SliceLayout(1, COPY))
        cols = gl.arange(0, D, layout=gl.SliceLayout(0, COPY))
        offsets = gl.expand_dims(rows, 1) * D + gl.expand_dims(cols, 0)                      # [COPY_ROWS, D]
        chunk_ends = gl.expand_dims(cols // VEC * VEC + VEC - 1, 0) - gl.expand_dims(rows, 1)  # [COPY_ROWS, D]
        ORDER: gl.constexpr = _ring_order(SLOTS, MIRROR, VALUE)
        kk_tiles = 0
        kv_tiles = 0
        if TMA:
            TILE: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=0,
                                                      element_bitwidth=h_kk_ptr.dtype.element_ty.primitive_bitwidth,
                                                      rank=2)
            kk_tiles = tma.make_tensor_descriptor(h_kk_ptr, [num_items * D, D], [D, 1], [D, D], TILE)
            kv_tiles = tma.make_tensor_descriptor(h_kv_ptr, [num_items * D, D], [D, 1], [D, D], TILE)
        if ORDER == 2:   # both solvers' first h_kk, then item j's h_kv and item j + 2's h_kk in turn
            for ahead in gl.static_range(2):
                if ahead < count:
                    _load_tile(ring, full.index(ahead), free, 2 * ahead,
                               h_kk_ptr + (first + ahead * stride).to(gl.int64) * (D * D), kk_tiles,
                               (first + ahead * stride) * D, TMA, offsets, chunk_ends, D, SLOTS, COPY_ROWS, False,
                               ORDER)
        for j in range(count):
            state = (first + j * stride).to(gl.int64) * (D * D)
            row = (first + j * stride) * D                 # the item's first row in the [num_items D, D] view
            if ORDER == 2:
                _load_tile(ring, full.index(2), free, 2 * j + 1, h_kv_ptr + state, kv_tiles, row, TMA, offsets,
                           chunk_ends, D, SLOTS, COPY_ROWS, False, ORDER)
                if j + 2 < count:
                    _load_tile(ring, full.index(j % 2), free, 2 * j + 4, h_kk_ptr + state + 2 * stride * (D * D),
                               kk_tiles, row + 2 * stride * D, TMA, offsets, chunk_ends, D, SLOTS, COPY_ROWS, False,
                               ORDER)
            elif ORDER != 1 or j != 1:
                if VALUE == 3 and j == 3:   # item 3's h_kk lands on item 1's full barrier: only once item 1's h_kk
                    mbarrier.wait(free.index(2), 0)   # was read (without h_kv tiles nothing else orders the two)
                _load_tile(ring, full.index(2 * (j % 2)), free, 2 * j, h_kk_ptr + state, kk_tiles, row, TMA, offsets,
                           chunk_ends, D, SLOTS, COPY_ROWS, MIRROR == 1, ORDER)
            if ORDER == 1 and j == 0 and count > 1:        # item 1's h_kk, early
                _load_tile(ring, full.index(2), free, 2, h_kk_ptr + state + stride * (D * D), kk_tiles,
                           row + stride * D, TMA, offsets, chunk_ends, D, SLOTS, COPY_ROWS, MIRROR == 1, ORDER)
            if ORDER != 2 and VALUE != 3:      # (VALUE 3: the value partition copies the h_kv tiles)
                _load_tile(ring, full.index(2 * (j % 2) + 1), free, 2 * j + 1, h_kv_ptr + state, kv_tiles, row, TMA,
                           offsets, chunk_ends, D, SLOTS, COPY_ROWS, False, ORDER)

    @gluon.jit
    def _slot(tile, SLOTS: gl.constexpr, ORDER: gl.constexpr):
        """(buffer, its use number) of tile t = 2 j (+ 1: h_kv) of the program's j-th item. Two buffers: t % 2,
        t // 2. Three: h_kk in buffer 0 and item j's h_kv in 1 + j % 2, one h_kv buffer per solver, so that a
        solver's next h_kv can load during its own solve (the default: 84 against 88 us at B = 32, num_iter 30
        on an H200, docs/benchmarks.md). ORDER 1 (three buffers without the mirror, ``_ring_order``): item 1's
        h_kk goes to buffer 2 (before item 1's h_kv), so that both solvers' first h_kk load at once (83.7-83.9 against
        84.6-85.2 us at B = 32, 290.5 against 294.3 at B = 128, num_iter 30; with the mirror, 72.6 against 70.7
        at B = 32, num_iter 10).

        ORDER 2 (``value_partition="readback"`` and "single"): each solver's h_kk in a buffer of its own
        (j % 2), every h_kv in buffer 2 (released as soon as h_kv' is written, or with "single" once o is).

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

    @gluon.constexpr_function
    def _ring_order(SLOTS, MIRROR, VALUE):
        """How the pipelined form maps tiles to buffers (``_slot``): 0 in turn (two buffers, or three with the
        mirror), 1 item 1's h_kk early (three buffers; with VALUE 3 the loader copies only the h_kk tiles), 2 two
        h_kk buffers and one h_kv (VALUE 2, and VALUE 4: the tile resident until o, as VALUE 1)."""
        if VALUE == 2 or VALUE == 4:
            return 2
        return 1 if SLOTS == 3 and MIRROR == 0 else 0

    @gluon.jit
    def _load_tile(ring, full, free, tile, source, tiles, row, TMA: gl.constexpr, offsets, chunk_ends,
                   D: gl.constexpr, SLOTS: gl.constexpr, COPY_ROWS: gl.constexpr, UPPER: gl.constexpr,
                   ORDER: gl.constexpr):
        """Copy tile ``tile`` (at ``source``; TMA: rows ``row``.. of the descriptor ``tiles``) into its buffer
        (``_slot``), then arrive on ``full`` when it lands. UPPER: only the 16-byte chunks whose last element is
        on or right of the diagonal (the others are zero-filled, reading nothing)."""
        slot, use = _slot(tile, SLOTS, ORDER)
        mbarrier.wait(free.index(slot), (use + 1) & 1, pred=use > 0)   # the previous tile's release
        if TMA:
            mbarrier.expect(full, D * D * tiles.dtype.primitive_bitwidth // 8)
            tma.async_copy_global_to_shared(tiles, [row, 0], full, ring.index(slot))
        else:
            _copy_rows(ring.index(slot), source, offsets, chunk_ends, D, COPY_ROWS, UPPER)
            async_copy.mbarrier_arrive(full, increment_count=False)

    @gluon.jit
    def _copy_rows(buffer, source, offsets, chunk_ends, D: gl.constexpr, COPY_ROWS: gl.constexpr,
                   UPPER: gl.constexpr):
        """cp.async of the [D, D] tile at ``source`` into ``buffer``, COPY_ROWS rows (``offsets``) at a time
        (UPPER: as ``_load_tile``)."""
        for row in gl.static_range(0, D, COPY_ROWS):
            if UPPER:
                async_copy.async_copy_global_to_shared(buffer.slice(row, COPY_ROWS), source + row * D + offsets,
                                                       mask=chunk_ends >= row)
            else:
                async_copy.async_copy_global_to_shared(buffer.slice(row, COPY_ROWS), source + row * D + offsets)

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
