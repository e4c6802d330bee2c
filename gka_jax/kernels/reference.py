"""Pure-JAX GKA math: the chunked prefill and the one-token decode step.

This is the numerical reference for every kernel in ``gka_jax.kernels`` and the path that runs on CPU/TPU.
Per (batch, head), with log-decay g_t, keys k_t (unit norm times beta_t), values v_t, queries q_t:

    H_t = exp(g_t) H_{t-1} + k_t k_t^T                  (h_kk, [D, D], symmetric, fp32)
    S_t = exp(g_t) S_{t-1} + k_t v_t^T                  (h_kv, [D, Dv], fp32)
    fro_t = ||H_t||_F,  lambda_t = ridge * fro_t
    x_t  = Chebyshev(num_iter) solution of (H_t + lambda_t I) x = q_t on the eigen-bounds
           [lambda_t, lambda_t + fro_t]
    q'_t = q_t + alpha_t (x_t - q_t)                   (num_iter == 0: q'_t = q_t)
    o_t  = scale * S_t^T q'_t

The chunked form splits T into chunks of C tokens. With G_t the within-chunk inclusive cumsum of g and
M[t, s] = exp(G_t - G_s) for s <= t (else 0), inside a chunk that starts from states H0, S0:

    H_t x = exp(G_t) H0 x + sum_{s<=t} M[t,s] (k_s . x) k_s
    ||H_t||_F^2 = exp(2 G_t) ||H0||^2 + 2 exp(G_t) sum_s M[t,s] k_s^T H0 k_s
                  + sum_{s,s'} M[t,s] M[t,s'] (k_s . k_s')^2           (all terms >= 0: no cancellation)
    o_t = scale (exp(G_t) S0^T q'_t + sum_{s<=t} M[t,s] (q'_t . k_s) v_s)

and the chunk-start states come from the chunk summaries (a_n = exp(G_last), U_n = sum_s exp(G_last - G_s)
k_s [k_s, v_s]^T) through the linear recurrence X_{n+1} = a_n X_n + U_n, evaluated either with
``jax.lax.associative_scan`` over chunks or with ``jax.lax.scan``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from ..numerics import upcast

HIGHEST = jax.lax.Precision.HIGHEST


class GKAResult(NamedTuple):
    o: jax.Array     # [B, T, H, Dv] GLA output (before the output norm)
    x: jax.Array     # [B, T, H, D] Chebyshev solution (equals q when num_iter == 0)
    h_kk: jax.Array  # [B, H, D, D] final key-key state
    h_kv: jax.Array  # [B, H, D, Dv] final key-value state


# ----------------------------------------------------------------------------- inputs
def expand_heads(k: jax.Array, v: jax.Array, beta: jax.Array | None, num_heads: int):
    """GQA expansion and beta scaling: kv head j serves query heads j*G .. j*G+G-1.

    k [B, T, Hkv, D], v [B, T, Hkv, Dv], beta [B, T, H] (the multiplier, already including its eps)
    -> k, v [B, T, H, *] in float32.
    """
    group = num_heads // k.shape[2]
    k = jnp.repeat(upcast(k), group, axis=2)
    v = jnp.repeat(upcast(v), group, axis=2)
    if beta is not None:
        b = upcast(beta)[..., None]
        k, v = k * b, v * b
    return k, v


def _to_chunks(x: jax.Array, chunk: int) -> jax.Array:
    """[B, T, H, ...] -> [B, H, N, C, ...] with T zero-padded to N*C (zeros change no state)."""
    b, t, h = x.shape[:3]
    n = -(-t // chunk)
    pad = [(0, 0)] * x.ndim
    pad[1] = (0, n * chunk - t)
    x = jnp.pad(x, pad)
    x = x.reshape((b, n, chunk, h) + x.shape[3:])
    return jnp.moveaxis(x, 3, 1)


def _from_chunks(x: jax.Array, t: int) -> jax.Array:
    """[B, H, N, C, ...] -> [B, T, H, ...]."""
    b, h, n, c = x.shape[:4]
    x = jnp.moveaxis(x, 1, 3).reshape((b, n * c, h) + x.shape[4:])
    return x[:, :t]


def _decay_mask(gcum: jax.Array) -> jax.Array:
    """M[..., t, s] = exp(G_t - G_s) for s <= t, else 0.  gcum [..., C] -> [..., C, C]."""
    c = gcum.shape[-1]
    causal = jnp.tril(jnp.ones((c, c), dtype=bool))
    diff = gcum[..., :, None] - gcum[..., None, :]
    return jnp.exp(jnp.where(causal, diff, -jnp.inf))


# ----------------------------------------------------------------------------- state pass
def _linear_state_pass(keys, values, g, init, *, chunk_size, method, precision):
    """Chunk-start and final values of X_t = exp(g_t) X_{t-1} + keys_t values_t^T.

    keys [B, T, H, D], values [B, T, H, E], g [B, T, H], init [B, H, D, E]
    -> (starts [B, H, N, D, E], final [B, H, D, E]) in float32.
    """
    kc = _to_chunks(upcast(keys), chunk_size)     # [B, H, N, C, D]
    vc = _to_chunks(upcast(values), chunk_size)   # [B, H, N, C, E]
    gcum = jnp.cumsum(_to_chunks(upcast(g), chunk_size), axis=-1)  # [B, H, N, C]
    g_last = gcum[..., -1]                                     # [B, H, N]
    weight = jnp.exp(g_last[..., None] - gcum)                 # [B, H, N, C]
    update = jnp.einsum("bhncd,bhnce->bhnde", kc * weight[..., None], vc, precision=precision)
    decay = jnp.exp(g_last)                                    # [B, H, N]
    init = upcast(init)

    if method == "associative":
        def combine(left, right):
            a_l, u_l = left
            a_r, u_r = right
            return a_l * a_r, a_r[..., None, None] * u_l + u_r

        cum_decay, cum_update = jax.lax.associative_scan(combine, (decay, update), axis=2)
        after = cum_decay[..., None, None] * init[:, :, None] + cum_update   # state after chunk n
        starts = jnp.concatenate([init[:, :, None], after[:, :, :-1]], axis=2)
        final = after[:, :, -1]
    elif method == "scan":
        def step(state, xs):
            a, u = xs
            return a[..., None, None] * state + u, state

        xs = (jnp.moveaxis(decay, 2, 0), jnp.moveaxis(update, 2, 0))
        final, starts = jax.lax.scan(step, init, xs)
        starts = jnp.moveaxis(starts, 0, 2)
    else:
        raise ValueError(f"unknown state-pass method {method!r} (use 'associative' or 'scan')")
    return starts, final


def chunk_state_pass(k, v, g, h_kk0, h_kv0, *, g_kk=None, chunk_size=64, method="associative",
                     precision=HIGHEST):
    """States at the start of every chunk and after the last token.

    k [B, T, H, D], v [B, T, H, Dv], g [B, T, H] float32 log-decay of h_kv, g_kk (default g) that of h_kk;
    h_kk0 [B, H, D, D], h_kv0 [B, H, D, Dv] float32.
    Returns (h_kk_starts [B, H, N, D, D], h_kv_starts [B, H, N, D, Dv], h_kk_final, h_kv_final), float32.
    With one gate for both states, [k, v] is concatenated so one pass yields [h_kk, h_kv].
    """
    d = k.shape[-1]
    kwargs = dict(chunk_size=chunk_size, method=method, precision=precision)
    if g_kk is None:
        values = jnp.concatenate([upcast(k), upcast(v)], axis=-1)
        init = jnp.concatenate([h_kk0, h_kv0], axis=-1)
        starts, final = _linear_state_pass(k, values, g, init, **kwargs)
        return starts[..., :d], starts[..., d:], final[..., :d], final[..., d:]
    kk_starts, kk_final = _linear_state_pass(k, k, g_kk, h_kk0, **kwargs)
    kv_starts, kv_final = _linear_state_pass(k, v, g, h_kv0, **kwargs)
    return kk_starts, kv_starts, kk_final, kv_final


# ----------------------------------------------------------------------------- solver
def chebyshev_chunked(q, k, g, h_kk_starts, *, num_iter, ridge_strength, chunk_size=64, precision=HIGHEST):
    """Chebyshev solution x_t of (H_t + lambda_t I) x = q_t for every token, chunk-parallel.

    q, k [B, T, H, D]; g [B, T, H] log-decay of h_kk; h_kk_starts [B, H, N, D, D] (``chunk_state_pass``).
    Returns x [B, T, H, D] float32.
    """
    t = q.shape[1]
    qc = _to_chunks(upcast(q), chunk_size)      # [B, H, N, C, D]
    kc = _to_chunks(upcast(k), chunk_size)
    gcum = jnp.cumsum(_to_chunks(upcast(g), chunk_size), axis=-1)  # [B, H, N, C]
    mask = _decay_mask(gcum)                                  # [B, H, N, C, C]
    start_decay = jnp.exp(gcum)                               # [B, H, N, C]
    h0 = upcast(h_kk_starts)

    # ||H_t||_F^2 from the chunk-start state and the chunk's keys.
    h0_sq = jnp.sum(h0 * h0, axis=(-2, -1))                   # [B, H, N]
    h0_k = jnp.einsum("bhnij,bhncj->bhnci", h0, kc, precision=precision)
    k_h0_k = jnp.sum(h0_k * kc, axis=-1)                      # [B, H, N, C]
    gram = jnp.einsum("bhncd,bhnsd->bhncs", kc, kc, precision=precision)  # [B, H, N, C, C]
    mp = jnp.einsum("bhnts,bhnsu->bhntu", mask, gram * gram, precision=precision)
    fro_sq = (start_decay ** 2 * h0_sq[..., None]
              + 2 * start_decay * jnp.einsum("bhnts,bhns->bhnt", mask, k_h0_k, precision=precision)
              + jnp.sum(mp * mask, axis=-1))
    fro = jnp.sqrt(jnp.maximum(fro_sq, 0.0))                  # [B, H, N, C]

    def apply_h(x):  # H_t x_t for every t of every chunk
        from_start = jnp.einsum("bhnij,bhncj->bhnci", h0, x, precision=precision) * start_decay[..., None]
        scores = jnp.einsum("bhncd,bhnsd->bhncs", x, kc, precision=precision) * mask
        return from_start + jnp.einsum("bhncs,bhnsd->bhncd", scores, kc, precision=precision)

    x = _chebyshev(apply_h, qc, fro, num_iter=num_iter, ridge_strength=ridge_strength)
    return _from_chunks(x, t)


def chebyshev_coefficients(fro, ridge_strength):
    """(lambda, step, rho^2 / 4), each [..., 1], of the Chebyshev iteration for ``fro`` [...] = ||H||_F:
    lambda = ridge * fro, eigen-bounds [lambda, lambda + fro], step = 2 / (2 lambda + fro) and
    rho = fro / (2 lambda + fro). fro = 0 (H exactly zero) is taken as 1 (see ``_chebyshev``)."""
    fro = jnp.where(fro > 0, fro, 1.0)
    lam = (ridge_strength * fro)[..., None]
    fro = fro[..., None]
    step = 2.0 / (2.0 * lam + fro)
    rho_sq_4 = (fro / (2.0 * lam + fro) / 2.0) ** 2
    return lam, step, rho_sq_4


def _chebyshev(apply_h, q, fro, *, num_iter, ridge_strength):
    """Chebyshev iteration for (H + lambda I) x = q with lambda = ridge * fro, eigen-bounds [lambda, lambda+fro].

    q [..., D]; fro [...]; apply_h maps x [..., D] to H x. ``fro`` is 0 only when H is exactly zero (no
    key seen yet, e.g. a padded slot); the reference divides by zero there, we use fro := 1 instead so the
    result stays finite. No real token reaches this case (a unit-norm key makes fro > 0).
    """
    lam, step, rho_sq_4 = chebyshev_coefficients(fro, ridge_strength)

    def body(_, carry):
        x, x_prev, omega = carry
        omega = 1.0 / (1.0 - rho_sq_4 * omega)
        residual = apply_h(x) + lam * x - q
        x_next = omega * x - step * omega * residual - (omega - 1.0) * x_prev
        return x_next, x, omega

    x0 = step * q
    omega0 = jnp.full_like(step, 2.0)
    x, _, _ = jax.lax.fori_loop(0, num_iter, body, (x0, jnp.zeros_like(x0), omega0))
    return x


# ----------------------------------------------------------------------------- GLA output
def gla_chunked(q, k, v, g, h_kv_starts, *, scale, chunk_size=64, precision=HIGHEST):
    """o_t = scale * S_t^T q_t, chunk-parallel.  q, k [B, T, H, D]; v [B, T, H, Dv]; -> [B, T, H, Dv] f32."""
    t = q.shape[1]
    qc = _to_chunks(upcast(q), chunk_size)
    kc = _to_chunks(upcast(k), chunk_size)
    vc = _to_chunks(upcast(v), chunk_size)
    gcum = jnp.cumsum(_to_chunks(upcast(g), chunk_size), axis=-1)
    mask = _decay_mask(gcum)
    inter = jnp.einsum("bhncd,bhnde->bhnce", qc, upcast(h_kv_starts), precision=precision)
    inter = inter * jnp.exp(gcum)[..., None]
    scores = jnp.einsum("bhncd,bhnsd->bhncs", qc, kc, precision=precision) * mask
    intra = jnp.einsum("bhncs,bhnse->bhnce", scores, vc, precision=precision)
    return _from_chunks(scale * (inter + intra), t)


# ----------------------------------------------------------------------------- entry points
def gka_prefill(q, k, v, beta, g, alpha, h_kk, h_kv, *, num_iter, ridge_strength, scale, g_kk=None,
                chunk_size=64, state_pass="associative", precision=HIGHEST) -> GKAResult:
    """Chunked GKA over a sequence.

    q [B, T, H, D] unit-norm queries; k [B, T, Hkv, D] unit-norm keys; v [B, T, Hkv, Dv];
    beta [B, T, H] multiplier of k and v (or None); g [B, T, H] float32 log-decay (of h_kv, and of h_kk
    unless ``g_kk`` is given); alpha [B, T, H] mixing weight (or None: q' = x);
    h_kk [B, H, D, D], h_kv [B, H, D, Dv] float32 initial states.
    Outputs o and x are in q's dtype, states in float32.
    """
    num_heads = q.shape[2]
    k, v = expand_heads(k, v, beta, num_heads)
    kk_starts, kv_starts, h_kk_final, h_kv_final = chunk_state_pass(
        k, v, g, h_kk, h_kv, g_kk=g_kk, chunk_size=chunk_size, method=state_pass, precision=precision)
    q32 = upcast(q)
    if num_iter > 0:
        x = chebyshev_chunked(q32, k, g if g_kk is None else g_kk, kk_starts, num_iter=num_iter,
                              ridge_strength=ridge_strength, chunk_size=chunk_size, precision=precision)
        q_mixed = x if alpha is None else q32 + upcast(alpha)[..., None] * (x - q32)
    else:
        x = q32
        q_mixed = q32
    o = gla_chunked(q_mixed, k, v, g, kv_starts, scale=scale, chunk_size=chunk_size, precision=precision)
    return GKAResult(o.astype(q.dtype), x.astype(q.dtype), h_kk_final, h_kv_final)


def gka_decode(q, k, v, beta, g, alpha, h_kk, h_kv, *, num_iter, ridge_strength, scale, g_kk=None,
               precision=HIGHEST) -> GKAResult:
    """One token.  q [B, H, D]; k [B, Hkv, D]; v [B, Hkv, Dv]; beta, g, alpha, g_kk [B, H]; states float32.

    Returns GKAResult with o, x [B, H, *] and the updated states.
    """
    num_heads = q.shape[1]
    k, v = expand_heads(k[:, None], v[:, None], None if beta is None else beta[:, None], num_heads)
    k, v = k[:, 0], v[:, 0]                                   # [B, H, D], [B, H, Dv]
    g = upcast(g)
    g_kk = g if g_kk is None else upcast(g_kk)
    h_kk = jnp.exp(g_kk)[..., None, None] * upcast(h_kk) + k[..., :, None] * k[..., None, :]
    h_kv = jnp.exp(g)[..., None, None] * upcast(h_kv) + k[..., :, None] * v[..., None, :]
    q32 = upcast(q)
    if num_iter > 0:
        fro = jnp.sqrt(jnp.sum(h_kk * h_kk, axis=(-2, -1)))   # [B, H]

        def apply_h(x):
            return jnp.einsum("bhij,bhj->bhi", h_kk, x, precision=precision)

        x = _chebyshev(apply_h, q32, fro, num_iter=num_iter, ridge_strength=ridge_strength)
        q_mixed = x if alpha is None else q32 + upcast(alpha)[..., None] * (x - q32)
    else:
        x = q32
        q_mixed = q32
    o = scale * jnp.einsum("bhkv,bhk->bhv", h_kv, q_mixed, precision=precision)
    return GKAResult(o.astype(q.dtype), x.astype(q.dtype), h_kk, h_kv)
