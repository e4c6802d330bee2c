"""Naive per-token float64 NumPy GKA, written straight from the math. Used only by tests, as the oracle.

Every token builds H_t and S_t explicitly and runs the Chebyshev iteration with dense matrix-vector
products; nothing is chunked or fused, so it shares no code path with ``reference.py``.
"""

from __future__ import annotations

import numpy as np


def chebyshev_fp64(h: np.ndarray, q: np.ndarray, num_iter: int, ridge_strength: float) -> np.ndarray:
    """Chebyshev iteration for (h + lambda I) x = q, lambda = ridge * ||h||_F.  h [D, D], q [D]."""
    fro = np.sqrt(np.sum(h * h))
    lam = ridge_strength * fro
    step = 2.0 / (2.0 * lam + fro)
    rho_sq_4 = (fro / (2.0 * lam + fro) / 2.0) ** 2
    x_prev = np.zeros_like(q)
    x = step * q
    omega = 2.0
    for _ in range(num_iter):
        omega = 1.0 / (1.0 - rho_sq_4 * omega)
        residual = h @ x + lam * x - q
        x, x_prev = omega * x - step * omega * residual - (omega - 1.0) * x_prev, x
    return x


def gka_core_fp64(q, k, v, beta, g, alpha, h_kk=None, h_kv=None, *, num_iter, ridge_strength, scale,
                  g_kk=None):
    """Per-token GKA.  q [B, T, H, D]; k [B, T, Hkv, D]; v [B, T, Hkv, Dv]; beta/g/alpha [B, T, H] or None.

    ``g_kk`` (default: g) is the log-decay of the key-key state. Returns dict of float64 arrays:
    o, x, q_mixed [B, T, H, *] and final h_kk [B, H, D, D], h_kv [B, H, D, Dv].
    """
    q, k, v, g = (np.asarray(a, np.float64) for a in (q, k, v, g))
    g_kk = g if g_kk is None else np.asarray(g_kk, np.float64)
    b, t, num_heads, d = q.shape
    dv = v.shape[-1]
    group = num_heads // k.shape[2]
    h_kk = np.zeros((b, num_heads, d, d)) if h_kk is None else np.array(h_kk, np.float64)
    h_kv = np.zeros((b, num_heads, d, dv)) if h_kv is None else np.array(h_kv, np.float64)
    o = np.zeros((b, t, num_heads, dv))
    x_all = np.zeros((b, t, num_heads, d))
    q_mixed_all = np.zeros((b, t, num_heads, d))
    for bi in range(b):
        for hi in range(num_heads):
            for ti in range(t):
                kt = k[bi, ti, hi // group].copy()
                vt = v[bi, ti, hi // group].copy()
                if beta is not None:
                    kt *= beta[bi, ti, hi]
                    vt *= beta[bi, ti, hi]
                h_kk[bi, hi] = np.exp(g_kk[bi, ti, hi]) * h_kk[bi, hi] + np.outer(kt, kt)
                h_kv[bi, hi] = np.exp(g[bi, ti, hi]) * h_kv[bi, hi] + np.outer(kt, vt)
                qt = q[bi, ti, hi]
                if num_iter > 0:
                    x = chebyshev_fp64(h_kk[bi, hi], qt, num_iter, ridge_strength)
                    qm = x if alpha is None else qt + alpha[bi, ti, hi] * (x - qt)
                else:
                    x, qm = qt, qt
                x_all[bi, ti, hi] = x
                q_mixed_all[bi, ti, hi] = qm
                o[bi, ti, hi] = scale * h_kv[bi, hi].T @ qm
    return {"o": o, "x": x_all, "q_mixed": q_mixed_all, "h_kk": h_kk, "h_kv": h_kv}


# ----------------------------------------------------------------------------- whole layer
def _silu(x):
    return x / (1.0 + np.exp(-x))


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _softplus(x):
    return np.where(x > 20, x, np.log1p(np.exp(np.minimum(x, 20))))


def gka_layer_fp64(params: dict, hidden: np.ndarray, *, num_heads: int, num_kv_heads: int, head_dim: int,
                   num_iter: int, decode_hidden: np.ndarray | None = None, ridge_strength: float = 0.02,
                   norm_eps: float = 1e-6, use_gate: bool = True, use_beta_gate: bool = True,
                   use_alpha_connection: bool = True, use_v_conv: bool = True, use_forgetting_gate: bool = True,
                   use_forgetting_gate_kk: bool = True, gla_rescale: bool = True) -> dict:
    """The whole GKA layer in float64 from HF-named parameters (``q_proj.weight`` [out, in], ...).

    hidden [B, T, E] is processed token by token; ``decode_hidden`` [B, S, E] continues the same sequence.
    Returns float64 arrays over all T (+S) tokens: out, q, k, v (expanded, beta applied), alpha, g, beta, x,
    o_gla, and the final states h_kk, h_kv and raw conv windows conv_q/k/v [B, C, W] (reference layout).
    """
    p = {name: np.asarray(value, np.float64) for name, value in params.items()}
    x = np.asarray(hidden, np.float64)
    if decode_hidden is not None:
        x = np.concatenate([x, np.asarray(decode_hidden, np.float64)], axis=1)
    b, t, _ = x.shape
    d = head_dim

    def conv(raw, weight):  # raw [B, T, C], weight [C, 1, W]
        w = weight.shape[-1]
        padded = np.concatenate([np.zeros((b, w - 1, raw.shape[-1])), raw], axis=1)
        y = sum(weight[:, 0, j] * padded[:, j: j + t] for j in range(w))
        window = np.concatenate([np.zeros((b, w, raw.shape[-1])), raw], axis=1)[:, -w:]
        return _silu(y), np.transpose(window, (0, 2, 1))

    raw_q, raw_k, raw_v = x @ p["q_proj.weight"].T, x @ p["k_proj.weight"].T, x @ p["v_proj.weight"].T
    q, conv_q = conv(raw_q, p["q_conv1d.weight"])
    k, conv_k = conv(raw_k, p["k_conv1d.weight"])
    if use_v_conv:
        v, conv_v = conv(raw_v, p["v_conv1d.weight"])
    else:
        v, conv_v = raw_v, None
    q = q.reshape(b, t, num_heads, d)
    k = k.reshape(b, t, num_kv_heads, d)
    v = v.reshape(b, t, num_kv_heads, d)
    q = q / (np.linalg.norm(q, axis=-1, keepdims=True) + 1e-6)
    k = k / (np.linalg.norm(k, axis=-1, keepdims=True) + 1e-6)
    beta = _sigmoid(x @ p["b_proj.weight"].T + p["b_proj.bias"]) if use_beta_gate else None
    alpha = _sigmoid(x @ p["alpha_proj.weight"].T + p["alpha_proj.bias"]) if use_alpha_connection else None
    if use_forgetting_gate:
        g = -np.exp(p["A_log"]) * _softplus(x @ p["a_proj.weight"].T + p["dt_bias"])
    else:
        g = np.zeros((b, t, num_heads))
    g_kk = g if use_forgetting_gate_kk else np.zeros_like(g)
    beta_eps = None if beta is None else beta + 1e-6
    core = gka_core_fp64(q, k, v, beta_eps, g, alpha, num_iter=num_iter, ridge_strength=ridge_strength,
                         scale=d ** -0.5 if gla_rescale else 1.0, g_kk=g_kk)
    o = core["o"]
    normed = o / np.sqrt(np.mean(o * o, axis=-1, keepdims=True) + norm_eps) * p["o_norm.weight"]
    if use_gate:
        normed = normed * _silu((x @ p["g_proj.weight"].T).reshape(b, t, num_heads, d))
    out = normed.reshape(b, t, num_heads * d) @ p["o_proj.weight"].T
    group = num_heads // num_kv_heads
    scale_kv = 1.0 if beta_eps is None else beta_eps[..., None]
    return {
        "out": out, "q": q, "k": np.repeat(k, group, axis=2) * scale_kv, "v": np.repeat(v, group, axis=2) * scale_kv,
        "alpha": alpha, "g": g, "beta": beta, "x": core["x"], "o_gla": o,
        "h_kk": core["h_kk"], "h_kv": core["h_kv"], "conv_q": conv_q, "conv_k": conv_k, "conv_v": conv_v,
    }
