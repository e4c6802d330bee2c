"""The hybrid Qwen3 model as Flax NNX modules (parameters only; the math lives in ``__call__``).

    h = embed(tokens)
    for each layer:  h = h + mixer(RMSNorm(h));  h = h + MLP(RMSNorm(h))     (mixer: attention or GKA)
    logits = RMSNorm(h) W_lm                                                   (W_lm = embed^T when tied)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from .attention import Attention
from .cache import Cache
from .config import ATTENTION, ModelConfig
from .gka import GKA
from .layers import MLP, Embedding, RMSNorm, param
from .numerics import acc_dtype


def default_precision(dtype) -> jax.lax.Precision:
    """float32 models compute exactly (HIGHEST); lower-precision models use the fast default."""
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else jax.lax.Precision.DEFAULT


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, kind: str, dtype, precision, rngs: nnx.Rngs | None = None):
        self.kind = kind
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, "embed", dtype, rngs)
        if kind == ATTENTION:
            self.mixer = Attention(cfg, dtype, precision, rngs)
        else:
            self.mixer = GKA(cfg, dtype, precision, rngs)
        self.post_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, "embed", dtype, rngs)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, dtype, precision, rngs)

    def __call__(self, h, positions, valid, cache, *, fresh, num_iter, backend):
        x = self.input_norm(h)
        if self.kind == ATTENTION:
            y, cache = self.mixer(x, positions, valid, cache, fresh=fresh)
        else:
            y, cache = self.mixer(x, valid, cache, num_iter=num_iter, backend=backend)
        h = h + y
        h = h + self.mlp(self.post_norm(h))
        return h, cache


class HybridQwen3(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype=jnp.bfloat16, precision=None, rngs: nnx.Rngs | None = None):
        precision = default_precision(dtype) if precision is None else precision
        self.cfg = cfg
        self.dtype = jnp.dtype(dtype)
        self.precision = precision
        self.embed = Embedding(cfg.vocab_size, cfg.hidden_size, dtype, rngs)
        self.layers = nnx.List([DecoderLayer(cfg, kind, dtype, precision, rngs) for kind in cfg.layer_types])
        self.final_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, "embed", dtype, rngs)
        if not cfg.tie_word_embeddings:
            self.lm_head = param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), dtype)

    def __call__(self, tokens, cache: Cache, valid=None, *, num_iter: int | None = None, fresh: bool = False,
                 backend: str | None = None, last_only: bool = False):
        """Run ``tokens`` [B, T] on top of ``cache``; returns (logits [B, T or 1, V] float32, new cache).

        valid [B, T] bool marks real tokens (default: all); padding must come after a row's real tokens
        and changes no state. ``fresh`` says the cache is empty (prefill): attention then works on the
        prompt alone. ``num_iter`` overrides the config's Chebyshev iterations. ``last_only`` returns
        only the logits of each row's last real token.
        """
        cfg = self.cfg
        num_iter = cfg.gka.num_iter if num_iter is None else num_iter
        b, t = tokens.shape
        if valid is None:
            valid = jnp.ones((b, t), bool)
        positions = cache.lengths[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]   # [B, T]
        h = self.embed(tokens)
        new_layers = []
        for layer, layer_cache in zip(self.layers, cache.layers):
            h, layer_cache = layer(h, positions, valid, layer_cache, fresh=fresh, num_iter=num_iter,
                                   backend=backend)
            new_layers.append(layer_cache)
        count = jnp.sum(valid, axis=1).astype(jnp.int32)
        if last_only:
            last = jnp.maximum(count - 1, 0)
            h = jnp.take_along_axis(h, last[:, None, None], axis=1)                    # [B, 1, E]
        h = self.final_norm(h)
        if cfg.tie_word_embeddings:
            logits = self.embed.attend(h, self.precision)
        else:
            logits = jnp.einsum("bte,ve->btv", h, self.lm_head[...], precision=self.precision,
                                preferred_element_type=acc_dtype(h.dtype))
        return logits.astype(acc_dtype(logits.dtype)), Cache(tuple(new_layers), cache.lengths + count)
