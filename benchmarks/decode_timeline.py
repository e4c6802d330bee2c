"""Per-SM timeline of the pipelined Gluon decode: when each partition of each program reaches each stage.

A diagnostic, like ``decode_whatif.py`` (whose variants it can trace): the kernel source gets marks that store
the SM's cycle counter (``%clock``) at each stage of each item into an extra int32 output (the x output is not
written in the traced kernel). Marks per item j of a program (a row of the trace):

- solver: 0 before waiting for h_kk's tile, 1 h_kk in registers, 2 h_kk' stored (issued), 3 solve done,
  4 h_kv in registers (with a value partition: before handing q' over, so that "wait h_kv + take" is nil and
  "output + h_kv' store" is the hand-over), 5 item done;
- loader: 8 before h_kk's copies (it first waits for the buffer's release), 9 h_kk's copies issued,
  10 h_kv's copies issued (with value_partition="readback": 8 before item j's h_kv and item j + 2's h_kk,
  9 = 10 after them).

It prints, per case, the mean per item of the solver's stages in microseconds (cycles over the SM clock, from
the kernel's GPU time) and how much of the program's time both solvers spent in their solves at once; the raw
marks go to ``--out`` as .npz.

    python3 benchmarks/decode_timeline.py --variants "default,mirror" --batches 32 --num-iter 30 --out $OUT

Needs a Hopper GPU and jax-triton (as the pipelined form).
"""

from __future__ import annotations

import argparse
import os
import re
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import decode_whatif  # noqa: E402

ROWS, MARKS = 64, 16     # trace rows per program (items), marks per row
CLOCK = '''    @gluon.jit
    def _mark(trace_ptr, program, row, mark: gl.constexpr):
        """Store the SM's cycle counter at trace[program, row, mark] (diagnostic variant only)."""
        now = gl.inline_asm_elementwise("mov.u32 $0, %clock;", "=r,r", [row], dtype=gl.int32, is_pure=False,
                                        pack=1)
        gl.store(trace_ptr + (program * ROWS + row) * MARKS + mark, now)

    @gluon.jit
    def _stamp(trace_ptr, program, row, mark: gl.constexpr):
        """Store the GPU's nanosecond timer (%globaltimer, low 32 bits: one clock for every SM) there."""
        now = gl.inline_asm_elementwise("mov.u32 $0, %globaltimer_lo;", "=r,r", [row], dtype=gl.int32,
                                        is_pure=False, pack=1)
        gl.store(trace_ptr + (program * ROWS + row) * MARKS + mark, now)

'''.replace("ROWS", str(ROWS)).replace("MARKS", str(MARKS))

# Anchors in gluon_decode.py's source; the later entries of a tuple match earlier versions of it (the saved
# sources that "default@PATH" names), the mark going where it went in that version.
SOLVER_TAKE = (
    "            h = _take_tile(ring, full.index(KK_FULL), j // 2, free, 2 * j, L3, BLOCKS, RB, D, SLOTS,\n",
    "            h = _take_tile(ring, full.index(2 * (j % 2)), j // 2, free, 2 * j, L3, BLOCKS, RB, D, SLOTS,\n")
DECAY = "            h = _decay_add_outer(h, g_kk, k_rows, k_cols)                                   # H'\n"
X_STORE = "            gl.store(x_ptr + item * D + cols, x.to(x_ptr.dtype.element_ty))\n"
OUTPUT = (   # (the S phase one level deeper since the value partition)
    "                _value_and_output(s, g, k_rows, v_cols, mixed, iterate_b, h_kv_out_ptr + state + square,\n",
    "            _value_and_output(s, g, k_rows, v_cols, mixed, iterate_b, h_kv_out_ptr + state + square,\n")
AHEAD_ISSUED = ("                                     HAS_ALPHA)\n"   # inputs_ahead: the next item's loads issued
                "                kv_row, state = _item_rows(item, NUM_HEADS, GROUP, D)\n")
SOLVER_START = ("        square = gl.expand_dims(rows, 2) * D + gl.expand_dims(gl.expand_dims(cols, 0), 0)"
                "   # [BLOCKS, RB, D]\n")
HANDOFF = "                mbarrier.wait(mixed_free.index(which), ((j // 2) + 1) & 1, pred=j >= 2)\n"
ITEM_END = ("            gl.thread_barrier()                            "
            "# the iterate buffers are reused by the next item\n")
