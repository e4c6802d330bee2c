"""The parameter spec: abstract shapes + logical axes (from the NNX modules) and the one table that maps
each parameter path to its Hugging Face tensor name and layout, in both directions.

Our parameters keep the checkpoint's memory layout (PyTorch ``[out, in]``) and only split merged
dimensions: HF ``q_proj.weight [H*D, E]`` is ours ``[H, D, E]``, ``o_proj.weight [E, H*D]`` is ``[E, H, D]``,
a depthwise conv ``[C, 1, W]`` is ``[H, D, W]``. Both directions are therefore reshapes (views, no copy,
bit-exact). A layout is a tuple ``groups``: HF dimension i merges the next ``groups[i]`` of our dimensions
(0: a singleton HF dimension of size 1).
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
    groups: tuple    # layout: see the module docstring
    shape: tuple     # our shape
    axes: tuple      # logical axes, one per dimension

    @property
    def hf_shape(self) -> tuple:
        return hf_shape(self.groups, self.shape)

    @property
    def key(self) -> str:
        """The path as one string ("layers.0.mixer.q_proj"), used as the checkpoint key."""
        return path_key(self.path)


def path_key(path: Path) -> str:
    return ".".join(str(p) for p in path)


def hf_shape(groups: tuple, shape: tuple) -> tuple:
    out, i = [], 0
    for g in groups:
        out.append(1 if g == 0 else math.prod(shape[i: i + g]))
        i += g
    assert i == len(shape), (groups, shape)
    return tuple(out)


def to_ours(groups: tuple, hf_array: np.ndarray, shape: tuple) -> np.ndarray:
    """HF layout -> ours (a reshape: a view of the same memory)."""
    return hf_array.reshape(shape)


def to_hf(groups: tuple, array: np.ndarray) -> np.ndarray:
    """Our layout -> HF (a reshape)."""
    return array.reshape(hf_shape(groups, array.shape))


_MATRIX, _VECTOR, _HEADS_IN, _HEADS_OUT = (1, 1), (1,), (2, 1), (1, 2)

# Per-module name maps: our leaf name -> (HF name, layout groups).
_ATTENTION = {
    "q_proj": ("q_proj.weight", _HEADS_IN), "k_proj": ("k_proj.weight", _HEADS_IN),
    "v_proj": ("v_proj.weight", _HEADS_IN), "o_proj": ("o_proj.weight", _HEADS_OUT),
    "q_norm": ("q_norm.weight", _VECTOR), "k_norm": ("k_norm.weight", _VECTOR),
    "q_bias": ("q_proj.bias", (2,)), "k_bias": ("k_proj.bias", (2,)),
    "v_bias": ("v_proj.bias", (2,)), "o_bias": ("o_proj.bias", _VECTOR),
}
_GKA = {
    "q_proj": ("q_proj.weight", _HEADS_IN), "k_proj": ("k_proj.weight", _HEADS_IN),
    "v_proj": ("v_proj.weight", _HEADS_IN), "o_proj": ("o_proj.weight", _HEADS_OUT),
    "g_proj": ("g_proj.weight", _HEADS_IN),
    "q_conv": ("q_conv1d.weight", (2, 0, 1)), "k_conv": ("k_conv1d.weight", (2, 0, 1)),
    "v_conv": ("v_conv1d.weight", (2, 0, 1)),
    "a_proj": ("a_proj.weight", _MATRIX), "A_log": ("A_log", _VECTOR), "dt_bias": ("dt_bias", _VECTOR),
    "b_proj": ("b_proj.weight", _MATRIX), "b_bias": ("b_proj.bias", _VECTOR),
    "alpha_proj": ("alpha_proj.weight", _MATRIX), "alpha_bias": ("alpha_proj.bias", _VECTOR),
    "o_norm": ("o_norm.weight", _VECTOR),
    "k_lowrank_a": ("proj_k.linearA.weight", _HEADS_OUT), "k_lowrank_b": ("proj_k.linearB.weight", _HEADS_IN),
    "v_lowrank_a": ("proj_v.linearA.weight", _HEADS_OUT), "v_lowrank_b": ("proj_v.linearB.weight", _HEADS_IN),
    "k_rep": ("k_rep", _MATRIX), "v_rep": ("v_rep", _MATRIX),
}
_LAYER = {
    ("input_norm", "weight"): ("input_layernorm.weight", _VECTOR),
    ("post_norm", "weight"): ("post_attention_layernorm.weight", _VECTOR),
    ("mlp", "gate_proj"): ("mlp.gate_proj.weight", _MATRIX),
    ("mlp", "up_proj"): ("mlp.up_proj.weight", _MATRIX),
    ("mlp", "down_proj"): ("mlp.down_proj.weight", _MATRIX),
}
_TOP = {
    ("embed", "embedding"): ("model.embed_tokens.weight", _MATRIX),
    ("final_norm", "weight"): ("model.norm.weight", _VECTOR),
    ("lm_head",): ("lm_head.weight", _MATRIX),
}

# HF tensors that carry no parameter of ours and may be present in a checkpoint.
IGNORED_HF_SUFFIXES = ("rotary_emb.inv_freq",)


def abstract_model(cfg: ModelConfig, dtype=jnp.bfloat16, precision=None) -> HybridQwen3:
    """The model with ``ShapeDtypeStruct`` leaves: shapes, dtypes and axes without memory."""
    return nnx.eval_shape(lambda: HybridQwen3(cfg, dtype, precision, rngs=nnx.Rngs(0)))


def _hf_name(cfg: ModelConfig, path: Path) -> tuple[str, tuple]:
    if path in _TOP:
        return _TOP[path]
    if path[0] == "layers":
        i, rest = path[1], tuple(path[2:])
        prefix = f"model.layers.{i}."
        if rest in _LAYER:
            name, groups = _LAYER[rest]
            return prefix + name, groups
        if rest[0] == "mixer" and len(rest) == 2:
            if cfg.layer_types[i] == ATTENTION:
                name, groups = _ATTENTION[rest[1]]
                return prefix + "self_attn." + name, groups
            name, groups = _GKA[rest[1]]
            return prefix + "gka." + name, groups
    raise KeyError(f"no HF name for parameter {'.'.join(map(str, path))}")


def param_table(cfg: ModelConfig, dtype=jnp.bfloat16) -> list[ParamEntry]:
    """Every parameter of the model for ``cfg``, in a stable order, with its HF name and layout."""
    _, state = nnx.split(abstract_model(cfg, dtype))
    entries = []
    for path, var in flat_variables(state):
        name, groups = _hf_name(cfg, path)
        entries.append(ParamEntry(path, name, groups, tuple(var.get_value().shape),
                                  tuple(var.get_metadata()["axes"])))
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
        name, groups = _GKA[path[-1]]
        arrays[path] = jnp.asarray(to_ours(groups, np.asarray(hf_params[name]), var.get_value().shape), dtype)
    return nnx.merge(graphdef, unflatten_into(state, arrays))
