"""The Pallas state-pass, GLA-output and fused GLA kernels against the pure-JAX reference and the float64 oracle.

On CPU the kernels run with interpret=True (on a GPU backend they run compiled). Tolerances: relative
Frobenius error <= 1e-5 against the fp32 reference and between the fused and two-kernel paths (all
HIGHEST), <= 1e-4 against float64; bf16 chunk starts <= 4e-3 against fp32 ones (bf16 keeps 8 mantissa bits:
<= 2^-9 per element). ``test_lowers_for_gpu`` checks the Triton lowering (TTIR generation, not the Triton
compiler) at the production tile sizes without a GPU; it is skipped on a GPU backend (the cuda export
lowering fails there with "No supported GPU devices found", and the other tests run compiled).
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
TOL_REF, TOL_FP64, TOL_BF16_STARTS = 1e-5, 1e-4, 4e-3

# d, dv, chunk, t, kv heads, beta, separate g_kk, initial states, tunables (state pass / output and fused
# block_v)
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
        fused = pallas_chunk.gla_fused(q, k, v, beta, g, h_kv, scale=scale, chunk_size=chunk,
                                       interpret=INTERPRET, block_v=out_block_v)
        k_x, v_x = reference.expand_heads(k, v, beta, q.shape[2])
        ref_states = reference.chunk_state_pass(k_x, v_x, g, h_kk, h_kv, g_kk=g_kk, chunk_size=chunk)
        ref_o = reference.gla_chunked(q, k_x, v_x, g, ref_states[1], scale=scale, chunk_size=chunk)
        return states, o, fused, ref_states, ref_o

    states, o, (fused_o, fused_h_kv), ref_states, ref_o = kernels_and_reference(
        inp["q"], inp["k"], inp["v"], beta, inp["g"], g_kk, inp["h_kk"], inp["h_kv"])
    for got, want in zip(states, ref_states):
        assert got.dtype == jnp.float32
        assert rel(got, want) < TOL_REF
    assert o.dtype == jnp.float32 and rel(o, ref_o) < TOL_REF
    # The fused kernel against the two-kernel path and the reference.
    assert fused_o.dtype == fused_h_kv.dtype == jnp.float32
    assert rel(fused_o, o) < TOL_REF and rel(fused_h_kv, states[3]) < TOL_REF
    assert rel(fused_o, ref_o) < TOL_REF and rel(fused_h_kv, ref_states[3]) < TOL_REF

    # num_iter = 0: o_t = scale * S_t^T q_t, so the composition is plain GLA.
    want = oracle.gka_core_fp64(inp["q"], inp["k"], inp["v"], beta, inp["g"], None, inp["h_kk"], inp["h_kv"],
                                num_iter=0, ridge_strength=0.02, scale=scale, g_kk=g_kk)
    assert rel(states[2], want["h_kk"]) < TOL_FP64
    assert rel(states[3], want["h_kv"]) < TOL_FP64
    assert rel(o, want["o"]) < TOL_FP64
    assert rel(fused_h_kv, want["h_kv"]) < TOL_FP64
    assert rel(fused_o, want["o"]) < TOL_FP64


@pytest.mark.parametrize("separate_g_kk", [True, False])
def test_kk_only_and_bf16_starts(separate_g_kk):
    """kk_only equals the h_kk half of the full pass; bf16 starts round the fp32 ones, finals stay fp32."""
    d, chunk, t = 32, 16, 37
    inp = make_inputs(seed=3, b=1, t=t, h=4, hkv=2, d=d, with_state=True)
    rng = np.random.default_rng(5)
    g_kk = (-np.exp(rng.uniform(-4, 1, size=inp["g"].shape))).astype(np.float32) if separate_g_kk else None

    @jax.jit
    def passes(k, v, beta, g, g_kk, h_kk, h_kv):
        full = pallas_chunk.state_pass(k, v, beta, g, g_kk, h_kk, h_kv, chunk_size=chunk, interpret=INTERPRET)
        kk = pallas_chunk.state_pass(k, None, beta, g, g_kk, h_kk, None, chunk_size=chunk, interpret=INTERPRET,
                                     kk_only=True, block_v=16)
        kk_bf16 = pallas_chunk.state_pass(k, None, beta, g, g_kk, h_kk, None, chunk_size=chunk,
                                          interpret=INTERPRET, kk_only=True, starts_dtype=jnp.bfloat16)
        return full, kk, kk_bf16

    full, kk, kk_bf16 = passes(inp["k"], inp["v"], inp["beta"], inp["g"], g_kk, inp["h_kk"], inp["h_kv"])
    assert len(kk) == len(kk_bf16) == 2
    assert kk[0].dtype == kk[1].dtype == kk_bf16[1].dtype == jnp.float32
    assert rel(kk[0], full[0]) < 1e-6 and rel(kk[1], full[2]) < 1e-6
    assert kk_bf16[0].dtype == jnp.bfloat16
    assert rel(kk_bf16[0], full[0]) < TOL_BF16_STARTS
    assert rel(kk_bf16[1], full[2]) < 1e-6


@pytest.mark.parametrize("segment_chunks", [1, 2, 3])
def test_segmented_state_pass(segment_chunks):
    """Segments run in parallel, then fixed up: state_pass (fix-up in XLA) and gla_output fed the Segmented
    starts (fix-up in the kernel) equal the unsegmented pass; 7 chunks (T = 100, chunk 16), so segments of
    2 and 3 pad the last one."""
    d, chunk, t = 16, 16, 100
    inp = make_inputs(seed=17, b=2, t=t, h=4, hkv=2, d=d, with_state=True)
    g_kk = (-np.exp(np.random.default_rng(2).uniform(-4, 1, size=inp["g"].shape))).astype(np.float32)

    @jax.jit
    def run(q, k, v, beta, g, g_kk, h_kk, h_kv):
        common = dict(chunk_size=chunk, interpret=INTERPRET)
        plain = pallas_chunk.state_pass(k, v, beta, g, g_kk, h_kk, h_kv, **common)
        resolved = pallas_chunk.state_pass(k, v, beta, g, g_kk, h_kk, h_kv, segment_chunks=segment_chunks,
                                           **common)
        (_, kv_seg), finals = pallas_chunk.state_pass_segmented(k, v, beta, g, g_kk, h_kk, h_kv,
                                                                segment_chunks=segment_chunks, **common)
        o_plain = pallas_chunk.gla_output(q, k, v, beta, g, plain[1], scale=0.25, **common)
        o_seg = pallas_chunk.gla_output(q, k, v, beta, g, kv_seg, scale=0.25, **common)
        return plain, resolved, finals, o_plain, o_seg

    plain, resolved, finals, o_plain, o_seg = run(inp["q"], inp["k"], inp["v"], inp["beta"], inp["g"], g_kk,
                                                  inp["h_kk"], inp["h_kv"])
    for got, want in zip(resolved, plain):
        assert got.shape == want.shape and rel(got, want) < TOL_REF
    assert rel(finals[0], plain[2]) < TOL_REF and rel(finals[1], plain[3]) < TOL_REF
    assert rel(o_seg, o_plain) < TOL_REF


def test_bf16_output_operands():
    """operand_dtype bf16 (DEFAULT models): the output dots take bf16 q', k, v, S (fp32 accumulation); the
    fused kernel's state update keeps fp32 operands, so its final h_kv is unchanged. Against float64 with
    bf16 q'/k/v inputs: o within bf16 rounding (<= 1e-2, observed ~3e-3), h_kv as in fp32 (<= 1e-4)."""
    d, chunk, t = 32, 16, 37
    inp = make_inputs(seed=13, b=2, t=t, h=4, hkv=2, d=d, with_state=True)
    bf = {n: jnp.asarray(inp[n], jnp.bfloat16) for n in ("q", "k", "v")}
    exact = {n: np.asarray(bf[n], np.float32) for n in bf}
    scale = d ** -0.5

    @jax.jit
    def run(q, k, v, beta, g, h_kk, h_kv):
        states = pallas_chunk.state_pass(k, v, beta, g, None, h_kk, h_kv, chunk_size=chunk, interpret=INTERPRET,
                                         starts_dtype=jnp.bfloat16)
        o = pallas_chunk.gla_output(q, k, v, beta, g, states[1], scale=scale, chunk_size=chunk,
                                    interpret=INTERPRET, operand_dtype=jnp.bfloat16)
        fused = pallas_chunk.gla_fused(q, k, v, beta, g, h_kv, scale=scale, chunk_size=chunk, interpret=INTERPRET,
                                       operand_dtype=jnp.bfloat16)
        return o, fused

    o, (fused_o, fused_h_kv) = run(bf["q"], bf["k"], bf["v"], inp["beta"], inp["g"], inp["h_kk"], inp["h_kv"])
    want = oracle.gka_core_fp64(exact["q"], exact["k"], exact["v"], inp["beta"], inp["g"], None, inp["h_kk"],
                                inp["h_kv"], num_iter=0, ridge_strength=0.02, scale=scale)
    assert o.dtype == fused_o.dtype == jnp.float32
    assert rel(o, want["o"]) < 1e-2 and rel(fused_o, want["o"]) < 1e-2
    assert rel(fused_h_kv, want["h_kv"]) < TOL_FP64


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
    with pytest.raises(ValueError, match="block_v"):
        pallas_chunk.gla_fused(inp["q"], inp["k"], inp["v"], None, inp["g"], inp["h_kv"], scale=1.0,
                               block_v=8, interpret=True)


