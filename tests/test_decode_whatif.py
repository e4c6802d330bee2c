"""benchmarks/decode_whatif.py edits the Gluon decode's source text (its three modules joined) to build its
diagnostic variants; this checks on CPU that every edit still finds its anchor in the kernel source and yields
valid Python, so that a change to the kernel cannot silently turn a variant into the default (the variants run
on a GPU only)."""

import ast
import importlib.util

from conftest import REPO


def load_tool():
    spec = importlib.util.spec_from_file_location("decode_whatif", REPO / "benchmarks" / "decode_whatif.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_variant_is_an_edit_of_the_kernel_source():
    tool = load_tool()
    source = tool.kernel_source()
    variants = tool.variants(source)
    assert variants["default"] == source
    assert len(variants) == 47
    for name, text in variants.items():
        ast.parse(text)
        if name != "default":
            assert text != source, name
    assert tool.SOLVE.replace("NUM_ITER", "0") in variants["tail solves num_iter 0"]
    assert tool.H_KV_STORE not in variants["no stores"]
    assert variants["no stores"].count(tool.H_KK_STORE) == source.count(tool.H_KK_STORE) - 1
    assert "_prefetch_l2(h_kv_ptr + ahead)" in variants["L2 prefetch 2 ahead"]
    assert "MIRROR_MAX_ITER = 1000 " in variants["mirror"]
    assert tool.LONG_SOLVE in source and tool.LONG_SOLVE not in variants["previous default"]
    assert variants["spread store 4"] == tool.long_solve(source, False, 4, False)
    folder = str(REPO / "gka_jax/kernels")
    assert tool.choose(["default@" + folder]) == {"default@" + folder: source}
    assert "from gka_jax.kernels.gluon_decode_" not in source       # one module: the edits reach every part
    assert source.count("def _ws_solver(") == source.count("def _solve(") == source.count("def gka_decode(") == 1
    upper = variants["mirror with an upper h_kk' store"]
    assert upper.count(tool.UPPER_STORE[1]) == 1 and upper.replace(*tool.UPPER_STORE[::-1]) == variants["mirror"]


def test_the_timeline_marks_find_their_anchors():
    """benchmarks/decode_timeline.py's traced kernel: every mark placed once, the trace as an extra output."""
    spec = importlib.util.spec_from_file_location("decode_timeline", REPO / "benchmarks" / "decode_timeline.py")
    timeline = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(timeline)
    tool = load_tool()
    for name in ("default", "mirror", "value partition", "value partition readback", "tma"):
        text = timeline.traced(tool.variants(tool.kernel_source())[name])
        ast.parse(text)
        for mark in (0, 1, 2, 3, 5):
            assert text.count(f"_mark(x_ptr, first, j, {mark})") == 1, mark
        for stamp in (12, 13):   # the global timer at the take and the item's end, and at the solver's start
            assert text.count(f"_stamp(x_ptr, first, j, {stamp})") == 1, stamp
        assert text.count("_stamp(x_ptr, first, first * 0 + which, 11)") == 1
        assert text.count("_mark(x_ptr, first, j, 4)") == 2     # before the output, or before the hand-over
        for mark in (8, 9, 10):
            assert text.count(f"_mark(trace_ptr, first, j, {mark})") == 1, mark
        assert "_mark(trace_ptr, first, j, 8)\n            if ORDER == 2:\n" in text   # not inside the if
        assert "_mark(trace_ptr, first, j, 9)\n            if ORDER != 2 and VALUE != 3:" in text   # nor this one
        assert timeline.X_STORE not in text.split("def _ws_solver")[1].split("@gluon.jit")[0]
