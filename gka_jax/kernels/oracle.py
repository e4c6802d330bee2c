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
