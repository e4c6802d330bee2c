"""HF safetensors -> Orbax, streaming with bounded memory.

One tensor at a time is read (plain file reads, no memory map), checked against the parameter table,
reshaped to our layout (a view), cast, hashed and put on its devices; each decoder layer (or top-level
parameter) is then written as one Orbax partial save. Peak memory is about one layer plus the largest
tensor, never the model. Everything is written to a temporary sibling folder that is renamed to DST only
when complete, so a failed or interrupted conversion leaves no DST that looks complete.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import shutil
import sys
import warnings

import jax
import numpy as np

from .. import __version__
from ..config import ConfigError, ModelConfig
from ..hf_checkpoint import CheckpointError, HFCheckpoint
from ..loading import check_names, leaf_at
from ..params import param_table
from ..sharding import describe, param_shardings
from .layout import (FORMAT, METADATA_FILE, NP_DTYPES, PARAMS_DIR, SIDE_FILES, ConvertError, nested,
                     param_groups, read_metadata, restore_arrays, staged_output)

DTYPE_CHOICES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp32": "float32", "float32": "float32",
                 "keep": None}


def resolve_source(src: str) -> str:
    """A local folder, or a hub id downloaded with huggingface_hub when it can reach the hub."""
    if os.path.isdir(src):
        return src
    if os.path.exists(src):
        raise ConvertError(f"{src} is not a folder")
    looks_like_id = src.count("/") == 1 and not src.startswith((".", "/"))
    if not looks_like_id:
        raise ConvertError(f"{src}: no such folder")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ConvertError(f"{src} is not a local folder and huggingface_hub is not installed: download the "
                           f"checkpoint first (e.g. huggingface-cli download {src} --local-dir DIR) and pass "
                           f"the folder") from None
    try:
        return snapshot_download(src, allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.txt",
                                                      "tokenizer*"])
    except Exception as e:  # offline, unknown repo, auth: all end the same way for the user
        raise ConvertError(f"could not fetch {src} from the hub ({type(e).__name__}); download it first "
                           f"(huggingface-cli download {src} --local-dir DIR) and pass the folder") from None


def _progress(total_bytes: int, total_tensors: int, quiet: bool):
    if quiet or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024, dynamic_ncols=True,
                desc=f"converting {total_tensors} tensors", file=sys.stderr)


def sha256(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).reshape(-1).view(np.uint8)).hexdigest()


def convert(src: str, dst: str, *, dtype: str = "keep", mesh=None, verify: bool = False,
            overwrite: bool = False, quiet: bool = True, compress: bool = False) -> dict:
    """Convert the HF checkpoint ``src`` into the Orbax folder ``dst``; returns the metadata written.

    dtype: "bf16", "fp32" or "keep" (each tensor's own dtype). mesh: write every array with the
    NamedSharding of the sharding rules on this mesh. verify: read everything back and compare checksums.
    compress: zstd-compress the stored arrays (~20% smaller for bf16 weights, ~2.5x slower to write).
    """
    if dtype not in DTYPE_CHOICES:
        raise ConvertError(f"--dtype must be one of bf16, fp32, keep (got {dtype!r})")
    target_dtype = DTYPE_CHOICES[dtype]
    dst = os.path.abspath(dst)
    if os.path.exists(dst) and not overwrite:
        raise ConvertError(f"{dst} already exists (pass --overwrite to replace it)")
    src_dir = resolve_source(src)
    cfg = ModelConfig.from_file(src_dir)
    checkpoint = HFCheckpoint(src_dir)
    table = param_table(cfg)
    check_names(cfg, table, set(checkpoint.names()))
    for entry in table:  # every shape before writing anything
        found = checkpoint.shape(entry.hf_name)
        if found != entry.hf_shape:
            raise CheckpointError(f"tensor {entry.hf_name} has shape {list(found)}, expected "
                                  f"{list(entry.hf_shape)} from config.json")
    abstract_shardings = None
    if mesh is not None:
        from flax import nnx

        from ..params import abstract_model
        _, abstract_state = nnx.split(abstract_model(cfg))
        shardings_state = param_shardings(abstract_state, mesh)
        abstract_shardings = {e.path: leaf_at(shardings_state, e.path) for e in table}

    with staged_output(dst) as tmp:
        meta = _write(checkpoint, src, src_dir, cfg, table, tmp, target_dtype, mesh, abstract_shardings, quiet,
                      compress)
        if verify:
            _verify(tmp, table, abstract_shardings)
    return meta


CHUNK_BYTES = 64 * 1024**2  # storage chunk: bounds write buffers and lets both cores compress/write
OVERLAP_BYTES = 1024**3     # read the next group during a save only while both fit in this budget


def _orbax_context(compress: bool):
    from orbax.checkpoint.experimental import v1 as ocp_v1

    ctx = ocp_v1.Context()
    ctx.array.saving.storage_options.chunk_byte_size = CHUNK_BYTES
    ctx.array.saving.use_compression = compress
    try:  # our host arrays are never touched again once handed over: no defensive copy (orbax >= 0.12.8)
        ctx.memory.deepcopy_host_arrays = False
    except AttributeError:
        pass
    return ctx


def _write(checkpoint, src, src_dir, cfg, table, tmp, target_dtype, mesh, shardings, quiet, compress) -> dict:
    from orbax.checkpoint.experimental import v1 as ocp_v1

    for name in SIDE_FILES:
        if os.path.isfile(os.path.join(src_dir, name)):
            shutil.copyfile(os.path.join(src_dir, name), os.path.join(tmp, name))
    total = sum(checkpoint.nbytes(e.hf_name) for e in table)
    bar = _progress(total, len(table), quiet)
    records = []
    params_path = os.path.join(tmp, PARAMS_DIR)
    pending, pending_bytes = None, 0  # a group's save runs in Orbax's threads while we read the next one
    try:
        with warnings.catch_warnings(), _orbax_context(compress):
            warnings.simplefilter("ignore")
            for group in param_groups(table):
                group_bytes = sum(checkpoint.nbytes(e.hf_name) for e in group)
                if pending is not None and pending_bytes + group_bytes > OVERLAP_BYTES:
                    pending.result()  # keep peak memory near one large tensor, not two
                    pending = None
                arrays = {}
                for entry in group:
                    host = checkpoint.read(entry.hf_name).reshape(entry.shape)
                    source_dtype = str(host.dtype)
                    if source_dtype not in NP_DTYPES:
                        raise CheckpointError(f"tensor {entry.hf_name} has dtype {source_dtype}, not a float type")
                    if target_dtype is not None and source_dtype != target_dtype:
                        host = host.astype(NP_DTYPES[target_dtype])
                    records.append({"key": entry.key, "hf_name": entry.hf_name, "shape": list(entry.shape),
                                    "dtype": str(host.dtype), "source_dtype": source_dtype,
                                    "sha256": sha256(host)})
                    # Without a mesh the NumPy array is written as is (no copy); with one, each device
                    # gets its shard and the array is written with its NamedSharding.
                    arrays[entry] = host if shardings is None else jax.device_put(host, shardings[entry.path])
                    del host
                    if bar is not None:
                        bar.update(checkpoint.nbytes(entry.hf_name))
                if pending is not None:
                    pending.result()
                pending, pending_bytes = ocp_v1.partial.save_async(params_path, nested(arrays)), group_bytes
                del arrays
            if pending is not None:
                pending.result()
                pending = None
            ocp_v1.partial.finalize(params_path)
    finally:
        if pending is not None:
            try:
                pending.result()
            except Exception:  # the original error is the one to report
                pass
        if bar is not None:
            bar.close()
    dtypes = sorted({r["dtype"] for r in records})
    meta = {
        "format": FORMAT,
        "gka_jax_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source": src,
        "dtype": dtypes[0] if len(dtypes) == 1 else "mixed",
        "param_count": int(sum(int(np.prod(r["shape"])) for r in records)),
        "param_bytes": int(sum(int(np.prod(r["shape"])) * np.dtype(NP_DTYPES[r["dtype"]]).itemsize
                               for r in records)),
        "mesh": None if mesh is None else describe(mesh),
        "compressed": bool(compress),
        "tensors": records,
    }
    with open(os.path.join(tmp, METADATA_FILE), "w") as f:
        json.dump(meta, f, indent=1)
    return meta


def _verify(path, table, shardings) -> None:
    """Restore every group from disk and compare its bytes' sha256 with the metadata written there."""
    meta = read_metadata(path)
    want = {t["key"]: t for t in meta["tensors"]}
    dtypes = {k: t["dtype"] for k, t in want.items()}
    for group in param_groups(table):
        restored = restore_arrays(path, group, dtypes, shardings)
        for entry in group:
            got = sha256(np.asarray(jax.device_get(restored[entry.path])))
            if got != want[entry.key]["sha256"]:
                raise ConvertError(f"verification failed: {entry.key} ({entry.hf_name}) reads back different "
                                   f"from what was written")


__all__ = ["ConfigError", "ConvertError", "convert", "resolve_source"]
