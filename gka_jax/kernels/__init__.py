"""GKA kernels behind one backend-neutral API.

``gka_prefill`` (chunked solve + state pass + gated linear attention over a sequence) and ``gka_decode``
(one token, states updated) have the signatures of the pure-JAX reference in ``reference.py``.

Backends:
  ``"pallas"``  the GPU kernels: Pallas (Triton lowering) ``pallas_chunk`` (state pass, GLA output),
                ``pallas_solve`` (chunked Chebyshev solve), and for the in-place decode step the Gluon kernel
                ``gluon_decode`` where jax-triton is installed and it covers the shapes (``decode_kernel``),
                else ``pallas_decode``.
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
from typing import NamedTuple

import jax
from jax.sharding import Mesh, PartitionSpec

from . import gluon_decode, pallas_decode, pallas_prefill, reference
from .reference import HIGHEST, GKAResult

BACKENDS = ("pallas", "xla", "pallas_interpret")
DECODE_KERNELS = ("auto", "gluon", "pallas")
_PALLAS_DECODE_OPTIONS = {"split", "matvec", "num_warps", "value_num_warps", "value_block"}
_GLUON_DECODE_OPTIONS = {"form", "blocks", "lanes", "maxnreg", "slots", "loader_warps", "mirror",
                         "value_partition", "spread_store", "inputs_ahead"}


def decode_kernel(q, k, v, h_kk, h_kv, *, kernel: str = "auto", options=(), gluon_available=None,
                  multiprocessors=None) -> str:
    """Which GPU decode kernel runs: ``kernel`` if not "auto"; else "gluon" (one fused Gluon kernel, faster
    on an H200: docs/kernels.md) when jax-triton and Gluon are installed, the shapes are covered, no
    Pallas-only ``options`` are given and the step has at least one item (b, h) per SM (``multiprocessors``,
    default the GPU's) or Gluon-only ``options`` ask for it; else "pallas". With fewer items than SMs the
    Pallas split kernels measured faster and steadier on an H200 (B=1, H=32: 9.5 against 19-24 us at
    num_iter 10, 16 against 16-27 us at 30, docs/benchmarks.md), where the Gluon kernel's one program per
    item has nothing to overlap."""
    if kernel not in DECODE_KERNELS:
        raise ValueError(f"decode kernel {kernel!r} is not one of {DECODE_KERNELS}")
    available = gluon_decode.AVAILABLE if gluon_available is None else gluon_available
    covered = gluon_decode.supports(q, k, v, h_kk, h_kv)
    if kernel == "gluon" and not (available and covered):
        raise ValueError("the Gluon decode kernel " + ("needs jax-triton and triton with Gluon" if not available
                         else f"covers D = Dv in {gluon_decode.HEAD_DIMS}; got q {q.shape}, v {v.shape}"))
    if kernel == "auto":
        items = q.shape[0] * q.shape[1]
        asked = set(options) & _GLUON_DECODE_OPTIONS
        enough = items >= (multiprocessors or gluon_decode._multiprocessors()) or asked
        kernel = ("gluon" if available and covered and enough and not set(options) & _PALLAS_DECODE_OPTIONS
                  else "pallas")
    return kernel


def _gpu_decode(q, k, v, beta, g, alpha, h_kk, h_kv, *, kernel: str = "auto", **kwargs):
    """The decode step on a GPU: the Gluon kernel or the Pallas kernels (``decode_kernel``)."""
    if decode_kernel(q, k, v, h_kk, h_kv, kernel=kernel, options=kwargs) == "gluon":
        return gluon_decode.gka_decode(q, k, v, beta, g, alpha, h_kk, h_kv, **kwargs)
    return _pallas_decode(q, k, v, beta, g, alpha, h_kk, h_kv, **kwargs)


def _pallas_decode(q, k, v, beta, g, alpha, h_kk, h_kv, **kwargs):
    """The Pallas decode kernels; the Gluon kernel's tuning options are refused with the reason."""
    gluon_only = sorted(set(kwargs) & _GLUON_DECODE_OPTIONS)
    if gluon_only:
        raise ValueError(f"{', '.join(gluon_only)}: tuning of the Gluon decode kernel, but the Pallas decode kernels "
                         f"run here (kernel='pallas', interpret mode, or no jax-triton/Gluon: "
                         f"kernels.decode_kernel)")
    return pallas_decode.gka_decode(q, k, v, beta, g, alpha, h_kk, h_kv, **kwargs)


_PREFILL = {"xla": reference.gka_prefill, "pallas": pallas_prefill.gka_prefill,
            "pallas_interpret": functools.partial(pallas_prefill.gka_prefill, interpret=True)}
_DECODE = {"xla": reference.gka_decode, "pallas": _gpu_decode,
           "pallas_interpret": functools.partial(_pallas_decode, interpret=True)}
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


class PerShard(NamedTuple):
    """Run the kernels of ``backend`` (a name, or None for the automatic choice) once per device of ``mesh``
    (``shard_map``): batch over ``dp``, heads over ``tp`` (query and kv heads together, so every shard keeps
    whole GQA groups). The Pallas kernels are single-device custom calls that XLA cannot partition."""

    backend: str | None
    mesh: Mesh


def _per_shard(kernel, mesh: Mesh, arrays: dict, head_axes: dict, num_heads: int, num_kv_heads: int):
    """Call ``kernel(**arrays)`` per shard. ``head_axes[name]`` is the position of the heads axis (axis 0 is
    batch for every array); a mesh axis that does not divide its dims is not used (those shards repeat the
    work), so any shape runs on any mesh."""
    batch = next(iter(arrays.values())).shape[0]
    dp = "dp" if "dp" in mesh.shape and batch % mesh.shape["dp"] == 0 else None
    tp_size = mesh.shape.get("tp", 1)
    tp = "tp" if "tp" in mesh.shape and num_heads % tp_size == 0 and num_kv_heads % tp_size == 0 else None

    def spec(name, ndim):
        axes = [None] * ndim
        axes[0] = dp
        axes[head_axes[name]] = tp
        return PartitionSpec(*axes)

    names = [n for n, a in arrays.items() if a is not None]
    in_specs = tuple(spec(n, arrays[n].ndim) for n in names)
    out_specs = GKAResult(spec("q", arrays["q"].ndim), spec("q", arrays["q"].ndim),
                          spec("h_kk", 4), spec("h_kv", 4))

    def body(*values):
        given = dict(zip(names, values))
        return kernel(**{n: given.get(n) for n in arrays})

    return jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)(
        *(arrays[n] for n in names))


