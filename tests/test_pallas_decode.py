"""The Pallas-Triton GKA decode kernels (interpret mode on CPU), fused (``split=False``) and split into a
solve and a value kernel (``split=True``), against the pure-JAX reference and the per-token float64 oracle,
plus their Triton lowering (TTIR, exported for CUDA without a GPU).

Tolerances: rel <= 1e-5 vs ``reference.gka_decode`` in float32, rel <= 1e-4 vs the float64 oracle.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel
from test_kernels import make_inputs

from gka_jax.kernels import oracle, pallas_decode, reference

if not pallas_decode.AVAILABLE:
    pytest.skip("Pallas Triton lowering not available", allow_module_level=True)

# jax >= 0.11 warns at lowering that the Pallas Triton backend is deprecated.
pytestmark = pytest.mark.filterwarnings("ignore:.*Triton backend is deprecated:DeprecationWarning")

RIDGE = 0.02
INTERPRET = jax.default_backend() != "gpu"  # compiled for real on a GPU, interpret mode elsewhere
NAMES = ("q", "k", "v", "beta", "g", "alpha")
STATES = ("h_kk", "h_kv")


def decode_inputs(seed, *, b=3, h=4, hkv=2, d=16, no_beta=False, no_alpha=False, g_kk=False):
    """One token (``make_inputs`` at T=1, T axis dropped) with symmetric PSD initial states."""
    inp = make_inputs(seed, b=b, t=1, h=h, hkv=hkv, d=d, with_state=True)
    args = {n: inp[n][:, 0] for n in NAMES}
    if no_beta:
        args["beta"] = None
    if no_alpha:
        args["alpha"] = None
    rng = np.random.default_rng(seed)
    args["g_kk"] = (-np.exp(rng.uniform(-6, 0, size=(b, h)))).astype(np.float32) if g_kk else None
    args["h_kk"], args["h_kv"] = inp["h_kk"], inp["h_kv"]
    return args


def run(fn, args, num_iter, **kwargs):
    """fn (a decode step) under jit: one compile per case instead of op-by-op dispatch."""
    step = jax.jit(functools.partial(fn, num_iter=num_iter, ridge_strength=RIDGE,
                                     scale=args["q"].shape[-1] ** -0.5, **kwargs))
    arrays = {n: None if a is None else jnp.asarray(a) for n, a in args.items()}
    return step(*(arrays[n] for n in NAMES + STATES), g_kk=arrays["g_kk"])


def run_kernel(args, num_iter, **options):
    return run(pallas_decode.gka_decode, args, num_iter, interpret=INTERPRET, **options)


def run_oracle(args, num_iter):
    seq = {n: None if args[n] is None else args[n][:, None] for n in NAMES + ("g_kk",)}  # T = 1
    want = oracle.gka_core_fp64(*(seq[n] for n in NAMES), args["h_kk"], args["h_kv"], g_kk=seq["g_kk"],
                                num_iter=num_iter, ridge_strength=RIDGE, scale=args["q"].shape[-1] ** -0.5)
    return reference.GKAResult(want["o"][:, 0], want["x"][:, 0], want["h_kk"], want["h_kv"])


def assert_close(got, want, tol):
    for name in reference.GKAResult._fields:
        assert rel(getattr(got, name), getattr(want, name)) < tol, name


# Both forms with their default matvec; the split value kernel in several column blocks where Dv allows.
SPLITS = {"fused": {"split": False}, "split": {"split": True, "value_block": 8}}


@functools.lru_cache
def case_and_expected(d, hkv, num_iter, no_beta, no_alpha, g_kk):
    """(inputs, reference result, float64 oracle result) of one case, shared by both forms."""
    args = decode_inputs(d + 7 * hkv + num_iter, d=d, hkv=hkv, no_beta=no_beta, no_alpha=no_alpha, g_kk=g_kk)
    return args, run(reference.gka_decode, args, num_iter), run_oracle(args, num_iter)


@pytest.mark.parametrize("form", SPLITS)
@pytest.mark.parametrize("d, hkv, num_iter, no_beta, no_alpha, g_kk", [
    (16, 2, 0, False, False, False),
    (16, 2, 1, False, True, False),
    (16, 4, 10, True, False, True),
    (16, 4, 30, False, False, False),
    (32, 2, 30, False, False, True),
    (32, 4, 30, True, True, False),
    (32, 2, 10, False, False, False),
])
def test_matches_reference_and_fp64_oracle(d, hkv, num_iter, no_beta, no_alpha, g_kk, form):
    args, want, want_fp64 = case_and_expected(d, hkv, num_iter, no_beta, no_alpha, g_kk)
    got = run_kernel(args, num_iter, **SPLITS[form])
    assert got.o.shape == (3, 4, d) and got.x.shape == (3, 4, d)
    assert_close(got, want, 1e-5)
    assert_close(got, want_fp64, 1e-4)


@pytest.mark.parametrize("split, matvec", [(False, "sym"), (False, "dot"), (True, "sum"), (True, "dot")])
def test_other_matvec_forms(split, matvec):
    """The H x forms that are not the defaults above (interpret mode runs "dot" in plain fp32: XLA:CPU has
    no 3xTF32)."""
    args, want, _ = case_and_expected(16, 4, 30, False, False, True)
    assert_close(run_kernel(args, 30, split=split, matvec=matvec), want, 1e-5)


@pytest.mark.parametrize("split", [False, True])
def test_zero_state_first_token(split):
    """Zero initial states (H = k k^T, rank one: the solve amplifies rounding; checked against float64)."""
    args = decode_inputs(7)
    args["h_kk"], args["h_kv"] = np.zeros_like(args["h_kk"]), np.zeros_like(args["h_kv"])
    assert_close(run_kernel(args, 30, split=split), run_oracle(args, 30), 1e-4)


@pytest.mark.parametrize("split", [False, True])
def test_donated_states_are_updated_in_place(split):
    args = decode_inputs(21, g_kk=True)
    want = run(reference.gka_decode, args, 30)
    step = jax.jit(functools.partial(pallas_decode.gka_decode, num_iter=30, ridge_strength=RIDGE, scale=0.25,
                                     interpret=INTERPRET, split=split), donate_argnums=(6, 7))
    arrays = [jnp.asarray(args[n]) for n in NAMES + STATES]
    compiled = step.lower(*arrays, g_kk=jnp.asarray(args["g_kk"])).compile()
    assert "input_output_alias" in compiled.as_text()
    got = compiled(*arrays, g_kk=jnp.asarray(args["g_kk"]))
    assert arrays[-2].is_deleted() and arrays[-1].is_deleted()
    assert_close(got, want, 1e-5)


@pytest.mark.parametrize("split", [False, True])
def test_low_precision_inputs_and_states(split):
    """bf16 q/k/v and states: computed in fp32, o and x in q's dtype, states stored back in bf16."""
    args = decode_inputs(33)
    args.update({n: jnp.asarray(args[n], jnp.bfloat16) for n in ("q", "k", "v") + STATES})
    got = run_kernel(args, 1, split=split)
    assert {a.dtype for a in got} == {jnp.dtype(jnp.bfloat16)}
    assert_close(got, run(reference.gka_decode, args, 1), 1e-2)


