"""``gka_jax.load``: a Hugging Face checkpoint folder -> a runnable ``Model``.

Tensors are read one at a time, checked against the parameter table (names and shapes), converted to our
layout and dtype, and placed on their devices (with their NamedSharding when a mesh is given).
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from . import sharding as shd
from .config import ModelConfig
from .hf_checkpoint import CheckpointError, HFCheckpoint
from .layers import host_init
from .params import IGNORED_HF_SUFFIXES, abstract_model, flat_variables, param_table, to_ours, unflatten_into
from .runtime import Model

_DTYPES = {"float32": jnp.float32, "fp32": jnp.float32, "bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16,
           "float16": jnp.float16, "fp16": jnp.float16}


def resolve_dtype(dtype, cfg: ModelConfig | None = None):
    """A jnp dtype from a name, a dtype, or None (the checkpoint's own dtype)."""
    if dtype is None:
        dtype = cfg.dtype if cfg is not None else "bfloat16"
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"unsupported dtype {dtype!r} (use one of {', '.join(_DTYPES)})")
        return jnp.dtype(_DTYPES[dtype])
    return jnp.dtype(dtype)


def check_names(cfg: ModelConfig, table, present: set[str]) -> None:
    """Raise CheckpointError for missing or unexpected tensors, naming them."""
    expected = {e.hf_name for e in table}
    missing = sorted(expected - present)
    unexpected = sorted(n for n in present - expected
                        if not n.endswith(IGNORED_HF_SUFFIXES)
                        and not (cfg.tie_word_embeddings and n == "lm_head.weight"))
    if missing:
        raise CheckpointError(f"missing tensor{'s' if len(missing) > 1 else ''}: {', '.join(missing[:10])}"
                              + (f" (+{len(missing) - 10} more)" if len(missing) > 10 else ""))
    if unexpected:
        raise CheckpointError(f"unexpected tensor{'s' if len(unexpected) > 1 else ''} (not in this config): "
                              f"{', '.join(unexpected[:10])}"
                              + (f" (+{len(unexpected) - 10} more)" if len(unexpected) > 10 else ""))


def read_eos_token_ids(path) -> tuple[int, ...]:
    """eos_token_id from generation_config.json (else config.json): an int or a list."""
    import json

    for name in ("generation_config.json", "config.json"):
        file = os.path.join(path, name)
        if os.path.isfile(file):
            try:
                with open(file) as f:
                    value = json.load(f).get("eos_token_id")
            except (OSError, ValueError):
                continue
            if isinstance(value, int):
                return (value,)
            if isinstance(value, list) and all(isinstance(v, int) for v in value):
                return tuple(value)
    return ()


def read_tokenizer(path):
    """The folder's tokenizer (tokenizer.json + chat template), or None when it has none."""
    if not os.path.isfile(os.path.join(path, "tokenizer.json")):
        return None
    from .tokenizer import Tokenizer

    return Tokenizer.from_folder(path)


def load(path: str | os.PathLike, dtype=None, num_iter: int | None = None, *, mesh=None, precision=None,
         backend: str | None = None) -> Model:
    """Load a hybrid GKA checkpoint: a Hugging Face folder, or a folder written by ``gka-jax convert``.

    path: folder with ``config.json`` and ``model.safetensors`` (or shards + ``model.safetensors.index.json``),
    or a converted Orbax folder (restored straight onto the mesh's devices, no host copy of the model).
    dtype: parameter/activation dtype ("bfloat16", "float32", a jnp dtype, or None for the checkpoint's:
    config.json's ``dtype``, or for a converted folder the dtype it was converted to).
    num_iter: default Chebyshev iterations for this model (None: the config's ``gka_config.num_iter``).
    mesh: a ``jax.sharding.Mesh`` with axes ("dp", "tp") to shard parameters on (see ``gka_jax.make_mesh``).
    precision: matmul precision (default: HIGHEST for float32, DEFAULT otherwise).
    Raises ``ConfigError`` / ``CheckpointError`` naming the problem.
    """
    path = os.fspath(path)
    cfg = ModelConfig.from_file(path)
    if num_iter is not None:
        cfg = dataclasses.replace(cfg, gka=dataclasses.replace(cfg.gka, num_iter=num_iter))
    from .convert.layout import is_converted, read_metadata

    if is_converted(path):
        stored = read_metadata(path)["dtype"]
        if dtype is None and stored != "mixed":
            dtype = stored  # a converted folder defaults to the dtype it was converted to
        model = _load_converted(path, cfg, resolve_dtype(dtype, cfg), num_iter, mesh, precision, backend)
        return dataclasses.replace(model, eos_token_ids=read_eos_token_ids(path), tokenizer=read_tokenizer(path))
    dtype = resolve_dtype(dtype, cfg)
    checkpoint = HFCheckpoint(path)
    table = param_table(cfg, dtype)
    check_names(cfg, table, set(checkpoint.names()))

    graphdef, abstract_state = nnx.split(abstract_model(cfg, dtype, precision))
    shardings = None if mesh is None else shd.param_shardings(abstract_state, mesh)
    arrays = {}
    for entry in table:
        found = checkpoint.shape(entry.hf_name)
        if found != entry.hf_shape:
            raise CheckpointError(f"tensor {entry.hf_name} has shape {list(found)}, expected "
                                  f"{list(entry.hf_shape)} from config.json")
        host = to_ours(entry.groups, checkpoint.read(entry.hf_name), entry.shape)
        host = np.asarray(host).astype(dtype)
        target = None if shardings is None else leaf_at(shardings, entry.path)
        arrays[entry.path] = jax.device_put(host, target)
    params = unflatten_into(abstract_state, arrays)
    return Model(cfg, graphdef, params, mesh=mesh, num_iter=num_iter, backend=backend,
                 eos_token_ids=read_eos_token_ids(path), tokenizer=read_tokenizer(path))


