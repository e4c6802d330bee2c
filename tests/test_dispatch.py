"""The kernel dispatcher: Pallas kernels on GPU, the XLA path on CPU/TPU and for uncovered shapes, a
warning (never a crash) when the Pallas backend is missing, clear errors for impossible requests; and the
whole model run through the Pallas kernels (interpret mode) reproduces the goldens."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gka_jax
from gka_jax import kernels
from gka_jax.config import GKA

from conftest import load_case, rel

pytestmark = pytest.mark.filterwarnings("ignore:.*Triton.*:DeprecationWarning")


def test_selection_by_platform_and_shape():
    assert kernels.select_backend(platform="cpu") == "xla"
    assert kernels.select_backend(platform="tpu") == "xla"
    assert kernels.select_backend(platform="gpu") == "pallas"
    assert kernels.select_backend(platform="gpu", shapes_ok=False) == "xla"
    assert kernels.select_backend("xla", platform="gpu") == "xla"
    assert kernels.select_backend("xla", platform="gpu", shapes_ok=False) == "xla"   # xla covers every shape
    assert kernels.available_backends("cpu") == ("xla", "pallas_interpret")
    with pytest.raises(ValueError, match="needs a GPU"):
        kernels.select_backend("pallas", platform="cpu")
    with pytest.raises(ValueError, match="unknown GKA kernel backend 'triton'"):
        kernels.select_backend("triton")
    with pytest.raises(ValueError, match="does not cover these shapes"):
        kernels.select_backend("pallas", platform="gpu", shapes_ok=False)


def test_environment_variable_sets_the_default(monkeypatch):
    monkeypatch.setenv("GKA_KERNEL_BACKEND", "xla")
    assert kernels.select_backend(platform="gpu") == "xla"


def test_missing_pallas_backend_falls_back_with_a_warning(monkeypatch):
    monkeypatch.setitem(kernels._AVAILABLE, "pallas", False)
    monkeypatch.setattr(kernels, "_warned", set())
    with pytest.warns(RuntimeWarning, match="using the XLA path"):
        assert kernels.select_backend(platform="gpu") == "xla"
    with pytest.raises(ValueError, match="no Pallas Triton lowering"):
        kernels.select_backend("pallas", platform="gpu")


def _primitives(jaxpr, found=None):
    found = set() if found is None else found
    for eqn in jaxpr.eqns:
        found.add(eqn.primitive.name)
        for sub in jax.core.subjaxprs(eqn) if hasattr(jax.core, "subjaxprs") else ():
            _primitives(sub, found)
        for param in eqn.params.values():
            inner = getattr(param, "jaxpr", None)
            if inner is not None:
                _primitives(getattr(inner, "jaxpr", inner), found)
    return found


def test_model_forward_uses_pallas_on_gpu_and_xla_on_cpu(monkeypatch):
    """Trace (no lowering) the whole model's prefill and decode as they are dispatched on this platform and,
    with the platform reported as GPU, as they would be there."""
    cfg = gka_jax.preset("GKA-primed-HQwen3-8B-Reasoner")
    import dataclasses
    cfg = dataclasses.replace(cfg, layer_types=(GKA, "attention"), vocab_size=256)
    model = gka_jax.random_model(cfg, jnp.bfloat16, seed=0)

    def traced(t):
        cache = jax.eval_shape(lambda: model.init_cache(1, 128))
        tokens = jax.ShapeDtypeStruct((1, t), jnp.int32)
        valid = jax.ShapeDtypeStruct((1, t), bool)
        fn = lambda p, tok, c, v: gka_jax.runtime._forward(model.graphdef, p, tok, c, v, num_iter=2, fresh=t > 1,  # noqa: E731
                                                          backend=None, last_only=False)
        return _primitives(jax.make_jaxpr(fn)(model.params, tokens, cache, valid).jaxpr)

    gpu_kernels = {"pallas_call", "triton_kernel_call"}   # Pallas; the Gluon decode through jax-triton
    on_this = traced(64) | traced(1)
    assert bool(on_this & gpu_kernels) == (jax.default_backend() == "gpu")
    monkeypatch.setattr(kernels, "_platform", lambda: "gpu")
    assert "pallas_call" in traced(64)
    assert traced(1) & gpu_kernels


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (the CPU platform fakes them)")
def test_sharded_model_runs_the_kernels_per_shard():
    """On a multi-device mesh the Pallas kernels run once per shard (shard_map: batch over dp, heads over
    tp); the sharded model's prefill and decode equal the unsharded XLA path (interpret mode on CPU)."""
    import dataclasses
    cfg = dataclasses.replace(gka_jax.preset("GKA-primed-HQwen3-8B-Reasoner"), layer_types=(GKA, "attention"),
                              vocab_size=128, hidden_size=128, intermediate_size=128, num_heads=8, num_kv_heads=4,
                              head_dim=16)
    model = gka_jax.random_model(cfg, jnp.float32, seed=0)
    assert model.kernel_backend is None                     # one device: the automatic choice per platform
    sharded = model.shard(gka_jax.sharding.make_mesh(tp=4, dp=2))
    assert sharded.kernel_backend == "xla"                  # CPU mesh: the XLA path, partitioned by XLA
    per_shard = dataclasses.replace(sharded, backend="pallas_interpret")
    assert isinstance(per_shard.kernel_backend, kernels.PerShard)
    ids = np.asarray(jax.random.randint(jax.random.PRNGKey(0), (2, 40), 0, 128))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        want_logits, want_cache = model.prefill(ids, model.init_cache(2, 41))
        want_step, _ = model.decode(ids[:, 0], want_cache)
        got_logits, got_cache = per_shard.prefill(ids, per_shard.init_cache(2, 41))
        got_step, _ = per_shard.decode(ids[:, 0], got_cache)
    assert rel(got_logits, want_logits) < 1e-5
    assert rel(got_step, want_step) < 1e-5