LOADER_DEF = "    def _ws_loader(ring, full, free,"
LOADER_ARGS = "(_ws_loader, (ring, full, free,"
LOADER_FIRST = (   # before h_kk's copies (ORDER 2: before h_kv's, then the next h_kk)
    "            if ORDER == 2:\n                _load_tile(",
    "            if not EARLY or j != 1:\n",
    "            _load_tile(ring, full.index(2 * (j % 2)), free, 2 * j, h_kk_ptr + state,")
LOADER_KV = (
    "            if ORDER != 2 and VALUE != 3:      # (VALUE 3: the value partition copies the h_kv tiles)\n"
    "                _load_tile(ring, full.index(2 * (j % 2) + 1)",
    "            if ORDER != 2:\n                _load_tile(ring, full.index(2 * (j % 2) + 1)",
    "            _load_tile(ring, full.index(2 * (j % 2) + 1), free, 2 * j + 1, h_kv_ptr + state,")
LOADER_KV_END = (
    "                           offsets, chunk_ends, D, SLOTS, COPY_ROWS, False, ORDER)\n",
    "                           chunk_ends, D, SLOTS, COPY_ROWS, False, ORDER)\n",
    "                       D, SLOTS, COPY_ROWS, False, EARLY)\n",
    "                       D, SLOTS, COPY_ROWS, False)\n")
SOLVER_X = "x_ptr, h_kk_out_ptr, h_kv_out_ptr, NUM_HEADS, GROUP, D, NUM_ITER,"
# (the later entries of these tuples: versions before the scratch output of 2026-11-29's tenth session)
KERNEL_OUTS = ("                          o_ptr, x_ptr, h_kk_out_ptr, h_kv_out_ptr, scratch_ptr,\n",
               "                          o_ptr, x_ptr, h_kk_out_ptr, h_kv_out_ptr,\n"
               "                          NUM_HEADS")
KERNEL_OUTS_NEW = ("                          o_ptr, x_ptr, h_kk_out_ptr, h_kv_out_ptr, scratch_ptr,"
                   " trace_ptr,\n",
                   "                          o_ptr, x_ptr, h_kk_out_ptr, h_kv_out_ptr, trace_ptr,\n"
                   "                          NUM_HEADS")
CALL = ("    o, x, h_kk, h_kv, *_ = triton_call(", "    o, x, h_kk, h_kv = triton_call(")
CALL_NEW = "    o, x, h_kk, h_kv, *extra = triton_call("
OUT_SHAPES = ("                   jax.ShapeDtypeStruct(h_kv.shape, h_kv.dtype)] + scratch,\n",
              "                   jax.ShapeDtypeStruct(h_kv.shape, h_kv.dtype)],\n")
RETURN = "    return GKAResult(o, x, h_kk, h_kv)"


