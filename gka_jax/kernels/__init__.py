"""GKA kernels behind one backend-neutral API.

``gka_prefill`` (chunked solve + state pass + gated linear attention over a sequence) and ``gka_decode``
(one token, states updated) have the signatures of the pure-JAX reference in ``reference.py``. The
dispatcher picks an implementation by backend and availability; ``backend=`` overrides it.
Backends: ``"xla"`` (the pure-JAX chunked reference; runs everywhere).
"""

from __future__ import annotations

from . import reference
from .reference import GKAResult, HIGHEST

_PREFILL = {"xla": reference.gka_prefill}
_DECODE = {"xla": reference.gka_decode}


def available_backends() -> tuple[str, ...]:
    return tuple(_PREFILL)


def select_backend(backend: str | None = None) -> str:
    """The backend to run: ``backend`` if given (it must exist), else the best one for this platform."""
    if backend is not None and backend != "auto":
        if backend not in _PREFILL:
            raise ValueError(f"unknown GKA kernel backend {backend!r} (available: {', '.join(_PREFILL)})")
        return backend
    return "xla"  # the only backend so far; GPU kernels register here and are preferred on GPU


def gka_prefill(q, k, v, beta, g, alpha, h_kk, h_kv, *, backend: str | None = None, **kwargs) -> GKAResult:
    """Chunked GKA over a sequence; see ``reference.gka_prefill`` for the arguments and the math."""
    return _PREFILL[select_backend(backend)](q, k, v, beta, g, alpha, h_kk, h_kv, **kwargs)


def gka_decode(q, k, v, beta, g, alpha, h_kk, h_kv, *, backend: str | None = None, **kwargs) -> GKAResult:
    """One GKA token; see ``reference.gka_decode`` for the arguments and the math."""
    return _DECODE[select_backend(backend)](q, k, v, beta, g, alpha, h_kk, h_kv, **kwargs)


__all__ = ["GKAResult", "HIGHEST", "available_backends", "gka_decode", "gka_prefill", "select_backend"]
