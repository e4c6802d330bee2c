"""generate() and the sampler: goldens, batching that padding cannot leak into, seeds, each sampling
option checked on the logits/distribution it produces, stop tokens and strings, one compile per run."""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gka_jax
from gka_jax import SamplingParams, generate
from gka_jax.generate import bucket_length, decode_and_sample, prefill_in_groups
from gka_jax.sampling import apply_penalties, filter_logits, row_params, sample

from conftest import load_case


@pytest.fixture(scope="module")
def tiny(golden):
    arrays, _ = load_case("tiny_hybrid_qwen3")
    return gka_jax.load(golden / "tiny_hybrid_qwen3" / "checkpoint", dtype="float32"), arrays


def test_greedy_equals_golden_and_batch_equals_alone(tiny):
    model, arrays = tiny
    ids = arrays["input_ids"]
    want = arrays["naive_fp64.generated_ids"]
    greedy = SamplingParams(temperature=0, max_tokens=want.shape[1])
    prompts = [ids[0].tolist(), ids[1].tolist(), ids[1, :9].tolist()]
    batched = generate(model, prompts, greedy)
    for row in range(2):
        assert batched[row].token_ids == want[row].tolist()
        assert batched[row].finish_reason == "length"
    alone = generate(model, prompts[2], greedy)
    assert alone[0].token_ids == batched[2].token_ids


def test_prefill_in_row_groups_equals_one_call(tiny):
    """Prefilling a batch a few rows at a time (bounded activation memory) changes nothing: the same
    tokens and the same cache, including the uneven last group that is padded with empty rows."""
    model, arrays = tiny
    ids = arrays["input_ids"]
    prompts = [ids[0].tolist(), ids[1, :9].tolist(), ids[1].tolist(), ids[0, :5].tolist(), ids[1, :3].tolist()]
    greedy = SamplingParams(temperature=0, max_tokens=3)
    whole = generate(model, prompts, greedy)
    grouped = generate(model, prompts, greedy, max_prefill_tokens=128)  # bucket 64 -> 2 rows per group
    assert [o.token_ids for o in grouped] == [o.token_ids for o in whole]

    tokens = np.zeros((5, 64), np.int32)
    valid = np.zeros((5, 64), bool)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)], valid[i, :len(p)] = p, True
    one = prefill_in_groups(model, tokens, valid, 70, state_dtype=jnp.float32, num_iter=None)
    two = prefill_in_groups(model, tokens, valid, 70, state_dtype=jnp.float32, num_iter=None,
                                             max_prefill_tokens=128)
    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(two)):
        assert a.shape == b.shape
        np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=1e-5, atol=1e-6)


def test_seeds(tiny):
    model, arrays = tiny
    prompt = arrays["input_ids"][0].tolist()
    same = SamplingParams(seed=7, max_tokens=10)
    a = generate(model, [prompt, prompt], [same, same])
    b = generate(model, prompt, SamplingParams(seed=7, max_tokens=10))
    c = generate(model, prompt, SamplingParams(seed=8, max_tokens=10))
    assert a[0].token_ids == a[1].token_ids == b[0].token_ids
    assert c[0].token_ids != b[0].token_ids


def test_stop_token_and_one_compile(tiny):
    model, arrays = tiny
    prompt = arrays["input_ids"][0].tolist()
    want = arrays["naive_fp64.generated_ids"][0].tolist()
    before = decode_and_sample._cache_size()
    out = generate(model, prompt, SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[want[4]]))
    assert out[0].token_ids == want[:5]
    assert out[0].finish_reason == "stop" and out[0].stop_reason == want[4]
    eos = generate(model, prompt, SamplingParams(temperature=0, max_tokens=12), eos_token_ids=[want[2]])
    assert eos[0].token_ids == want[:3] and eos[0].finish_reason == "stop" and eos[0].stop_reason is None
    assert decode_and_sample._cache_size() - before <= 1  # one decode compile for this batch shape


