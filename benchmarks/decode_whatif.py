"""What-if variants of the pipelined Gluon decode, to see where its time goes (diagnostics, not features).

Each variant is the Gluon decode's source (``gluon_decode.py`` with ``gluon_decode_math.py`` and
``gluon_decode_ring.py``, joined by ``kernel_source``) with one edit of its text, written as a module of its own in a
temporary folder and timed like ``benchmarks/kernels.py`` times decode (GPU time of a traced 16-step loop):

- "default": unchanged; "previous default": no value partition, h_kk' stored before the solve and the inputs
  loaded per item at every num_iter (the default before ``LONG_SOLVE``); the variants below are edits of it:
- "no h_kv' store" / "no h_kk' store" / "no stores": the solvers skip writing the new state(s) (wrong
  states: this bounds what the stores cost);
- "tail solves num_iter 0": each solver's last item skips its solve (bounds what the last solves cost);
- "L2 prefetch N ahead": the loader also prefetches item j + N's states into L2 (cp.async.bulk.prefetch);
- "mirror": h_kk read as its upper triangle and mirrored in shared memory at every num_iter (the default
  does so up to ``MIRROR_MAX_ITER``);
- "... (swizzled)" / "... (unswizzled)" / "... (loader 64 registers)": a variant with the ring swizzled as the
  mirror's (16-byte chunk c of row r at c ^ (r % 8)), or not, or the loader given 64 registers;
- "value partition" (also "... without the mirror"), "value partition readback": ``value_partition=True``
  / ``"readback"`` at every num_iter (h_kv and o by a partition of their own);
- above num_iter 10 only (``LONG_SOLVE``): "spread store N" (h_kk' stored in N parts over the solve), "inputs
  ahead" (each solver loads its next item's inputs during the current one), "spread store 4 with inputs ahead",
  "value partition with spread store 4", "value partition with inputs ahead", "value partition with spread
  store 2 and inputs ahead" (with 4 parts: the default);
- "value partition loads": the default above num_iter 10 with ``value_partition="loads"`` (the value partition
  copies the h_kv tiles itself, the loader only h_kk's);
- "value partition readback with long solve": the default above num_iter 10 with ``value_partition="readback"``;
- "value partition single": the default above num_iter 10 with ``value_partition="single"`` (one h_kv buffer,
  one h_kk buffer per solver);
- "blocks 2" / "blocks 4": the default with H held as 2 / 4 row blocks (more FMA chains per thread);
- "copy rows 4" / "copy rows 16": the default with the loader copying 4 / 16 rows of a tile per round (8; "copy
  rows 4" above num_iter 10 only: the one-warp loader of the mirror's range covers 8 rows at a time);
- "h_kk one ahead": the default whose loader copies item j + 1's h_kk before item j's h_kv (ring order 1);
- "zeroed counter output": the default with an unused [1] output zeroed before each launch (what a counter of
  claimed items costs before it claims anything: ``claim_items``, docs/kernels.md "Tried and dropped");
- "first h_kk alone": the loader waits for item 0's h_kk to land before its other copies (at the start every SM
  asks for 192 KiB at once, and the first tile lands after 7-10 us; docs/kernels.md);
- "default with the mirror": the default (``LONG_SOLVE`` above num_iter 10) with the mirror at every num_iter;
- "loader mirror" (also "... with h_kk one ahead"): the default with the mirror at every num_iter, done by the
  loader's warps once h_kk's copies land rather than by the solver that takes the tile (ring order 1);
- "inputs after the take": the default whose solvers issue the next item's input loads after the take;
- "balanced grid": the pipelined form on as few programs as keep its most items per program at every item count
  (1024 items: 128 programs of 8 rather than 100 of 8 and 32 of 7; 4096: 128 of 32 rather than 4 of 32 and 128
  of 31); the default does so only when most programs take the extra item (``pipelined_programs``);
- "one program per SM": the pipelined form's grid before 2026-11-29's tenth session (one program per SM);
- "tma": the default whose loader copies each tile by TMA (``tma=True``) wherever the mirror is off;
- "swapped solvers" (also "... with spread store 4"): the first solver partition (warps 0-3) takes the odd items;
- "delay N ns before each h_kk take": a nanosleep of N ns where the mirror would run (does a fixed delay on the
  solver's path cost what the mirror costs?);
- "VARIANT@PATH", e.g. "default@PATH" / "mirror@PATH": that variant of the kernel source at PATH (e.g. an
  earlier commit's gluon_decode.py, for an A/B in one run);
- "upper copy without a mirror": the default's partitions, the loader copying only h_kk's upper triangle (wrong
  states: what the bytes alone save);
- "... with an upper h_kk' store": a mirror variant whose solvers store only h_kk's 16-byte chunks on or right of
  the diagonal (the loop stays exact, as the mirror never reads the others: what a state kept as its upper
  triangle would save).

    python3 benchmarks/decode_whatif.py [--variants "default,no stores"] [--batches 32,128] [--num-iter 30,0]

Needs a Hopper GPU and jax-triton (as the pipelined form).
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Joined in this order: the pipelined form last, as the edits of lines it shares with the "item" form (``edit_last``)
# expect.
PARTS = ("gluon_decode_math.py", "gluon_decode.py", "gluon_decode_ring.py")
SIBLING_IMPORT = re.compile(r"^ *from \.gluon_decode_(math|ring) import [^\n]*\n", re.M)
FUTURE = "from __future__ import annotations\n"
SOLVE = ("            x = _solve(h, q, ridge, iterate_a, iterate_b, NUM_ITER, BLOCKS, RB, ROW, "
         "h_kk_out_ptr + state + square,\n                       rows, SPREAD)\n")
H_KK_STORE = "            gl.store(h_kk_out_ptr + state + square, h.to(h_kk_out_ptr.dtype.element_ty))\n"
H_KV_STORE = "        gl.store(s_out, s.to(s_out.dtype.element_ty))\n"
NO_STORE = "            pass\n"   # (the pipelined solver's h_kk' store is the body of an ``if``)
BLOCKS_DEFAULT = "PIPELINED_BLOCKS = 1 "
TMA_DEFAULT = "DEFAULT_TMA = False "
LONG_SOLVE = "LONG_SOLVE = dict(value_partition=True, spread_store=4, inputs_ahead=True)\n"
PLAIN_SOLVERS = "        else:\n            gl.warp_specialize([\n"
LOADER_LOOP = "        for j in range(count):\n            state = (first + j * stride).to(gl.int64) * (D * D)\n"
PREFETCH = '''    @gluon.jit
    def _prefetch_l2(source):
        """L2 prefetch of a [128, 128] fp32 tile by one warp: 2 KiB a lane."""
        lanes = gl.arange(0, 32, layout=gl.BlockedLayout([1], [32], [1], [0]))
        gl.inline_asm_elementwise("cp.async.bulk.prefetch.L2.global [$1], 2048;\\n\\tmov.u32 $0, 0;", "=r,l",
                                  [source + lanes * 512], dtype=gl.int32, is_pure=False, pack=1)

'''


def edit_last(text: str, old: str, new: str) -> str:
    """``text`` with the last ``old`` (the pipelined solver's copy of a line shared with the item kernel)
    replaced."""
    assert old in text, old
    at = text.rindex(old)
    return text[:at] + new + text[at + len(old):]


def prefetching(text: str, distance: int) -> str:
    assert LOADER_LOOP in text
    loop = LOADER_LOOP + (f"            if j + {distance} < count:\n"
                          f"                ahead = (first + (j + {distance}) * stride).to(gl.int64) * (D * D)\n"
                          "                _prefetch_l2(h_kk_ptr + ahead)\n"
                          "                _prefetch_l2(h_kv_ptr + ahead)\n")
    slot = "    @gluon.jit\n    def _slot("
    return text.replace(LOADER_LOOP, loop).replace(slot, PREFETCH + slot)


MIRROR_ON = ("MIRROR_MAX_ITER = 10 ", "MIRROR_MAX_ITER = 1000 ")
MIRROR_OFF = ("MIRROR_MAX_ITER = 10 ", "MIRROR_MAX_ITER = -1 ")
VALUE_ON = ("    value = VALUE_PARTITIONS[value_partition]", "    value = 1")
VALUE_READBACK = ("    value = VALUE_PARTITIONS[value_partition]", "    value = 2")
H_KK_LOAD = "COPY_ROWS, MIRROR == 1, ORDER)"


SWIZZLED = "            RING: gl.constexpr = gl.SwizzledSharedLayout(VEC, 1, 8, [1, 0])\n"
PLAIN = "            RING: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [1, 0])\n"
LOADER_REGS = "LOADER_REGS=MIRROR_LOADER_REGS if mirror else LOADER_REGS,"


TAKE_WAIT = "        mbarrier.wait(full, phase & 1)\n"
SPIN = '''    @gluon.jit
    def _delay(value, NANOSECONDS: gl.constexpr):
        """A nanosleep of about NANOSECONDS (what-if variant only)."""
        return gl.inline_asm_elementwise(f"nanosleep.u32 {NANOSECONDS};\\n\\tmov.u32 $0, 0;", "=r,r", [value],
                                         dtype=gl.int32, is_pure=False, pack=1)

'''


def delayed(text: str, nanoseconds: int) -> str:
    assert TAKE_WAIT in text
    wait = TAKE_WAIT + f"        if tile % 2 == 0:\n            _delay(tile, {nanoseconds})\n"
    slot = "    @gluon.jit\n    def _slot("
    return text.replace(TAKE_WAIT, wait).replace(slot, SPIN + slot)


UPPER_STORE = ("gl.store(h_kk_out_ptr + state + square, h.to(h_kk_out_ptr.dtype.element_ty))",
               "gl.store(h_kk_out_ptr + state + square, h.to(h_kk_out_ptr.dtype.element_ty), "
               "mask=gl.expand_dims(gl.expand_dims(cols // 4, 0), 0) >= gl.expand_dims(rows // 4, 2))")


def upper_store(text: str) -> str:
    return edit_last(text, H_KK_STORE, H_KK_STORE.replace(*UPPER_STORE))


def swapped(text: str) -> str:
    """The default partition (warps 0-3, which the warp schedulers seem to favour: solver 0 solves faster and
    ends first) runs solver 1's items, and the first worker solver 0's."""
    head, _, tail = text.rpartition(PLAIN_SOLVERS)
    assert head
    zero = "(_ws_solver, (0, ring, full, free, iterate_0a, iterate_0b, key_0,"
    one = "(_ws_solver, (1, ring, full, free, iterate_1a, iterate_1b, key_1,"
    assert zero in tail and one in tail
    tail = tail.replace(zero, "@ZERO@", 1).replace(one, zero, 1).replace("@ZERO@", one, 1)
    return head + PLAIN_SOLVERS + tail


def swizzled(text: str) -> str:
    return text.replace(PLAIN, PLAIN.replace("(1, 1, 1,", "(4, 1, 8,"))


def unswizzled(text: str) -> str:
    return text.replace(SWIZZLED, SWIZZLED.replace("(VEC, 1, 8,", "(1, 1, 1,"))


def long_solve(text: str, value, spread: int, ahead: bool) -> str:
    """``text`` with the pipelined form's defaults above num_iter 10 (``LONG_SOLVE``) replaced."""
    assert LONG_SOLVE in text
    return text.replace(LONG_SOLVE, f"LONG_SOLVE = dict(value_partition={value}, spread_store={spread}, "
                                    f"inputs_ahead={ahead})\n")


def variants(text: str) -> dict:
    """The variants of ``text``: "default" is the text itself; the others are edits of "previous default" (the
    default before 2026-11-29's eighth session: no value partition, h_kk' stored before the solve, inputs
    loaded per item), so that their names keep their meaning."""
    base = long_solve(text, False, 0, False)
    tail = ("            if j + 2 >= count:\n    " + SOLVE.replace("NUM_ITER", "0") + "            else:\n    "
            + SOLVE)
    assert all(anchor in text for anchor in (H_KV_STORE, SWIZZLED, PLAIN, LOADER_REGS, H_KK_LOAD))
    found = {
        "default": text,
        "previous default": base,
        "no h_kv' store": base.replace(H_KV_STORE, ""),
        "no h_kk' store": edit_last(base, H_KK_STORE, NO_STORE),
        "no stores": edit_last(base.replace(H_KV_STORE, ""), H_KK_STORE, NO_STORE),
        "tail solves num_iter 0": edit_last(base, SOLVE, tail),
        **{f"L2 prefetch {n} ahead": prefetching(base, n) for n in (1, 2, 3)},
        "mirror": base.replace(*MIRROR_ON),
        "upper copy without a mirror": base.replace(H_KK_LOAD, H_KK_LOAD.replace("MIRROR == 1,", "True,")),
    }
    upper = found["upper copy without a mirror"]
    found["upper copy without a mirror (swizzled)"] = swizzled(upper)
    found["upper copy without a mirror (loader 64 registers)"] = upper.replace(LOADER_REGS, "LOADER_REGS=64,")
    found["mirror (unswizzled)"] = unswizzled(found["mirror"])
    found["mirror with an upper h_kk' store"] = upper_store(found["mirror"])
    assert VALUE_ON[0] in text
    found["value partition"] = base.replace(*VALUE_ON)
    found["value partition without the mirror"] = found["value partition"].replace(*MIRROR_OFF)
    found["value partition readback"] = base.replace(*VALUE_READBACK)
    for parts in (2, 4, 8):
        found[f"spread store {parts}"] = long_solve(text, False, parts, False)
    found["inputs ahead"] = long_solve(text, False, 0, True)
    found["spread store 4 with inputs ahead"] = long_solve(text, False, 4, True)
    found["value partition with spread store 4"] = long_solve(text, True, 4, False)
    found["value partition with inputs ahead"] = long_solve(text, True, 0, True)
    found["value partition with spread store 2 and inputs ahead"] = long_solve(text, True, 2, True)   # (4: default)
    found["value partition loads"] = long_solve(text, '"loads"', 4, True)   # the default with value_partition="loads"
    found["value partition single"] = long_solve(text, '"single"', 4, True)   # ... with value_partition="single"
    found["value partition readback with long solve"] = long_solve(text, '"readback"', 4, True)
    for blocks in (2, 4):   # the default with more FMA chains per thread (offline: no spills, 425-489 instructions
        found[f"blocks {blocks}"] = text.replace(BLOCKS_DEFAULT, f"PIPELINED_BLOCKS = {blocks} ")   # per 2 iterations)
    found["zeroed counter output"] = zeroed_output(text)
    found["h_kk one ahead"] = h_kk_ahead(text)
    for rows in (4, 16):   # rows of a tile per cp.async round of the loader (8: the default)
        assert text.count("COPY_ROWS=8,") == 1
        found[f"copy rows {rows}"] = text.replace("COPY_ROWS=8,", f"COPY_ROWS={rows},")
    assert text.count(EARLY_H_KK) == 1
    found["first h_kk alone"] = text.replace(EARLY_H_KK, FIRST_ALONE + EARLY_H_KK)
    found["default with the mirror"] = text.replace(*MIRROR_ON)
    assert text.count(TMA_DEFAULT) == 1
    found["inputs after the take"] = inputs_after_take(text)
    assert text.count(GRID) == 1
    found["balanced grid"] = text.replace(GRID, BALANCED_GRID)   # (at every item count)
    found["one program per SM"] = text.replace(GRID, ONE_PER_SM)   # (the grid before the tenth session)
    found["loader mirror"] = loader_mirror(text)
    found["loader mirror with h_kk one ahead"] = h_kk_ahead(loader_mirror(text))
    found["tma"] = text.replace(TMA_DEFAULT, "DEFAULT_TMA = True ")
    found["swapped solvers"] = swapped(base)
    found["swapped solvers with spread store 4"] = swapped(found["spread store 4"])
    for nanoseconds in (1000, 4000):
        found[f"delay {nanoseconds} ns before each h_kk take"] = delayed(base, nanoseconds)
    return found


def kernel_source(path: str = "") -> str:
    """The Gluon decode's text as one module: its three modules (``PARTS``: the math, the wrapper with the
    "item" form, the pipelined form) joined, the imports between them removed and the relative imports made
    absolute (the variants live outside the package). ``path``: a folder holding the three modules (an
    earlier version's), or one file (versions before the split of 2026-11-29's eighth session)."""
    import gka_jax.kernels.gluon_decode as gluon_decode
    folder = path if not path or os.path.isdir(path) else None
    if folder is None:
        with open(path) as f:
            text = f.read()
    else:
        texts = []
        for name in PARTS:
            with open(os.path.join(folder or os.path.dirname(gluon_decode.__file__), name)) as f:
                texts.append(SIBLING_IMPORT.sub("", f.read()))
        text = "\n\n".join([texts[0]] + [part.replace(FUTURE, "") for part in texts[1:]])
    return text.replace("from .", "from gka_jax.kernels.")


ZEROED = (("                          o_ptr, x_ptr, h_kk_out_ptr, h_kv_out_ptr, scratch_ptr,\n",
           "                          o_ptr, x_ptr, h_kk_out_ptr, h_kv_out_ptr, scratch_ptr, counter_ptr,\n"),
          ("                   jax.ShapeDtypeStruct(h_kv.shape, h_kv.dtype)] + scratch,\n",
           "                   jax.ShapeDtypeStruct(h_kv.shape, h_kv.dtype)] + scratch\n"
           "        + ([jax.ShapeDtypeStruct((1,), jnp.int32)] if form == \"pipelined\" else []),\n"
           "        zeroed_outputs=(5,) if form == \"pipelined\" else (),\n"))


EARLY_H_KK = "            if ORDER == 1 and j == 0 and count > 1:        # item 1's h_kk, early\n"
FIRST_ALONE = "            if j == 0:\n                mbarrier.wait(full.index(0), 0)\n"


KK_TURN = ("            elif ORDER != 1 or j != 1:\n",
           "            elif ORDER != 1 or j == 0 or (VALUE == 3 and j != 1):\n")
KV_LOAD = "            if ORDER != 2 and VALUE != 3:      # (VALUE 3: the value partition copies the h_kv tiles)\n"
KK_AHEAD = ("            if ORDER == 1 and VALUE != 3 and j >= 1 and j + 1 < count:   # item j + 1's h_kk first\n"
            "                _load_tile(ring, full.index(2 * ((j + 1) % 2)), free, 2 * j + 2,\n"
            "                           h_kk_ptr + state + stride * (D * D), kk_tiles, row + stride * D, TMA,\n"
            "                           offsets, chunk_ends, D, SLOTS, COPY_ROWS, MIRROR == 1, ORDER)\n")


def h_kk_ahead(text: str) -> str:
    """``text`` whose loader (ring order 1: three buffers, no mirror) copies item j + 1's h_kk before item j's
    h_kv (h_kk 0, 1, h_kv 0, h_kk 2, h_kv 1, ...; model-checked like the kernel's order), so that an h_kk
    copy no longer waits behind the h_kv copy whose buffer the value partition releases last."""
    assert text.count(KK_TURN[0]) == 1 and text.count(KV_LOAD) == 1
    return text.replace(*KK_TURN).replace(KV_LOAD, KK_AHEAD + KV_LOAD)


LOADER_COPY = ("            _copy_rows(ring.index(slot), source, offsets, chunk_ends, D, COPY_ROWS, UPPER)\n"
               "            async_copy.mbarrier_arrive(full, increment_count=False)\n")
LOADER_MIRROR = ("            _copy_rows(ring.index(slot), source, offsets, chunk_ends, D, COPY_ROWS, UPPER)\n"
                 "            if UPPER:     # the loader mirrors h_kk's tile once its copies land\n"
                 "                async_copy.commit_group()\n"
                 "                async_copy.wait_group(0)\n"
                 "                gl.thread_barrier()\n"
                 "                _mirror_square(ring.index(slot))\n"
                 "                gl.thread_barrier()\n"
                 "            async_copy.mbarrier_arrive(full, increment_count=False)\n")
SOLVER_MIRROR = ("                           MIRROR, ORDER).to(gl.float32)\n",
                 "                           0, ORDER).to(gl.float32)\n")
RING_ORDER = ("        return 1 if SLOTS == 3 and MIRROR == 0 else 0\n", "        return 1 if SLOTS == 3 else 0\n")


def loader_mirror(text: str) -> str:
    """``text`` with the mirror at every num_iter, done by the loader's warps (its copies of h_kk's upper triangle
    landed, the rest written from the mirror image, then the tile's full barrier), not by the solver taking the
    tile, and ring order 1 (item 1's h_kk early) with the mirror too."""
    for old in (LOADER_COPY, SOLVER_MIRROR[0], RING_ORDER[0]):
        assert text.count(old) == 1, old
    text = text.replace(*MIRROR_ON).replace(LOADER_COPY, LOADER_MIRROR)
    return text.replace(*SOLVER_MIRROR).replace(*RING_ORDER)


AHEAD_LOADS = ("                ahead = _item_inputs(first + gl.minimum(j + 2, count - 1) * stride, q_ptr, k_ptr, "
               "v_ptr, beta_ptr,\n"
               "                                     g_ptr, g_kk_ptr, alpha_ptr, cols, NUM_HEADS, GROUP, D, HAS_BETA, "
               "HAS_G_KK,\n"
               "                                     HAS_ALPHA)\n")
TAKE_LINE = ("            h = _take_tile(ring, full.index(KK_FULL), j // 2, free, 2 * j, L3, BLOCKS, RB, D, SLOTS,\n"
             "                           MIRROR, ORDER).to(gl.float32)\n")


def inputs_after_take(text: str) -> str:
    """``text`` whose solvers issue the next item's input loads (``inputs_ahead``) once the item's h_kk tile is in
    registers, before the solve's first h_kk' store, rather than before waiting for the tile."""
    assert text.count(AHEAD_LOADS) == 1 and text.count(TAKE_LINE) == 1
    return text.replace(AHEAD_LOADS, "").replace(TAKE_LINE, TAKE_LINE + "            if AHEAD:\n    "
                                                 + AHEAD_LOADS.replace("\n     ", "\n         "))


GRID = '    programs = num_items if form == "item" else pipelined_programs(num_items, _multiprocessors())\n'
ONE_PER_SM = '    programs = num_items if form == "item" else min(num_items, _multiprocessors())\n'
BALANCED_GRID = (ONE_PER_SM   # (variant) as few programs as give the same turns
                 + '    programs = -(-num_items // -(-num_items // programs))\n')


def zeroed_output(text: str) -> str:
    """``text`` whose pipelined kernel gets an extra [1] int32 output, unused, zeroed before each launch
    (jax-triton's ``zeroed_outputs``: a memset in the same call), as a counter of claimed items would be."""
    for old, new in ZEROED:
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    return text


def choose(names: list) -> dict:
    """{name: source} of the named variants ("VARIANT@PATH": that variant of the file at PATH; "default@PATH" and
    "mirror@PATH" of any earlier version, the others of versions that have their anchors)."""
    known = variants(kernel_source())
    chosen = {}
    for name in names:
        base, _, path = name.partition("@")
        if path:
            text = kernel_source(path)
            if base in ("default", "mirror"):
                chosen[name] = text if base == "default" else text.replace(*MIRROR_ON)
            else:
                chosen[name] = variants(text)[base]
        else:
            chosen[name] = known[name]
    return chosen


def import_sources(sources: dict, prefix: str) -> dict:
    """{name: module} of kernel sources {name: text}, each written to a temporary folder and imported."""
    folder = tempfile.mkdtemp()
    sys.path.insert(0, folder)
    modules = {}
    for number, (name, source) in enumerate(sources.items()):
        with open(os.path.join(folder, f"{prefix}_{number}.py"), "w") as f:
            f.write(source)
        modules[name] = importlib.import_module(f"{prefix}_{number}")
    return modules


def main():
    import jax.numpy as jnp
    import numpy as np
    from kernels import RIDGE, SCALE, decode_states, make_inputs, time_decode_loop, to_jax

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default="", help="comma-separated names (default: all)")
    parser.add_argument("--batches", default="32,128")
    parser.add_argument("--num-iter", default="30,0")
    parser.add_argument("--rounds", type=int, default=1,
                        help="time every variant this many times, the order reversed every other round; with 2 or "
                             "more a last table gives each variant's median and range")
    args = parser.parse_args()
    assert not any("," in name for name in variants(kernel_source()))
    chosen = choose(args.variants.split(",")) if args.variants else variants(kernel_source())
    modules = import_sources(chosen, "decode_whatif")
    times = {}
    print("| B | num_iter | variant | decode us |\n| --- | --- | --- | --- |")
    for b in map(int, args.batches.split(",")):
        x = to_jax(make_inputs(5, b, 1, decode=True), jnp.bfloat16)
        kk, kv = decode_states(6, b)
        for num_iter in map(int, args.num_iter.split(",")):
            def timed(module, num_iter=num_iter):
                def step(x, h_kk, h_kv):
                    r = module.gka_decode(x["q"], x["k"], x["v"], x["beta"], x["g"], x["alpha"], h_kk, h_kv,
                                          num_iter=num_iter, ridge_strength=RIDGE, scale=SCALE, form="pipelined")
                    return r.o, r.h_kk, r.h_kv
                return 1000 * time_decode_loop(step, x, jnp.asarray(kk), jnp.asarray(kv))
            names = list(modules)
            if args.rounds > 1:   # one untimed pass first: a first kernel timed after start once ran 10% slow
                timed(modules[names[0]])
            for round_ in range(args.rounds):
                for name in names if round_ % 2 == 0 else names[::-1]:
                    us = timed(modules[name])
                    times.setdefault((b, num_iter, name), []).append(us)
                    print(f"| {b} | {num_iter} | {name} | {us:.1f} |", flush=True)
    if args.rounds > 1:
        print(f"\n| B | num_iter | variant | median us ({args.rounds} rounds) | min | max |")
        print("| --- | --- | --- | --- | --- | --- |")
        for (b, num_iter, name), found in times.items():
            print(f"| {b} | {num_iter} | {name} | {np.median(found):.1f} | {min(found):.1f} | {max(found):.1f} |")


if __name__ == "__main__":
    main()
