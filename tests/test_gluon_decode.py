"""The Gluon decode kernel (``gluon_decode``) against the pure-JAX reference and the float64 oracle, compiled
on a GPU. Gluon has no interpreter, so this file runs where jax-triton and a GPU are present
(``benchmarks/gpu_kernels.sh`` runs it on the GPU machine); the same math runs in CI through the Pallas
decode kernels (tests/test_pallas_decode.py). The kernel choice itself is tested on CPU in test_dispatch.py.

Tolerances: rel <= 1e-5 vs ``reference.gka_decode`` in float32, rel <= 1e-4 vs the float64 oracle.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_pallas_decode import NAMES, STATES, assert_close, case_and_expected, decode_inputs, run, run_oracle

from gka_jax import kernels
from gka_jax.kernels import gluon_call, gluon_decode, reference

if not gluon_decode.AVAILABLE or jax.default_backend() != "gpu":
    pytest.skip("the Gluon kernel needs jax-triton and an NVIDIA GPU", allow_module_level=True)

RIDGE = 0.02
HOPPER = gluon_call.on_hopper()


def run_gluon(args, num_iter, **options):
    if options.get("form") == "pipelined" and not HOPPER:
        pytest.skip("the pipelined form runs on Hopper GPUs only (it refuses others: test_dispatch.py)")
    return run(gluon_decode.gka_decode, args, num_iter, **options)


@pytest.mark.parametrize("d, hkv, num_iter, no_beta, no_alpha, g_kk", [
    (32, 2, 0, False, False, False),
    (32, 2, 1, False, True, False),
    (64, 4, 10, True, False, True),
    (64, 2, 30, False, False, False),
    (128, 2, 30, False, False, True),
    (128, 4, 29, True, True, False),
    (128, 1, 10, False, False, False),
])
@pytest.mark.parametrize("form, value_partition", [("item", False), ("pipelined", False), ("pipelined", True),
                                                   ("pipelined", "readback"), ("pipelined", "loads")])
def test_matches_reference_and_fp64_oracle(d, hkv, num_iter, no_beta, no_alpha, g_kk, form, value_partition):
    args, want, want_fp64 = case_and_expected(d, hkv, num_iter, no_beta, no_alpha, g_kk)
    if form == "pipelined" and d not in gluon_decode.PIPELINED_HEAD_DIMS:
        with pytest.raises(ValueError, match="pipelined form covers"):
            run_gluon(args, num_iter, form=form, value_partition=value_partition)
        return
    got = run_gluon(args, num_iter, form=form, value_partition=value_partition)
    assert_close(got, want, 1e-5)
    assert_close(got, want_fp64, 1e-4)


@pytest.mark.parametrize("form, blocks, lanes, maxnreg, slots", [
    ("item", 8, 1, None, None), ("item", 4, 4, 0, None), ("item", 16, 2, 200, None), ("item", 1, 1, 168, None),
    ("item", 8, 4, 0, None), ("pipelined", 4, 4, None, 2), ("pipelined", 8, 2, None, 3),
    ("pipelined", 1, 4, None, 3), ("pipelined", 2, 4, None, 3)])
@pytest.mark.parametrize("b", [40, 300])
def test_tunables_give_the_same_result(form, blocks, lanes, maxnreg, slots, b):
    """One program per item, or the pipelined form's programs, which walk several items each when B * H
    passes the number of SMs (b = 40: 1 to 2 items per program at H = 4; b = 300: 9 to 10, several turns of
    the buffer ring)."""
    args = decode_inputs(5, b=b, d=128, g_kk=True)
    got = run_gluon(args, 30, form=form, blocks=blocks, lanes=lanes, maxnreg=maxnreg, slots=slots)
    assert_close(got, run(reference.gka_decode, args, 30), 1e-5)


@pytest.mark.parametrize("b, slots, loader_warps", [(1, 2, 1), (33, 2, 4), (67, 3, 1), (301, 2, 1), (301, 3, 4),
                                                     (134, 2, 4), (1, 3, 1), (33, 3, 1), (301, 3, 1), (250, 3, 4),
                                                     (250, 2, 1)])
def test_pipelined_form_item_counts(b, slots, loader_warps):
    """The pipelined form with 1 to 10 items per program (H = 4: 4 to 1204 items on the GPU's SMs), so that
    each solver gets none, one or several items and the buffer ring turns over many times; b = 250 (1000 items)
    runs on fewer programs than SMs on an H200 (``pipelined_programs``: 125 of 8)."""
    args = decode_inputs(11, b=b, d=128, g_kk=b % 2 == 1)
    got = run_gluon(args, 10, form="pipelined", slots=slots, loader_warps=loader_warps)
    assert_close(got, run(reference.gka_decode, args, 10), 1e-5)


@pytest.mark.parametrize("b, num_iter", [(1, 30), (33, 10), (301, 30), (67, 0)])
def test_mirror_reads_only_the_upper_triangle(b, num_iter):
    """mirror: h_kk's 16-byte chunks left of the diagonal are never read (here NaN), they are rebuilt from
    their mirror images; the step and the written h_kk' equal the reference's
    on the symmetric state. 1 to 10 items per program (H = 4)."""
    args = decode_inputs(41, b=b, d=128, g_kk=True)
    want = run(reference.gka_decode, args, num_iter)
    chunk = np.arange(128) // 4
    below = chunk[None, :] < chunk[:, None]                                  # [D, D]
    corrupted = dict(args, h_kk=np.where(below, np.nan, args["h_kk"]).astype(np.float32))
    got = run_gluon(corrupted, num_iter, form="pipelined", mirror=True)
    assert_close(got, want, 1e-5)


@pytest.mark.parametrize("b, num_iter, mode, mirror, slots", [
    (1, 30, True, False, 3), (33, 10, True, True, 3), (301, 30, True, False, 3), (67, 0, True, False, 2),
    (250, 30, True, False, 3),
    (40, 29, True, False, 2), (301, 10, True, True, 3), (134, 30, True, False, 3),
    (1, 30, "readback", False, 3), (33, 10, "readback", False, 3), (67, 0, "readback", False, 3),
    (134, 29, "readback", False, 3), (301, 30, "readback", False, 3),
    (1, 30, "loads", False, 3), (33, 10, "loads", False, 3), (67, 0, "loads", False, 3), (134, 29, "loads", False, 3),
    (301, 30, "loads", False, 3), (201, 3, "loads", False, 3),
    (1, 30, "single", False, 3), (33, 10, "single", False, 3), (67, 0, "single", False, 3),
    (134, 29, "single", False, 3), (301, 30, "single", False, 3), (201, 3, "single", False, 3)])
def test_value_partition_item_counts(b, num_iter, mode, mirror, slots):
    """value_partition (h_kv' and o by a partition of their own, q' handed over per solver) with 1 to 10 items
    per program: h_kv resident until o (with and without the mirror, two and three buffers; "single": in one
    buffer, each solver's h_kk in one of its own), read back, or copied by the value partition itself
    ("loads")."""
    args = decode_inputs(51, b=b, d=128, g_kk=b % 2 == 1)
    got = run_gluon(args, num_iter, form="pipelined", value_partition=mode, mirror=mirror, slots=slots)
    assert_close(got, run(reference.gka_decode, args, num_iter), 1e-5)


@pytest.mark.parametrize("b, num_iter, spread, mirror, slots", [
    (1, 30, 4, False, 3), (33, 10, 2, True, 3), (301, 30, 4, False, 3), (67, 0, 4, False, 3),
    (40, 29, 8, False, 2), (301, 1, 8, False, 3), (134, 30, 1, False, 3), (33, 3, 4, False, 3)])
def test_spread_store_writes_all_of_h_kk(b, num_iter, spread, mirror, slots):
    """spread_store: h_kk' stored in parts between runs of the solve's iterations (fewer iteration pairs
    than parts, none, odd counts), 1 to 10 items per program; h_kk' must be whole and exact."""
    args = decode_inputs(61, b=b, d=128, g_kk=b % 2 == 1)
    got = run_gluon(args, num_iter, form="pipelined", spread_store=spread, mirror=mirror, slots=slots)
    assert_close(got, run(reference.gka_decode, args, num_iter), 1e-5)


@pytest.mark.parametrize("b, num_iter, spread, no_beta, no_alpha, value", [
    (1, 30, 4, False, False, False), (33, 10, 0, True, False, False), (301, 30, 4, False, True, False),
    (67, 0, 0, False, False, False), (40, 29, 4, True, True, False), (134, 30, 0, False, False, True)])
def test_inputs_ahead_item_counts(b, num_iter, spread, no_beta, no_alpha, value):
    """inputs_ahead (each solver's next item's inputs loaded during the current one; k to its rows through
    shared memory) with 1 to 10 items per program, absent beta / alpha, and with the value partition."""
    args = decode_inputs(71, b=b, d=128, g_kk=b % 2 == 1)
    args = dict(args, beta=None if no_beta else args["beta"], alpha=None if no_alpha else args["alpha"])
    got = run_gluon(args, num_iter, form="pipelined", inputs_ahead=True, spread_store=spread, value_partition=value)
    assert_close(got, run(reference.gka_decode, args, num_iter), 1e-5)


@pytest.mark.parametrize("b, num_iter, value, slots", [
    (1, 30, True, 3), (33, 10, False, 3), (301, 30, True, 3), (67, 0, True, 3), (40, 29, False, 2),
    (134, 30, "single", 3), (301, 10, "readback", 3), (201, 3, True, 3), (300, 30, True, 3)])
def test_tma_copies_item_counts(b, num_iter, value, slots):
    """tma (each tile one bulk tensor copy; its descriptors made on the device in the scratch output) with 1 to
    10 items per program and each ring order; 300 x 4 items also exercise large row coordinates."""
    args = decode_inputs(81, b=b, d=128, g_kk=b % 2 == 1)
    got = run_gluon(args, num_iter, form="pipelined", tma=True, value_partition=value, mirror=False, slots=slots)
    assert_close(got, run(reference.gka_decode, args, num_iter), 1e-5)


def test_pipelined_options_are_checked():
    args = decode_inputs(12, b=2, d=128)
    with pytest.raises(ValueError, match="slots=4 is not one of"):
        run_gluon(args, 10, form="pipelined", slots=4)
    with pytest.raises(ValueError, match="loader_warps=2 is not one of"):
        run_gluon(args, 10, form="pipelined", loader_warps=2)
    with pytest.raises(ValueError, match="pipelined form covers D in"):
        run_gluon(decode_inputs(12, b=2, d=64), 10, form="pipelined")
    with pytest.raises(ValueError, match="mirror=True .* needs the pipelined form with slots=3"):
        run_gluon(args, 10, form="pipelined", slots=2, mirror=True)
    bf16_states = dict(args, h_kk=jnp.asarray(args["h_kk"], jnp.bfloat16), h_kv=jnp.asarray(args["h_kv"], jnp.bfloat16))
    with pytest.raises(ValueError, match="and float32 states"):
        run_gluon(bf16_states, 10, form="pipelined", mirror=True)
    with pytest.raises(ValueError, match="mirror='both' is not a bool"):
        run_gluon(args, 10, form="pipelined", mirror="both")
    with pytest.raises(ValueError, match="value_partition=True needs loader_warps=4"):
        run_gluon(args, 10, form="pipelined", value_partition=True, loader_warps=1)
    with pytest.raises(ValueError, match="value_partition=True needs the pipelined form"):
        run_gluon(args, 10, form="item", value_partition=True)
    with pytest.raises(ValueError, match="value_partition='yes' is not one of"):
        run_gluon(args, 10, form="pipelined", value_partition="yes")
    with pytest.raises(ValueError, match="value_partition='readback' needs slots=3 without the mirror"):
        run_gluon(args, 10, form="pipelined", value_partition="readback", mirror=True)
    with pytest.raises(ValueError, match="value_partition='readback' needs slots=3 without the mirror"):
        run_gluon(args, 10, form="pipelined", value_partition="readback", slots=2)
    with pytest.raises(ValueError, match="value_partition='loads' needs slots=3 without the mirror"):
        run_gluon(args, 10, form="pipelined", value_partition="loads", mirror=True)
    with pytest.raises(ValueError, match="value_partition='single' needs slots=3 without the mirror"):
        run_gluon(args, 10, form="pipelined", value_partition="single", slots=2)
    with pytest.raises(ValueError, match="spread_store=3 is not one of"):
        run_gluon(args, 10, form="pipelined", spread_store=3)
    with pytest.raises(ValueError, match="spread_store=4 needs the pipelined form"):
        run_gluon(args, 10, form="item", spread_store=4)
    with pytest.raises(ValueError, match="inputs_ahead=1 is not a bool"):
        run_gluon(args, 10, form="pipelined", inputs_ahead=1)
    with pytest.raises(ValueError, match="inputs_ahead=True needs the pipelined form"):
        run_gluon(args, 10, form="item", inputs_ahead=True)
    with pytest.raises(ValueError, match="tma=1 is not a bool"):
        run_gluon(args, 30, form="pipelined", tma=1)
    for options in (dict(form="item"), dict(form="pipelined", mirror=True),
                    dict(form="pipelined", value_partition="loads")):
        with pytest.raises(ValueError, match="tma=True needs the pipelined form without the mirror"):
            run_gluon(args, 10, tma=True, **options)


def test_zero_state_first_token():
    args = decode_inputs(7, d=64)
    args["h_kk"], args["h_kv"] = np.zeros_like(args["h_kk"]), np.zeros_like(args["h_kv"])
    assert_close(run_gluon(args, 30), run_oracle(args, 30), 1e-4)


@pytest.mark.parametrize("form", ["item", "pipelined"])
def test_donated_states_are_updated_in_place(form):
    args = decode_inputs(21, d=128, g_kk=True)
    want = run(reference.gka_decode, args, 30)
    step = jax.jit(functools.partial(gluon_decode.gka_decode, num_iter=30, ridge_strength=RIDGE,
                                     scale=128 ** -0.5, form=form), donate_argnums=(6, 7))
    arrays = [jnp.asarray(args[n]) for n in NAMES + STATES]
    compiled = step.lower(*arrays, g_kk=jnp.asarray(args["g_kk"])).compile()
    assert "input_output_alias" in compiled.as_text()
    got = compiled(*arrays, g_kk=jnp.asarray(args["g_kk"]))
    assert arrays[-2].is_deleted() and arrays[-1].is_deleted()
    assert_close(got, want, 1e-5)


def test_low_precision_inputs_and_states():
    """bf16 q/k/v and states: computed in fp32, o and x in q's dtype, states stored back in bf16."""
    args = decode_inputs(33, d=64)
    args.update({n: jnp.asarray(args[n], jnp.bfloat16) for n in ("q", "k", "v") + STATES})
    got = run_gluon(args, 1)
    assert {a.dtype for a in got} == {jnp.dtype(jnp.bfloat16)}
    assert_close(got, run(reference.gka_decode, args, 1), 1e-2)


def test_pipelined_form_low_precision_states():
    """bf16 states in the pipelined form: bf16 buffers, 8 elements per 16-byte copy; the results of the
    one-program-per-item form up to bf16 rounding of the outputs (rel 4e-5 seen on an H200: a few elements
    one bf16 ulp apart)."""
    args = decode_inputs(35, b=70, d=128)
    args.update({n: jnp.asarray(args[n], jnp.bfloat16) for n in ("q", "k", "v") + STATES})
    got = run_gluon(args, 10, form="pipelined")
    assert {a.dtype for a in got} == {jnp.dtype(jnp.bfloat16)}
    assert_close(got, run(reference.gka_decode, args, 10), 1e-2)
    assert_close(got, run_gluon(args, 10, form="item"), 2e-4)


def test_dispatcher_runs_it_on_gpu():
    """backend="pallas" (the GPU default) picks the Gluon kernel for covered shapes, in its pipelined form
    when B H reaches the number of SMs: same result."""
    args = decode_inputs(9, b=40, d=128)
    assert kernels.decode_kernel(*(jnp.asarray(args[n]) for n in ("q", "k", "v", "h_kk", "h_kv"))) == "gluon"
    assert gluon_decode.default_form(128, 40 * 4, gluon_decode._multiprocessors(), True) == "pipelined"
    got = run(functools.partial(kernels.gka_decode, backend="pallas"), args, 30)
    assert_close(got, run(reference.gka_decode, args, 30), 1e-5)
