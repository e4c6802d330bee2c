"""``generate``: batched generation with per-request sampling, padding-exact batching, one compile.

Prompts of different lengths are right-padded to a small set of bucket lengths and prefilled with a
``valid`` mask, so padding reaches no state (attention K/V or GKA recurrences): each prompt generates the
same tokens alone or in a batch. Every later step runs one jitted function (decode + sample) with the
cache donated; rows that have finished are frozen (``valid`` False) until the whole batch is done.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .runtime import ContextOverflowError, Model
from .sampling import RowParams, SamplingParams, row_params, sample

BUCKET_MIN = 16
MAX_PREFILL_TOKENS = 32768  # prompt tokens prefilled in one call (rows are grouped to stay under it)


class CacheMemoryError(MemoryError):
    """The cache for this batch and length cannot fit in the device's free memory."""


def free_device_bytes(device=None) -> int | None:
    """Free memory of the device (accelerators: from the runtime; CPU: available host memory)."""
    device = device or jax.devices()[0]
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_cache_fits(model: Model, batch: int, max_length: int, state_dtype, report=None) -> int:
    """Bytes the cache needs (reported through ``report`` before anything is allocated); raises
    ``CacheMemoryError`` when they exceed the free memory of the devices that will hold it."""
    need = model.cache_bytes(batch, max_length, state_dtype)
    devices = 1 if model.mesh is None else model.mesh.devices.size
    free = free_device_bytes()
    if report is not None:
        report(f"cache: {need / 2**20:,.1f} MiB for batch {batch} x {max_length} tokens"
               + (f" ({free * devices / 2**20:,.0f} MiB free)" if free is not None else ""))
    if free is not None and need > free * devices:
        raise CacheMemoryError(f"the cache needs {need / 2**30:.2f} GiB for batch {batch} x {max_length} tokens "
                               f"but only {free * devices / 2**30:.2f} GiB is free: lower the batch, max_tokens or "
                               f"the context")
    return need


@dataclasses.dataclass
class CompletionOutput:
    """One prompt's result (vLLM names): new tokens, their text, and why generation stopped."""

    token_ids: list[int]
    text: str | None = None
    finish_reason: str | None = None    # "stop" (eos, stop token or stop string) or "length"
    stop_reason: int | str | None = None  # the stop token id or stop string, None for eos/length
    prompt_token_ids: list[int] | None = None


def bucket_length(n: int) -> int:
    """Prompt lengths are padded to powers of two (>= 16), so prefill compiles for few shapes."""
    return max(BUCKET_MIN, 1 << (max(n, 1) - 1).bit_length())


def _update_counts(tokens, valid, seen, counts):
    onehot = jax.nn.one_hot(tokens, seen.shape[-1], dtype=jnp.int32) * valid[:, None]
    return seen | (onehot > 0), counts + onehot


def _first_token(logits, rows: RowParams, seen, counts, valid):
    tokens = sample(logits, rows, seen, counts, 0)
    seen, counts = _update_counts(tokens, valid, seen, counts)
    return tokens, seen, counts


def _decode_and_sample(graphdef, params, tokens, cache, valid, rows, seen, counts, step, *, num_iter, backend):
    model = nnx.merge(graphdef, params)
    logits, cache = model(tokens[:, None], cache, valid[:, None], num_iter=num_iter, backend=backend)
    next_tokens = sample(logits[:, 0], rows, seen, counts, step)
    seen, counts = _update_counts(next_tokens, valid, seen, counts)
    return next_tokens, cache, seen, counts


@functools.partial(jax.jit, donate_argnames=("cache",))
def _insert_rows(cache, part, start):
    """Write the rows of cache ``part`` into ``cache`` from row ``start`` on (every leaf is batch-first)."""
    return jax.tree.map(lambda full, rows: jax.lax.dynamic_update_slice_in_dim(full, rows, start, 0), cache, part)