class CharTokenizer:
    """Token i decodes to a fixed 1-2 character string (enough to test stop strings across tokens)."""

    def __init__(self, vocab):
        letters = "abcdefghijklmnopqrstuvwxyz"
        self.pieces = [letters[i % 26] + ("" if i < 26 else letters[(i // 26) % 26]) for i in range(vocab)]

    def encode(self, text):
        return [self.pieces.index(ch) for ch in text]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.pieces[i] for i in ids)


def test_stop_string_across_token_boundaries(tiny):
    model, arrays = tiny
    tokenizer = CharTokenizer(model.config.vocab_size)
    prompt = arrays["input_ids"][0].tolist()
    want = arrays["naive_fp64.generated_ids"][0].tolist()
    full = "".join(tokenizer.pieces[t] for t in want)
    # A stop string made of the end of token 3's text and the start of token 4's.
    start = len("".join(tokenizer.pieces[t] for t in want[:4])) - 1
    stop = full[start: start + 2]
    assert len(stop) == 2 and full.find(stop) == start
    out = generate(model, prompt, SamplingParams(temperature=0, max_tokens=12, stop=[stop]), tokenizer=tokenizer)
    assert out[0].finish_reason == "stop" and out[0].stop_reason == stop
    assert out[0].token_ids == want[:5]
    assert out[0].text == full[:start]


def test_cache_memory_is_reported_and_refused(tiny, monkeypatch):
    model, _ = tiny
    lines = []
    generate(model, [1, 2, 3], SamplingParams(max_tokens=2), report=lines.append)
    assert len(lines) == 1 and "MiB for batch 1 x" in lines[0]
    gen = sys.modules["gka_jax.generate"]  # the module (gka_jax.generate is also the function's name)
    monkeypatch.setattr(gen, "free_device_bytes", lambda device=None: 1000)
    with pytest.raises(gen.CacheMemoryError, match="the cache needs .* but only"):
        generate(model, [1, 2, 3], SamplingParams(max_tokens=2))


def test_bad_requests(tiny):
    model, _ = tiny
    with pytest.raises(ValueError, match="outside the vocabulary"):
        generate(model, [1, 2, 9999])
    with pytest.raises(ValueError, match="need a tokenizer"):
        generate(model, "hello")
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(gka_jax.ContextOverflowError):
        generate(model, list(range(50)), SamplingParams(max_tokens=4), max_length=40)


# ----------------------------------------------------------------------------- the sampler on logits
def rows_for(n, **kw):
    return row_params([SamplingParams(**kw)] * n)


LOGITS = jnp.asarray([[2.0, 1.0, 0.5, -1.0, -3.0, 0.0]])


def kept(filtered):
    return np.flatnonzero(np.asarray(filtered[0]) > -1e29).tolist()


def test_top_k_top_p_min_p_masks():
    probs = np.asarray(jax.nn.softmax(LOGITS[0]))
    order = np.argsort(-probs)
    assert kept(filter_logits(LOGITS, rows_for(1, top_k=2))) == sorted(order[:2].tolist())
    # top_p: the smallest prefix (by probability) whose mass reaches p.
    for p in (0.3, 0.6, 0.8, 0.95):
        n = int(np.searchsorted(np.cumsum(probs[order]), p) + 1)
        assert kept(filter_logits(LOGITS, rows_for(1, top_p=p))) == sorted(order[:n].tolist()), p
    for m in (0.05, 0.2, 0.5):
        assert kept(filter_logits(LOGITS, rows_for(1, min_p=m))) == np.flatnonzero(probs >= m * probs.max()).tolist()
    # temperature divides the logits before the masks
    np.testing.assert_allclose(np.asarray(filter_logits(LOGITS, rows_for(1, temperature=0.5))), LOGITS * 2)


def test_unfiltered_rows_skip_the_sort_with_the_same_draws():
    """Greedy / plain-temperature batches skip the vocabulary sort; the draws equal those of the sorted
    path for the same keys, and top_p = 1 never cuts the tail (even where the cumulative sum rounds to 1)."""
    tail = jnp.concatenate([jnp.asarray([[30.0]]), jnp.full((1, 5000), -10.0)], axis=1)  # tail mass ~1e-17
    assert len(kept(filter_logits(tail, rows_for(1, top_p=1.0)))) == 5001
    logits = jax.random.normal(jax.random.PRNGKey(3), (4, 50)) * 2
    seen = jnp.zeros((4, 50), bool)
    counts = jnp.zeros((4, 50), jnp.int32)
    plain = rows_for(4, temperature=0.7, seed=5)
    forced = plain._replace(min_p=jnp.full((4,), 1e-30))      # same distribution, through the sorted path
    for step in range(20):
        a = sample(logits, plain, seen, counts, step)
        b = sample(logits, forced, seen, counts, step)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_penalties():
    rows = rows_for(1, repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25)
    seen = jnp.asarray([[True, False, False, True, False, False]])
    counts = jnp.asarray([[0, 2, 0, 1, 0, 0]])
    got = np.asarray(apply_penalties(LOGITS, rows, seen, counts))
    want = np.asarray(LOGITS[0]).copy()
    want[0] /= 2.0            # seen, positive: divided
    want[3] *= 2.0            # seen, negative: multiplied
    want[1] -= 0.5 + 0.25 * 2
    want[3] -= 0.5 + 0.25 * 1
    np.testing.assert_allclose(got[0], want, rtol=1e-6)


def test_sample_distribution_and_greedy():
    n = 4000
    logits = jnp.broadcast_to(LOGITS, (n, 6))
    seen = jnp.zeros((n, 6), bool)
    counts = jnp.zeros((n, 6), jnp.int32)
    greedy = sample(logits, rows_for(n, temperature=0.0), seen, counts, 0)
    assert set(np.asarray(greedy).tolist()) == {0}
    assert set(np.asarray(sample(logits, rows_for(n, temperature=1.0, top_k=1), seen, counts, 0)).tolist()) == {0}
    rows = row_params([SamplingParams(temperature=0.7, seed=i) for i in range(n)])
    draws = np.asarray(sample(logits, rows, seen, counts, 3))
    freq = np.bincount(draws, minlength=6) / n
    want = np.asarray(jax.nn.softmax(LOGITS[0] / 0.7))
    assert np.abs(freq - want).max() < 0.03, (freq, want)  # 4000 draws: std <= 0.008


def test_buckets():
    assert [bucket_length(n) for n in (1, 16, 17, 100, 128, 129)] == [16, 16, 32, 128, 128, 256]
