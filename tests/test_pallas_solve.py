"""The Pallas-Triton chunked Chebyshev solve (interpret mode on CPU) against the pure-JAX reference and the
float64 oracle.

The reference is ``reference.chebyshev_chunked`` fed with ``expand_heads`` keys and ``chunk_state_pass``
chunk-start states; the oracle is ``oracle.gka_core_fp64`` (its x, which equals q when num_iter is 0, so that
case is checked against the reference only). Tolerances (relative Frobenius error): fp32 operands with
precision=HIGHEST <= 1e-5 vs the reference (the same math in another summation order; observed <= 2e-7) and
<= 1e-4 vs float64 (observed <= 5e-7); bfloat16 operands (fp32 accumulation, as in the PyTorch kernels)
<= 3e-2 vs both (observed 4e-3).
Interpret mode computes exact fp32 dots on CPU: TF32 rounding (precision=DEFAULT) is a GPU-only concern.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gka_jax.kernels import oracle, pallas_solve, reference

from conftest import rel

RIDGE = 0.02


def make_inputs(seed, *, b=2, t=48, h=4, hkv=2, d=16, with_beta=True, with_state=True):
    rng = np.random.default_rng(seed)

    def unit(x):
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    keys = unit(rng.normal(size=(b, h, 8, d)))
    beta = 1 / (1 + np.exp(-rng.normal(size=(b, t, h)))) + 1e-6
    h_kk = np.einsum("bhnd,bhne->bhde", keys, keys) if with_state else np.zeros((b, h, d, d))
    return {
        "q": unit(rng.normal(size=(b, t, h, d))).astype(np.float32),
        "k": unit(rng.normal(size=(b, t, hkv, d))).astype(np.float32),
        "beta": beta.astype(np.float32) if with_beta else None,
        "g": (-np.exp(rng.uniform(-4, 1, size=(b, t, h)))).astype(np.float32),
        "h_kk": h_kk.astype(np.float32),
    }


@functools.partial(jax.jit, static_argnames=("num_iter", "chunk_size"))
def _reference(q, k, beta, g, h_kk, *, num_iter, chunk_size):
    k, _ = reference.expand_heads(k, k, beta, q.shape[2])
    starts, _, _, _ = reference.chunk_state_pass(k, k, g, h_kk, h_kk, chunk_size=chunk_size)
    x = reference.chebyshev_chunked(q, k, g, starts, num_iter=num_iter, ridge_strength=RIDGE,
                                    chunk_size=chunk_size)
    return x, starts


def run_reference(inp, num_iter, chunk_size):
    """(x, h_kk_starts) of the pure-JAX reference."""
    return _reference(inp["q"], inp["k"], inp["beta"], inp["g"], inp["h_kk"], num_iter=num_iter,
                      chunk_size=chunk_size)


def run_oracle(inp, num_iter):
    return oracle.gka_core_fp64(inp["q"], inp["k"], inp["k"], inp["beta"], inp["g"], None, inp["h_kk"], None,
                                num_iter=num_iter, ridge_strength=RIDGE, scale=1.0)["x"]


def run_kernel(inp, starts, num_iter, chunk_size, **kwargs):
    return pallas_solve.chebyshev_solve(inp["q"], inp["k"], inp["beta"], inp["g"], starts, num_iter=num_iter,
                                        ridge_strength=RIDGE, chunk_size=chunk_size, interpret=True, **kwargs)


# (d, chunk_size, t, num_iter, hkv, with_beta, with_state): every feature appears, each row is one compile.
CASES = [
    (16, 16, 48, 30, 2, True, True),     # GQA, T a multiple of the chunk
    (16, 16, 37, 10, 4, False, True),    # no GQA, no beta, ragged T
    (32, 32, 37, 30, 2, True, True),
    (32, 32, 48, 1, 4, True, False),     # zero initial state
    (16, 64, 100, 30, 2, True, True),    # chunk 64, second chunk partial
    (16, 16, 37, 0, 2, True, True),      # no iteration: x = step * q
]


@pytest.mark.parametrize("d, chunk_size, t, num_iter, hkv, with_beta, with_state", CASES)
def test_matches_reference_and_fp64(d, chunk_size, t, num_iter, hkv, with_beta, with_state):
    inp = make_inputs(seed=d + chunk_size + t + num_iter, t=t, hkv=hkv, d=d, with_beta=with_beta,
                      with_state=with_state)
    want, starts = run_reference(inp, num_iter, chunk_size)
    got = run_kernel(inp, starts, num_iter, chunk_size, loop="auto")
    assert got.shape == want.shape and got.dtype == jnp.float32
    assert rel(got, want) < 1e-5
    if num_iter == 30 and d == 16:   # the masked loop alone (the default for fp32 operands)
        assert rel(run_kernel(inp, starts, num_iter, chunk_size, loop="masked"), want) < 1e-5
    if num_iter > 0:
        assert rel(got, run_oracle(inp, num_iter)) < 1e-4


@pytest.mark.parametrize("log_decay_range", [(1.0, 3.0), (-30.0, -20.0)])
def test_strong_and_no_decay(log_decay_range):
    """Chunks whose decay span passes ``FACTORED_SPAN`` run the masked loop, the others the factored loop:
    g = -exp(U(1, 3)) (2.7 to 20 per token: spans of 113 to 189) puts 16-token chunks on both sides;
    g = -exp(U(-30, -20)) is no decay to fp32 precision."""
    chunk_size, t = 16, 80
    inp = make_inputs(seed=13, t=t, d=16)
    inp["g"] = (-np.exp(np.random.default_rng(2).uniform(*log_decay_range, size=inp["g"].shape))).astype(np.float32)
    spans = -np.cumsum(inp["g"].reshape(2, t // chunk_size, chunk_size, -1), axis=2)[:, :, -1]
    if log_decay_range[0] > 0:
        assert (spans > pallas_solve.FACTORED_SPAN).any() and (spans <= pallas_solve.FACTORED_SPAN).any()
    want, starts = run_reference(inp, 30, chunk_size)
    got = run_kernel(inp, starts, 30, chunk_size, loop="auto")
    assert np.isfinite(np.asarray(got)).all()
    assert rel(got, want) < 1e-5
    assert rel(got, run_oracle(inp, 30)) < 1e-4


def test_bfloat16_operands_and_inputs():
    """bf16 q/k inputs and bf16 dot operands (fp32 accumulation): 3e-2 vs the fp32 math on the same inputs."""
    inp = make_inputs(seed=11, t=48, d=32)
    inp["q"] = jnp.asarray(inp["q"], jnp.bfloat16)
    inp["k"] = jnp.asarray(inp["k"], jnp.bfloat16)
    want, starts = run_reference(inp, 30, 16)
    got = run_kernel(inp, starts, 30, 16, operand_dtype=jnp.bfloat16)
    assert rel(got, want) < 3e-2
    exact = {**inp, "q": np.asarray(inp["q"], np.float32), "k": np.asarray(inp["k"], np.float32)}
    assert rel(got, run_oracle(exact, 30)) < 3e-2


@pytest.mark.parametrize("with_alpha", [True, False])
def test_query_mix_in_the_kernel(with_alpha):
    """mixed_dtype: the kernel also returns q' = q + alpha (x - q) (alpha None: q' = x), computed in fp32
    from the fp32 x and stored in mixed_dtype; x comes back in x_dtype."""
    inp = make_inputs(seed=12, t=37, d=16)
    alpha = jnp.asarray(np.random.default_rng(1).uniform(size=inp["g"].shape), jnp.float32) if with_alpha else None
    want_x, starts = run_reference(inp, 10, 16)
    x, mixed = run_kernel(inp, starts, 10, 16, alpha=alpha, mixed_dtype=jnp.float32, loop="auto")
    assert x.dtype == mixed.dtype == jnp.float32
    want_mixed = want_x if alpha is None else inp["q"] + alpha[..., None] * (want_x - inp["q"])
    assert rel(x, want_x) < 1e-5 and rel(mixed, want_mixed) < 1e-5
    x_bf, mixed_bf = run_kernel(inp, starts, 10, 16, alpha=alpha, x_dtype=jnp.bfloat16, mixed_dtype=jnp.bfloat16)
    assert x_bf.dtype == mixed_bf.dtype == jnp.bfloat16
    assert rel(x_bf, want_x) < 4e-3 and rel(mixed_bf, want_mixed) < 4e-3   # bf16 rounding of the outputs only


@pytest.mark.skipif(not pallas_solve.AVAILABLE, reason="no Pallas Triton lowering in this jax")
@pytest.mark.skipif(jax.default_backend() == "gpu", reason="cuda export lowering needs no GPU; runs compiled there")
def test_lowers_for_gpu_with_segmented_starts():
    """The solve at C = 64, D = 128 with bf16 operands, the in-kernel q mix and Segmented starts (segment
    fix-up on load) lowers to Triton IR without a GPU."""
    from gka_jax.kernels import pallas_chunk

    b, t, h, hkv, d, c = 1, 300, 4, 2, 128, 64
    f32, bf16 = jnp.float32, jnp.bfloat16

    def run(q, k, beta, g, h_kk, alpha):
        (kk, _), _ = pallas_chunk.state_pass_segmented(k, k, beta, g, None, h_kk, h_kk, chunk_size=c,
                                                       segment_chunks=2, starts_dtype=bf16)
        return pallas_solve.chebyshev_solve(q, k, beta, g, kk, num_iter=30, ridge_strength=RIDGE, chunk_size=c,
                                            precision=jax.lax.Precision.DEFAULT, operand_dtype=bf16, alpha=alpha,
                                            x_dtype=bf16, mixed_dtype=bf16)

    gate = jax.ShapeDtypeStruct((b, t, h), f32)
    lowered = jax.jit(run).trace(jax.ShapeDtypeStruct((b, t, h, d), bf16), jax.ShapeDtypeStruct((b, t, hkv, d), bf16),
                                 gate, gate, jax.ShapeDtypeStruct((b, h, d, d), f32), gate
                                 ).lower(lowering_platforms=("cuda",))
    assert lowered.as_text().count("xla.gpu.triton") == 2


def test_rejects_bad_shapes():
    inp = make_inputs(seed=0, t=32)
    _, starts = run_reference(inp, 1, 16)
    with pytest.raises(ValueError, match="power of 2"):
        run_kernel(inp, starts, 1, 24)
    with pytest.raises(ValueError, match="h_kk_starts"):
        run_kernel(inp, starts[:, :, :1], 1, 16)
    with pytest.raises(ValueError, match="kv heads"):
        pallas_solve.chebyshev_solve(inp["q"], inp["k"][:, :, :1].repeat(3, axis=2), None, inp["g"], starts,
                                     num_iter=1, ridge_strength=RIDGE, chunk_size=16, interpret=True)

    with pytest.raises(ValueError, match="loop="):
        run_kernel(inp, starts, 1, 16, loop="unrolled")