@pytest.fixture(scope="module")
def tiny(golden):
    arrays, manifest = load_case("tiny_hybrid_qwen3")
    return gka_jax.load(golden / "tiny_hybrid_qwen3" / "checkpoint", dtype="float32"), arrays


def test_model_through_pallas_kernels_matches_goldens(tiny):
    """Prefill + decode of the golden tiny model with every GKA layer on the Pallas kernels (interpret mode
    on CPU, compiled on a GPU): prefill and decode logits equal the XLA path's (fp32, HIGHEST), which
    tests/test_model_golden.py checks against the goldens."""
    import dataclasses
    model, arrays = tiny
    ids = arrays["input_ids"][:1, :40]
    pallas = dataclasses.replace(model, backend="pallas" if jax.default_backend() == "gpu" else "pallas_interpret")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        got = np.asarray(pallas(ids))
        want = np.asarray(model(ids))
        assert rel(got, want) < 1e-5
        cache = pallas.init_cache(1, 48)
        logits, cache = pallas.prefill(ids, cache, last_only=True)
        step, cache = pallas.decode(jnp.argmax(logits[:, 0], -1), cache)
        ref_cache = model.init_cache(1, 48)
        ref_logits, ref_cache = model.prefill(ids, ref_cache, last_only=True)
        ref_step, _ = model.decode(jnp.argmax(ref_logits[:, 0], -1), ref_cache)
    assert rel(step, ref_step) < 1e-5


