"""Cache semantics: prefill of T tokens then n decode steps == prefill of T + n tokens, for attention and
GKA layers, batch > 1, across GKA chunk boundaries; padded rows == the same rows alone; every gka option.

The logic is checked in float64 (``jax.enable_x64``, float64 parameters and states), where the chunked and
per-token paths must agree to rel <= 1e-10 (observed ~3e-15). In float32 the same comparisons differ by
fp32 rounding that the Chebyshev solve amplifies (condition number up to 1 + 1/ridge = 51; observed up to
3e-4 on random weights, whose fp32-vs-fp64 logits differ by 2e-4 themselves), so float32 is checked on
the default options with its own, looser bound.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gka_jax
from gka_jax.config import ATTENTION, GKA, GKAConfig, ModelConfig, RopeConfig

from conftest import rel

EXACT64 = 1e-10


def small_config(**gka_options):
    return ModelConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_heads=4, num_kv_heads=2,
                       head_dim=16, layer_types=(GKA, ATTENTION, GKA), rope=RopeConfig(theta=1e4),
                       gka=GKAConfig(chunk_size=16, **gka_options), dtype="float32")


def model64(**gka_options):
    return gka_jax.random_model(small_config(**gka_options), jnp.float32, seed=4).astype(jnp.float64)


def tokens(seed, b, t, vocab=97):
    return np.asarray(jax.random.randint(jax.random.PRNGKey(seed), (b, t), 0, vocab))


def prefill_then_decode(model, ids, t0, state_dtype, num_iter=None):
    b, t = ids.shape
    cache = model.init_cache(b, t, state_dtype=state_dtype)
    logits, cache = model.prefill(ids[:, :t0], cache, num_iter=num_iter)
    steps = []
    for step in range(t0, t):
        step_logits, cache = model.decode(ids[:, step], cache, num_iter=num_iter)
        steps.append(step_logits)
    return np.concatenate([logits, np.stack(steps, 1)], axis=1), cache


def test_prefill_then_decode_equals_longer_prefill():
    with jax.enable_x64(True):
        model = model64()
        ids = tokens(0, 3, 45)
        full, whole_cache = model.prefill(ids, model.init_cache(3, 45, state_dtype=jnp.float64))
        got, cache = prefill_then_decode(model, ids, 21, jnp.float64)  # crosses 16-token chunks twice
        assert rel(got, full) < EXACT64
        np.testing.assert_array_equal(np.asarray(cache.lengths), [45, 45, 45])
        for mine, want in zip(jax.tree.leaves(cache), jax.tree.leaves(whole_cache)):
            if jnp.issubdtype(want.dtype, jnp.floating):
                assert rel(mine, want) < EXACT64


def test_float32_prefill_then_decode():
    model = gka_jax.random_model(small_config(), jnp.float32, seed=1)
    ids = tokens(0, 3, 45)
    full = np.asarray(model(ids))
    got, _ = prefill_then_decode(model, ids, 21, jnp.float32)
    assert rel(got, full) < 2e-5


def test_multi_token_extend():
    """Chunked prefill: 19 + 13 + 13 tokens through ``extend`` equal one prefill of 45."""
    with jax.enable_x64(True):
        model = model64()
        ids = tokens(1, 2, 45)
        full, _ = model.prefill(ids, model.init_cache(2, 45, state_dtype=jnp.float64))
        logits1, cache = model.prefill(ids[:, :19], model.init_cache(2, 45, state_dtype=jnp.float64))
        logits2, cache = model.extend(ids[:, 19:32], cache)
        logits3, cache = model.extend(ids[:, 32:], cache)
        assert rel(np.concatenate([logits1, logits2, logits3], axis=1), full) < EXACT64


def test_padded_rows_equal_rows_alone():
    """Rows of different lengths in one batch (padding at the end, ``valid`` False) equal each row alone,
    through prefill and decode: padding never reaches any state."""
    with jax.enable_x64(True):
        model = model64()
        lengths = [30, 17, 5]
        ids = tokens(2, 3, 30)
        valid = np.arange(30)[None, :] < np.asarray(lengths)[:, None]
        cache = model.init_cache(3, 40, state_dtype=jnp.float64)
        logits, cache = model.prefill(np.where(valid, ids, 0), cache, valid=valid, last_only=True)
        next_tokens = [tokens(10 + s, 3, 1)[:, 0] for s in range(6)]
        batched = [np.asarray(logits[:, 0])]
        for tok in next_tokens:
            step, cache = model.decode(tok, cache)
            batched.append(np.asarray(step))
        np.testing.assert_array_equal(np.asarray(cache.lengths), np.asarray(lengths) + 6)
        for row, n in enumerate(lengths):
            alone_cache = model.init_cache(1, 40, state_dtype=jnp.float64)
            alone_logits, alone_cache = model.prefill(ids[row: row + 1, :n], alone_cache, last_only=True)
            alone = [np.asarray(alone_logits[:, 0])]
            for tok in next_tokens:
                step, alone_cache = model.decode(tok[row: row + 1], alone_cache)
                alone.append(np.asarray(step))
            for s, (b, a) in enumerate(zip(batched, alone)):
                assert rel(b[row: row + 1], a) < EXACT64, (row, s)


def test_frozen_rows_keep_their_state():
    """decode with valid=False for a row leaves that row's cache untouched."""
    model = gka_jax.random_model(small_config(), jnp.float32, seed=1)
    _, cache = model.prefill(tokens(3, 2, 20), max_length=30)
    before = jax.tree.map(lambda x: np.asarray(x).copy(), cache)
    _, after = model.decode(jnp.array([5, 6]), cache, valid=jnp.array([True, False]))
    for b_leaf, a_leaf in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
        np.testing.assert_array_equal(np.asarray(a_leaf)[1], b_leaf[1])
    assert list(np.asarray(after.lengths)) == [21, 20]


