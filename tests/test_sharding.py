"""Tensor/data parallel sharding on 8 fake CPU devices (conftest sets the XLA flag).

Sharded logits equal unsharded ones up to the reordering of fp32 sums across devices, which the
Chebyshev solve amplifies: rel <= 5e-5 (observed 1.2e-5 on the tiny checkpoint, whose unsharded logits
are themselves 7e-6 from exact math); both stay within 1e-4 of the float64 logits. Every parameter
carries the NamedSharding its logical axes ask for.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import gka_jax
from gka_jax import sharding as shd
from gka_jax.config import ATTENTION, GKA, GKAConfig, ModelConfig, RopeConfig
from gka_jax.params import flat_variables

from conftest import load_case, rel


def test_eight_devices():
    assert len(jax.devices()) == 8


def expected_spec(axes, shape, mesh):
    spec = []
    for name, size in zip(axes, shape):
        axis = shd.RULES[name]
        ok = axis is not None and axis not in spec and size % mesh.shape[axis] == 0
        spec.append(axis if ok else None)
    return P(*spec)


def check_param_shardings(model, mesh):
    count = 0
    for path, var in flat_variables(model.params):
        array = var.get_value()
        want = expected_spec(var.get_metadata()["axes"], array.shape, mesh)
        assert array.sharding.mesh.shape == mesh.shape, path
        assert array.sharding.spec == want, (path, array.sharding.spec, want)
        count += 1
    return count


@pytest.mark.parametrize("tp, dp", [(4, 2), (8, 1)])
def test_tiny_checkpoint_sharded_logits(golden, tp, dp):
    arrays, _ = load_case("tiny_hybrid_qwen3")
    path = golden / "tiny_hybrid_qwen3" / "checkpoint_sharded"
    plain = gka_jax.load(path, dtype="float32")
    mesh = gka_jax.make_mesh(tp=tp, dp=dp)
    sharded = gka_jax.load(path, dtype="float32", mesh=mesh)
    assert check_param_shardings(sharded, mesh) > 50
    q_proj = sharded.params["layers"][0]["mixer"]["q_proj"].get_value()
    assert q_proj.sharding.spec == (P("tp", None, None) if tp == 4 else P(None, None, None))
    assert sharded.params["lm_head"].get_value().sharding.spec == P("tp", None)
    ids = arrays["input_ids"]
    want = np.asarray(plain(ids))
    got = np.asarray(sharded(ids))
    assert rel(got, want) < 5e-5
    assert rel(got, arrays["naive_fp64.logits"]) < 1e-4
    # Decode on the mesh: the cache is sharded over dp (batch) and tp (heads).
    logits, cache = sharded.prefill(ids, max_length=ids.shape[1] + 2, last_only=True)
    h_kk = cache.layers[1].h_kk
    assert (tuple(h_kk.sharding.spec) + (None,))[0] == ("dp" if dp > 1 else None)
    step, cache = sharded.decode(jnp.argmax(logits[:, -1], -1), cache)
    plain_logits, plain_cache = plain.prefill(ids, max_length=ids.shape[1] + 2, last_only=True)
    plain_step, _ = plain.decode(jnp.argmax(plain_logits[:, -1], -1), plain_cache)
    assert rel(step, plain_step) < 5e-5


def test_tp8_shards_every_head():
    """A model whose 8 query and 8 kv heads split over tp=8."""
    cfg = ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_heads=8, num_kv_heads=8,
                      head_dim=8, layer_types=(ATTENTION, GKA), rope=RopeConfig(theta=1e4),
                      gka=GKAConfig(chunk_size=16), dtype="float32")
    plain = gka_jax.random_model(cfg, jnp.float32, seed=3)
    mesh = gka_jax.make_mesh(tp=8)
    sharded = plain.shard(mesh)
    check_param_shardings(sharded, mesh)
    gka_layer = sharded.params["layers"][1]["mixer"]
    assert gka_layer["k_proj"].get_value().sharding.spec == P("tp", None, None)
    assert gka_layer["A_log"].get_value().sharding.spec == P("tp")
    ids = np.asarray(jax.random.randint(jax.random.PRNGKey(0), (2, 40), 0, 256))
    assert rel(sharded(ids), plain(ids)) < 5e-5
    direct = gka_jax.random_model(cfg, jnp.float32, seed=3, mesh=mesh)
    assert rel(direct(ids), plain(ids)) < 5e-5


def test_mesh_helpers():
    mesh = gka_jax.parse_mesh("tp=4,dp=2")
    assert dict(mesh.shape) == {"dp": 2, "tp": 4}
    with pytest.raises(ValueError, match="needs 16 devices"):
        gka_jax.make_mesh(tp=16)
    with pytest.raises(ValueError, match="bad mesh spec"):
        gka_jax.parse_mesh("tp=four")
