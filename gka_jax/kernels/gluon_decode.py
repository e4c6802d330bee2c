"""Gluon GPU kernels for the one-token GKA decode step: each item (batch, head) in one fused pass, and
``gka_decode``, which picks the form and its options.

Why Gluon: the step is a chain of num_iter matrix-vector products with the same [D, D] fp32 matrix, so its
speed is the latency of one product, and it must move H and S at memory speed in between. Gluon fixes the
register layout, which the Pallas kernels (``pallas_decode``) leave to the compiler. The per-item math and
layout are in ``gluon_decode_math``.

Memory: every state element is read once and written once, in place (``input_output_aliases``; under
``jax.jit(..., donate_argnums=...)`` no copy is made), with 16-byte coalesced accesses. Two forms
(``FORMS``) schedule the items (b, h). (A third, one program per SM with the next item's states prefetched
during the current one, measured slower than both and was removed: docs/benchmarks.md.)

- "pipelined" (``gluon_decode_ring``; the default at D = 128 when B H reaches the number of SMs,
  ``default_form``): one persistent, warp-specialized program per SM; a loader streams the states through a
  ring of shared-memory buffers to two solver partitions. Its options: the mirror up to num_iter 10
  (``default_mirror``), and above it ``LONG_SOLVE`` (the value partition, h_kk' stored over the solve, inputs
  an item ahead).
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
VALUE_PARTITIONS = {None: 0, False: 0, True: 1, "resident": 1, "readback": 2, "loads": 3, "single": 4}   # -> VALUE
OWN_RING_VALUES = (2, 3, 4)   # VALUE modes with a ring of their own: three buffers, h_kk read whole (no mirror)
SPREAD_PARTS = (0, 1, 2, 4, 8)   # pipelined form: h_kk' stored in this many parts over the solve (0: before it)
# The pipelined form's defaults for value_partition, spread_store and inputs_ahead: above MIRROR_MAX_ITER
# (h_kk read whole) the value partition, h_kk' stored in 4 parts over the solve and each solver's next inputs
# loaded an item ahead (78.9-80.5 against 83.4-84.9 us at B = 32, num_iter 30 on an H200, docs/benchmarks.md);
# up to it (the mirror's range, where they measured slower) none of them.
LONG_SOLVE = dict(value_partition=True, spread_store=4, inputs_ahead=True)
SHORT_SOLVE = dict(value_partition=False, spread_store=0, inputs_ahead=False)
DEFAULT_TMA = False       # pipelined form without the mirror: tiles copied by TMA (``tma``)
SCRATCH_BYTES = 256       # pipelined form: global scratch per program (two TMA descriptors of 128 bytes; gluon_call)
MIRROR_LOADER_REGS = 64   # the loader's registers with the mirror (its masks spill at 40)

if GLUON:
    from .gluon_call import async_copy, gl, gluon
    from .gluon_decode_math import _copy_state, _decay_add_outer, _item_scalars, _solve, _state_layout
    from .gluon_decode_math import _value_and_output
    from .gluon_decode_ring import _decode_ws_kernel

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


def pipelined_programs(num_items: int, multiprocessors: int) -> int:
    """Programs of the pipelined form: one per SM, each walking items pid, pid + P, ...; but when most programs
    would take one item more than the others, as few programs as give every one that many (B = 32, H = 32 on
    132 SMs: 128 programs of 8 items rather than 100 of 8 and 32 of 7, 78.3 against 79.2 us at num_iter 30 and
    69.7 against 70.4 at 10 on an H200; at B = 128, where 4 of 132 programs take a 32nd item, the spread grid
    measured 3 us slower, so it stays: docs/benchmarks.md)."""
    programs = min(num_items, multiprocessors)
    turns = -(-num_items // programs)                  # items of the busiest program
    extra = num_items - (turns - 1) * programs          # programs that take that many
    if 2 * extra > programs:
        programs = -(-num_items // turns)
    return programs


def gka_decode(q, k, v, beta, g, alpha, h_kk, h_kv, *, num_iter, ridge_strength, scale, g_kk=None,
               precision=HIGHEST, form=None, blocks=None, lanes=None, maxnreg=None, slots=None,
               loader_warps=None, mirror=None, value_partition=None, spread_store=None,
               inputs_ahead=None, tma=None) -> GKAResult:
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
      buffer of its own; "loads" (three buffers, no mirror): as True, but the value partition copies the h_kv
      tiles itself and the loader only h_kk's, which then neither wait for an h_kv buffer nor land behind an
      h_kv tile; "single" (three buffers, no mirror): as True, with one h_kv buffer and one h_kk buffer per
      solver (h_kk copied an item ahead; each h_kv tile copied once the previous item's o is done). All three
      measured slower than True with the other ``LONG_SOLVE`` options (docs/benchmarks.md).
    - ``spread_store`` (pipelined form; ``SPREAD_PARTS``; default as ``value_partition``'s): h_kk' stored in
      this many parts, one before each run of the solve's iterations (``_solve``), rather than all before it.
    - ``inputs_ahead`` (pipelined form; default as ``value_partition``'s): each solver loads its next item's q,
      k, v, beta, g, g_kk and alpha while the current item runs, so that no global load waits on its path
      (beta k reaches each thread's rows through shared memory).
    - ``tma`` (pipelined form without the mirror and "loads"; default ``DEFAULT_TMA`` there): the loader
      copies each [D, D] tile with one bulk tensor copy (TMA) instead of 16-byte cp.async per lane.
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
    defaults = LONG_SOLVE if form == "pipelined" and int(num_iter) > MIRROR_MAX_ITER else SHORT_SOLVE
    if value_partition is None:     # (the value partition needs 4 loader warps: off if 1 was asked for)
        value_partition = defaults["value_partition"] if loader_warps in (None, VALUE_LOADER_WARPS) else False
    spread_store = defaults["spread_store"] if spread_store is None else spread_store
    inputs_ahead = defaults["inputs_ahead"] if inputs_ahead is None else inputs_ahead
    value = VALUE_PARTITIONS[value_partition]          # 0 none, 1 resident, 2 readback, 3 loads, 4 single
    if value and form != "pipelined":
        raise ValueError(f"value_partition=True needs the pipelined form; got form={form!r}")
    loader_warps = loader_warps or (VALUE_LOADER_WARPS if value else DEFAULT_LOADER_WARPS)
    fp32_states = h_kk.dtype == jnp.float32 and h_kv.dtype == jnp.float32
    if mirror is None:
        mirror = value not in OWN_RING_VALUES and default_mirror(form, slots, fp32_states, int(num_iter))
    if not isinstance(mirror, (bool, np.bool_)):
        raise ValueError(f"mirror={mirror!r} is not a bool")
    if mirror and (form != "pipelined" or slots != 3 or not fp32_states):
        raise ValueError(f"mirror=True (h_kk read as its upper triangle) needs the pipelined form with slots=3 "
                         f"and float32 states; got form={form!r}, slots={slots}, {h_kk.dtype} states")
    if loader_warps not in LOADER_WARPS:
        raise ValueError(f"loader_warps={loader_warps} is not one of {LOADER_WARPS}")
    if value in OWN_RING_VALUES and (slots != 3 or mirror):
        raise ValueError(f"value_partition={value_partition!r} needs slots=3 without the mirror; got slots={slots}, "
                         f"mirror={mirror}")
    if spread_store not in SPREAD_PARTS or isinstance(spread_store, bool):
        raise ValueError(f"spread_store={spread_store!r} is not one of {SPREAD_PARTS}")
    if spread_store and form != "pipelined":
        raise ValueError(f"spread_store={spread_store} needs the pipelined form; got form={form!r}")
    if not isinstance(inputs_ahead, (bool, np.bool_)):
        raise ValueError(f"inputs_ahead={inputs_ahead!r} is not a bool")
    if inputs_ahead and form != "pipelined":
        raise ValueError(f"inputs_ahead=True needs the pipelined form; got form={form!r}")
    if tma is None:
        tma = DEFAULT_TMA and form == "pipelined" and not mirror and value != 3
    if not isinstance(tma, (bool, np.bool_)):
        raise ValueError(f"tma={tma!r} is not a bool")
    if tma and (form != "pipelined" or mirror or value == 3):
        raise ValueError(f"tma=True needs the pipelined form without the mirror and without "
                         f"value_partition='loads'; got form={form!r}, mirror={mirror}, "
                         f"value_partition={value_partition!r}")
    if value and loader_warps != VALUE_LOADER_WARPS:
        raise ValueError(f"value_partition=True needs loader_warps={VALUE_LOADER_WARPS} (4 + 4 + 4 + 4 warps fill "
                         f"the register file exactly); got loader_warps={loader_warps}")
    programs = num_items if form == "item" else pipelined_programs(num_items, _multiprocessors())
    g = g.astype(jnp.float32)
    present = lambda a: g if a is None else a  # noqa: E731  (an absent input's pointer is never read)
    if form == "pipelined":
        kernel = _decode_ws_kernel
        tuning = dict(SLOTS=slots, COPY_ROWS=8, SOLVER_REGS=SOLVER_REGS,
                      LOADER_REGS=MIRROR_LOADER_REGS if mirror else LOADER_REGS, LOADER_WARPS=loader_warps,
                      MIRROR=int(mirror), VALUE=value, VALUE_REGS=VALUE_REGS, SPREAD=spread_store,
                      AHEAD=int(inputs_ahead), TMA=int(tma), SCRATCH_BYTES=SCRATCH_BYTES)
        scratch = [jax.ShapeDtypeStruct((programs * SCRATCH_BYTES,), jnp.uint8)]   # (gluon_call's scratch_ptr)
    else:
        kernel = _decode_kernel
        tuning = dict(MAXNREG=DEFAULT_MAXNREG if maxnreg is None else maxnreg)
        scratch = []
    o, x, h_kk, h_kv, *_ = triton_call(
        q, k, v, present(beta), g, present(g_kk), present(alpha), h_kk, h_kv,
        np.float32(scale), np.float32(ridge_strength), num_items,   # fp32 scalars (a Python float is fp64)
        kernel=kernel,
        out_shape=[jax.ShapeDtypeStruct((batch, num_heads, d), q.dtype),
                   jax.ShapeDtypeStruct((batch, num_heads, d), q.dtype),
                   jax.ShapeDtypeStruct(h_kk.shape, h_kk.dtype),
                   jax.ShapeDtypeStruct(h_kv.shape, h_kv.dtype)] + scratch,
        grid=(programs,),
        num_warps=d // 32,          # the pipelined form's solver partitions have as many
        input_output_aliases={7: 2, 8: 3},   # h_kk -> new h_kk, h_kv -> new h_kv (array operands 7, 8)
        name="gka_gluon_decode",
        NUM_HEADS=num_heads, GROUP=num_heads // k.shape[1], D=d, NUM_ITER=int(num_iter), BLOCKS=blocks,
        HAS_BETA=beta is not None, HAS_ALPHA=alpha is not None, HAS_G_KK=g_kk is not None, LANES=lanes,
        **tuning)
    return GKAResult(o, x, h_kk, h_kv)
