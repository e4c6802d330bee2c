"""The converted-checkpoint folder: an Orbax checkpoint of the parameters plus the HF side files.

    DST/
      params/         Orbax checkpoint of a nested dict of arrays: {"layers": {"0": {"mixer": {...}}}, ...}
      gka_jax.json    metadata: format, source, dtypes, parameter count, mesh, per-tensor sha256
      config.json     copied from the source (and generation_config.json, tokenizer and chat-template files)

``restore_params`` restores every array straight onto its devices: the target is built from abstract
shapes with explicit shardings, so no full host copy is ever made.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import warnings

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from ..config import ModelConfig
from ..params import ParamEntry, param_table

PARAMS_DIR = "params"
METADATA_FILE = "gka_jax.json"
FORMAT = "gka-jax/orbax-params/1"
SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "chat_template.json",
              "vocab.json", "merges.txt", "tokenizer.model")

NP_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16,
             "float64": np.float64}


class ConvertError(ValueError):
    """A conversion or restore that cannot proceed, with the reason named."""


@contextlib.contextmanager
def staged_output(dst: str):
    """Yield a temporary sibling folder of ``dst``; on success it replaces ``dst`` by renames, on any error
    (or interrupt) it is removed, so no ``dst`` that looks complete is ever left half-written."""
    parent = os.path.dirname(dst)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(dst)}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
        if os.path.exists(dst):
            old = f"{dst}.old-{os.getpid()}"
            os.rename(dst, old)
            os.rename(tmp, dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def is_converted(path) -> bool:
    return os.path.isfile(os.path.join(path, METADATA_FILE)) and os.path.isdir(os.path.join(path, PARAMS_DIR))


def read_metadata(path) -> dict:
    file = os.path.join(path, METADATA_FILE)
    try:
        with open(file) as f:
            meta = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ConvertError(f"{file}: cannot read the conversion metadata ({e})") from None
    if meta.get("format") != FORMAT:
        raise ConvertError(f"{file}: format {meta.get('format')!r} is not {FORMAT!r}")
    return meta


def nested(entries_to_values: dict) -> dict:
    """{ParamEntry or path tuple: value} -> nested dict with string keys."""
    tree: dict = {}
    for key, value in entries_to_values.items():
        path = key.path if isinstance(key, ParamEntry) else key
        node = tree
        for part in path[:-1]:
            node = node.setdefault(str(part), {})
        node[str(path[-1])] = value
    return tree


def lookup(tree: dict, path: tuple):
    for part in path:
        tree = tree[str(part)]
    return tree


def param_groups(table: list[ParamEntry]) -> list[list[ParamEntry]]:
    """Entries grouped for streaming: one group per decoder layer, one per top-level parameter."""
    groups: dict[tuple, list[ParamEntry]] = {}
    for entry in table:
        key = entry.path[:2] if entry.path[0] == "layers" else entry.path[:1]
        groups.setdefault(key, []).append(entry)
    return list(groups.values())


def _pytree_dir(path) -> str:
    params = os.path.join(path, PARAMS_DIR)
    state = os.path.join(params, "state")  # Orbax v1 layout (partial saves) keeps the tree here
    return state if os.path.isdir(state) else params


def restore_arrays(path, entries: list[ParamEntry], dtypes: dict[str, str], shardings=None) -> dict:
    """Restore ``entries`` (a subset is fine) as {path tuple: jax.Array}, each onto its sharding."""
    import orbax.checkpoint as ocp

    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = {}
    for entry in entries:
        sharding = device if shardings is None else shardings[entry.path]
        target[entry] = jax.ShapeDtypeStruct(entry.shape, jnp.dtype(NP_DTYPES[dtypes[entry.key]]),
                                             sharding=sharding)
    target = nested(target)
    restore_args = ocp.checkpoint_utils.construct_restore_args(target)
    checkpointer = ocp.PyTreeCheckpointer()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            restored = checkpointer.restore(_pytree_dir(path), args=ocp.args.PyTreeRestore(
                item=target, restore_args=restore_args, partial_restore=True))
        except FileNotFoundError as e:
            raise ConvertError(f"{path}: the Orbax parameters are missing ({e})") from None
    return {entry.path: lookup(restored, entry.path) for entry in entries}


def converted_table(path, cfg: ModelConfig) -> tuple[list[ParamEntry], dict]:
    """The parameter table checked against the metadata: (entries, {key: stored dtype})."""
    meta = read_metadata(path)
    table = param_table(cfg)
    stored = {t["key"]: t for t in meta["tensors"]}
    expected = {e.key for e in table}
    missing, extra = sorted(expected - set(stored)), sorted(set(stored) - expected)
    if missing or extra:
        raise ConvertError(f"{path}: the converted parameters do not match config.json "
                           f"(missing: {missing[:5]}, unexpected: {extra[:5]})")
    for entry in table:
        if tuple(stored[entry.key]["shape"]) != entry.shape:
            raise ConvertError(f"{path}: {entry.key} has shape {stored[entry.key]['shape']}, "
                               f"expected {list(entry.shape)}")
    return table, {key: t["dtype"] for key, t in stored.items()}
