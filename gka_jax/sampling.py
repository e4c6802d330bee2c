"""Sampling with vLLM's parameters, per row of a batch, inside jit.

Order (as vLLM applies them): repetition penalty (prompt and output tokens: positive logits divided,
negative multiplied), frequency and presence penalties (output tokens: ``- f * count - p * [count > 0]``),
then greedy if temperature == 0, else temperature, top-k, top-p (smallest set whose probability reaches
top_p), min-p (drop tokens below ``min_p * max prob``), and a draw from the remaining distribution.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

_NEG = -1e30


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """vLLM's sampling parameters (same names and meanings)."""

    temperature: float = 1.0          # 0 = greedy
    top_p: float = 1.0                # (0, 1]
    top_k: int = -1                   # -1 or 0 = all tokens
    min_p: float = 0.0                # [0, 1]
    repetition_penalty: float = 1.0   # > 0; 1 = off
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: Sequence[str] | str | None = None
    stop_token_ids: Sequence[int] | None = None
    max_tokens: int | None = 16

    def __post_init__(self):
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            raise ValueError(f"top_k must be -1 (off) or a positive integer, got {self.top_k!r}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            raise ValueError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")

    @property
    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class RowParams(NamedTuple):
    """Per-row sampling parameters as arrays [B] (a pytree for jit)."""

    temperature: jax.Array
    top_p: jax.Array
    top_k: jax.Array
    min_p: jax.Array
    repetition_penalty: jax.Array
    presence_penalty: jax.Array
    frequency_penalty: jax.Array
    key: jax.Array       # [B, 2] uint32 per-row PRNG key


def row_params(params: Sequence[SamplingParams], default_seed: int = 0) -> RowParams:
    """Stack per-request parameters. Rows without a seed draw from ``default_seed`` and their row index."""
    def col(name, dtype):
        return jnp.asarray(np.array([getattr(p, name) for p in params], dtype))

    keys = [jax.random.PRNGKey(p.seed) if p.seed is not None else jax.random.fold_in(
        jax.random.PRNGKey(default_seed), i) for i, p in enumerate(params)]
    return RowParams(col("temperature", np.float32), col("top_p", np.float32), col("top_k", np.int32),
                     col("min_p", np.float32), col("repetition_penalty", np.float32),
                     col("presence_penalty", np.float32), col("frequency_penalty", np.float32),
                     jnp.stack(keys))


def apply_penalties(logits, rows: RowParams, seen, counts):
    """logits [B, V] float32; seen [B, V] bool (prompt or output tokens); counts [B, V] output counts."""
    rep = rows.repetition_penalty[:, None]
    penalized = jnp.where(logits > 0, logits / rep, logits * rep)
    logits = jnp.where(seen, penalized, logits)
    counts = counts.astype(jnp.float32)
    return logits - rows.frequency_penalty[:, None] * counts - rows.presence_penalty[:, None] * (counts > 0)


def filter_logits(logits, rows: RowParams):
    """Temperature, top-k, top-p and min-p: the logits of the distribution to draw from (masked = -1e30)."""
    vocab = logits.shape[-1]
    temperature = jnp.where(rows.temperature > 0, rows.temperature, 1.0)[:, None]
    logits = logits / temperature
    order = jnp.argsort(-logits, axis=-1)                                   # [B, V] descending
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    rank = jnp.arange(vocab)[None, :]
    top_k = jnp.where(rows.top_k > 0, rows.top_k, vocab)[:, None]
    keep = rank < top_k
    probs = jax.nn.softmax(jnp.where(keep, sorted_logits, _NEG), axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs                            # mass of strictly better tokens
    keep &= (before < rows.top_p[:, None]) | (rows.top_p[:, None] >= 1.0)   # top_p 1: no cut (even in rounding)
    keep &= probs >= rows.min_p[:, None] * probs[:, :1]
    keep = keep.at[:, 0].set(True)                                          # the best token always stays
    sorted_logits = jnp.where(keep, sorted_logits, _NEG)
    return jnp.zeros_like(logits).at[jnp.arange(logits.shape[0])[:, None], order].set(sorted_logits)


def sample(logits, rows: RowParams, seen, counts, step):
    """The next token [B] int32 for logits [B, V]; ``step`` varies the per-row keys."""
    logits = apply_penalties(logits.astype(jnp.float32), rows, seen, counts)
    greedy = jnp.argmax(logits, axis=-1)
    # The vocabulary sort is only needed when some row asks for top-k / top-p / min-p (greedy or plain
    # temperature sampling skips it; both branches give the same distribution for such rows).
    needs_filter = jnp.any((rows.top_k > 0) | (rows.top_p < 1.0) | (rows.min_p > 0.0))
    temperature = jnp.where(rows.temperature > 0, rows.temperature, 1.0)[:, None]
    filtered = jax.lax.cond(needs_filter, lambda x: filter_logits(x, rows), lambda x: x / temperature, logits)
    keys = jax.vmap(lambda key: jax.random.fold_in(key, step))(rows.key)
    drawn = jax.vmap(lambda key, row: jax.random.categorical(key, row))(keys, filtered)
    return jnp.where(rows.temperature > 0, drawn, greedy).astype(jnp.int32)