def test_decode_kernel_choice():
    """On a GPU the decode runs the Gluon kernel where it is installed, covers the shapes and has an item
    (b, h) for every SM (or is asked for by its options), else Pallas."""
    def arrays(d, dv=None):
        dv = dv or d
        return (np.zeros((2, 8, d)), np.zeros((2, 2, d)), np.zeros((2, 2, dv)), np.zeros((2, 8, d, d)),
                np.zeros((2, 8, d, dv)))

    assert kernels.decode_kernel(*arrays(128), gluon_available=True, multiprocessors=16) == "gluon"  # 16 items
    assert kernels.decode_kernel(*arrays(128), gluon_available=True, multiprocessors=132) == "pallas"
    assert kernels.decode_kernel(*arrays(128), gluon_available=True, multiprocessors=132,
                                 options={"form": "item"}) == "gluon"
    assert kernels.decode_kernel(*arrays(128), gluon_available=False) == "pallas"
    assert kernels.decode_kernel(*arrays(16), gluon_available=True, multiprocessors=16) == "pallas"  # D < 32
    assert kernels.decode_kernel(*arrays(64, 128), gluon_available=True, multiprocessors=16) == "pallas"  # D != Dv
    assert kernels.decode_kernel(*arrays(128), gluon_available=True, options={"split": False},
                                 multiprocessors=16) == "pallas"
    assert kernels.decode_kernel(*arrays(128), kernel="pallas", gluon_available=True) == "pallas"
    with pytest.raises(ValueError, match="covers D = Dv in"):
        kernels.decode_kernel(*arrays(16), kernel="gluon", gluon_available=True)
    with pytest.raises(ValueError, match="needs jax-triton"):
        kernels.decode_kernel(*arrays(128), kernel="gluon", gluon_available=False)
    with pytest.raises(ValueError, match="is not one of"):
        kernels.decode_kernel(*arrays(128), kernel="cuda")
    # The Gluon kernel's form: pipelined (persistent, warp-specialized) on Hopper where every SM gets an item.
    from gka_jax.kernels.gluon_decode import default_form
    assert default_form(128, 32 * 32, 132, hopper=True) == "pipelined"
    assert default_form(128, 1 * 32, 132, hopper=True) == "item"
    assert default_form(64, 32 * 32, 132, hopper=True) == "item"
    assert default_form(128, 32 * 32, 108, hopper=False) == "item"     # an A100: not measured there
    # h_kk read as its upper triangle (mirror) where the loads bound the step: up to num_iter 10, fp32 states,
    # the pipelined form with its three buffers.
    from gka_jax.kernels.gluon_decode import MIRROR_MAX_ITER, default_mirror
    assert MIRROR_MAX_ITER == 10
    assert default_mirror("pipelined", 3, True, 10) and default_mirror("pipelined", 3, True, 0)
    assert not default_mirror("pipelined", 3, True, 30)
    assert not default_mirror("pipelined", 2, True, 10)
    assert not default_mirror("pipelined", 3, False, 10)
    assert not default_mirror("item", 3, True, 10)


def test_gluon_options_are_refused_by_the_pallas_decode():
    """Tuning options of the Gluon decode kernel reaching the Pallas kernels (interpret mode here) are refused
    with the reason, not a TypeError."""
    q, k = jnp.zeros((1, 4, 16)), jnp.zeros((1, 2, 16))
    beta, h = jnp.zeros((1, 4)), jnp.zeros((1, 4, 16, 16))
    with pytest.raises(ValueError, match="mirror, slots: tuning of the Gluon decode kernel"):
        kernels.gka_decode(q, k, k, beta, beta, None, h, h, num_iter=1, ridge_strength=0.02, scale=0.25,
                           backend="pallas_interpret", slots=3, mirror=True)
    with pytest.raises(ValueError, match="value_partition: tuning of the Gluon decode kernel"):
        kernels.gka_decode(q, k, k, beta, beta, None, h, h, num_iter=1, ridge_strength=0.02, scale=0.25,
                           backend="pallas_interpret", value_partition="readback")