@pytest.mark.skipif(not pallas_chunk.AVAILABLE, reason="no Pallas Triton lowering in this jax")
@pytest.mark.skipif(jax.default_backend() == "gpu", reason="cuda export lowering needs no GPU; runs compiled there")
@pytest.mark.parametrize("gates", [True, False])
def test_lowers_for_gpu(gates):
    """All kernels lower to Triton IR at D = Dv = 128, chunk 64, bf16 k/v, ragged T (no GPU needed)."""
    b, t, h, hkv, d, c = 1, 300, 4, 2, 128, 64
    f32, bf16 = jnp.float32, jnp.bfloat16
    k = jax.ShapeDtypeStruct((b, t, hkv, d), bf16)
    g = jax.ShapeDtypeStruct((b, t, h), f32)
    gate = g if gates else None
    state = jax.ShapeDtypeStruct((b, h, d, d), f32)
    starts = jax.ShapeDtypeStruct((b, h, -(-t // c), d, d), f32)

    def run(q, k, v, beta, g, g_kk, h_kk, h_kv, starts):
        states = pallas_chunk.state_pass(k, v, beta, g, g_kk, h_kk, h_kv, chunk_size=c, block_k=64)
        kk_bf16 = pallas_chunk.state_pass(k, None, beta, g, g_kk, h_kk, None, chunk_size=c, kk_only=True,
                                          starts_dtype=bf16)
        o = pallas_chunk.gla_output(q, k, v, beta, g, starts, scale=0.1, chunk_size=c)
        fused = [pallas_chunk.gla_fused(q, k, v, beta, g, h_kv, scale=0.1, chunk_size=c, block_v=block_v)
                 for block_v in (32, 128)]
        bf16_operands = (  # DEFAULT models: bf16 q' and starts, bf16 output dots
            pallas_chunk.gla_output(q.astype(bf16), k, v, beta, g, starts.astype(bf16), scale=0.1, chunk_size=c,
                                    operand_dtype=bf16),
            pallas_chunk.gla_fused(q.astype(bf16), k, v, beta, g, h_kv, scale=0.1, chunk_size=c, block_v=32,
                                   operand_dtype=bf16))
        segmented, _ = pallas_chunk.state_pass_segmented(k, v, beta, g, g_kk, h_kk, h_kv, chunk_size=c,
                                                         segment_chunks=2, starts_dtype=bf16)
        o_segmented = pallas_chunk.gla_output(q.astype(bf16), k, v, beta, g, segmented[1], scale=0.1,
                                              chunk_size=c, operand_dtype=bf16, out_dtype=bf16)
        return states, kk_bf16, o, fused, bf16_operands, o_segmented

    lowered = jax.jit(run).trace(jax.ShapeDtypeStruct((b, t, h, d), f32), k, k, gate, g, gate, state, state,
                                 starts).lower(lowering_platforms=("cuda",))
    assert lowered.as_text().count("xla.gpu.triton") == 9


def test_bf16_update_operands():
    """``operand_dtype=bfloat16`` rounds the weighted keys and the values to bf16 for the update dot (the
    reference's chunk kernels do so; fp32 accumulation): chunk starts and final states stay within bf16
    rounding (<= 4e-3) of the fp32-operand pass, which matches float64 to 1e-4 (test above)."""
    d, chunk, t = 32, 16, 100
    inp = make_inputs(seed=23, b=2, t=t, h=4, hkv=2, d=d, with_state=True)

    @jax.jit
    def run(k, v, beta, g, h_kk, h_kv):
        common = dict(chunk_size=chunk, interpret=INTERPRET)
        fp32 = pallas_chunk.state_pass_segmented(k, v, beta, g, None, h_kk, h_kv, **common)
        bf16 = pallas_chunk.state_pass_segmented(k, v, beta, g, None, h_kk, h_kv, operand_dtype=jnp.bfloat16,
                                                 **common)
        return fp32, bf16

    (starts32, finals32), (starts16, finals16) = run(inp["k"], inp["v"], inp["beta"], inp["g"], inp["h_kk"],
                                                     inp["h_kv"])
    for got, want in zip(finals16 + tuple(s.starts for s in starts16), finals32 + tuple(s.starts for s in starts32)):
        assert got.dtype == want.dtype == jnp.float32
        assert 0 < rel(got, want) < TOL_BF16_STARTS