def traced(text: str) -> str:
    """``text`` (gluon_decode.py's source or a what-if variant of it) with the marks; its gka_decode returns the
    trace [programs * ROWS * MARKS] int32 in place of x (pipelined form only)."""
    mark = lambda n, at="            ": f"{at}_mark(x_ptr, first, j, {n})\n"  # noqa: E731
    stamp = lambda n, row="j": f"            _stamp(x_ptr, first, {row}, {n})\n"  # noqa: E731  (global ns)
    loader_mark = lambda n: f"            _mark(trace_ptr, first, j, {n})\n"  # noqa: E731
    found = lambda anchors: next(a for a in anchors if a in text)  # noqa: E731
    output = found(OUTPUT)
    at = lambda anchor: anchor[:len(anchor) - len(anchor.lstrip(" "))]  # noqa: E731  (its indentation)
    edits = [
        (found(SOLVER_TAKE), mark(0) + stamp(12) + found(SOLVER_TAKE)),
        (SOLVER_START, SOLVER_START + stamp(11, "first * 0 + which")[4:]),
        (DECAY, mark(1) + DECAY),
        (decode_whatif.H_KK_STORE, decode_whatif.H_KK_STORE + mark(2)),
        (X_STORE, mark(3)),
        (output, mark(4, at(output)) + output),
        *([(HANDOFF, mark(4, at(HANDOFF)) + HANDOFF)] if HANDOFF in text else []),   # the value partition's
        *([(AHEAD_ISSUED, AHEAD_ISSUED.replace("\n", "\n" + mark(6, " " * 16), 1))] if AHEAD_ISSUED in text else []),
        (ITEM_END, ITEM_END + mark(5) + stamp(13)),
        (found(LOADER_FIRST), loader_mark(8) + found(LOADER_FIRST)),
        (found(LOADER_KV), loader_mark(9) + found(LOADER_KV)),
        (found(LOADER_KV_END), found(LOADER_KV_END) + loader_mark(10)),
    ]
    for old, new in edits:
        text = decode_whatif.edit_last(text, old, new)
    assert text.count(SOLVER_X) in (2, 4) and all(a in text for a in (LOADER_DEF, LOADER_ARGS, RETURN))
    version = next(i for i, anchor in enumerate(KERNEL_OUTS) if anchor in text)   # 0: with the scratch output
    assert KERNEL_OUTS[version] in text and CALL[version] in text and OUT_SHAPES[version] in text
    text = text.replace(SOLVER_X, SOLVER_X.replace("x_ptr", "trace_ptr"))   # the solvers get the trace as x_ptr
    text = text.replace(LOADER_DEF, LOADER_DEF + " trace_ptr,").replace(LOADER_ARGS, LOADER_ARGS + " trace_ptr,")
    text = text.replace(KERNEL_OUTS[version], KERNEL_OUTS_NEW[version])
    text = text.replace(CALL[version], CALL_NEW)     # the trace: the last output
    trace_shape = f"jax.ShapeDtypeStruct((programs * {ROWS * MARKS},), jnp.int32)"
    text = text.replace(OUT_SHAPES[version], OUT_SHAPES[version].replace(
        ",\n", f" + [{trace_shape}],\n") if version == 0 else OUT_SHAPES[version].replace(
        "],\n", f",\n                   {trace_shape}],\n"))
    text = text.replace(RETURN, RETURN.replace("(o, x,", "(o, extra[-1],"))
    slot = "    @gluon.jit\n    def _slot("
    return text.replace(slot, CLOCK + slot)


def summarize(marks: np.ndarray, counts: np.ndarray, cycles_per_us: float, ahead: bool = False) -> dict:
    """Mean per item (us) of the solver's stages, over the programs' items; marks [P, ROWS, MARKS] (cycles,
    relative to each program's first mark, signed), counts [P] items per program; ahead: the solvers ran with
    inputs_ahead (mark 6 written)."""
    stages = {"wait h_kk": (0, 1), "decay + h_kk' store": (1, 2), "solve": (2, 3), "wait h_kv + take": (3, 4),
              "output + h_kv' store": (4, 5),   # the loader's (h_kk through the ring only):
              "loader: h_kk wait + issue": (8, 9), "loader: h_kv wait + issue": (9, 10)}
    found = {name: [] for name in stages}
    found["solver idle between items"], found["inputs ahead issued to take"] = [], []
    both, spans, first_take = [], [], []
    for program, count in enumerate(counts):
        m = marks[program, :count].astype(np.int64)
        m = (m - m[0, 0] + (1 << 31)) % (1 << 32) - (1 << 31)   # cycles from the first mark (32-bit clock)
        for name, (a, b) in stages.items():
            found[name] += list(m[:, b] - m[:, a])
        for which in (0, 1):
            items = m[which::2]
            found["solver idle between items"] += list(items[1:, 0] - items[:-1, 5])
            if ahead:     # from the next item's input loads issued to the take
                found["inputs ahead issued to take"] += list(items[1:, 0] - items[1:, 6])
        solving = [(m[j, 2], m[j, 3]) for j in range(count)]
        overlap = sum(max(0, min(a1, b1) - max(a0, b0)) for i, (a0, a1) in enumerate(solving)
                      for (b0, b1) in solving[i + 1:])
        span = m[:, 5].max()
        both.append(overlap / span)
        spans.append(span)
        first_take.append(m[0, 1])
    result = {name: float(np.mean(v)) / cycles_per_us for name, v in found.items() if v}
    result["both solving, share of the program"] = float(np.mean(both))
    result["program span"] = float(np.mean(spans)) / cycles_per_us
    result["first h_kk in registers"] = float(np.mean(first_take)) / cycles_per_us
    # From the global ns timer (marks 11-13; one clock for all SMs): the solvers' starts and the last item's end.
    stamps = [(marks[p, :2, 11], marks[p, :count, 12], marks[p, :count, 13]) for p, count in enumerate(counts)]
    origin = min(int(s.min()) for s, _, _ in stamps)
    ns = lambda v: ((np.asarray(v, np.int64) - origin) % (1 << 32)) / 1000.0  # noqa: E731  (us from the first start)
    starts = np.array([ns(s).min() for s, _, _ in stamps])
    result["solver starts: spread"] = float(starts.max())
    result["solver start to first take"] = float(np.mean([ns(t[0]) - ns(s[0]) for s, t, _ in stamps]))
    result["last item end (global)"] = float(max(ns(e).max() for _, _, e in stamps))
    return result