def _dispatch(table, arrays, head_axes, backend, shapes_ok, kwargs):
    mesh = None
    if isinstance(backend, PerShard):
        backend, mesh = backend.backend, backend.mesh
    chosen = select_backend(backend, shapes_ok=shapes_ok)
    kernel = functools.partial(table[chosen], **kwargs)
    if mesh is None or chosen == "xla":
        return kernel(**arrays)
    return _per_shard(kernel, mesh, arrays, head_axes, arrays["q"].shape[head_axes["q"]],
                      arrays["k"].shape[head_axes["k"]])


_SEQ_HEADS = dict(q=2, k=2, v=2, beta=2, g=2, alpha=2, g_kk=2, h_kk=1, h_kv=1)
_STEP_HEADS = dict(q=1, k=1, v=1, beta=1, g=1, alpha=1, g_kk=1, h_kk=1, h_kv=1)


def gka_prefill(q, k, v, beta, g, alpha, h_kk, h_kv, *, backend: str | PerShard | None = None,
                **kwargs) -> GKAResult:
    """Chunked GKA over a sequence; see ``reference.gka_prefill`` for the arguments and the math."""
    shapes_ok = pallas_prefill.supports(q, k, v, chunk_size=kwargs.get("chunk_size", 64))
    g_kk = kwargs.pop("g_kk", None)
    arrays = dict(q=q, k=k, v=v, beta=beta, g=g, alpha=alpha, h_kk=h_kk, h_kv=h_kv, g_kk=g_kk)
    return _dispatch(_PREFILL, arrays, _SEQ_HEADS, backend, shapes_ok, kwargs)


def gka_decode(q, k, v, beta, g, alpha, h_kk, h_kv, *, backend: str | PerShard | None = None,
               **kwargs) -> GKAResult:
    """One GKA token; see ``reference.gka_decode`` for the arguments and the math."""
    shapes_ok = pallas_prefill.supports(q[:, None], k[:, None], v[:, None])
    g_kk = kwargs.pop("g_kk", None)
    arrays = dict(q=q, k=k, v=v, beta=beta, g=g, alpha=alpha, h_kk=h_kk, h_kv=h_kv, g_kk=g_kk)
    return _dispatch(_DECODE, arrays, _STEP_HEADS, backend, shapes_ok, kwargs)


__all__ = ["BACKENDS", "DECODE_KERNELS", "GKAResult", "HIGHEST", "PerShard", "available_backends", "decode_kernel",
           "gka_decode", "gka_prefill", "select_backend"]
