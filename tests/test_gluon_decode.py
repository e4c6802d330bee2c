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
from gka_jax.kernels import gluon_decode, reference

if not gluon_decode.AVAILABLE or jax.default_backend() != "gpu":
    pytest.skip("the Gluon kernel needs jax-triton and an NVIDIA GPU", allow_module_level=True)

RIDGE = 0.02


def run_gluon(args, num_iter, **options):
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
def test_matches_reference_and_fp64_oracle(d, hkv, num_iter, no_beta, no_alpha, g_kk):
    args, want, want_fp64 = case_and_expected(d, hkv, num_iter, no_beta, no_alpha, g_kk)
    got = run_gluon(args, num_iter)
    assert_close(got, want, 1e-5)
    assert_close(got, want_fp64, 1e-4)


@pytest.mark.parametrize("persistent, blocks, lanes, maxnreg", [(False, 8, 1, None), (True, 4, 4, 0),
                                                               (False, 16, 2, 200), (True, 1, 1, 168),
                                                               (False, 8, 4, 0)])
def test_tunables_give_the_same_result(persistent, blocks, lanes, maxnreg):
    """One program per item or persistent programs (which walk several items each at B * H > #SMs)."""
    args = decode_inputs(5, b=40, d=128, g_kk=True)
    got = run_gluon(args, 30, persistent=persistent, blocks=blocks, lanes=lanes, maxnreg=maxnreg)
    assert_close(got, run(reference.gka_decode, args, 30), 1e-5)


def test_zero_state_first_token():
    args = decode_inputs(7, d=64)
    args["h_kk"], args["h_kv"] = np.zeros_like(args["h_kk"]), np.zeros_like(args["h_kv"])
    assert_close(run_gluon(args, 30), run_oracle(args, 30), 1e-4)


def test_donated_states_are_updated_in_place():
    args = decode_inputs(21, d=128, g_kk=True)
    want = run(reference.gka_decode, args, 30)
    step = jax.jit(functools.partial(gluon_decode.gka_decode, num_iter=30, ridge_strength=RIDGE,
                                     scale=128 ** -0.5), donate_argnums=(6, 7))
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


def test_dispatcher_runs_it_on_gpu():
    """backend="pallas" (the GPU default) picks the Gluon kernel for covered shapes: same result."""
    args = decode_inputs(9, d=128)
    assert kernels.decode_kernel(*(jnp.asarray(args[n]) for n in ("q", "k", "v", "h_kk", "h_kv"))) == "gluon"
    got = run(functools.partial(kernels.gka_decode, backend="pallas"), args, 30)
    assert_close(got, run(reference.gka_decode, args, 30), 1e-5)
