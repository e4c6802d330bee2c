"""The parameter spec: abstract shapes + logical axes (from the NNX modules) and the one table that maps
each parameter path to its Hugging Face tensor name and layout, in both directions.

Layouts: HF ``nn.Linear`` weights are ``[out, in]``; ours are ``[in..., out...]`` with heads split out
(``q_proj`` ``[E, H, D]``, ``o_proj`` ``[H, D, E]``); HF depthwise conv weights ``[C, 1, W]`` are ours
``[W, heads, D]``. A transform kind names the mapping:

* ``linear<n>``: HF ``[prod(ours[n:]), prod(ours[:n])]`` = ours reshaped to 2-D ``[in, out]``, transposed;
* ``conv``: HF ``[prod(ours[1:]), 1, ours[0]]``;
* ``flat``: HF ``[prod(ours)]``;
* ``same``: identical shape.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .config import ATTENTION, ModelConfig
from .model import HybridQwen3

Path = tuple  # a parameter's path in the NNX state, e.g. ("layers", 0, "mixer", "q_proj")


@dataclasses.dataclass(frozen=True)
class ParamEntry:
    path: Path
    hf_name: str
    kind: str        # linear<n> | conv | flat | same
    shape: tuple     # our shape
    axes: tuple      # logical axes, one per dimension

    @property
    def hf_shape(self) -> tuple:
        return hf_shape(self.kind, self.shape)


def hf_shape(kind: str, shape: tuple) -> tuple:
    if kind.startswith("linear"):
        n = int(kind[len("linear"):])
        return (math.prod(shape[n:]), math.prod(shape[:n]))
    if kind == "conv":
        return (math.prod(shape[1:]), 1, shape[0])
    if kind == "flat":
        return (math.prod(shape),)
    if kind == "same":
        return tuple(shape)
    raise ValueError(f"unknown transform kind {kind!r}")


def to_ours(kind: str, hf_array: np.ndarray, shape: tuple) -> np.ndarray:
    """HF layout -> our layout (a view or a transpose; no dtype change)."""
    if kind.startswith("linear"):
        return hf_array.T.reshape(shape)
    if kind == "conv":
        return hf_array[:, 0, :].T.reshape(shape)
    return hf_array.reshape(shape)


def to_hf(kind: str, array: np.ndarray) -> np.ndarray:
    """Our layout -> HF layout (inverse of ``to_ours``)."""
    shape = array.shape
    if kind.startswith("linear"):
        n = int(kind[len("linear"):])
        return np.ascontiguousarray(array.reshape(math.prod(shape[:n]), math.prod(shape[n:])).T)
    if kind == "conv":
        return np.ascontiguousarray(array.reshape(shape[0], -1).T[:, None, :])
    return np.ascontiguousarray(array.reshape(hf_shape(kind, shape)))


# Per-module name maps: our leaf name -> (HF name, transform kind).
_ATTENTION = {
    "q_proj": ("q_proj.weight", "linear1"), "k_proj": ("k_proj.weight", "linear1"),
    "v_proj": ("v_proj.weight", "linear1"), "o_proj": ("o_proj.weight", "linear2"),
    "q_norm": ("q_norm.weight", "same"), "k_norm": ("k_norm.weight", "same"),
    "q_bias": ("q_proj.bias", "flat"), "k_bias": ("k_proj.bias", "flat"),
    "v_bias": ("v_proj.bias", "flat"), "o_bias": ("o_proj.bias", "same"),
}
_GKA = {
    "q_proj": ("q_proj.weight", "linear1"), "k_proj": ("k_proj.weight", "linear1"),
    "v_proj": ("v_proj.weight", "linear1"), "o_proj": ("o_proj.weight", "linear2"),
    "g_proj": ("g_proj.weight", "linear1"),
    "q_conv": ("q_conv1d.weight", "conv"), "k_conv": ("k_conv1d.weight", "conv"),
    "v_conv": ("v_conv1d.weight", "conv"),
    "a_proj": ("a_proj.weight", "linear1"), "A_log": ("A_log", "same"), "dt_bias": ("dt_bias", "same"),
    "b_proj": ("b_proj.weight", "linear1"), "b_bias": ("b_proj.bias", "same"),
    "alpha_proj": ("alpha_proj.weight", "linear1"), "alpha_bias": ("alpha_proj.bias", "same"),
    "o_norm": ("o_norm.weight", "same"),
    "k_lowrank_a": ("proj_k.linearA.weight", "linear2"), "k_lowrank_b": ("proj_k.linearB.weight", "linear1"),
    "v_lowrank_a": ("proj_v.linearA.weight", "linear2"), "v_lowrank_b": ("proj_v.linearB.weight", "linear1"),
    "k_rep": ("k_rep", "same"), "v_rep": ("v_rep", "same"),
}
_LAYER = {
    ("input_norm", "weight"): ("input_layernorm.weight", "same"),
    ("post_norm", "weight"): ("post_attention_layernorm.weight", "same"),
    ("mlp", "gate_proj"): ("mlp.gate_proj.weight", "linear1"),
    ("mlp", "up_proj"): ("mlp.up_proj.weight", "linear1"),
    ("mlp", "down_proj"): ("mlp.down_proj.weight", "linear1"),
}
_TOP = {
    ("embed", "embedding"): ("model.embed_tokens.weight", "same"),
    ("final_norm", "weight"): ("model.norm.weight", "same"),
    ("lm_head",): ("lm_head.weight", "linear1"),
}

# HF tensors that carry no parameter of ours and may be present in a checkpoint.
IGNORED_HF_SUFFIXES = ("rotary_emb.inv_freq",)


def abstract_model(cfg: ModelConfig, dtype=jnp.bfloat16, precision=None) -> HybridQwen3:
    """The model with ``ShapeDtypeStruct`` leaves: shapes, dtypes and axes without memory."""
    return nnx.eval_shape(lambda: HybridQwen3(cfg, dtype, precision, rngs=nnx.Rngs(0)))


def _hf_name(cfg: ModelConfig, path: Path) -> tuple[str, str]:
    if path in _TOP:
        return _TOP[path]
    if path[0] == "layers":
        i, rest = path[1], tuple(path[2:])
        prefix = f"model.layers.{i}."
        if rest in _LAYER:
            name, kind = _LAYER[rest]
            return prefix + name, kind
        if rest[0] == "mixer" and len(rest) == 2:
            if cfg.layer_types[i] == ATTENTION:
                name, kind = _ATTENTION[rest[1]]
                return prefix + "self_attn." + name, kind
            name, kind = _GKA[rest[1]]
            return prefix + "gka." + name, kind
    raise KeyError(f"no HF name for parameter {'.'.join(map(str, path))}")


def param_table(cfg: ModelConfig, dtype=jnp.bfloat16) -> list[ParamEntry]:
    """Every parameter of the model for ``cfg``, in a stable order, with its HF name and layout."""
    _, state = nnx.split(abstract_model(cfg, dtype))
    entries = []
    for path, var in flat_variables(state):
        name, kind = _hf_name(cfg, path)
        entries.append(ParamEntry(path, name, kind, tuple(var.get_value().shape), tuple(var.get_metadata()["axes"])))
    return entries


def flat_variables(state):
    leaves = jax.tree_util.tree_leaves_with_path(state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    for key_path, var in leaves:
        yield tuple(getattr(k, "key", getattr(k, "idx", k)) for k in key_path), var


def flat_params(state) -> dict[Path, jax.Array]:
    """{path: array} of an NNX state."""
    return {path: var.get_value() for path, var in flat_variables(state)}


def unflatten_into(state, arrays: dict[Path, jax.Array]):
    """A copy of ``state`` whose leaves are ``arrays[path]``."""
    def replace(key_path, var):
        path = tuple(getattr(k, "key", getattr(k, "idx", k)) for k in key_path)
        return var.replace(arrays[path])
    return jax.tree_util.tree_map_with_path(replace, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def gka_layer_from_hf(cfg: ModelConfig, hf_params: dict, dtype=jnp.float32, precision=None):
    """A standalone GKA layer module from HF-named tensors of one layer (``q_proj.weight``, ``A_log`` ...)."""
    from .gka import GKA
    from .model import default_precision

    precision = default_precision(dtype) if precision is None else precision
    layer = nnx.eval_shape(lambda: GKA(cfg, dtype, precision, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(layer)
    arrays = {}
    for path, var in flat_variables(state):
        name, kind = _GKA[path[-1]]
        arrays[path] = jnp.asarray(to_ours(kind, np.asarray(hf_params[name]), var.get_value().shape), dtype)
    return nnx.merge(graphdef, unflatten_into(state, arrays))