def _load_converted(path, cfg, dtype, num_iter, mesh, precision, backend) -> Model:
    from .convert.layout import converted_table, restore_arrays

    table, stored_dtypes = converted_table(path, cfg)
    graphdef, abstract_state = nnx.split(abstract_model(cfg, dtype, precision))
    shardings = None
    if mesh is not None:
        state_shardings = shd.param_shardings(abstract_state, mesh)
        shardings = {e.path: leaf_at(state_shardings, e.path) for e in table}
    restored = restore_arrays(path, table, stored_dtypes, shardings)
    arrays = {p: (a if a.dtype == dtype else a.astype(dtype)) for p, a in restored.items()}
    return Model(cfg, graphdef, unflatten_into(abstract_state, arrays), mesh=mesh, num_iter=num_iter,
                 backend=backend)


def leaf_at(state, path):
    """The value at ``path`` of an NNX state (or a tree of shardings built from one)."""
    node = state
    for key in path:
        node = node[key]
    return node.get_value() if isinstance(node, nnx.Variable) else node


def random_model(cfg: ModelConfig, dtype=jnp.bfloat16, *, seed: int = 0, mesh=None, precision=None,
                 backend: str | None = None) -> Model:
    """A model with random weights (for benchmarks and tests), each parameter drawn with its module's
    initialisation and placed on its devices (sharded when a mesh is given). Small models are drawn on the
    host with NumPy; large ones on the device (one jitted draw per parameter shape), which is much faster."""
    dtype = resolve_dtype(dtype)
    graphdef, abstract_state = nnx.split(abstract_model(cfg, dtype, precision))
    shardings = None if mesh is None else shd.param_shardings(abstract_state, mesh)
    variables = list(flat_variables(abstract_state))
    total = sum(int(np.prod(var.get_value().shape)) for _, var in variables)
    on_host = total < 50_000_000
    rng = np.random.default_rng(seed)
    key = jax.random.PRNGKey(seed)
    arrays = {}
    for i, (path, var) in enumerate(variables):
        meta = var.get_metadata()
        shape = var.get_value().shape
        target = None if shardings is None else leaf_at(shardings, path)
        if on_host:
            host = host_init(meta["init"], shape, meta["fan_in"], rng).astype(dtype)
            arrays[path] = jax.device_put(host, target)
        else:
            arrays[path] = _device_init(jax.random.fold_in(key, i), meta["init"], shape, meta["fan_in"], dtype,
                                        target)
    return Model(cfg, graphdef, unflatten_into(abstract_state, arrays), mesh=mesh, backend=backend)


def _device_init(key, init, shape, fan_in, dtype, sharding):
    @functools.partial(jax.jit, out_shardings=sharding)
    def draw(key):
        if init == "ones":
            return jnp.ones(shape, dtype)
        if init == "zeros":
            return jnp.zeros(shape, dtype)
        if init == "a_log":
            return jnp.log(jax.random.uniform(key, shape, jnp.float32, 1.0, 16.0)).astype(dtype)
        if init == "dt_bias":
            dt = jnp.exp(jax.random.uniform(key, shape, jnp.float32, np.log(1e-3), np.log(1e-1)))
            return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)
        return (jax.random.normal(key, shape, jnp.float32) * fan_in ** -0.5).astype(dtype)

    return draw(key)
