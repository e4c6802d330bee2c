"""The Pallas state-pass and GLA-output kernels against the pure-JAX reference and the float64 oracle.

On CPU the kernels run with interpret=True (on a GPU backend they run compiled). Tolerances: relative
Frobenius error <= 1e-5 against the fp32 reference (both HIGHEST), <= 1e-4 against float64.
``test_lowers_for_gpu`` checks the Triton lowering (TTIR generation, not the Triton compiler) at the
production tile sizes without a GPU.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel
from test_kernels import make_inputs

from gka_jax.kernels import oracle, pallas_chunk, reference

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the Triton lowering's, on jax >= 0.11

INTERPRET = jax.default_backend() != "gpu"
TOL_REF, TOL_FP64 = 1e-5, 1e-4

# d, dv, chunk, t, kv heads, beta, separate g_kk, initial states, tunables (state pass / output block_v)
CASES = {
    "d16-c16-t48-gqa": (16, 16, 16, 48, 2, True, False, True, {}),
    "d16-c16-t37-mha-nobeta-gkk": (16, 16, 16, 37, 4, False, True, True, {}),
    "d32-dv16-c32-t37-gkk": (32, 16, 32, 37, 2, True, True, True, {}),
    "d16-dv32-c64-t100-zero-state": (16, 32, 64, 100, 4, True, False, False, {}),
    "d32-c16-t48-small-blocks": (32, 32, 16, 48, 2, True, True, True,
                                 {"block_k": 16, "block_v": 16, "out_block_v": 16}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference_and_oracle(name):
    d, dv, chunk, t, hkv, use_beta, separate_g_kk, with_state, tunables = CASES[name]
    inp = make_inputs(seed=len(name), b=2, t=t, h=4, hkv=hkv, d=d, dv=dv, with_state=with_state)
    beta = inp["beta"] if use_beta else None
    rng = np.random.default_rng(7)
    g_kk = (-np.exp(rng.uniform(-4, 1, size=inp["g"].shape))).astype(np.float32) if separate_g_kk else None
    scale = d ** -0.5
    tunables = dict(tunables)
    out_block_v = tunables.pop("out_block_v", None)

    @jax.jit
    def kernels_and_reference(q, k, v, beta, g, g_kk, h_kk, h_kv):
        states = pallas_chunk.state_pass(k, v, beta, g, g_kk, h_kk, h_kv, chunk_size=chunk,
                                         interpret=INTERPRET, **tunables)
        o = pallas_chunk.gla_output(q, k, v, beta, g, states[1], scale=scale, chunk_size=chunk,
                                    interpret=INTERPRET, block_v=out_block_v)
        k_x, v_x = reference.expand_heads(k, v, beta, q.shape[2])
        ref_states = reference.chunk_state_pass(k_x, v_x, g, h_kk, h_kv, g_kk=g_kk, chunk_size=chunk)
        ref_o = reference.gla_chunked(q, k_x, v_x, g, ref_states[1], scale=scale, chunk_size=chunk)
        return states, o, ref_states, ref_o

    states, o, ref_states, ref_o = kernels_and_reference(
        inp["q"], inp["k"], inp["v"], beta, inp["g"], g_kk, inp["h_kk"], inp["h_kv"])
    for got, want in zip(states, ref_states):
        assert got.dtype == jnp.float32
        assert rel(got, want) < TOL_REF
    assert o.dtype == jnp.float32 and rel(o, ref_o) < TOL_REF

    # num_iter = 0: o_t = scale * S_t^T q_t, so the composition is plain GLA.
    want = oracle.gka_core_fp64(inp["q"], inp["k"], inp["v"], beta, inp["g"], None, inp["h_kk"], inp["h_kv"],
                                num_iter=0, ridge_strength=0.02, scale=scale, g_kk=g_kk)
    assert rel(states[2], want["h_kk"]) < TOL_FP64
    assert rel(states[3], want["h_kv"]) < TOL_FP64
    assert rel(o, want["o"]) < TOL_FP64


def test_rejects_bad_blocks():
    inp = make_inputs(seed=0, b=1, t=16, h=2, hkv=2, d=32)
    args = (inp["k"], inp["v"], None, inp["g"], None, inp["h_kk"], inp["h_kv"])
    with pytest.raises(ValueError, match="block_v"):
        pallas_chunk.state_pass(*args, block_v=24, interpret=True)
    with pytest.raises(ValueError, match="chunk_size"):
        pallas_chunk.state_pass(*args, chunk_size=8, interpret=True)
    with pytest.raises(ValueError, match="chunks"):
        pallas_chunk.gla_output(inp["q"], inp["k"], inp["v"], None, inp["g"], jnp.zeros((1, 2, 3, 32, 32)),
                                scale=1.0, chunk_size=16, interpret=True)


@pytest.mark.skipif(not pallas_chunk.AVAILABLE, reason="no Pallas Triton lowering in this jax")
@pytest.mark.parametrize("gates", [True, False])
def test_lowers_for_gpu(gates):
    """Both kernels lower to Triton IR at D = Dv = 128, chunk 64, bf16 k/v, ragged T (no GPU needed)."""
    b, t, h, hkv, d, c = 1, 300, 4, 2, 128, 64
    f32, bf16 = jnp.float32, jnp.bfloat16
    k = jax.ShapeDtypeStruct((b, t, hkv, d), bf16)
    g = jax.ShapeDtypeStruct((b, t, h), f32)
    gate = g if gates else None
    state = jax.ShapeDtypeStruct((b, h, d, d), f32)
    starts = jax.ShapeDtypeStruct((b, h, -(-t // c), d, d), f32)

    def run(q, k, v, beta, g, g_kk, h_kk, h_kv, starts):
        states = pallas_chunk.state_pass(k, v, beta, g, g_kk, h_kk, h_kv, chunk_size=c, block_k=64)
        return states, pallas_chunk.gla_output(q, k, v, beta, g, starts, scale=0.1, chunk_size=c)

    lowered = jax.jit(run).trace(jax.ShapeDtypeStruct((b, t, h, d), f32), k, k, gate, g, gate, state, state,
                                 starts).lower(lowering_platforms=("cuda",))
    assert lowered.as_text().count("xla.gpu.triton") == 2
