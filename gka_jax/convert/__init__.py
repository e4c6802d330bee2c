"""Checkpoint conversion: HF safetensors <-> sharded Orbax (``gka-jax convert`` / ``gka-jax export``)."""

from .hf_to_orbax import convert, resolve_source
from .layout import ConvertError, is_converted, read_metadata
from .orbax_to_hf import export

__all__ = ["ConvertError", "convert", "export", "is_converted", "read_metadata", "resolve_source"]
