"""gka-jax convert / export: HF safetensors <-> Orbax.

Checks: convert -> load gives the same logits as loading the HF folder (bit-equal); convert -> export
reproduces every original tensor bit for bit; restore onto 8 fake devices with tp=4,dp=2 and tp=8 puts
every array on its NamedSharding; every bad input fails with one line naming the file or tensor, a
non-zero exit, and no DST (nor temporary folder) left behind.
"""

import json
import os
import shutil
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import gka_jax
from gka_jax.config import ATTENTION, GKA, GKAConfig, ModelConfig, RopeConfig
from gka_jax.convert import ConvertError, convert, export, read_metadata
from gka_jax.hf_checkpoint import HFCheckpoint
from gka_jax.params import flat_variables, param_table, to_hf

from conftest import REPO, load_case


def write_hf(model: gka_jax.Model, folder, max_shard_bytes=None):
    """Write a model's parameters as an HF checkpoint folder (exact HF names and shapes)."""
    os.makedirs(folder, exist_ok=True)
    params = {path: np.asarray(var.get_value()) for path, var in flat_variables(model.params)}
    tensors = {e.hf_name: to_hf(e.groups, params[e.path]) for e in param_table(model.config)}
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(model.config.to_hf(), f)
    if max_shard_bytes is None:
        save_file(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
        return
    shards, current, size = [], {}, 0
    for name in sorted(tensors):
        if current and size + tensors[name].nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = tensors[name]
        size += tensors[name].nbytes
    shards.append(current)
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(folder, fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


def synthetic_config(**gka):
    return ModelConfig(vocab_size=320, hidden_size=64, intermediate_size=96, num_heads=8, num_kv_heads=4,
                       head_dim=16, layer_types=(GKA, ATTENTION, GKA, ATTENTION), rope=RopeConfig(theta=1e4),
                       gka=GKAConfig(chunk_size=16, **gka), dtype="bfloat16")


def assert_same_tensors(folder_a, folder_b):
    a, b = HFCheckpoint(folder_a), HFCheckpoint(folder_b)
    assert a.names() == b.names()
    for name in a.names():
        x, y = a.read(name), b.read(name)
        assert x.dtype == y.dtype and x.shape == y.shape, name
        assert x.tobytes() == y.tobytes(), name


def leftovers(parent, name):
    return [p for p in os.listdir(parent) if p.startswith(f".{name}.tmp") or p == name]


@pytest.mark.parametrize("folder", ["checkpoint", "checkpoint_sharded"])
def test_golden_convert_load_export(golden, tmp_path, folder):
    src = golden / "tiny_hybrid_qwen3" / folder
    dst = tmp_path / "orbax"
    meta = convert(str(src), str(dst), verify=True)
    assert meta["param_count"] == 1127152 and meta["dtype"] == "float32" and len(meta["tensors"]) == 99
    assert (dst / "config.json").read_text() == (src / "config.json").read_text()
    arrays, _ = load_case("tiny_hybrid_qwen3")
    direct = np.asarray(gka_jax.load(src, dtype="float32")(arrays["input_ids"]))
    converted = np.asarray(gka_jax.load(dst, dtype="float32")(arrays["input_ids"]))
    np.testing.assert_array_equal(converted, direct)
    back = tmp_path / "hf"
    export(str(dst), str(back), max_shard_bytes=2 * 10**6)
    assert (back / "model.safetensors.index.json").exists()
    assert_same_tensors(src, back)
    assert gka_jax.load(back, dtype="float32").config == gka_jax.load(src, dtype="float32").config


def test_synthetic_bf16_sharded_roundtrip_and_dtypes(tmp_path):
    model = gka_jax.random_model(synthetic_config(kv_proj_rank=4, kv_learnable_residual=True), jnp.bfloat16)
    src = tmp_path / "hf"
    write_hf(model, src, max_shard_bytes=60_000)
    assert len(HFCheckpoint(src).files) > 3
    dst = tmp_path / "orbax"
    convert(str(src), str(dst))
    back = tmp_path / "back"
    export(str(dst), str(back))
    assert (back / "model.safetensors").exists() and not (back / "model.safetensors.index.json").exists()
    assert_same_tensors(src, back)
    ids = np.arange(24).reshape(2, 12) % 320
    np.testing.assert_array_equal(np.asarray(gka_jax.load(dst)(ids)), np.asarray(model(ids)))
    # --dtype fp32: every stored array is float32, values are the bf16 ones exactly.
    dst32 = tmp_path / "orbax32"
    meta = convert(str(src), str(dst32), dtype="fp32")
    assert meta["dtype"] == "float32" and {t["source_dtype"] for t in meta["tensors"]} == {"bfloat16"}
    loaded = gka_jax.load(dst32)
    assert loaded.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(gka_jax.load(dst32, dtype="bfloat16")(ids)), np.asarray(model(ids)))


@pytest.mark.parametrize("tp, dp, write_mesh", [(4, 2, False), (8, 1, True)])
def test_restore_onto_mesh(tmp_path, tp, dp, write_mesh):
    model = gka_jax.random_model(synthetic_config(), jnp.float32, seed=2)
    src = tmp_path / "hf"
    write_hf(model, src)
    mesh = gka_jax.make_mesh(tp=tp, dp=dp)
    dst = tmp_path / "orbax"
    meta = convert(str(src), str(dst), mesh=mesh if write_mesh else None, verify=True)
    assert (meta["mesh"] is not None) == write_mesh
    restored = gka_jax.load(dst, mesh=mesh)
    reference = {path: np.asarray(var.get_value()) for path, var in flat_variables(model.params)}
    for entry in param_table(model.config):
        array = restored.params
        for key in entry.path:
            array = array[key]
        array = array.get_value()
        spec = gka_jax.sharding.partition_spec(entry.axes, entry.shape, mesh)
        assert array.sharding.spec == spec, entry.key
        assert array.sharding.mesh.shape == mesh.shape
        assert len(array.addressable_shards) == tp * dp
        np.testing.assert_array_equal(np.asarray(array), reference[entry.path])
    heads = restored.params["layers"][0]["mixer"]["q_proj"].get_value()
    assert heads.sharding.spec[0] == "tp" and heads.addressable_shards[0].data.shape[0] == 8 // tp


# ----------------------------------------------------------------------------- bad inputs
def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "gka_jax.convert", *map(str, args)], capture_output=True,
                          text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})