def test_pipelined_defaults_follow_num_iter(monkeypatch):
    """The pipelined decode's defaults (``LONG_SOLVE`` above ``MIRROR_MAX_ITER``, else ``SHORT_SOLVE``) as
    passed to the kernel: checked on CPU with the launch replaced (the kernels themselves: test_gluon_decode.py
    on a GPU)."""
    from gka_jax.kernels import gluon_decode
    launched = []

    def launch(*args, **kwargs):
        launched.append(kwargs)
        b, h, d = args[0].shape
        return jnp.zeros((b, h, d)), jnp.zeros((b, h, d)), args[7], args[8]
    monkeypatch.setattr(gluon_decode, "AVAILABLE", True)
    monkeypatch.setattr(gluon_decode, "on_hopper", lambda: True)
    monkeypatch.setattr(gluon_decode, "triton_call", launch)
    monkeypatch.setattr(gluon_decode, "_decode_ws_kernel", "ws", raising=False)
    b, h, hkv, d = 2, 4, 2, 128
    q, k, states = jnp.zeros((b, h, d)), jnp.zeros((b, hkv, d)), jnp.zeros((b, h, d, d))

    def tuning(num_iter, **options):
        gluon_decode.gka_decode(q, k, k, None, jnp.zeros((b, h)), None, states, states, num_iter=num_iter,
                                ridge_strength=0.02, scale=1.0, form="pipelined", **options)
        found = launched.pop()
        return {key: found[key] for key in ("VALUE", "SPREAD", "AHEAD", "MIRROR", "LOADER_WARPS")}
    assert gluon_decode.MIRROR_MAX_ITER == 10
    assert tuning(30) == dict(VALUE=1, SPREAD=4, AHEAD=1, MIRROR=0, LOADER_WARPS=4)
    assert tuning(11) == dict(VALUE=1, SPREAD=4, AHEAD=1, MIRROR=0, LOADER_WARPS=4)
    assert tuning(10) == dict(VALUE=0, SPREAD=0, AHEAD=0, MIRROR=1, LOADER_WARPS=1)
    assert tuning(30, loader_warps=1) == dict(VALUE=0, SPREAD=4, AHEAD=1, MIRROR=0, LOADER_WARPS=1)
    assert tuning(30, value_partition=False, spread_store=0, inputs_ahead=False) == dict(
        VALUE=0, SPREAD=0, AHEAD=0, MIRROR=0, LOADER_WARPS=1)
    assert tuning(10, value_partition=True) == dict(VALUE=1, SPREAD=0, AHEAD=0, MIRROR=1, LOADER_WARPS=4)
    monkeypatch.setattr(gluon_decode, "LONG_SOLVE", dict(gluon_decode.LONG_SOLVE, value_partition="loads"))
    assert tuning(30) == dict(VALUE=3, SPREAD=4, AHEAD=1, MIRROR=0, LOADER_WARPS=4)


def test_pipelined_decode_is_refused_off_hopper(monkeypatch):
    """A forced pipelined form on a machine without a Hopper GPU is refused with the reason, before any
    compile (the machine is made one without a Hopper GPU, so that the test also holds on an H100/H200)."""
    from gka_jax.kernels import gluon_decode
    monkeypatch.setattr(gluon_decode, "AVAILABLE", True)
    monkeypatch.setattr(gluon_decode, "on_hopper", lambda: False)
    b, h, hkv, d = 1, 4, 2, 128
    q, k = jnp.zeros((b, h, d)), jnp.zeros((b, hkv, d))
    states = jnp.zeros((b, h, d, d))
    with pytest.raises(ValueError, match="needs a Hopper GPU"):
        gluon_decode.gka_decode(q, k, k, None, jnp.zeros((b, h)), None, states, states, num_iter=1,
                                ridge_strength=0.02, scale=1.0, form="pipelined")


def test_gluon_kernels_need_the_releases_they_were_written_for():
    """Gluon is experimental and the adapter wraps jax-triton 0.3's internals: other releases keep the
    Pallas kernels (``gluon_call.AVAILABLE`` is False) instead of failing at compile time."""
    from gka_jax.kernels import gluon_call

    assert gluon_call.releases_supported("3.6.0", "0.3.1")
    assert gluon_call.releases_supported("3.6.1+git1234", "0.3.0")
    assert not gluon_call.releases_supported("3.7.0", "0.3.1")
    assert not gluon_call.releases_supported("3.6.0", "0.4.0")
    assert not gluon_call.releases_supported("unknown", "0.3.1")


