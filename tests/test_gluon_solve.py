"""The Gluon prefill solve (``gluon_solve``) against the pure-JAX reference, the float64 oracle and the Pallas
solve with the same bf16 dot operands, compiled on a GPU. Gluon has no interpreter, so this file runs where
jax-triton and a GPU are present (``benchmarks/gpu_kernels.sh`` runs it on the GPU machine); the same math
runs in CI through the Pallas solve (tests/test_pallas_solve.py). The kernel choice is tested on CPU in
test_dispatch.py.

Tolerances (relative Frobenius error): bf16 dot operands with fp32 accumulation, as the Pallas solve's
bf16 test: <= 3e-2 against the fp32 reference and the float64 oracle; <= 1.5e-2 against the Pallas solve
with the same operand dtype (the two round different intermediate values to bf16).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel
from test_pallas_solve import RIDGE, make_inputs, run_oracle, run_reference

from gka_jax.kernels import gluon_solve, pallas_prefill, pallas_solve, reference

if not gluon_solve.AVAILABLE or jax.default_backend() != "gpu" or not gluon_solve.on_hopper():
    pytest.skip("the Gluon kernel needs jax-triton and a Hopper GPU", allow_module_level=True)

BF16 = jnp.bfloat16


def run_gluon(inp, starts, num_iter, **kwargs):
    return gluon_solve.chebyshev_solve(inp["q"], inp["k"], inp["beta"], inp["g"], starts, num_iter=num_iter,
                                       ridge_strength=RIDGE, **kwargs)


def run_pallas_bf16(inp, starts, num_iter):
    return pallas_solve.chebyshev_solve(inp["q"], inp["k"], inp["beta"], inp["g"], starts, num_iter=num_iter,
                                        ridge_strength=RIDGE, chunk_size=64, operand_dtype=BF16,
                                        precision=jax.lax.Precision.DEFAULT)


# (d, t, num_iter, hkv, with_beta, with_state, bf16_starts)
CASES = [
    (128, 256, 30, 2, True, True, True),     # GQA, T a multiple of 64, bf16 starts (as the prefill passes)
    (128, 200, 10, 4, False, True, False),   # no GQA, no beta, ragged T, fp32 starts
    (64, 130, 30, 1, True, True, False),     # D = 64, 8 query heads per kv head, a 2-token last chunk
    (128, 100, 1, 2, True, False, True),     # zero initial state, one iteration
    (64, 64, 0, 2, True, True, False),       # no iteration: x = step q
]


@pytest.mark.parametrize("d, t, num_iter, hkv, with_beta, with_state, bf16_starts", CASES)
def test_matches_reference_oracle_and_pallas(d, t, num_iter, hkv, with_beta, with_state, bf16_starts):
    inp = make_inputs(seed=d + t + num_iter, t=t, hkv=hkv, d=d, with_beta=with_beta, with_state=with_state)
    want, starts = run_reference(inp, num_iter, 64)
    starts = starts.astype(BF16) if bf16_starts else starts
    got = run_gluon(inp, starts, num_iter)
    assert got.shape == want.shape and got.dtype == jnp.float32
    assert rel(got, want) < 3e-2
    assert rel(got, run_pallas_bf16(inp, starts, num_iter)) < 1.5e-2
    if num_iter > 0:
        assert rel(got, run_oracle(inp, num_iter)) < 3e-2


@pytest.mark.parametrize("log_decay_range", [(1.3, 1.7), (2.0, 3.0), (-30.0, -20.0)])
def test_strong_and_no_decay(log_decay_range):
    """Chunks whose decay span passes ``FACTORED_SPAN`` take the masked form: g = -exp(U(1.3, 1.7)) (3.7 to
    5.5 per token: spans of about 290 over 64 tokens) puts every chunk there, g = -exp(U(2, 3)) too with
    most keys decayed to nothing within a few tokens; g = -exp(U(-30, -20)) is no decay to fp32 precision."""
    t = 192
    inp = make_inputs(seed=13, t=t, d=128)
    inp["g"] = (-np.exp(np.random.default_rng(2).uniform(*log_decay_range, size=inp["g"].shape))).astype(np.float32)
    want, starts = run_reference(inp, 30, 64)
    got = run_gluon(inp, starts, 30)
    assert np.isfinite(np.asarray(got)).all()
    assert rel(got, want) < 3e-2
    assert rel(got, run_oracle(inp, 30)) < 3e-2


def test_factored_and_masked_chunks_in_one_call():
    """Per-chunk choice: the first chunk decays strongly (masked form), the others weakly (factored)."""
    t = 192
    inp = make_inputs(seed=14, t=t, d=128)
    g = inp["g"].copy()
    g[:, :64] = -4.0
    inp["g"] = g
    spans = -np.cumsum(g.reshape(2, 3, 64, -1), axis=2)[:, :, -1]
    assert (spans[:, 0] > pallas_solve.FACTORED_SPAN).all() and (spans[:, 1:] <= pallas_solve.FACTORED_SPAN).all()
    want, starts = run_reference(inp, 30, 64)
    got = run_gluon(inp, starts, 30)
    assert rel(got, want) < 3e-2
    assert rel(got, run_pallas_bf16(inp, starts, 30)) < 1.5e-2


@pytest.mark.parametrize("with_alpha", [True, False])
def test_query_mix_and_output_dtypes(with_alpha):
    """mixed_dtype: the kernel also returns q' = q + alpha (x - q) (alpha None: q' = x) from bf16 inputs."""
    inp = make_inputs(seed=12, t=150, d=128)
    inp = {**inp, "q": jnp.asarray(inp["q"], BF16), "k": jnp.asarray(inp["k"], BF16)}
    alpha = jnp.asarray(np.random.default_rng(1).uniform(size=inp["g"].shape), jnp.float32) if with_alpha else None
    want_x, starts = run_reference(inp, 10, 64)
    x, mixed = run_gluon(inp, starts.astype(BF16), 10, alpha=alpha, x_dtype=BF16, mixed_dtype=BF16)
    assert x.dtype == mixed.dtype == BF16
    q = jnp.asarray(inp["q"], jnp.float32)
    want_mixed = want_x if alpha is None else q + alpha[..., None] * (want_x - q)
    assert rel(x, want_x) < 3e-2 and rel(mixed, want_mixed) < 3e-2


def test_prefill_uses_it_and_matches_the_reference():
    """The whole Pallas prefill at DEFAULT precision picks the Gluon solve (``solve_kernel``) and gives the
    pure-JAX results (o, x, final states) within the bf16 tolerances, like the Pallas solve."""
    rng = np.random.default_rng(3)
    b, t, h, hkv, d = 1, 300, 4, 2, 128
    inp = make_inputs(seed=15, b=b, t=t, h=h, hkv=hkv, d=d)
    v = jnp.asarray(rng.normal(size=(b, t, hkv, d)), BF16)
    q, k = jnp.asarray(inp["q"], BF16), jnp.asarray(inp["k"], BF16)
    alpha = jnp.asarray(rng.uniform(size=(b, t, h)), jnp.float32)
    h_kk = jnp.asarray(inp["h_kk"])
    h_kv = jnp.asarray(rng.normal(size=(b, h, d, d)) * 0.1, jnp.float32)
    common = dict(num_iter=30, ridge_strength=RIDGE, scale=d ** -0.5, precision=jax.lax.Precision.DEFAULT)
    args = (q, k, v, inp["beta"], inp["g"], alpha, h_kk, h_kv)
    starts_probe = jnp.zeros((b, h, -(-t // 64), d, d), BF16)
    assert pallas_prefill.solve_kernel(q, k, starts_probe, chunk_size=64, operand_dtype=BF16, interpret=False) \
        == "gluon"
    got = jax.jit(lambda *a: pallas_prefill.gka_prefill(*a, **common))(*args)
    pallas = jax.jit(lambda *a: pallas_prefill.gka_prefill(
        *a, **common, tuning={**pallas_prefill.GPU_TUNING, "solve": {"kernel": "pallas"}}))(*args)
    want = jax.jit(lambda *a: reference.gka_prefill(*a, **{**common, "precision": jax.lax.Precision.HIGHEST}))(*args)
    # o: the bf16 paths' o errors are large (the solve amplifies directions orthogonal to the keys, up to
    # 1 / lambda; docs/kernels.md: 3e-2 against float64 for the Pallas path); the states come from the same
    # state pass in both kernel paths.
    for name, tol_ref, tol_pallas in (("o", 8e-2, 8e-2), ("x", 3e-2, 1.5e-2), ("h_kk", 1e-2, 1e-6),
                                      ("h_kv", 1e-2, 1e-6)):
        assert rel(getattr(got, name), getattr(want, name)) < tol_ref, name
        assert rel(getattr(got, name), getattr(pallas, name)) < tol_pallas, name

