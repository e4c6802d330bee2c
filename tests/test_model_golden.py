"""The tiny hybrid checkpoint (pattern *-GKA-*-*-GKA-GKA) against the reference goldens.

fp32 (precision=HIGHEST) logits vs the goldens' float64 logits: rel <= 1e-4 (observed 7e-6). The reference's
own logits carry TF32 error (~2e-2, MANIFEST ``validation``); we require <= 5e-2 as the MANIFEST recommends.
"""

import jax.numpy as jnp
import numpy as np
import pytest

import gka_jax

from conftest import load_case, rel


@pytest.fixture(scope="module")
def tiny():
    arrays, manifest = load_case("tiny_hybrid_qwen3")
    return arrays, manifest


def greedy(model, ids, steps):
    """Prefill, then one-token decode steps feeding back the argmax."""
    logits, cache = model.prefill(ids, max_length=ids.shape[1] + steps, last_only=True)
    token = jnp.argmax(logits[:, -1], axis=-1)
    tokens, step_logits = [token], []
    for _ in range(steps - 1):
        logits, cache = model.decode(token, cache)
        step_logits.append(logits)
        token = jnp.argmax(logits, axis=-1)
        tokens.append(token)
    return np.stack([np.asarray(t) for t in tokens], 1), np.stack([np.asarray(x) for x in step_logits], 1)


@pytest.mark.parametrize("folder", ["checkpoint", "checkpoint_sharded"])
def test_logits_and_greedy(golden, tiny, folder):
    arrays, manifest = tiny
    model = gka_jax.load(golden / "tiny_hybrid_qwen3" / folder, dtype="float32")
    ids = arrays["input_ids"]
    logits = np.asarray(model(ids))
    assert logits.shape == (2, 37, 512) and logits.dtype == np.float32
    assert rel(logits, arrays["naive_fp64.logits"]) < 1e-4
    assert rel(logits, arrays["logits"]) < 5e-2
    tokens, step_logits = greedy(model, ids, arrays["naive_fp64.generated_ids"].shape[1])
    np.testing.assert_array_equal(tokens, arrays["naive_fp64.generated_ids"])
    # The reference's cached decode logits carry its TF32 prefill-state error (1.4e-2 vs exact, MANIFEST).
    assert rel(step_logits, arrays["decode_logits_cached"]) < 5e-2


def test_fullseq_logits(golden, tiny):
    arrays, _ = tiny
    model = gka_jax.load(golden / "tiny_hybrid_qwen3" / "checkpoint", dtype="float32")
    seq = np.concatenate([arrays["input_ids"], arrays["generated_ids_cached"]], axis=1)
    assert rel(model(seq), arrays["fullseq_logits"]) < 5e-2


def test_num_iter_is_a_runtime_knob(golden, tiny):
    arrays, _ = tiny
    model = gka_jax.load(golden / "tiny_hybrid_qwen3" / "checkpoint", dtype="float32")
    ids = arrays["input_ids"]
    full = np.asarray(model(ids))
    ten = np.asarray(model(ids, num_iter=10))
    assert 1e-6 < rel(ten, full) < 0.5
    model10 = gka_jax.load(golden / "tiny_hybrid_qwen3" / "checkpoint", dtype="float32", num_iter=10)
    np.testing.assert_array_equal(np.asarray(model10(ids)), ten)
    with pytest.raises(ValueError, match="num_iter"):
        model(ids, num_iter=-1)


def test_bf16_next_token_kl(golden, tiny):
    """KL(p_fp32 || p_bf16) of next-token distributions over every position of the tiny model.

    Measured mean 2.0e-4 nats, max 4.9e-4 (2 x 37 positions): bf16 rounds weights and activations at
    ~4e-3 relative, which moves the tiny model's logits by ~1e-2 absolute; KL is second order in that
    (~0.5 * var(dlogits)), so it stays orders of magnitude under 1e-2. Bounds: mean < 2e-3, max < 2e-2.
    """
    arrays, _ = tiny
    path = golden / "tiny_hybrid_qwen3" / "checkpoint"
    ids = arrays["input_ids"]
    logp32 = np.asarray(jax_log_softmax(gka_jax.load(path, dtype="float32")(ids)), np.float64)
    logp16 = np.asarray(jax_log_softmax(gka_jax.load(path, dtype="bfloat16")(ids)), np.float64)
    kl = np.sum(np.exp(logp32) * (logp32 - logp16), axis=-1)
    assert kl.mean() < 2e-3 and kl.max() < 2e-2, (kl.mean(), kl.max())
    assert kl.mean() > 0  # bf16 does change the distribution


def jax_log_softmax(x):
    import jax
    return jax.nn.log_softmax(jnp.asarray(x, jnp.float32), axis=-1)
