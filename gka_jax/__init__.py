"""gka-jax: Gated KalmaNet (GKA) hybrid language models in JAX/Flax.

    import gka_jax
    model = gka_jax.load("path/to/hf-checkpoint", dtype="bfloat16")
    logits = model(token_ids)                       # [B, T] int -> [B, T, vocab] float32
    logits, cache = model.prefill(prompt, max_length=4096)
    logits, cache = model.decode(next_tokens, cache)
"""

from .cache import AttentionCache, Cache, GKACache, init_cache
from .generate import CompletionOutput, generate
from .sampling import SamplingParams
from .config import ConfigError, GKAConfig, ModelConfig, RopeConfig, preset
from .hf_checkpoint import CheckpointError
from .loading import load, random_model
from .runtime import ContextOverflowError, Model
from . import params
from .sharding import make_mesh, parse_mesh

__version__ = "0.1.0"

__all__ = [
    "AttentionCache", "Cache", "CheckpointError", "CompletionOutput", "ConfigError", "ContextOverflowError",
    "GKACache", "GKAConfig", "Model", "ModelConfig", "RopeConfig", "SamplingParams", "generate", "init_cache",
    "load", "make_mesh", "params", "parse_mesh", "preset", "random_model",
]
