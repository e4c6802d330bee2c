"""The Gated KalmaNet (GKA) layer.

For input x [B, T, E] (already pre-normed by the decoder layer), per head h of H = num_heads:

    q, k, v  = silu(causal depthwise conv_W(x W_q / W_k / W_v))   (v: no conv/silu without use_v_conv)
    k, v     = GQA-expanded to H heads (or low-rank expanded with kv_proj_rank)
    q, k     = q / (||q|| + 1e-6), k / (||k|| + 1e-6)               (per head, over D)
    beta     = sigmoid(x W_b + b_b) + 1e-6,  k *= beta, v *= beta   (use_beta_gate)
    alpha    = sigmoid(x W_alpha + b_alpha)                          (use_alpha_connection, else 1)
    g        = -exp(A_log) softplus(x W_a + dt_bias)  in float32      (use_forgetting_gate, else 0)
    o        = GKA(q, k, v, g, alpha)   -- see gka_jax.kernels.reference (Chebyshev ridge solve + GLA)
    y        = (RMSNorm_D(o) * w_norm * silu(x W_g)) W_o            (use_gate; else plain RMSNorm)

The Chebyshev solve uses ``num_iter`` iterations (a per-call argument; 0 gives gated linear attention).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from . import kernels
from .cache import GKACache
from .config import ModelConfig
from .layers import param
from .numerics import acc_dtype, upcast

L2_EPS = 1e-6
BETA_EPS = 1e-6


def causal_conv(raw, conv_state, weight, valid_count):
    """Depthwise causal convolution continuing from ``conv_state``.

    raw [B, T, *C] new raw inputs; conv_state [B, W, *C] the W previous raw inputs (oldest first, zeros
    at the start of a sequence); weight [*C, W] with weight[..., -1] multiplying the current token;
    valid_count [B] tokens of ``raw`` that are real (the rest is padding at the end).
    Returns (y [B, T, *C] in raw's dtype, before the activation; the new state [B, W, *C]).
    """
    w = weight.shape[-1]
    t = raw.shape[1]
    ext = jnp.concatenate([conv_state.astype(raw.dtype), raw], axis=1)   # [B, W + T, *C]
    y = sum(upcast(weight[..., j]) * upcast(ext[:, j + 1: j + 1 + t]) for j in range(w))
    # The last W real inputs: ext[n : n + W] for n real tokens of this call.
    new_state = jax.vmap(lambda e, n: jax.lax.dynamic_slice_in_dim(e, n, w, axis=0))(ext, valid_count)
    return y.astype(raw.dtype), new_state.astype(conv_state.dtype)


def l2_normalize(x):
    """x / (||x|| + 1e-6) over the last axis, computed in float32, returned in x's dtype."""
    x32 = upcast(x)
    return (x32 / (jnp.sqrt(jnp.sum(x32 * x32, axis=-1, keepdims=True)) + L2_EPS)).astype(x.dtype)


class GKA(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype, precision, rngs: nnx.Rngs | None = None):
        self.cfg = cfg
        self.precision = precision
        gc = cfg.gka
        e, h, kv, d, w = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, gc.conv_size
        # Weights keep the checkpoint's [out, in] orientation with heads split out.
        self.q_proj = param(rngs, (h, d, e), ("heads", "head_dim", "embed"), dtype)
        self.k_proj = param(rngs, (kv, d, e), ("kv_heads", "head_dim", "embed"), dtype)
        self.v_proj = param(rngs, (kv, d, e), ("kv_heads", "head_dim", "embed"), dtype)
        self.q_conv = param(rngs, (h, d, w), ("heads", "head_dim", "conv"), dtype)
        self.k_conv = param(rngs, (kv, d, w), ("kv_heads", "head_dim", "conv"), dtype)
        if gc.use_v_conv:
            self.v_conv = param(rngs, (kv, d, w), ("kv_heads", "head_dim", "conv"), dtype)
        # Gates (the reference keeps a_proj, A_log and dt_bias even without the forgetting gate).
        self.a_proj = param(rngs, (h, e), ("heads", "embed"), dtype)
        self.A_log = param(rngs, (h,), ("heads",), dtype, init="a_log")
        self.dt_bias = param(rngs, (h,), ("heads",), dtype, init="dt_bias")
        if gc.use_beta_gate:
            self.b_proj = param(rngs, (h, e), ("heads", "embed"), dtype)
            self.b_bias = param(rngs, (h,), ("heads",), dtype, init="zeros")
        if gc.use_alpha_connection:
            self.alpha_proj = param(rngs, (h, e), ("heads", "embed"), dtype)
            self.alpha_bias = param(rngs, (h,), ("heads",), dtype, init="zeros")
        if gc.kv_proj_rank is not None:
            r = gc.kv_proj_rank
            self.k_lowrank_a = param(rngs, (r, kv, d), ("rank", "kv_heads", "head_dim"), dtype, fan_in=kv * d)
            self.k_lowrank_b = param(rngs, (h, d, r), ("heads", "head_dim", "rank"), dtype, init="zeros")
            self.v_lowrank_a = param(rngs, (r, kv, d), ("rank", "kv_heads", "head_dim"), dtype, fan_in=kv * d)
            self.v_lowrank_b = param(rngs, (h, d, r), ("heads", "head_dim", "rank"), dtype, init="zeros")
            if gc.kv_learnable_residual:
                self.k_rep = param(rngs, (h, kv), ("heads", "kv_heads"), dtype, init="zeros")
                self.v_rep = param(rngs, (h, kv), ("heads", "kv_heads"), dtype, init="zeros")
        if gc.use_gate:
            self.g_proj = param(rngs, (h, d, e), ("heads", "head_dim", "embed"), dtype)
        self.o_norm = param(rngs, (d,), ("head_dim",), dtype, init="ones")
        self.o_proj = param(rngs, (e, h, d), ("embed", "heads", "head_dim"), dtype, fan_in=h * d)

    # ------------------------------------------------------------------ pieces
    def _expand(self, x, which: str):
        """Flat kv-head features [B, T, Hkv, D] -> the H-head form the kernels take.

        Plain GQA stays at Hkv heads (the kernels repeat head j for query heads j*G..j*G+G-1); the
        low-rank path (kv_proj_rank, when heads are grouped) builds all H heads here.
        """
        cfg, p = self.cfg, self.precision
        if cfg.gka.kv_proj_rank is None or cfg.num_kv_heads == cfg.num_heads:
            return x
        a = getattr(self, f"{which}_lowrank_a")[...]
        b = getattr(self, f"{which}_lowrank_b")[...]
        low = jnp.einsum("btkd,rkd->btr", x, a, precision=p)
        out = jnp.einsum("btr,hdr->bthd", jax.nn.silu(low), b, precision=p)
        if cfg.gka.kv_learnable_residual:
            rep = getattr(self, f"{which}_rep")[...]
            residual = jnp.einsum("hk,btkd->bthd", rep, x, precision=p)
        else:
            residual = jnp.repeat(x, cfg.q_per_kv, axis=2)
        return out + residual

    def features(self, x, conv_state_q, conv_state_k, conv_state_v, valid):
        """Everything the recurrence consumes, plus the new conv states."""
        cfg, gc, p = self.cfg, self.cfg.gka, self.precision
        count = jnp.sum(valid, axis=1).astype(jnp.int32)
        raw_q = jnp.einsum("bte,hde->bthd", x, self.q_proj[...], precision=p)
        raw_k = jnp.einsum("bte,hde->bthd", x, self.k_proj[...], precision=p)
        raw_v = jnp.einsum("bte,hde->bthd", x, self.v_proj[...], precision=p)
        q, conv_q = causal_conv(raw_q, conv_state_q, self.q_conv[...], count)
        k, conv_k = causal_conv(raw_k, conv_state_k, self.k_conv[...], count)
        q, k = jax.nn.silu(q), jax.nn.silu(k)
        if gc.use_v_conv:
            v, conv_v = causal_conv(raw_v, conv_state_v, self.v_conv[...], count)
            v = jax.nn.silu(v)
        else:
            v, conv_v = raw_v, None
        k, v = self._expand(k, "k"), self._expand(v, "v")
        q, k = l2_normalize(q), l2_normalize(k)

        def gate(proj, bias):
            return jax.nn.sigmoid(jnp.einsum("bte,he->bth", x, proj, precision=p) + bias)

        beta = upcast(gate(self.b_proj[...], self.b_bias[...])) + BETA_EPS if gc.use_beta_gate else None
        alpha = gate(self.alpha_proj[...], self.alpha_bias[...]) if gc.use_alpha_connection else None
        if gc.use_forgetting_gate:
            a = upcast(jnp.einsum("bte,he->bth", x, self.a_proj[...], precision=p))
            g = -jnp.exp(upcast(self.A_log[...])) * jax.nn.softplus(a + upcast(self.dt_bias[...]))
        else:
            g = jnp.zeros(x.shape[:2] + (cfg.num_heads,), acc_dtype(x.dtype))
        g_kk = None if gc.use_forgetting_gate_kk else jnp.zeros_like(g)
        # Padding changes no state: no key, no value, no decay.
        g = jnp.where(valid[..., None], g, 0.0)
        k = jnp.where(valid[..., None, None], k, 0)
        v = jnp.where(valid[..., None, None], v, 0)
        return dict(q=q, k=k, v=v, beta=beta, alpha=alpha, g=g, g_kk=g_kk,
                    conv_q=conv_q, conv_k=conv_k, conv_v=conv_v)

    def output(self, x, o):
        """Gated RMSNorm over D (weight shared by heads) and the output projection.  o [B, T, H, D]."""
        gc, p = self.cfg.gka, self.precision
        o32 = upcast(o)
        normed = o32 * jax.lax.rsqrt(jnp.mean(o32 * o32, axis=-1, keepdims=True) + gc.norm_eps)
        normed = normed * upcast(self.o_norm[...])
        if gc.use_gate:
            gate = upcast(jnp.einsum("bte,hde->bthd", x, self.g_proj[...], precision=p))
            normed = normed * jax.nn.silu(gate)
        return jnp.einsum("bthd,ehd->bte", normed.astype(x.dtype), self.o_proj[...], precision=p)

    # ------------------------------------------------------------------ forward
    def __call__(self, x, valid, cache: GKACache, *, num_iter: int, backend: str | None = None,
                 return_intermediates: bool = False):
        """x [B, T, E]; valid [B, T] bool (real tokens first, padding last); cache holds the states.

        Returns (y [B, T, E], updated cache) and, with ``return_intermediates``, a dict of the tensors
        the reference exposes (q, k, v after gating, alpha, g, beta, x, o_gla).
        """
        cfg, gc = self.cfg, self.cfg.gka
        f = self.features(x, cache.conv_q, cache.conv_k, cache.conv_v, valid)
        scale = cfg.head_dim ** -0.5 if gc.gla_rescale else 1.0
        common = dict(num_iter=num_iter, ridge_strength=gc.ridge_strength, scale=scale, g_kk=f["g_kk"],
                      precision=self.precision, backend=backend)
        if x.shape[1] == 1:
            squeeze = lambda a: None if a is None else a[:, 0]  # noqa: E731
            res = kernels.gka_decode(*(squeeze(f[n]) for n in ("q", "k", "v", "beta", "g", "alpha")),
                                     cache.h_kk, cache.h_kv, **{**common, "g_kk": squeeze(f["g_kk"])})
            # A frozen row (valid False) has k = v = 0 and g = 0, so its states come back unchanged
            # (exp(0) H + 0); no select here, which keeps the kernel's in-place state update in place.
            o, x_sol, h_kk, h_kv = res.o[:, None], res.x[:, None], res.h_kk, res.h_kv
        else:
            res = kernels.gka_prefill(f["q"], f["k"], f["v"], f["beta"], f["g"], f["alpha"],
                                      cache.h_kk, cache.h_kv, chunk_size=gc.chunk_size, **common)
            o, x_sol, h_kk, h_kv = res
        y = self.output(x, o)
        new_cache = GKACache(conv_q=f["conv_q"], conv_k=f["conv_k"], conv_v=f["conv_v"],
                             h_kk=h_kk.astype(cache.h_kk.dtype), h_kv=h_kv.astype(cache.h_kv.dtype))
        if not return_intermediates:
            return y, new_cache
        inter = dict(q=f["q"], alpha=f["alpha"], beta=f["beta"], g=f["g"], x=x_sol, o_gla=o)
        group = cfg.num_heads // f["k"].shape[2]
        b = 1.0 if f["beta"] is None else f["beta"][..., None]
        inter["k"] = jnp.repeat(upcast(f["k"]), group, axis=2) * b
        inter["v"] = jnp.repeat(upcast(f["v"]), group, axis=2) * b
        return y, new_cache, inter