@pytest.fixture()
def hf_copy(golden, tmp_path):
    folder = tmp_path / "src"
    shutil.copytree(golden / "tiny_hybrid_qwen3" / "checkpoint_sharded", folder)
    for p in folder.iterdir():
        p.chmod(0o644)
    return folder


def expect_failure(src, dst, message, *extra):
    result = run_cli(src, dst, *extra)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    assert leftovers(dst.parent, dst.name) == []


def rewrite_shard(folder, fname, change):
    tensors = load_file(folder / fname)
    change(tensors)
    save_file(tensors, folder / fname, metadata={"format": "pt"})


def shard_of(folder, name):
    return json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"][name]


def test_cli_success_and_existing_dst(hf_copy, tmp_path):
    dst = tmp_path / "out"
    result = run_cli(hf_copy, dst)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # no progress bar when not on a terminal
    assert "wrote" in result.stdout and "99 tensors" in result.stdout
    expect_existing = run_cli(hf_copy, dst)
    assert expect_existing.returncode != 0 and "already exists (pass --overwrite" in expect_existing.stderr
    assert run_cli(hf_copy, dst, "--overwrite", "--quiet").stdout == ""
    assert read_metadata(dst)["param_count"] == 1127152


def test_truncated_safetensors(hf_copy, tmp_path):
    path = hf_copy / "model-00002-of-00003.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    expect_failure(hf_copy, tmp_path / "out", "model-00002-of-00003.safetensors: not a readable safetensors file")


def test_corrupt_header(hf_copy, tmp_path):
    path = hf_copy / "model-00001-of-00003.safetensors"
    data = bytearray(path.read_bytes())
    data[8:40] = b"x" * 32
    path.write_bytes(bytes(data))
    expect_failure(hf_copy, tmp_path / "out", "model-00001-of-00003.safetensors: not a readable safetensors file")


def test_shard_missing(hf_copy, tmp_path):
    (hf_copy / "model-00003-of-00003.safetensors").unlink()
    expect_failure(hf_copy, tmp_path / "out", "shard model-00003-of-00003.safetensors listed in "
                                              "model.safetensors.index.json is missing")


