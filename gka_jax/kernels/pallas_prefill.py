"""GKA prefill from the three Pallas GPU kernels, with a ``jax.custom_vjp`` for fine-tuning.

    starts and finals of h_kk, h_kv = state_pass_segmented(k, v)  (pallas_chunk: optionally segments of chunks
                                                                   in parallel)
    x, q' = q + alpha (x - q)      = chebyshev_solve(q, h_kk starts)  (pallas_solve: num_iter iterations per
                                                                       chunk in registers, then the mix)
    o                              = gla_output(q', k, v, h_kv starts) (pallas_chunk: one program per chunk)
(or, with ``tuning["gla"]["fused"] = True``: a kk-only state pass, and gla_fused walks the chunks carrying
h_kv in registers.) Segmented starts are fixed up inside the solve and GLA kernels as they load them.

Same signature and result as ``reference.gka_prefill``. GQA keys/values stay at their Hkv heads in memory:
each kernel reads kv head h // group for query head h and applies beta itself.

Matmul precision inside the kernels follows ``precision`` (elementwise math, Frobenius norms, Chebyshev
coefficients, accumulation and final states are fp32 in every mode):
  HIGHEST  IEEE fp32 dots (FMA units; slow): float32 models and tests;
  HIGH     TF32 tensor-core dots everywhere, fp32 chunk starts and q';
  DEFAULT  (bf16 models) the solve's and the GLA output's dots take bf16 operands with fp32 accumulation,
           and the chunk starts and q' passed between kernels are stored in bf16, as the PyTorch reference
           (its kernels, fla's chunk_simple_gla) does: half the traffic, twice the tensor-core rate of TF32.
           The state updates keep fp32 operands (TF32), so the final h_kk / h_kv stay TF32-accurate.

Gradients: the backward pass is the VJP of the pure-JAX reference (``reference.gka_prefill``) at the same
inputs: it recomputes the forward through XLA, so gradients equal autodiff of the reference path exactly.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from ..numerics import upcast
from . import gluon_solve, pallas_chunk, pallas_solve, reference
from .reference import HIGHEST, GKAResult

AVAILABLE = pallas_chunk.AVAILABLE and pallas_solve.AVAILABLE


def supports(q, k, v, *, chunk_size: int = 64) -> bool:
    """Shapes the kernels cover: power-of-2 head dims >= 16 (Triton block and dot rules), chunk >= 16."""
    def pow2(n):
        return n >= 16 and not n & (n - 1)
    return pow2(q.shape[-1]) and pow2(v.shape[-1]) and pow2(chunk_size) and q.shape[2] % k.shape[2] == 0


# Tuned on an H200 at B=1, H=32, Hkv=8, D=128, T=4K and 16K (benchmarks/kernels.py variants,
# benchmarks/tune_kernels.py; docs/benchmarks.md): one state pass for both states, then gla_output (4.74 ms
# in all at 16K against 5.64 for the kk-only pass + fused GLA, whose chunk walk is serial). The unsegmented
# pass was the fastest in two runs at 16K (4.68 / 4.51 ms against 4.64-4.88 for segments of 16, 32, 64
# chunks), so segments are off by default; ``{"state_pass": {"segment_chunks": L}}`` turns them on.
GPU_TUNING = {
    "solve": {"kernel": "auto", "num_warps": 4, "num_stages": 1},
    "state_pass": {"block_v": 64, "block_k": 128, "num_warps": 4, "num_stages": 2, "segment_chunks": None},
    "gla": {"fused": False, "block_v": 128, "num_warps": 4, "num_stages": 1},
}
# The fused alternative: kk-only state pass, then gla_fused carries h_kv through the chunks in registers.
FUSED_GLA = {"state_pass": {"block_v": 32, "block_k": 128, "num_warps": 4, "num_stages": 2},
             "gla": {"fused": True, "block_v": 32, "num_warps": 4, "num_stages": 2}}


SOLVE_KERNELS = ("auto", "gluon", "pallas")


def solve_kernel(q, k, starts, *, kernel: str = "auto", chunk_size: int, operand_dtype, interpret: bool,
                 gluon_available=None) -> str:
    """Which solve kernel runs: ``kernel`` if not "auto"; else "gluon" (``gluon_solve``, asynchronous wgmma;
    faster on an H200: docs/kernels.md) for bf16 dot operands (the DEFAULT precision) when jax-triton and
    Gluon are installed (the ``gluon_call.SUPPORTED`` releases), the GPU is a Hopper, not in interpret mode,
    and the shapes are covered (C = 64, D in 64/128, unsegmented starts); else "pallas" (``pallas_solve``,
    which also runs TF32/IEEE operands and interpret mode)."""
    if kernel not in SOLVE_KERNELS:
        raise ValueError(f"solve kernel {kernel!r} is not one of {SOLVE_KERNELS}")
    available = gluon_solve.AVAILABLE and gluon_solve.on_hopper() if gluon_available is None else gluon_available
    reasons = [why for bad, why in (
        (not available, "needs jax-triton 0.3 and triton 3.6 with Gluon, on a Hopper GPU"),
        (interpret, "has no interpret mode"),
        (jnp.dtype(operand_dtype) != jnp.bfloat16, "takes bf16 dot operands only (precision DEFAULT)"),
        (not gluon_solve.supports(q, k, starts, chunk_size=chunk_size),
         f"covers chunk_size {gluon_solve.CHUNK}, D in {gluon_solve.HEAD_DIMS} and unsegmented starts"),
    ) if bad]
    if kernel == "gluon" and reasons:
        raise ValueError(f"the Gluon solve kernel {reasons[0]}; got q {q.shape}, chunk_size={chunk_size}")
    if kernel == "auto":
        kernel = "pallas" if reasons else "gluon"
    return kernel


def _kernel_precision(precision):
    """Dot algorithm of the kernels' float32 dots: IEEE for HIGHEST, TF32 otherwise."""
    return HIGHEST if precision == HIGHEST else jax.lax.Precision.DEFAULT


