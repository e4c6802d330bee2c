"""Config parsing and validation (HF config.json of model_type hybrid_qwen3), RoPE frequency rules."""

import json
import math

import jax.numpy as jnp
import numpy as np
import pytest

import gka_jax
from gka_jax.config import ATTENTION, GKA, ConfigError, GKAConfig, ModelConfig, RopeConfig, preset
from gka_jax.rope import rope_cos_sin, static_inv_freq


@pytest.fixture()
def raw(golden):
    return json.loads((golden / "tiny_hybrid_qwen3" / "checkpoint" / "config.json").read_text())


def test_golden_config(raw):
    cfg = ModelConfig.from_hf(raw)
    assert cfg.layer_types == (ATTENTION, GKA, ATTENTION, ATTENTION, GKA, GKA)
    assert (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size) == (512, 128, 128)
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (4, 2, 64)
    assert cfg.rope == RopeConfig(theta=5e6)
    assert cfg.gka == GKAConfig()
    assert cfg.dtype == "float32" and not cfg.tie_word_embeddings
    assert ModelConfig.from_hf(cfg.to_hf()) == cfg


def test_gka_defaults():
    gka = GKAConfig.from_hf({})
    assert (gka.num_iter, gka.ridge_strength, gka.conv_size, gka.chunk_size) == (30, 0.02, 4, 64)
    assert all([gka.use_gate, gka.use_beta_gate, gka.use_alpha_connection, gka.use_v_conv,
                gka.use_forgetting_gate, gka.use_forgetting_gate_kk, gka.gla_rescale])
    assert gka.kv_proj_rank is None and not gka.kv_learnable_residual and gka.norm_eps == 1e-6


def test_transformers4_rope_spelling(raw):
    del raw["rope_parameters"]
    raw["rope_theta"] = 1e6
    raw["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    cfg = ModelConfig.from_hf(raw)
    assert cfg.rope.kind == "yarn" and cfg.rope.theta == 1e6 and cfg.rope.factor == 4.0
    assert cfg.rope.original_max_position_embeddings == 32768
    raw["rope_scaling"] = None
    assert ModelConfig.from_hf(raw).rope == RopeConfig(theta=1e6)
    raw["rope_scaling"] = {"type": "linear", "factor": 2.0}
    assert ModelConfig.from_hf(raw).rope == RopeConfig(theta=1e6, kind="linear", factor=2.0)


@pytest.mark.parametrize("change, message", [
    ({"hybrid_override_pattern": "*-GKA-*-*-M2-GKA", "layer_types": None}, "layer 4 has unsupported layer type 'M2'"),
    ({"hybrid_override_pattern": "*-GKA-*", "layer_types": None}, "3 layers but num_hidden_layers is 6"),
    ({"layer_types": ["*", "GKA", "*", "*", "GKA", "*"]}, "disagrees with hybrid_override_pattern"),
    ({"model_type": "llama"}, "model_type 'llama' is not supported"),
    ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}}, "rope type 'longrope' is not supported"),
    ({"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4}}, "needs a 'factor'"),
    ({"gka_config": {"num_iter": -1}}, "num_iter must be an integer >= 0"),
    ({"gka_config": {"solver_type": "cg"}}, "solver_type 'cg' is not supported"),
    ({"gka_config": {"num_iters": 3}}, "unknown keys \\['num_iters'\\]"),
    ({"num_attention_heads": 3}, "multiple of num_key_value_heads"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"vocab_size": 0}, "vocab_size must be a positive integer"),
])
def test_bad_configs_name_the_problem(raw, change, message):
    raw.update(change)
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_hf(raw)


def test_missing_field_and_bad_file(raw, tmp_path):
    del raw["hidden_size"]
    with pytest.raises(ConfigError, match="missing 'hidden_size'"):
        ModelConfig.from_hf(raw)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_file(tmp_path)
    with pytest.raises(ConfigError, match="no config.json"):
        ModelConfig.from_file(tmp_path / "nowhere")


def test_8b_preset():
    cfg = preset("GKA-primed-HQwen3-8B-Reasoner")
    assert cfg.num_layers == 36 and cfg.layer_types.count(GKA) == 18
    assert (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (4096, 32, 8, 128)
    assert (cfg.intermediate_size, cfg.vocab_size, cfg.rope.theta) == (12288, 151936, 5e6)
    table = gka_jax.params.param_table(cfg)
    total = sum(math.prod(e.shape) for e in table)
    assert 7.5e9 < total < 9e9  # "~8B"
    with pytest.raises(ConfigError, match="unknown preset"):
        preset("nope")


# --------------------------------------------------------------------------- RoPE, in float64 from the formulas
def hf_default_inv_freq(theta, dim):
    return 1.0 / theta ** (np.arange(0, dim, 2) / dim)


def test_rope_default_and_linear():
    inv, scale = static_inv_freq(RopeConfig(theta=5e6), 64, 4096)
    np.testing.assert_allclose(inv, hf_default_inv_freq(5e6, 64), rtol=1e-6)
    assert scale == 1.0
    inv, _ = static_inv_freq(RopeConfig(theta=1e4, kind="linear", factor=4.0), 64, 4096)
    np.testing.assert_allclose(inv, hf_default_inv_freq(1e4, 64) / 4, rtol=1e-6)


def test_rope_yarn():
    """YaRN (Peng et al.): interpolate low frequencies by 1/factor, keep high ones, ramp between the
    correction dims for beta_fast=32 / beta_slow=1; attention scale 0.1 ln(factor) + 1."""
    dim, theta, factor, original = 128, 1e6, 4.0, 32768
    rope = RopeConfig(theta=theta, kind="yarn", factor=factor)
    inv, scale = static_inv_freq(rope, dim, original)
    base = hf_default_inv_freq(theta, dim)

    def corr(rot):
        return dim * math.log(original / (rot * 2 * math.pi)) / (2 * math.log(theta))

    low, high = math.floor(corr(32)), math.ceil(corr(1))
    ramp = np.clip((np.arange(dim // 2) - low) / (high - low), 0, 1)
    want = base / factor * ramp + base * (1 - ramp)
    np.testing.assert_allclose(inv, want, rtol=1e-6)
    assert scale == pytest.approx(0.1 * math.log(factor) + 1)
    # With original_max_position_embeddings the factor is max_position / original (HF rule).
    inv2, scale2 = static_inv_freq(RopeConfig(theta=theta, kind="yarn", factor=2.0,
                                              original_max_position_embeddings=original // 4), dim, original)
    assert scale2 == pytest.approx(0.1 * math.log(4.0) + 1)


def test_rope_dynamic_ntk():
    dim, theta, factor, original = 64, 1e4, 2.0, 100
    rope = RopeConfig(theta=theta, kind="dynamic", factor=factor)
    short = jnp.arange(50)[None]
    cos, sin = rope_cos_sin(rope, dim, original, short)
    want = np.outer(np.arange(50), hf_default_inv_freq(theta, dim))
    np.testing.assert_allclose(np.asarray(cos[0]), np.cos(want), atol=1e-5)
    long = jnp.arange(300)[None]
    cos, _ = rope_cos_sin(rope, dim, original, long)
    new_base = theta * ((factor * 300 / original) - (factor - 1)) ** (dim / (dim - 2))
    want = np.outer(np.arange(300), hf_default_inv_freq(new_base, dim))
    np.testing.assert_allclose(np.asarray(cos[0]), np.cos(want), atol=2e-4)
