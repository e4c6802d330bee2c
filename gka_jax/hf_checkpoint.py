"""Read-only access to a Hugging Face safetensors checkpoint folder, one tensor at a time.

Handles ``model.safetensors`` and sharded folders with ``model.safetensors.index.json``. Only safetensors
files are ever opened (no pickle). Each file is validated by the ``safetensors`` library when the
checkpoint is opened (header, dtypes, that the file holds every byte it announces); tensors are then read
with plain file reads at the header's offsets into a fresh buffer, so memory holds only the tensor being
read (a long-lived memory map keeps every page it touched resident). Problems raise ``CheckpointError``
naming the file or tensor.
"""

from __future__ import annotations

import json
import os
import struct

import ml_dtypes
import numpy as np
from safetensors import safe_open

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
}


class CheckpointError(ValueError):
    """A checkpoint that cannot be read as the config describes it."""


class HFCheckpoint:
    def __init__(self, folder: str | os.PathLike):
        self.folder = os.fspath(folder)
        if not os.path.isdir(self.folder):
            raise CheckpointError(f"{self.folder} is not a folder")
        index_path = os.path.join(self.folder, INDEX_FILE)
        single_path = os.path.join(self.folder, SINGLE_FILE)
        if os.path.exists(index_path):
            try:
                with open(index_path) as f:
                    weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{INDEX_FILE}: not a valid safetensors index ({e})") from None
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{INDEX_FILE}: 'weight_map' must be an object")
            file_of = {name: os.path.join(self.folder, fname) for name, fname in weight_map.items()}
            files = sorted(set(file_of.values()))
        elif os.path.exists(single_path):
            file_of, files = None, [single_path]
        else:
            raise CheckpointError(f"{self.folder} has neither {SINGLE_FILE} nor {INDEX_FILE}")
        for path in files:
            if not os.path.exists(path):
                raise CheckpointError(f"shard {os.path.basename(path)} listed in {INDEX_FILE} is missing")
        self._entries: dict[str, tuple] = {}  # name -> (path, dtype string, shape, begin, end)
        held = {path: self._index_file(path) for path in files}
        if file_of is None:
            file_of = {name: single_path for name in held[single_path]}
        else:
            for name, path in file_of.items():
                if name not in held[path]:
                    raise CheckpointError(f"tensor {name} is listed in {INDEX_FILE} under "
                                          f"{os.path.basename(path)} but that file does not hold it")
        self._file_of = file_of

    def _index_file(self, path) -> set[str]:
        base = os.path.basename(path)
        try:
            with safe_open(path, framework="numpy") as handle:
                names = set(handle.keys())
        except Exception as e:  # safetensors raises its own error types for corrupt headers/truncation
            raise CheckpointError(f"{base}: not a readable safetensors file ({e})") from None
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(header_len))
        data_start = 8 + header_len
        for name in names:
            info = header[name]
            if info["dtype"] not in DTYPES:
                raise CheckpointError(f"{base}: tensor {name} has unsupported dtype {info['dtype']}")
            begin, end = info["data_offsets"]
            self._entries[name] = (path, info["dtype"], tuple(info["shape"]), data_start + begin, data_start + end)
        return names

    @property
    def files(self) -> list[str]:
        return sorted(set(self._file_of.values()))

    def names(self) -> list[str]:
        return sorted(self._file_of)

    def file_of(self, name: str) -> str:
        return self._file_of[name]

    def shape(self, name: str) -> tuple:
        return self._entries[name][2]

    def dtype(self, name: str) -> str:
        """The safetensors dtype string ("BF16", "F32", ...)."""
        return self._entries[name][1]

    def nbytes(self, name: str) -> int:
        _, _, _, begin, end = self._entries[name]
        return end - begin

    def read(self, name: str) -> np.ndarray:
        """The tensor as a new NumPy array (one copy, no memory map)."""
        path, dtype, shape, begin, end = self._entries[name]
        out = np.empty(shape, DTYPES[dtype])
        if out.nbytes != end - begin:
            raise CheckpointError(f"{os.path.basename(path)}: tensor {name} holds {end - begin} bytes, "
                                  f"not {out.nbytes} for shape {list(shape)} {dtype}")
        try:
            with open(path, "rb", buffering=0) as f:
                f.seek(begin)
                view = memoryview(out.reshape(-1).view(np.uint8))
                done = 0
                while done < len(view):
                    got = f.readinto(view[done:])
                    if not got:
                        raise EOFError("the file ends early")
                    done += got
        except (OSError, EOFError) as e:
            raise CheckpointError(f"{os.path.basename(path)}: cannot read tensor {name} ({e})") from None
        return out