@pytest.mark.parametrize("split", [False, True])
def test_rejects_non_power_of_two_value_dim(split):
    args = decode_inputs(1)
    args["v"] = np.zeros((3, 2, 24), np.float32)
    args["h_kv"] = np.zeros((3, 4, 16, 24), np.float32)
    with pytest.raises(ValueError, match="power of 2"):
        run_kernel(args, 1, split=split)


@pytest.mark.parametrize("options, message", [
    ({"split": True, "value_block": 12}, "value_block=12 is not a power of 2"),
    ({"matvec": "gemv"}, "matvec='gemv' is not one of"),
])
def test_rejects_bad_options(options, message):
    with pytest.raises(ValueError, match=message):
        run_kernel(decode_inputs(1), 1, **options)


def export_for_cuda(**options):
    """The GPU path (no interpret) at the production shape, exported for CUDA: the module text."""
    from jax import export

    b, h, hkv, d = 2, 32, 8, 128
    shapes = {"q": (b, h, d), "k": (b, hkv, d), "v": (b, hkv, d), "beta": (b, h), "g": (b, h), "alpha": (b, h),
              "h_kk": (b, h, d, d), "h_kv": (b, h, d, d), "g_kk": (b, h)}
    specs = [jax.ShapeDtypeStruct(s, jnp.bfloat16 if n in ("q", "k", "v") else jnp.float32)
             for n, s in shapes.items()]

    def step(q, k, v, beta, g, alpha, h_kk, h_kv, g_kk):
        return pallas_decode.gka_decode(q, k, v, beta, g, alpha, h_kk, h_kv, g_kk=g_kk, num_iter=30,
                                        ridge_strength=RIDGE, scale=d ** -0.5, **options)

    exported = export.export(jax.jit(step, donate_argnums=(6, 7)), platforms=["cuda"], disabled_checks=[
        export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(*specs)
    return exported.mlir_module()


# Exporting for CUDA without a GPU works on CPU only; on a GPU the tests above run compiled anyway.
cuda_export = pytest.mark.skipif(jax.default_backend() == "gpu", reason="needs an abstract GPU device off-GPU")


@cuda_export
def test_lowers_to_triton_with_aliased_states():
    """The fused kernel lowers to TTIR, with both states aliased."""
    text = export_for_cuda(split=False)
    assert text.count("__gpu$xla.gpu.triton") == 1 and "num_stages = 1" in text and "num_warps = 8" in text
    assert "output_operand_alias<output_tuple_indices = [2], operand_index = 3" in text
    assert "output_operand_alias<output_tuple_indices = [3], operand_index = 4" in text


@cuda_export
@pytest.mark.parametrize("matvec", pallas_decode.MATVECS)
def test_split_lowers_to_two_triton_kernels_with_aliased_states(matvec):
    """Split: the solve kernel (h_kk operand 2 -> output 2) and the value kernel (h_kv operand 3 -> output 1)."""
    text = export_for_cuda(split=True, matvec=matvec, num_warps=8, value_num_warps=2, value_block=64)
    assert text.count("__gpu$xla.gpu.triton") == 2 and text.count("num_stages = 1") == 2
    assert "num_warps = 8" in text and "num_warps = 2" in text
    assert "output_operand_alias<output_tuple_indices = [2], operand_index = 2" in text
    assert "output_operand_alias<output_tuple_indices = [1], operand_index = 3" in text
