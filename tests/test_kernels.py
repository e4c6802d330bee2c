"""The pure-JAX GKA kernels against the naive per-token float64 oracle.

Tolerance: relative Frobenius error <= 1e-4 in float32 with precision=HIGHEST (observed ~1e-6..3e-6:
fp32 rounding amplified by up to 30 Chebyshev iterations).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gka_jax import kernels
from gka_jax.kernels import oracle, reference

from conftest import rel

TOL = 1e-4


def make_inputs(seed, b=2, t=100, h=4, hkv=2, d=16, dv=None, with_state=False):
    rng = np.random.default_rng(seed)
    dv = dv or d

    def unit(x):
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    inputs = dict(
        q=unit(rng.normal(size=(b, t, h, d))).astype(np.float32),
        k=unit(rng.normal(size=(b, t, hkv, d))).astype(np.float32),
        v=rng.normal(size=(b, t, hkv, dv)).astype(np.float32),
        beta=(1 / (1 + np.exp(-rng.normal(size=(b, t, h)))) + 1e-6).astype(np.float32),
        g=(-np.exp(rng.uniform(-4, 1, size=(b, t, h)))).astype(np.float32),
        alpha=rng.uniform(size=(b, t, h)).astype(np.float32),
    )
    if with_state:
        keys = unit(rng.normal(size=(b, h, 8, d)))
        inputs["h_kk"] = np.einsum("bhnd,bhne->bhde", keys, keys).astype(np.float32)
        inputs["h_kv"] = np.einsum("bhnd,bhne->bhde", keys, rng.normal(size=(b, h, 8, dv))).astype(np.float32)
    else:
        inputs["h_kk"] = np.zeros((b, h, d, d), np.float32)
        inputs["h_kv"] = np.zeros((b, h, d, dv), np.float32)
    return inputs


def run_oracle(inp, num_iter, g_kk=None):
    return oracle.gka_core_fp64(inp["q"], inp["k"], inp["v"], inp["beta"], inp["g"], inp["alpha"],
                                inp["h_kk"], inp["h_kv"], num_iter=num_iter, ridge_strength=0.02,
                                scale=inp["q"].shape[-1] ** -0.5, g_kk=g_kk)


def run_prefill(inp, num_iter, state_pass, chunk_size=64, g_kk=None):
    return kernels.gka_prefill(inp["q"], inp["k"], inp["v"], inp["beta"], inp["g"], inp["alpha"],
                               jnp.asarray(inp["h_kk"]), jnp.asarray(inp["h_kv"]), num_iter=num_iter,
                               ridge_strength=0.02, scale=inp["q"].shape[-1] ** -0.5, chunk_size=chunk_size,
                               state_pass=state_pass, g_kk=g_kk)


@pytest.mark.parametrize("state_pass", ["associative", "scan"])
@pytest.mark.parametrize("t", [1, 37, 64, 100, 192])
@pytest.mark.parametrize("num_iter", [0, 1, 10, 30])
def test_prefill_matches_fp64_oracle(state_pass, t, num_iter):
    inp = make_inputs(seed=t * 31 + num_iter, t=t, with_state=(t % 2 == 0))
    want = run_oracle(inp, num_iter)
    got = run_prefill(inp, num_iter, state_pass)
    assert rel(got.o, want["o"]) < TOL
    assert rel(got.x, want["x"]) < TOL
    assert rel(got.h_kk, want["h_kk"]) < TOL
    assert rel(got.h_kv, want["h_kv"]) < TOL


def test_prefill_small_chunks_and_d128_mqa():
    inp = make_inputs(seed=5, b=1, t=70, h=4, hkv=1, d=128)
    want = run_oracle(inp, 30)
    got = run_prefill(inp, 30, "associative", chunk_size=16)
    assert rel(got.o, want["o"]) < TOL and rel(got.x, want["x"]) < TOL
    assert rel(got.h_kk, want["h_kk"]) < TOL and rel(got.h_kv, want["h_kv"]) < TOL


def test_separate_kk_gate():
    """use_forgetting_gate_kk=False: h_kk is a plain running sum while h_kv still decays."""
    inp = make_inputs(seed=9, t=90)
    g_kk = np.zeros_like(inp["g"])
    want = run_oracle(inp, 10, g_kk=g_kk)
    for state_pass in ("associative", "scan"):
        got = run_prefill(inp, 10, state_pass, g_kk=jnp.asarray(g_kk))
        assert rel(got.o, want["o"]) < TOL and rel(got.h_kk, want["h_kk"]) < TOL
        assert rel(got.h_kv, want["h_kv"]) < TOL


@pytest.mark.parametrize("num_iter", [0, 1, 10, 30])
def test_decode_matches_fp64_oracle(num_iter):
    inp = make_inputs(seed=100 + num_iter, t=1, with_state=True)
    want = run_oracle(inp, num_iter)
    got = kernels.gka_decode(*(inp[n][:, 0] for n in ("q", "k", "v", "beta", "g", "alpha")),
                             jnp.asarray(inp["h_kk"]), jnp.asarray(inp["h_kv"]), num_iter=num_iter,
                             ridge_strength=0.02, scale=16 ** -0.5)
    assert rel(got.o, want["o"][:, 0]) < TOL
    assert rel(got.x, want["x"][:, 0]) < TOL
    assert rel(got.h_kk, want["h_kk"]) < TOL and rel(got.h_kv, want["h_kv"]) < TOL


def test_num_iter_zero_is_gated_linear_attention():
    """num_iter=0: o_t = scale * S_t^T q_t exactly, independent of h_kk."""
    inp = make_inputs(seed=3, t=80, with_state=True)
    got = run_prefill(inp, 0, "associative")
    other = dict(inp, h_kk=np.full_like(inp["h_kk"], 7.0))
    assert np.array_equal(np.asarray(run_prefill(other, 0, "associative").o), np.asarray(got.o))
    # Plain GLA in float64: S_t = exp(g_t) S_{t-1} + k_t v_t^T (beta on both), o_t = S_t^T q_t / sqrt(D).
    b, t, h, d = inp["q"].shape
    k = np.repeat(inp["k"], 2, axis=2) * inp["beta"][..., None]
    v = np.repeat(inp["v"], 2, axis=2) * inp["beta"][..., None]
    state = inp["h_kv"].astype(np.float64)
    outs = []
    for i in range(t):
        state = np.exp(inp["g"][:, i])[..., None, None] * state + np.einsum("bhd,bhe->bhde", k[:, i], v[:, i])
        outs.append(np.einsum("bhde,bhd->bhe", state, inp["q"][:, i]) * d ** -0.5)
    assert rel(got.o, np.stack(outs, 1)) < TOL
    assert np.array_equal(np.asarray(got.x), inp["q"])


def test_chunked_prefill_continues_from_state():
    """Prefill of T1 then of T2 from the returned states equals one prefill of T1 + T2."""
    inp = make_inputs(seed=11, t=150)
    whole = run_prefill(inp, 30, "associative")
    first = {n: a[:, :70] if a.ndim >= 3 and a.shape[1] == 150 else a for n, a in inp.items()}
    part1 = run_prefill(first, 30, "scan")
    second = {n: a[:, 70:] if a.ndim >= 3 and a.shape[1] == 150 else a for n, a in inp.items()}
    second["h_kk"], second["h_kv"] = np.asarray(part1.h_kk), np.asarray(part1.h_kv)
    part2 = run_prefill(second, 30, "associative")
    assert rel(np.concatenate([part1.o, part2.o], 1), whole.o) < 1e-5
    assert rel(part2.h_kk, whole.h_kk) < 1e-5 and rel(part2.h_kv, whole.h_kv) < 1e-5


def test_backend_selection():
    assert kernels.select_backend() == "xla"
    assert kernels.select_backend("xla") == "xla"
    with pytest.raises(ValueError, match="unknown GKA kernel backend"):
        kernels.select_backend("nope")
    assert reference.HIGHEST is kernels.HIGHEST


@pytest.mark.parametrize("num_iter", [1, 10, 30])
def test_chebyshev_vjp_in_q_is_the_solve_applied_to_the_cotangent(num_iter):
    """x = P(H) q with P a polynomial whose coefficients depend only on ||H||_F, and H symmetric, so the VJP
    in q is P(H) dx: a backward can reuse the forward solve for dq (docs/kernels.md, "A kernel-level
    backward"). float32, rel <= 1e-6 against autodiff of the pure-JAX iteration."""
    rng = np.random.default_rng(num_iter)
    d = 32
    keys = rng.standard_normal((48, d)).astype(np.float32)
    keys /= np.linalg.norm(keys, axis=1, keepdims=True)
    h = jnp.asarray(sum(0.97 ** i * np.outer(key, key) for i, key in enumerate(keys)), jnp.float32)
    fro = jnp.linalg.norm(h)
    q, dx = (jnp.asarray(rng.standard_normal((3, d)), jnp.float32) for _ in range(2))
    solve = lambda rhs: reference._chebyshev(lambda x: x @ h, rhs, fro, num_iter=num_iter,  # noqa: E731
                                             ridge_strength=0.02)
    _, vjp = jax.vjp(solve, q)
    assert rel(vjp(dx)[0], solve(dx)) <= 1e-6