def prefill_in_groups(model: Model, tokens, valid, max_length: int, *, state_dtype, num_iter,
                      max_prefill_tokens: int = MAX_PREFILL_TOKENS):
    """Prefill [B, T] prompts a group of rows at a time, so activation memory stays bounded by
    ``max_prefill_tokens`` whatever the batch. Every group has the same number of rows (the last one is
    filled with all-padding rows that are dropped), so prefill compiles once.

    Returns (logits of each row's last prompt token [B, 1, V], the cache for all B rows).
    """
    batch, length = tokens.shape
    rows = min(batch, max(1, max_prefill_tokens // length))
    if rows == batch:
        cache = model.init_cache(batch, max_length, state_dtype=state_dtype)
        return model.prefill(tokens, cache, valid=valid, num_iter=num_iter, last_only=True)
    groups = -(-batch // rows)
    pad = groups * rows - batch
    tokens = np.concatenate([tokens, np.zeros((pad, length), tokens.dtype)])
    valid = np.concatenate([valid, np.zeros((pad, length), bool)])
    cache = model.init_cache(batch, max_length, state_dtype=state_dtype)
    logits = []
    for group in range(groups):
        rows_here = slice(group * rows, (group + 1) * rows)
        part = model.init_cache(rows, max_length, state_dtype=state_dtype)
        group_logits, part = model.prefill(tokens[rows_here], part, valid=valid[rows_here], num_iter=num_iter,
                                           last_only=True)
        keep = min(rows, batch - group * rows)
        if keep < rows:
            part = jax.tree.map(lambda x: x[:keep], part)
        cache = _insert_rows(cache, part, group * rows)
        logits.append(group_logits[:keep])
    return jnp.concatenate(logits), cache


first_token = jax.jit(_first_token, donate_argnames=("seen", "counts"))
decode_and_sample = jax.jit(_decode_and_sample, static_argnums=(0,), static_argnames=("num_iter", "backend"),
                            donate_argnames=("cache", "seen", "counts"))


def _as_prompts(prompts, tokenizer) -> list[list[int]]:
    if isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts
                                    and all(isinstance(t, (int, np.integer)) for t in prompts)):
        prompts = [prompts]
    out = []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            if tokenizer is None:
                raise ValueError("string prompts need a tokenizer (load one, or pass token ids)")
            prompt = tokenizer.encode(prompt)
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise ValueError(f"prompt {i} is empty")
        out.append(prompt)
    if not out:
        raise ValueError("no prompts given")
    return out


def generate(model: Model, prompts, sampling: SamplingParams | Sequence[SamplingParams] | None = None, *,
             num_iter: int | None = None, tokenizer=None, eos_token_ids: Sequence[int] | None = None,
             max_length: int | None = None, state_dtype=jnp.float32, on_token=None,
             report=None, max_prefill_tokens: int = MAX_PREFILL_TOKENS) -> list[CompletionOutput]:
    """Generate for one prompt or a batch; each prompt is a string (needs a tokenizer) or token ids.

    sampling: one ``SamplingParams`` for all prompts or one per prompt. eos_token_ids: tokens that end a
    row (default: the model's, from generation_config.json). max_length: cache length (default: longest
    prompt + the largest max_tokens; without max_tokens, the model's max_position_embeddings).
    on_token: called as ``on_token(row, token_id)`` for every new token as it is produced (streaming).
    report: called with one line describing the cache's memory before it is allocated.
    state_dtype: dtype of the GKA conv and recurrent states (float32, as the model card advises).
    max_prefill_tokens: padded prompt tokens prefilled per call; larger batches are prefilled a group of
    rows at a time (bounds activation memory; results are the same).
    """
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    prompt_ids = _as_prompts(prompts, tokenizer)
    batch = len(prompt_ids)
    if sampling is None:
        sampling = SamplingParams()
    params = list(sampling) if isinstance(sampling, (list, tuple)) else [sampling] * batch
    if len(params) != batch:
        raise ValueError(f"{len(params)} SamplingParams for {batch} prompts")
    eos = set(model.eos_token_ids if eos_token_ids is None else eos_token_ids)
    vocab = model.config.vocab_size
    for i, prompt in enumerate(prompt_ids):
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt {i} has token ids outside the vocabulary [0, {vocab}): {bad[:5]}")

    lengths = np.array([len(p) for p in prompt_ids])
    padded = bucket_length(int(lengths.max()))
    limit = model.config.max_position_embeddings
    wanted = [p.max_tokens if p.max_tokens is not None else limit - int(n) for p, n in zip(params, lengths)]
    if max_length is None:
        max_length = int(max(n + w for n, w in zip(lengths, wanted)))
    if int(lengths.max()) >= max_length or int(lengths.max()) >= limit:
        raise ContextOverflowError(f"the longest prompt has {int(lengths.max())} tokens; the context holds "
                                   f"{min(max_length, limit)}")
    max_length = max(max_length, padded)

    tokens = np.zeros((batch, padded), np.int32)
    for i, prompt in enumerate(prompt_ids):
        tokens[i, : len(prompt)] = prompt
    valid = np.arange(padded)[None, :] < lengths[:, None]
    if max_prefill_tokens < 1:
        raise ValueError(f"max_prefill_tokens must be >= 1, got {max_prefill_tokens}")
    check_cache_fits(model, batch, max_length, state_dtype, report)
    logits, cache = prefill_in_groups(model, tokens, valid, max_length, state_dtype=state_dtype,
                                      num_iter=num_iter, max_prefill_tokens=max_prefill_tokens)
    rows = row_params(params)
    seen_host = np.zeros((batch, vocab), bool)
    for i, prompt in enumerate(prompt_ids):
        seen_host[i, prompt] = True
    seen = jnp.asarray(seen_host)
    counts = jnp.zeros((batch, vocab), jnp.int32)
    active = np.ones(batch, bool)
    next_tokens, seen, counts = first_token(logits[:, 0], rows, seen, counts, jnp.asarray(active))

    outputs = [CompletionOutput([], prompt_token_ids=p) for p in prompt_ids]
    stop_ids = [set(p.stop_token_ids or ()) for p in params]
    step = 0
    while True:
        host_tokens = np.asarray(next_tokens)
        for i in np.flatnonzero(active):
            out, tok = outputs[i], int(host_tokens[i])
            out.token_ids.append(tok)
            if on_token is not None:
                on_token(int(i), tok)
            if tok in stop_ids[i] or tok in eos:
                out.finish_reason, out.stop_reason = "stop", (tok if tok in stop_ids[i] else None)
            elif params[i].stop_strings and tokenizer is not None and _hit_stop_string(out, tokenizer, params[i]):
                pass
            elif len(out.token_ids) >= wanted[i] or lengths[i] + len(out.token_ids) >= max_length:
                out.finish_reason = "length"
            if out.finish_reason is not None:
                active[i] = False
        if not active.any():
            break
        step += 1
        next_tokens, cache, seen, counts = decode_and_sample(
            model.graphdef, model.params, next_tokens, cache, jnp.asarray(active), rows, seen, counts,
            jnp.int32(step), num_iter=model._num_iter(num_iter), backend=model.kernel_backend)
    if tokenizer is not None:
        for out, p in zip(outputs, params):
            if out.text is None:
                out.text = tokenizer.decode(out.token_ids, skip_special_tokens=True)
    return outputs


def _hit_stop_string(out: CompletionOutput, tokenizer, params: SamplingParams) -> bool:
    """Stop strings are matched on the decoded text, so they may span token boundaries; the text is cut
    before the stop string (vLLM's default) and the tokens are kept up to the one that completed it."""
    text = tokenizer.decode(out.token_ids, skip_special_tokens=True)
    hits = [(text.find(s), s) for s in params.stop_strings if s and s in text]
    if not hits:
        return False
    position, stop = min(hits)
    out.text, out.finish_reason, out.stop_reason = text[:position], "stop", stop
    return True
