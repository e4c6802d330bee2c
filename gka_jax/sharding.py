"""Sharding: logical axis names -> mesh axes, in one table.

Parameters carry logical axes (see ``layers.param``); caches get theirs in ``CACHE_AXES``. ``RULES`` maps
each logical name to a mesh axis (``tp`` tensor parallel, ``dp`` data parallel) or None (replicated).
A dimension that the mesh axis does not divide stays replicated, so every model runs on every mesh.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from .cache import AttentionCache, Cache, GKACache

RULES: dict[str, str | None] = {
    "batch": "dp",
    "vocab": "tp",
    "embed": None,
    "heads": "tp",
    "kv_heads": "tp",
    "head_dim": None,
    "state_dim": None,
    "mlp": "tp",
    "conv": None,
    "rank": None,
    "seq": None,
}

CACHE_AXES = {
    (AttentionCache, "k"): ("batch", "seq", "kv_heads", "head_dim"),
    (AttentionCache, "v"): ("batch", "seq", "kv_heads", "head_dim"),
    (GKACache, "conv_q"): ("batch", "conv", "heads", "head_dim"),
    (GKACache, "conv_k"): ("batch", "conv", "kv_heads", "head_dim"),
    (GKACache, "conv_v"): ("batch", "conv", "kv_heads", "head_dim"),
    (GKACache, "h_kk"): ("batch", "heads", "head_dim", "state_dim"),
    (GKACache, "h_kv"): ("batch", "heads", "head_dim", "state_dim"),
}


def make_mesh(tp: int = 1, dp: int = 1, devices=None) -> Mesh:
    """A ``(dp, tp)`` mesh over the first dp*tp devices."""
    devices = jax.devices() if devices is None else devices
    if tp < 1 or dp < 1:
        raise ValueError(f"mesh sizes must be >= 1, got tp={tp} dp={dp}")
    if tp * dp > len(devices):
        raise ValueError(f"a tp={tp} x dp={dp} mesh needs {tp * dp} devices, {len(devices)} available")
    return Mesh(np.asarray(devices[: tp * dp]).reshape(dp, tp), ("dp", "tp"))


def parse_mesh(spec: str) -> Mesh:
    """``"tp=4,dp=2"`` -> mesh."""
    sizes = {"tp": 1, "dp": 1}
    for part in filter(None, (s.strip() for s in spec.split(","))):
        name, _, value = part.partition("=")
        if name not in sizes or not value.isdigit():
            raise ValueError(f"bad mesh spec {spec!r}: expected e.g. 'tp=4,dp=2'")
        sizes[name] = int(value)
    return make_mesh(**sizes)


def partition_spec(axes, shape, mesh: Mesh, rules=RULES) -> PartitionSpec:
    """The PartitionSpec for logical ``axes`` of an array of ``shape`` (mesh axes used once each)."""
    used, spec = set(), []
    for name, size in zip(axes, shape):
        mesh_axis = rules.get(name)
        if mesh_axis is None or mesh_axis in used or mesh_axis not in mesh.shape or size % mesh.shape[mesh_axis]:
            spec.append(None)
        else:
            spec.append(mesh_axis)
            used.add(mesh_axis)
    return PartitionSpec(*spec)


def named_sharding(axes, shape, mesh: Mesh, rules=RULES) -> NamedSharding:
    return NamedSharding(mesh, partition_spec(axes, shape, mesh, rules))


def param_shardings(abstract_state, mesh: Mesh, rules=RULES):
    """NamedSharding for every parameter of an (abstract) NNX state, from its ``axes`` metadata."""
    from flax import nnx

    def one(var):
        return var.replace(named_sharding(var.get_metadata()["axes"], var.get_value().shape, mesh, rules))

    return jax.tree.map(one, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def cache_shardings(cache_shapes: Cache, mesh: Mesh, rules=RULES) -> Cache:
    """NamedSharding for every leaf of a cache (as built by ``cache.cache_shapes``)."""
    layers = []
    for layer in cache_shapes.layers:
        fields = {}
        for name in type(layer).__dataclass_fields__:
            leaf = getattr(layer, name)
            fields[name] = None if leaf is None else named_sharding(CACHE_AXES[(type(layer), name)], leaf.shape,
                                                                   mesh, rules)
        layers.append(type(layer)(**fields))
    lengths = named_sharding(("batch",), cache_shapes.lengths.shape, mesh, rules)
    return Cache(tuple(layers), lengths)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def describe(mesh: Mesh) -> str:
    return " x ".join(f"{k}={v}" for k, v in mesh.shape.items()) + f" ({math.prod(mesh.shape.values())} devices)"