def _operand_dtype(precision):
    """Operand dtype of the solve's and the GLA output's dots, and of the chunk starts and q' passed between
    kernels: bf16 for the fast default (the reference's policy), fp32 (TF32 or IEEE dots) for HIGH /
    HIGHEST. (The state updates always take fp32 operands.)"""
    return jnp.bfloat16 if precision in (None, jax.lax.Precision.DEFAULT) else jnp.float32


def _forward(q, k, v, beta, g, alpha, h_kk, h_kv, g_kk, *, num_iter, ridge_strength, scale, chunk_size,
             precision, interpret, tuning):
    tuning = {name: dict(opts) for name, opts in tuning or ()} or ({} if interpret else GPU_TUNING)
    tuning = _fit_blocks(tuning, q.shape[-1], v.shape[-1])
    kernel_precision = _kernel_precision(precision)
    operands = _operand_dtype(precision)
    common = dict(chunk_size=chunk_size, precision=kernel_precision, interpret=interpret)
    gla_opts = dict(tuning.get("gla", {}))
    fused = gla_opts.pop("fused", False)
    if fused:   # h_kk starts only; h_kv stays in the registers of gla_fused
        (kk_starts,), (h_kk_final,) = pallas_chunk.state_pass_segmented(
            k, None, beta, g, g_kk, upcast(h_kk), None, kk_only=True, starts_dtype=operands, **common,
            **tuning.get("state_pass", {}))
    else:       # one pass for both states' starts, then gla_output reads the h_kv starts
        (kk_starts, kv_starts), (h_kk_final, h_kv_final) = pallas_chunk.state_pass_segmented(
            k, v, beta, g, g_kk, upcast(h_kk), upcast(h_kv), starts_dtype=operands, **common,
            **tuning.get("state_pass", {}))
    if num_iter > 0:   # x and q' = q + alpha (x - q) from the solve kernel
        solve_opts = dict(tuning.get("solve", {}))
        which = solve_kernel(q, k, kk_starts, kernel=solve_opts.pop("kernel", "auto"), chunk_size=chunk_size,
                             operand_dtype=operands, interpret=interpret)
        solve_args = (q, k, beta, g if g_kk is None else g_kk, kk_starts)
        if which == "gluon":
            x, q_mixed = gluon_solve.chebyshev_solve(
                *solve_args, num_iter=num_iter, ridge_strength=ridge_strength, chunk_size=chunk_size, alpha=alpha,
                x_dtype=q.dtype, mixed_dtype=operands)
        else:
            x, q_mixed = pallas_solve.chebyshev_solve(
                *solve_args, num_iter=num_iter, ridge_strength=ridge_strength, alpha=alpha, x_dtype=q.dtype,
                mixed_dtype=operands, operand_dtype=operands, **common, **solve_opts)
    else:              # x = q, so q' = q
        x = q
        q_mixed = q.astype(operands)
    if fused:   # walks the chunks: writes o from the chunk-start h_kv, then updates h_kv
        o, h_kv_final = pallas_chunk.gla_fused(q_mixed, k, v, beta, g, upcast(h_kv), scale=scale,
                                               operand_dtype=operands, out_dtype=q.dtype, **common, **gla_opts)
    else:
        o = pallas_chunk.gla_output(q_mixed, k, v, beta, g, kv_starts, scale=scale, operand_dtype=operands,
                                    out_dtype=q.dtype, **common, **gla_opts)
    return GKAResult(o, x.astype(q.dtype), h_kk_final, h_kv_final)


