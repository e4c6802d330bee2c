"""Orbax -> HF safetensors: the inverse of ``hf_to_orbax``, shard by shard.

Tensors are packed into safetensors files of at most ``max_shard_bytes`` (HF names
``model-0000i-of-0000N.safetensors`` plus ``model.safetensors.index.json``; one file is written as
``model.safetensors``). Only one output shard's tensors are in memory at a time. The layouts are reshapes
of each other, so convert -> export reproduces the original tensors bit for bit (for ``--dtype keep``).
"""

from __future__ import annotations

import json
import os
import shutil

import jax
import numpy as np
from safetensors.numpy import save_file

from ..config import ModelConfig
from ..params import to_hf
from .layout import NP_DTYPES, SIDE_FILES, ConvertError, converted_table, restore_arrays, staged_output

DEFAULT_SHARD_BYTES = 2 * 1024**3


def export(src: str, dst: str, *, max_shard_bytes: int = DEFAULT_SHARD_BYTES, overwrite: bool = False) -> dict:
    """Write the converted checkpoint ``src`` as an HF folder ``dst``; returns the index written."""
    src, dst = os.path.abspath(src), os.path.abspath(dst)
    if os.path.exists(dst) and not overwrite:
        raise ConvertError(f"{dst} already exists (pass --overwrite to replace it)")
    if max_shard_bytes < 1:
        raise ConvertError("the shard size must be positive")
    cfg = ModelConfig.from_file(src)
    table, dtypes = converted_table(src, cfg)
    sizes = {e.key: int(np.prod(e.shape)) * np.dtype(NP_DTYPES[dtypes[e.key]]).itemsize for e in table}
    shards, current, current_bytes = [], [], 0
    for entry in sorted(table, key=lambda e: e.hf_name):
        if current and current_bytes + sizes[entry.key] > max_shard_bytes:
            shards.append(current)
            current, current_bytes = [], 0
        current.append(entry)
        current_bytes += sizes[entry.key]
    shards.append(current)

    with staged_output(dst) as tmp:
        weight_map = {}
        for i, shard in enumerate(shards):
            name = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            restored = restore_arrays(src, shard, dtypes)
            tensors = {e.hf_name: to_hf(e.groups, np.asarray(jax.device_get(restored[e.path]))) for e in shard}
            save_file(tensors, os.path.join(tmp, name), metadata={"format": "pt"})
            weight_map.update({e.hf_name: name for e in shard})
            del restored, tensors
        index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": dict(sorted(weight_map.items()))}
        if len(shards) > 1:
            with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
                json.dump(index, f, indent=2)
        for side in SIDE_FILES:
            if os.path.isfile(os.path.join(src, side)):
                shutil.copyfile(os.path.join(src, side), os.path.join(tmp, side))
    return index


def parse_size(text: str) -> int:
    """'2GB', '500MB', '1.5GiB', '123' (bytes) -> bytes."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    text = text.strip().upper()
    number = text.rstrip("KMGIB")
    unit = text[len(number):]
    try:
        return int(float(number) * units[unit])
    except (ValueError, KeyError):
        raise ConvertError(f"bad size {text!r} (e.g. 2GB, 500MB)") from None