@pytest.mark.parametrize("options", [
    dict(use_gate=False, use_beta_gate=False, use_alpha_connection=False, use_v_conv=False),
    dict(use_forgetting_gate=False, gla_rescale=False),
    dict(use_forgetting_gate_kk=False),
    dict(kv_proj_rank=8),
    dict(kv_proj_rank=8, kv_learnable_residual=True),
])
def test_gka_options_prefill_decode(options):
    """Every gka_config option keeps prefill + decode == longer prefill (float64, num_iter 30)."""
    with jax.enable_x64(True):
        model = model64(**options)
        ids = tokens(4, 2, 26)
        full, _ = model.prefill(ids, model.init_cache(2, 26, state_dtype=jnp.float64))
        got, _ = prefill_then_decode(model, ids, 20, jnp.float64)
        assert rel(got, full) < EXACT64


def test_context_overflow_is_a_clear_error():
    model = gka_jax.random_model(small_config(), jnp.float32, seed=1)
    ids = tokens(5, 1, 10)
    with pytest.raises(gka_jax.ContextOverflowError, match="cache holds 8"):
        model.prefill(ids, max_length=8)
    _, cache = model.prefill(ids, max_length=10)
    with pytest.raises(gka_jax.ContextOverflowError):
        model.decode(jnp.array([1]), cache)


def test_bad_tokens_are_clear_errors():
    model = gka_jax.random_model(small_config(), jnp.float32, seed=1)
    with pytest.raises(ValueError, match=r"integer ids of shape \[B, T\]"):
        model(jnp.zeros((3,), jnp.int32))
    with pytest.raises(ValueError, match=r"integer ids"):
        model(jnp.zeros((1, 3), jnp.float32))


def test_attention_in_query_blocks_is_exact(monkeypatch):
    """Long prompts run attention a block of queries at a time (bounded logits memory); fresh prefill and
    extend over a cache give the same logits as one block, in float64."""
    from gka_jax import attention

    with jax.enable_x64(True):
        model = model64()
        ids = tokens(5, 2, 64)
        whole = np.asarray(model(ids))
        extend_whole, _ = model.extend(ids[:, 32:], model.prefill(ids[:, :32], model.init_cache(2, 64, jnp.float64))[1])
        monkeypatch.setattr(attention, "QUERY_BLOCK", 16)
        jax.clear_caches()
        blocked = np.asarray(model(ids))
        extend_blocked, _ = model.extend(ids[:, 32:], model.prefill(ids[:, :32], model.init_cache(2, 64, jnp.float64))[1])
        jax.clear_caches()
    assert rel(blocked, whole) < EXACT64
    assert rel(extend_blocked, extend_whole) < EXACT64
    assert rel(extend_whole, whole[:, 32:]) < EXACT64
