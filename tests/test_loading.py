"""Loading HF checkpoints: bad inputs give one clear error naming the tensor or file."""

import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import gka_jax
from gka_jax import CheckpointError, ConfigError


@pytest.fixture()
def ckpt(golden, tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(golden / "tiny_hybrid_qwen3" / "checkpoint", folder)
    return folder


def rewrite(folder, change):
    tensors = load_file(folder / "model.safetensors")
    change(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def test_missing_tensor(ckpt):
    rewrite(ckpt, lambda t: t.pop("model.layers.1.gka.A_log"))
    with pytest.raises(CheckpointError, match=r"missing tensor: model\.layers\.1\.gka\.A_log"):
        gka_jax.load(ckpt)


def test_unexpected_tensor(ckpt):
    rewrite(ckpt, lambda t: t.update({"model.layers.0.self_attn.extra.weight": np.zeros(3, np.float32)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensor .*model\.layers\.0\.self_attn\.extra\.weight"):
        gka_jax.load(ckpt)


def test_misshaped_tensor(ckpt):
    rewrite(ckpt, lambda t: t.update({"model.layers.4.gka.q_proj.weight": np.zeros((128, 128), np.float32)}))
    with pytest.raises(CheckpointError, match=r"model\.layers\.4\.gka\.q_proj\.weight has shape \[128, 128\], "
                                              r"expected \[256, 128\]"):
        gka_jax.load(ckpt)


def test_config_that_disagrees_with_tensors(ckpt):
    config = json.loads((ckpt / "config.json").read_text())
    config["hybrid_override_pattern"] = "*-*-*-*-GKA-GKA"
    config["layer_types"] = None
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"missing tensors: model\.layers\.1\.self_attn"):
        gka_jax.load(ckpt)


def test_unsupported_layer_type(ckpt):
    config = json.loads((ckpt / "config.json").read_text())
    config["hybrid_override_pattern"] = "*-GDN-*-*-GKA-GKA"
    config["layer_types"] = None
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="layer 1 has unsupported layer type 'GDN'"):
        gka_jax.load(ckpt)


def test_truncated_file(ckpt):
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors: not a readable safetensors file"):
        gka_jax.load(ckpt)


def test_garbage_file(ckpt):
    (ckpt / "model.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        gka_jax.load(ckpt)


def test_missing_shard(golden, tmp_path):
    folder = tmp_path / "sharded"
    shutil.copytree(golden / "tiny_hybrid_qwen3" / "checkpoint_sharded", folder)
    (folder / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError, match="shard model-00002-of-00003.safetensors listed in "
                                              "model.safetensors.index.json is missing"):
        gka_jax.load(folder)


def test_empty_folder(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        gka_jax.load(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(gka_jax.preset("GKA-primed-HQwen3-8B-Reasoner").to_hf()))
    with pytest.raises(CheckpointError, match="has neither model.safetensors nor model.safetensors.index.json"):
        gka_jax.load(tmp_path)


def test_bf16_checkpoint_and_dtype_conversion(ckpt, golden):
    """A bf16 checkpoint loads (fp32 on request), and tied embeddings need no lm_head tensor."""
    import ml_dtypes

    tensors = load_file(ckpt / "model.safetensors")
    save_file({k: v.astype(ml_dtypes.bfloat16) for k, v in tensors.items()}, ckpt / "model.safetensors")
    model = gka_jax.load(ckpt, dtype="float32")
    assert model.dtype == np.float32
    ids = np.arange(10)[None] % 512
    assert np.all(np.isfinite(np.asarray(model(ids))))
    # Tied: drop lm_head, set the flag; logits then use the embedding matrix.
    config = json.loads((ckpt / "config.json").read_text())
    config["tie_word_embeddings"] = True
    (ckpt / "config.json").write_text(json.dumps(config))
    rewrite(ckpt, lambda t: t.pop("lm_head.weight"))
    tied = gka_jax.load(ckpt, dtype="float32")
    emb = np.asarray(tied.params["embed"]["embedding"].get_value())
    hidden_to_logits = np.asarray(tied(ids))
    assert hidden_to_logits.shape == (1, 10, 512)
    assert "lm_head" not in tied.params
    assert emb.shape == (512, 128)
