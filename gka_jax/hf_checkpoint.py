"""Read-only access to a Hugging Face safetensors checkpoint folder, one tensor at a time.

Handles ``model.safetensors`` and sharded folders with ``model.safetensors.index.json``. Only safetensors
files are ever opened (no pickle). Problems raise ``CheckpointError`` naming the file or tensor.
"""

from __future__ import annotations

import json
import os

import numpy as np
from safetensors import safe_open

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


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
                raise CheckpointError(f"{index_path}: not a valid safetensors index ({e})") from None
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index_path}: 'weight_map' must be an object")
            self._file_of = {name: os.path.join(self.folder, fname) for name, fname in weight_map.items()}
        elif os.path.exists(single_path):
            self._file_of = None
        else:
            raise CheckpointError(f"{self.folder} has neither {SINGLE_FILE} nor {INDEX_FILE}")
        files = sorted(set(self._file_of.values())) if self._file_of is not None else [single_path]
        for path in files:
            if not os.path.exists(path):
                raise CheckpointError(f"shard {os.path.basename(path)} listed in {INDEX_FILE} is missing")
        self._handles = {path: self._open(path) for path in files}
        if self._file_of is None:
            self._file_of = {name: single_path for name in self._handles[single_path].keys()}
        else:
            for name, path in self._file_of.items():
                if name not in self._handles[path].keys():
                    raise CheckpointError(f"tensor {name} is listed in {INDEX_FILE} under "
                                          f"{os.path.basename(path)} but that file does not hold it")

    @staticmethod
    def _open(path):
        try:
            return safe_open(path, framework="numpy")
        except Exception as e:  # safetensors raises its own error types for corrupt headers/truncation
            raise CheckpointError(f"{os.path.basename(path)}: not a readable safetensors file ({e})") from None

    @property
    def files(self) -> list[str]:
        return sorted(self._handles)

    def names(self) -> list[str]:
        return sorted(self._file_of)

    def file_of(self, name: str) -> str:
        return self._file_of[name]

    def shape(self, name: str) -> tuple:
        return tuple(self._handles[self._file_of[name]].get_slice(name).get_shape())

    def dtype(self, name: str) -> str:
        return self._handles[self._file_of[name]].get_slice(name).get_dtype()

    def read(self, name: str) -> np.ndarray:
        path = self._file_of[name]
        try:
            return self._handles[path].get_tensor(name)
        except Exception as e:
            raise CheckpointError(f"{os.path.basename(path)}: cannot read tensor {name} ({e})") from None
