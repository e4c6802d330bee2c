"""GKA kernels behind one backend-neutral API.

``gka_prefill`` (chunked solve + state pass + gated linear attention over a sequence) and ``gka_decode``
(one token, states updated) have the signatures of the pure-JAX reference in ``reference.py``.

Backends:
  ``"pallas"``  Pallas GPU kernels (Triton lowering): ``pallas_chunk`` (state pass, GLA output),
                ``pallas_solve`` (chunked Chebyshev solve), ``pallas_decode`` (in-place decode step).
  ``"xla"``     the pure-JAX chunked reference; runs everywhere and is the numerical oracle.
  ``"pallas_interpret"``  the Pallas kernels in interpret mode (any platform; slow: for tests and debugging).

``backend=None``/``"auto"`` picks ``"pallas"`` on GPU when this jax still ships the Triton lowering and the
shapes are covered (power-of-2 head dims >= 16), else ``"xla"``; a GPU without the Pallas backend falls back
with a warning instead of failing. An explicit ``backend=`` is honoured or refused with a clear error.
The environment variable ``GKA_KERNEL_BACKEND`` sets the default for the whole process.
"""

from __future__ import annotations

import functools
import os
import warnings

import jax

from . import pallas_decode, pallas_prefill, reference
from .reference import HIGHEST, GKAResult

BACKENDS = ("pallas", "xla", "pallas_interpret")
_PREFILL = {"xla": reference.gka_prefill, "pallas": pallas_prefill.gka_prefill,
            "pallas_interpret": functools.partial(pallas_prefill.gka_prefill, interpret=True)}
_DECODE = {"xla": reference.gka_decode, "pallas": pallas_decode.gka_decode,
           "pallas_interpret": functools.partial(pallas_decode.gka_decode, interpret=True)}
_PALLAS = pallas_prefill.AVAILABLE and pallas_decode.AVAILABLE
_AVAILABLE = {"xla": True, "pallas": _PALLAS, "pallas_interpret": _PALLAS}
_warned: set[str] = set()


def _platform() -> str:
    return jax.default_backend()


def available_backends(platform: str | None = None) -> tuple[str, ...]:
    """Backends that can run on ``platform`` (default: jax's default backend), best first."""
    platform = platform or _platform()
    return tuple(b for b in BACKENDS if _AVAILABLE[b] and (b != "pallas" or platform == "gpu"))


def _warn_once(message: str):
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def select_backend(backend: str | None = None, *, platform: str | None = None, shapes_ok: bool = True) -> str:
    """The backend to run: ``backend`` if given (it must exist and be usable), else the best one here."""
    backend = backend or os.environ.get("GKA_KERNEL_BACKEND") or "auto"
    platform = platform or _platform()
    if backend != "auto":
        if backend not in BACKENDS:
            raise ValueError(f"unknown GKA kernel backend {backend!r} (choose from: auto, {', '.join(BACKENDS)})")
        if backend not in available_backends(platform):
            why = ("this jax has no Pallas Triton lowering" if not _AVAILABLE[backend]
                   else f"it needs a GPU (platform is {platform})")
            raise ValueError(f"GKA kernel backend {backend!r} cannot run here: {why}")
        if not shapes_ok and backend != "xla":
            raise ValueError(f"GKA kernel backend {backend!r} does not cover these shapes (head dims must be "
                             f"powers of 2 >= 16)")
        return backend
    if platform == "gpu":
        if not _AVAILABLE["pallas"]:
            _warn_once("GKA Pallas GPU kernels are unavailable in this jax (no Triton lowering): "
                       "using the XLA path")
        elif shapes_ok:
            return "pallas"
    return "xla"


def gka_prefill(q, k, v, beta, g, alpha, h_kk, h_kv, *, backend: str | None = None, **kwargs) -> GKAResult:
    """Chunked GKA over a sequence; see ``reference.gka_prefill`` for the arguments and the math."""
    shapes_ok = pallas_prefill.supports(q, k, v, chunk_size=kwargs.get("chunk_size", 64))
    chosen = select_backend(backend, shapes_ok=shapes_ok)
    return _PREFILL[chosen](q, k, v, beta, g, alpha, h_kk, h_kv, **kwargs)


def gka_decode(q, k, v, beta, g, alpha, h_kk, h_kv, *, backend: str | None = None, **kwargs) -> GKAResult:
    """One GKA token; see ``reference.gka_decode`` for the arguments and the math."""
    shapes_ok = pallas_prefill.supports(q[:, None], k[:, None], v[:, None])
    chosen = select_backend(backend, shapes_ok=shapes_ok)
    return _DECODE[chosen](q, k, v, beta, g, alpha, h_kk, h_kv, **kwargs)


__all__ = ["BACKENDS", "GKAResult", "HIGHEST", "available_backends", "gka_decode", "gka_prefill",
           "select_backend"]