def test_shard_missing_from_index(hf_copy, tmp_path):
    index = json.loads((hf_copy / "model.safetensors.index.json").read_text())
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != "model-00003-of-00003.safetensors"}
    (hf_copy / "model.safetensors.index.json").write_text(json.dumps(index))
    expect_failure(hf_copy, tmp_path / "out", "missing tensors: ")


def test_index_names_a_tensor_its_shard_lacks(hf_copy, tmp_path):
    index = json.loads((hf_copy / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.norm.weight"] = "model-00001-of-00003.safetensors"
    if shard_of(hf_copy, "model.norm.weight") == "model-00001-of-00003.safetensors":
        index["weight_map"]["model.norm.weight"] = "model-00002-of-00003.safetensors"
    (hf_copy / "model.safetensors.index.json").write_text(json.dumps(index))
    expect_failure(hf_copy, tmp_path / "out", "tensor model.norm.weight is listed in model.safetensors.index.json")


def test_shape_disagrees_with_config(hf_copy, tmp_path):
    name = "model.layers.1.gka.o_norm.weight"
    rewrite_shard(hf_copy, shard_of(hf_copy, name), lambda t: t.update({name: np.ones(32, np.float32)}))
    expect_failure(hf_copy, tmp_path / "out", "tensor model.layers.1.gka.o_norm.weight has shape [32], expected [64]")


def test_unknown_and_missing_names(hf_copy, tmp_path):
    name = "model.layers.0.mlp.up_proj.weight"
    fname = shard_of(hf_copy, name)
    rewrite_shard(hf_copy, fname, lambda t: t.update({"model.layers.0.mlp.upp_proj.weight": t.pop(name)}))
    index = json.loads((hf_copy / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.0.mlp.upp_proj.weight"] = index["weight_map"].pop(name)
    (hf_copy / "model.safetensors.index.json").write_text(json.dumps(index))
    expect_failure(hf_copy, tmp_path / "out", "missing tensor: model.layers.0.mlp.up_proj.weight")


def test_unsupported_layer_type(hf_copy, tmp_path):
    config = json.loads((hf_copy / "config.json").read_text())
    config.update(hybrid_override_pattern="*-GKA-*-*-GDN-GKA", layer_types=None)
    (hf_copy / "config.json").write_text(json.dumps(config))
    expect_failure(hf_copy, tmp_path / "out", "layer 4 has unsupported layer type 'GDN'")


def test_hub_id_offline(tmp_path):
    result = run_cli("amazon/GKA-primed-HQwen3-8B-Reasoner", tmp_path / "out")
    assert result.returncode != 0 and "download" in result.stderr and "Traceback" not in result.stderr


def test_failure_midway_leaves_nothing(golden, tmp_path, monkeypatch):
    calls = {"n": 0}
    original = HFCheckpoint.read

    def flaky(self, name):
        calls["n"] += 1
        if calls["n"] == 60:
            raise OSError("disk went away")
        return original(self, name)

    monkeypatch.setattr(HFCheckpoint, "read", flaky)
    dst = tmp_path / "out"
    with pytest.raises(OSError, match="disk went away"):
        convert(str(golden / "tiny_hybrid_qwen3" / "checkpoint"), str(dst))
    assert leftovers(tmp_path, "out") == []
    # An existing DST survives a failed --overwrite untouched.
    monkeypatch.setattr(HFCheckpoint, "read", original)
    convert(str(golden / "tiny_hybrid_qwen3" / "checkpoint"), str(dst))
    before = read_metadata(dst)["created"]
    calls["n"] = 0
    monkeypatch.setattr(HFCheckpoint, "read", flaky)
    with pytest.raises(OSError):
        convert(str(golden / "tiny_hybrid_qwen3" / "checkpoint"), str(dst), overwrite=True)
    assert read_metadata(dst)["created"] == before
    assert sorted(leftovers(tmp_path, "out")) == ["out"]


def test_export_errors(tmp_path):
    with pytest.raises(ConvertError, match="cannot read the conversion metadata"):
        os.makedirs(tmp_path / "fake" / "params")
        (tmp_path / "fake" / "config.json").write_text(json.dumps(synthetic_config().to_hf()))
        (tmp_path / "fake" / "gka_jax.json").write_text("{")
        export(str(tmp_path / "fake"), str(tmp_path / "hf"))
    assert not (tmp_path / "hf").exists()