def test_solve_kernel_choice():
    """The prefill solve runs the Gluon kernel for bf16 dot operands where it is installed and covers the
    shapes (C = 64, D in 64/128, one-segment starts), else the Pallas solve."""
    from gka_jax.kernels import pallas_chunk, pallas_prefill

    def arrays(d, chunks=3):
        return np.zeros((1, 150, 8, d)), np.zeros((1, 150, 2, d)), np.zeros((1, 8, chunks, d, d))

    bf16, f32 = jnp.bfloat16, jnp.float32

    def choice(*arrs, kernel="auto", chunk_size=64, operand_dtype=bf16, interpret=False, available=True):
        return pallas_prefill.solve_kernel(*arrs, kernel=kernel, chunk_size=chunk_size, operand_dtype=operand_dtype,
                                           interpret=interpret, gluon_available=available)

    assert choice(*arrays(128)) == "gluon"
    assert choice(*arrays(64)) == "gluon"
    assert choice(*arrays(128), available=False) == "pallas"
    assert choice(*arrays(128), operand_dtype=f32) == "pallas"     # TF32 / IEEE operands
    assert choice(*arrays(128), interpret=True) == "pallas"
    assert choice(*arrays(32)) == "pallas"                           # D not covered
    assert choice(*arrays(128, chunks=5), chunk_size=32) == "pallas"
    q, k, starts = arrays(128)
    one_segment = pallas_chunk.Segmented(starts, None, None, 3, 3)
    two_segments = pallas_chunk.Segmented(np.zeros((1, 8, 4, 128, 128)), np.zeros((1, 8, 2, 128, 128)),
                                          np.zeros((1, 8, 4)), 2, 3)
    assert choice(q, k, one_segment) == "gluon"
    assert choice(q, k, two_segments) == "pallas"                   # fix-up on load: Pallas only
    assert choice(*arrays(128), kernel="pallas") == "pallas"
    with pytest.raises(ValueError, match="bf16 dot operands only"):
        choice(*arrays(128), kernel="gluon", operand_dtype=f32)
    with pytest.raises(ValueError, match="needs jax-triton"):
        choice(*arrays(128), kernel="gluon", available=False)
    with pytest.raises(ValueError, match="is not one of"):
        choice(*arrays(128), kernel="cuda")


PTX = """.visible .entry k(
	.param .u64 .ptr .global .align 1 k_param_0,
	.param .u32 k_param_1,
	.param .u64 .ptr .global .align 1 k_param_2,
	.param .u64 .ptr .global .align 1 k_param_3,
	.param .u64 .ptr .global .align 1 k_param_4
)
{
	ld.param.b64 	%rd1, [k_param_0];
	ld.param.b64 	%rd3, [k_param_3];
	ld.param.b64 	%rd4, [k_param_2];
}
"""


def test_global_scratch_is_routed_to_the_kernels_own_output():
    """jaxlib passes null for Triton's hidden global-scratch parameter (the second-to-last); a kernel that makes
    TMA descriptors on the device gets an output of its own for them, and the PTX reads that instead."""
    from gka_jax.kernels import gluon_call

    routed = gluon_call.route_global_scratch(PTX, "k", 2, 3)
    assert "[k_param_3]" not in routed and routed.count("[k_param_2]") == 2
    assert routed.replace("%rd3, [k_param_2]", "%rd3, [k_param_3]") == PTX
    with pytest.raises(RuntimeError, match="expected 4 parameters"):
        gluon_call.route_global_scratch(PTX, "k", 2, 4)
    with pytest.raises(RuntimeError, match="never read"):
        gluon_call.route_global_scratch(PTX.replace("%rd3, [k_param_3]", "%rd3, [k_param_1]"), "k", 2, 3)


def test_pipelined_grid_spreads_the_last_turn():
    """One program per SM, unless most programs would take one item more than the rest: then as few programs as
    give every program that many items (the kernel walks items pid, pid + P, ... for any P)."""
    from gka_jax.kernels.gluon_decode import pipelined_programs

    assert pipelined_programs(1024, 132) == 128        # B=32, H=32: 128 x 8, not 100 x 8 + 32 x 7
    assert pipelined_programs(4096, 132) == 132        # B=128: 4 x 32 + 128 x 31 stays
    assert pipelined_programs(132, 132) == 132 and pipelined_programs(40, 132) == 40
    assert pipelined_programs(1000, 132) == 125 and pipelined_programs(1204, 132) == 132
    for items in range(1, 3000, 7):
        programs = pipelined_programs(items, 132)
        assert programs <= min(items, 132) and -(-items // programs) == -(-items // min(items, 132))