@functools.partial(jax.custom_vjp, nondiff_argnums=(9,))
def _prefill(q, k, v, beta, g, alpha, h_kk, h_kv, g_kk, static):
    return _forward(q, k, v, beta, g, alpha, h_kk, h_kv, g_kk, **dict(static))


def _reference(static, *inputs):
    q, k, v, beta, g, alpha, h_kk, h_kv, g_kk = inputs
    opts = dict(static)
    return reference.gka_prefill(q, k, v, beta, g, alpha, h_kk, h_kv, g_kk=g_kk, num_iter=opts["num_iter"],
                                 ridge_strength=opts["ridge_strength"], scale=opts["scale"],
                                 chunk_size=opts["chunk_size"], precision=opts["precision"])


def _prefill_fwd(q, k, v, beta, g, alpha, h_kk, h_kv, g_kk, static):
    inputs = (q, k, v, beta, g, alpha, h_kk, h_kv, g_kk)
    return _prefill(*inputs, static), inputs


def _prefill_bwd(static, inputs, cotangents):
    _, vjp = jax.vjp(functools.partial(_reference, static), *inputs)
    return vjp(cotangents)


_prefill.defvjp(_prefill_fwd, _prefill_bwd)


def gka_prefill(q, k, v, beta, g, alpha, h_kk, h_kv, *, num_iter, ridge_strength, scale, g_kk=None,
                chunk_size=64, state_pass="associative", precision=HIGHEST, interpret=False,
                tuning: dict | None = None) -> GKAResult:
    """Chunked GKA over a sequence with the Pallas kernels; arguments and result as in
    ``reference.gka_prefill`` (``state_pass`` is accepted and ignored: the kernel walks the chunks in order).

    ``interpret`` runs the kernels in Pallas interpret mode (CPU tests). ``tuning`` maps "state_pass",
    "solve", "gla" to extra keyword arguments of that kernel (num_warps, num_stages, block sizes).
    """
    del state_pass
    if not AVAILABLE:
        raise RuntimeError("the Pallas Triton lowering is not available in this jax")
    static = tuple(sorted(dict(num_iter=num_iter, ridge_strength=float(ridge_strength), scale=float(scale),
                               chunk_size=chunk_size, precision=precision, interpret=interpret,
                               tuning=_freeze(tuning)).items()))
    return _prefill(q, k, v, beta, g, alpha, h_kk, h_kv, g_kk, static)


def _fit_blocks(tuning, d, dv):
    """Block sizes capped at the head dims they tile (the tuned 32/64/128 blocks are for D = 128)."""
    limits = {"state_pass": {"block_v": min(d, dv), "block_k": d}, "gla": {"block_v": dv}}
    return {name: {key: min(value, limits.get(name, {}).get(key, value)) if type(value) is int else value
                   for key, value in opts.items()} for name, opts in tuning.items()}


def _freeze(tuning):
    """``tuning`` as a hashable value (custom_vjp's static argument must hash)."""
    if not tuning:
        return None
    return tuple(sorted((name, tuple(sorted(opts.items()))) for name, opts in tuning.items()))