def main():
    import jax
    import jax.numpy as jnp
    from kernels import RIDGE, SCALE, decode_states, make_inputs, time_decode_loop, to_jax

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default="default", help="comma-separated decode_whatif variant names "
                        "(\"default@PATH\" too)")
    parser.add_argument("--batches", default="32")
    parser.add_argument("--num-iter", default="30")
    parser.add_argument("--clock-mhz", type=float, default=1980.0, help="SM clock to convert cycles (H200 boost)")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    sources = decode_whatif.choose(args.variants.split(","))          # names as decode_whatif's, PATH ones too
    modules = decode_whatif.import_sources({name: traced(text) for name, text in sources.items()}, "timeline_trace")
    plain = decode_whatif.import_sources(sources, "timeline_plain")
    rows, saved = [], {}
    for b in map(int, args.batches.split(",")):
        x = to_jax(make_inputs(5, b, 1, decode=True), jnp.bfloat16)
        kk, kv = decode_states(6, b)
        for num_iter in map(int, args.num_iter.split(",")):
            for name, module in modules.items():
                def step(x, h_kk, h_kv, module=module):
                    r = module.gka_decode(x["q"], x["k"], x["v"], x["beta"], x["g"], x["alpha"], h_kk, h_kv,
                                          num_iter=num_iter, ridge_strength=RIDGE, scale=SCALE, form="pipelined")
                    return r.x, r.h_kk, r.h_kv
                run = jax.jit(step, donate_argnums=(1, 2))
                h_kk, h_kv = jnp.asarray(kk), jnp.asarray(kv)
                for _ in range(4):
                    trace, h_kk, h_kv = run(x, h_kk, h_kv)
                trace = np.asarray(trace)
                programs = trace.size // (ROWS * MARKS)
                marks = trace.reshape(programs, ROWS, MARKS)
                items = b * x["q"].shape[1]
                counts = np.array([(items - p + programs - 1) // programs for p in range(programs)])
                saved[f"{name}|{b}|{num_iter}"] = marks

                def plain_step(x, h_kk, h_kv, module=plain[name]):
                    r = module.gka_decode(x["q"], x["k"], x["v"], x["beta"], x["g"], x["alpha"], h_kk, h_kv,
                                          num_iter=num_iter, ridge_strength=RIDGE, scale=SCALE, form="pipelined")
                    return r.o, r.h_kk, r.h_kv
                us = 1000 * time_decode_loop(plain_step, x, jnp.asarray(kk), jnp.asarray(kv))
                ahead = num_iter > 10 and re.search(r"LONG_SOLVE = dict\(.*inputs_ahead=True", sources[name])
                stats = summarize(marks, counts, args.clock_mhz, bool(ahead))
                rows.append((b, num_iter, name, us, stats))
                print(f"{b} {num_iter} {name}: {us:.1f} us untraced; " + "; ".join(
                    f"{k} {v:.3f}" for k, v in stats.items()), flush=True)
    if args.out:
        np.savez_compressed(os.path.join(args.out, "decode_timeline.npz"), **saved)
    keys = list(dict.fromkeys(key for row in rows for key in row[4]))   # (stages some variants lack: "-")
    print("\n| B | num_iter | variant | decode us | " + " | ".join(keys) + " |")
    print("| --- " * (4 + len(keys)) + "|")
    for b, num_iter, name, us, stats in rows:
        cells = (f"{stats[k]:.2f}" if k in stats else "-" for k in keys)
        print(f"| {b} | {num_iter} | {name} | {us:.1f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
