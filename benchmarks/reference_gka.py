"""Runs the PyTorch/Triton reference GKA kernels (awslabs/hybrid-model-factory + fla 0.4.1) on a CUDA GPU,
in our tensor layout, so that one benchmark process can time and compare them beside ours.

Set-up (none of the reference code is part of this repo):
  * ``bash tools/fetch_reference.sh MIRROR`` extracts the reference tree into ``.ref/hybrid-model-factory``
    and downloads the wheels into ``.whl``;
  * on the GPU machine (device call with carry [".ref", ".whl"]) install the wheels first:
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \\
          --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
    (fla 0.4.1 is the version the reference was written against: later fla switched ``chunk_fwd_h`` to exp2).
Importing this module needs nothing; every function imports torch / triton / the reference when called.
The reference packages are loaded by path: ``hmf`` and ``primed_vllm`` get empty parent packages so that
their heavy ``__init__`` files (LlamaFactory, vLLM) never run, and when vLLM is not installed the few
``vllm`` modules its GKA kernels import are stubbed with their fla 0.4.1 equivalents (same kernels).

Our layout (as ``gka_jax.kernels.reference``): q [B, T, H, D] unit-norm queries, k [B, T, Hkv, D] unit-norm
keys, v [B, T, Hkv, Dv], beta [B, T, H] the multiplier of k and v (eps included), g [B, T, H] float32
log-decay of both states, alpha [B, T, H] the mixing weight; states h_kk [B, H, D, D], h_kv [B, H, D, Dv].

Three reference paths:
  * training / HF prefill (``prefill``): what ``GatedKalmaNet.forward`` runs for a prompt without cache,
    i.e. ``gka_chebyshev_gla`` = ``latent_chebyshev`` (fla ``chunk_local_cumsum`` + ``chunk_fwd_h`` for the
    chunk-start h_kk + the Chebyshev chunk kernel) then the alpha mix then fla ``chunk_simple_gla``, on k, v
    expanded to H heads with beta applied in torch beforehand;
  * vLLM prefill (``vllm_prefill``): ``gka_forward.gka_chebyshev_gla_prefill``, native GQA (k, v stay at Hkv
    heads), beta applied inside the kernels, q/k L2-normalised in place, sequences packed with cu_seqlens;
  * vLLM decode (``decode``): ``gka_forward.gka_chebyshev_gla_decode``, one fused kernel per (sequence,
    head) that updates h_kk and h_kv in place in a state pool addressed by state indices; ``hf_decode`` is
    the training repo's decode step (Triton solve kernel + fla ``fused_recurrent_simple_gla``).
Activations run in the dtype the caller picks (``dtype``; the real model runs bf16); g stays float32 on
the HF path (vLLM stores g/alpha/beta in the activation dtype: ``gate_dtype``). Final states are float32.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import statistics
import sys
import types
from typing import NamedTuple

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REF_ROOT = os.path.join(REPO_ROOT, ".ref", "hybrid-model-factory")
TRAINING_SRC = os.path.join(REF_ROOT, "training", "src")
VLLM_SRC = os.path.join(REF_ROOT, "vllm-inference", "src")
GKA_PKG = "hmf.model.hybrid_zoo.layers.gated_kalmanet"
FLA_VERSION = "0.4.1"

# The 16 user keys of the reference's gka_config for the 8B model (all defaults: the priming recipe
# qwen3_8b_gka.yaml and the golden tiny model use exactly these).
GKA_8B_CONFIG = dict(
    use_alpha_connection=True, use_v_conv=True, use_forgetting_gate=True, gla_rescale=True,
    solver_type="chebyshev", bp_lambda=True, num_iter=30, ridge_strength=0.02, use_gate=True, conv_size=4,
    norm_eps=1e-6, use_forgetting_gate_kk=True, use_beta_gate=True, chunk_size=64, kv_proj_rank=None,
    kv_learnable_residual=False,
)
QWEN3_8B_SHAPE = dict(hidden_size=4096, head_dim=128, num_q_heads=32, num_k_heads=8, num_v_heads=8)
DEVICE = "cuda"  # where main() runs (the reference kernels need CUDA; "cpu" only under TRITON_INTERPRET=1)
BETA_EPS = 1e-6  # the reference adds this to sigmoid(b) before scaling k and v; our beta already holds it


# ----------------------------------------------------------------------------- loading
def _package(name: str, path: str | None = None) -> types.ModuleType:
    """An (empty) package ``name`` in sys.modules, searching ``path`` for submodules; its __init__ never runs."""
    if name in sys.modules:
        return sys.modules[name]
    module = types.ModuleType(name)
    module.__path__ = [path] if path else []
    sys.modules[name] = module
    parent, _, child = name.rpartition(".")
    if parent:
        setattr(sys.modules[parent], child, module)
    return module


def _stub_vllm() -> None:
    """The vllm modules imported by primed_vllm/gka/ops, mapped onto fla 0.4.1 (vLLM vendors these fla ops)."""
    if "vllm" in sys.modules or importlib.util.find_spec("vllm") is not None:
        return
    import triton
    import triton.language as tl
    import triton.language.extra.libdevice as tldevice
    import fla.ops.utils.cumsum as fla_cumsum
    import fla.ops.utils.index as fla_index
    import fla.ops.utils.op as fla_op
    import fla.utils as fla_utils

    for name in ("vllm", "vllm.model_executor", "vllm.model_executor.layers", "vllm.model_executor.layers.fla",
                 "vllm.model_executor.layers.fla.ops"):
        _package(name)
    stubs = {
        "vllm.triton_utils": dict(tl=tl, triton=triton, tldevice=tldevice),
        "vllm.model_executor.layers.fla.ops.cumsum": dict(chunk_local_cumsum=fla_cumsum.chunk_local_cumsum),
        "vllm.model_executor.layers.fla.ops.index": dict(prepare_chunk_indices=fla_index.prepare_chunk_indices,
                                                         prepare_chunk_offsets=fla_index.prepare_chunk_offsets),
        "vllm.model_executor.layers.fla.ops.op": dict(exp=fla_op.exp),
        "vllm.model_executor.layers.fla.ops.utils": dict(input_guard=fla_utils.input_guard),
    }
    for name, attrs in stubs.items():
        module = _package(name)
        module.__dict__.update(attrs)


_MODULES: dict[str, types.ModuleType] = {}


def _check_setup() -> None:
    if not os.path.isdir(TRAINING_SRC):
        raise RuntimeError(f"reference tree missing at {REF_ROOT}: run tools/fetch_reference.sh")
    try:
        import fla
    except ImportError as e:
        raise RuntimeError("fla is not importable: install .whl/*.whl into /tmp/site and put it on "
                           "PYTHONPATH (see tools/fetch_reference.sh)") from e
    if getattr(fla, "__version__", None) != FLA_VERSION:
        raise RuntimeError(f"fla {getattr(fla, '__version__', '?')} found, the reference needs {FLA_VERSION}")


def hf_modules() -> types.SimpleNamespace:
    """The training-repo solver module ``solve`` (ops/chebyshev/gka_chebyshev_solve.py) and fla's ``gla``
    (fla.ops.simple_gla). The layer module is imported by ``layer_8b``."""
    if "hf" not in _MODULES:
        _check_setup()
        _package("hmf", os.path.join(TRAINING_SRC, "hmf"))
        _package("hmf.model", os.path.join(TRAINING_SRC, "hmf", "model"))
        _MODULES["hf"] = types.SimpleNamespace(
            solve=importlib.import_module(GKA_PKG + ".ops.chebyshev.gka_chebyshev_solve"),
            gla=importlib.import_module("fla.ops.simple_gla"),
        )
    return _MODULES["hf"]


def vllm_modules() -> types.SimpleNamespace:
    """The vLLM plugin's GKA entry module ``forward`` (primed_vllm/gka/gka_forward.py; it imports gka/ops)."""
    if "vllm" not in _MODULES:
        _check_setup()
        _stub_vllm()
        _package("primed_vllm", os.path.join(VLLM_SRC, "primed_vllm"))
        _MODULES["vllm"] = types.SimpleNamespace(
            forward=importlib.import_module("primed_vllm.gka.gka_forward"))
    return _MODULES["vllm"]


# ----------------------------------------------------------------------------- autotune
def pruned_configs(configs, max_configs: int | None = 4, num_warps=(4, 8), max_stages: int | None = 2):
    """The configs ``prune_autotune`` keeps from one autotune list: those with num_warps in ``num_warps`` and
    num_stages <= ``max_stages`` (a criterion that would leave none is dropped), larger blocks first, at most
    ``max_configs``."""
    kept = list(configs)
    for test in (lambda c: not num_warps or c.num_warps in num_warps,
                 lambda c: max_stages is None or c.num_stages <= max_stages):
        kept = [c for c in kept if test(c)] or kept
    kept.sort(key=lambda c: -sum(v for v in c.kwargs.values() if isinstance(v, int)))  # stable: big blocks first
    return kept[:max_configs] if max_configs else kept


def prune_autotune(max_configs: int | None = 4, num_warps=(4, 8), max_stages: int | None = 2) -> None:
    """Shrink every ``triton.autotune`` candidate list (the reference's, fla's) at its first launch.

    The reference autotunes 16-36 configs per kernel (minutes of compiling per shape); this keeps
    ``pruned_configs(...)`` of each list. Results stay the same up to the summation order of block-split dot
    products. With one config left nothing is benchmarked at all. Call it before the first launch of a
    kernel; calling it again re-prunes (from the full lists) kernel keys not yet tuned, and
    ``prune_autotune(None, None, None)`` restores the full lists.
    """
    from triton.runtime.autotuner import Autotuner

    settings = (max_configs, tuple(num_warps) if num_warps else None, max_stages)
    original_run = getattr(Autotuner, "_reference_gka_run", Autotuner.run)
    Autotuner._reference_gka_run = original_run

    def run(self, *args, **kwargs):
        if getattr(self, "_reference_gka_settings", None) != settings:
            if not hasattr(self, "_reference_gka_configs"):
                self._reference_gka_configs = list(self.configs)
            self.configs = pruned_configs(self._reference_gka_configs, *settings)
            self._reference_gka_settings = settings
        return original_run(self, *args, **kwargs)

    Autotuner.run = run


# ----------------------------------------------------------------------------- timing
def time_cuda(fn, *, warmup: int = 2, iters: int = 10, graph: bool = False) -> float:
    """Median milliseconds of ``fn()`` over ``iters`` calls, each timed with CUDA events after ``warmup`` calls.

    ``graph=True`` captures one call in a CUDA graph (after the warm-up, so autotuning is done) and times its
    replays: no Python launch overhead, as vLLM runs decode. Not for the vLLM prefill (it syncs on .item())."""
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    if graph:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()  # a side-stream warm-up before capture, as torch's CUDA graph docs ask
        torch.cuda.current_stream().wait_stream(side)
        cuda_graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(cuda_graph):
            fn()
        torch.cuda.synchronize()
        fn = cuda_graph.replay
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


# ----------------------------------------------------------------------------- HF / training prefill
class PrefillInputs(NamedTuple):
    """The tensors ``gka_chebyshev_gla`` receives in the reference layer (all [B, T, H, *], contiguous)."""
    q: object      # [B, T, H, D] activation dtype
    k: object      # [B, T, H, D] activation dtype, GQA-expanded, times beta
    v: object      # [B, T, H, Dv] activation dtype, GQA-expanded, times beta
    g: object      # [B, T, H] float32 (used for both h_kk and h_kv, as gk = g in the layer)
    alpha: object  # [B, T, H] activation dtype


def prefill_inputs(q, k, v, beta, g, alpha, *, dtype=None) -> PrefillInputs:
    """Our layout -> the layer's: repeat k, v over the query-head groups (kv head h // G serves query head h,
    einops '(h g)' as the layer), then ``k, v <- beta * k, beta * v`` in the activation dtype as the layer
    does. ``dtype`` (default q.dtype) is the activation dtype; g is cast to float32; beta None = 1,
    alpha None = 1 (q' = x)."""
    import torch

    dtype = dtype or q.dtype
    heads = q.shape[2]
    group = heads // k.shape[2]
    q = q.to(dtype).contiguous()
    k = k.to(dtype).repeat_interleave(group, dim=2)
    v = v.to(dtype).repeat_interleave(group, dim=2)
    if beta is not None:
        b = beta.to(dtype)[..., None]
        k, v = (b * k).to(dtype), (b * v).to(dtype)
    alpha = torch.ones_like(q[..., 0]) if alpha is None else alpha.to(dtype).contiguous()
    return PrefillInputs(q, k.contiguous(), v.contiguous(), g.float().contiguous(), alpha)


def prefill_solve(inp: PrefillInputs, *, num_iter, ridge_strength, chunk_size=64):
    """The Chebyshev solve with its chunk-state pass (gka_chebyshev_solve.py:latent_chebyshev ->
    chebyshev_iteration.py:ChebyshevIteration.forward: fla chunk_local_cumsum, fla chunk_fwd_h (chunk-start
    h_kk stored in the k dtype), chebyshev_iteration_fro_gating_forward_kernel).
    Returns (x [B, T, H, D] in q's dtype, h_kk_final [B, H, D, D] float32)."""
    import torch

    m = hf_modules()
    with torch.no_grad(), torch.cuda.device(inp.q.device):
        return m.solve.latent_chebyshev(inp.k, inp.q, ridge_strength, num_iter, "chebyshev", True, inp.g,
                                        chunk_size)


def prefill_mix(inp: PrefillInputs, x):
    """q' = q + alpha (x - q), in the activation dtype (gka_chebyshev_gla)."""
    return inp.q + inp.alpha[..., None] * (x - inp.q)


def prefill_gla(inp: PrefillInputs, q_mixed, *, scale):
    """fla chunk_simple_gla(q', k, v, g, scale, output_final_state=True) as in gka_chebyshev_gla.
    Returns (o [B, T, H, Dv] in q's dtype, h_kv_final [B, H, D, Dv] float32)."""
    import torch

    m = hf_modules()
    with torch.no_grad(), torch.cuda.device(q_mixed.device):
        return m.gla.chunk_simple_gla(q=q_mixed, k=inp.k, v=inp.v, scale=scale, g=inp.g, output_final_state=True)


def prefill_core(inp: PrefillInputs, *, num_iter, ridge_strength, scale, chunk_size=64):
    """gka_chebyshev_gla on prepared inputs (solve, mix, GLA); returns (o, x, h_kk_final, h_kv_final).
    num_iter 0: no solve, x = q and h_kk_final None (as the reference)."""
    if num_iter > 0:
        x, h_kk = prefill_solve(inp, num_iter=num_iter, ridge_strength=ridge_strength, chunk_size=chunk_size)
        q_mixed = prefill_mix(inp, x)
    else:
        x, h_kk, q_mixed = inp.q, None, inp.q
    o, h_kv = prefill_gla(inp, q_mixed, scale=scale)
    return o, x, h_kk, h_kv


def prefill(q, k, v, beta, g, alpha, *, num_iter, ridge_strength, scale, chunk_size=64, dtype=None):
    """HF/training-path GKA prefill from zero states, our layout in and out: (o, x, h_kk_final, h_kv_final)."""
    inp = prefill_inputs(q, k, v, beta, g, alpha, dtype=dtype)
    return prefill_core(inp, num_iter=num_iter, ridge_strength=ridge_strength, scale=scale,
                        chunk_size=chunk_size)


# ----------------------------------------------------------------------------- vLLM prefill
class VllmPrefillInputs(NamedTuple):
    """What the vLLM layer hands to gka_chebyshev_gla_prefill: B sequences packed as one of B*T tokens."""
    q: object           # [1, B*T, H, D] activation dtype (L2-normalised in place by the call)
    k: object           # [1, B*T, Hkv, D] activation dtype (L2-normalised in place by the call)
    v: object           # [1, B*T, Hkv, Dv] activation dtype
    g: object           # [1, B*T, H] gate_dtype
    alpha: object       # [1, B*T, H] gate_dtype
    beta: object        # [1, B*T, H] gate_dtype, minus BETA_EPS (the kernels add it back)
    cu_seqlens: object  # [B + 1] int32
    h_kk0: object       # [B, H, D, D] float32 zeros (vLLM passes zeroed states for fresh sequences)
    h_kv0: object       # [B, H, D, Dv] h_kv_dtype zeros


def vllm_prefill_inputs(q, k, v, beta, g, alpha, *, dtype=None, gate_dtype=None, h_kv_dtype=None):
    """Our layout -> vLLM's packed layout. ``gate_dtype`` (default: the activation dtype, as vLLM's
    fused_gka_gating) is the dtype of g/alpha/beta; ``h_kv_dtype`` (default float32) that of the h_kv state
    pool (vLLM: the mamba ssm dtype, which defaults to the model dtype)."""
    import torch

    dtype = dtype or q.dtype
    gate_dtype = gate_dtype or dtype
    b, t, h, d = q.shape
    dv = v.shape[-1]

    def pack(x, dt):
        return x.to(dt).reshape((1, b * t) + tuple(x.shape[2:])).contiguous()

    beta = torch.ones_like(g, dtype=torch.float32) if beta is None else beta.float()
    alpha = torch.ones_like(g, dtype=gate_dtype) if alpha is None else alpha
    cu = torch.arange(b + 1, device=q.device, dtype=torch.int32) * t
    return VllmPrefillInputs(
        q=pack(q, dtype), k=pack(k, dtype), v=pack(v, dtype), g=pack(g, gate_dtype),
        alpha=pack(alpha, gate_dtype), beta=pack(beta - BETA_EPS, gate_dtype), cu_seqlens=cu,
        h_kk0=torch.zeros(b, h, d, d, device=q.device, dtype=torch.float32),
        h_kv0=torch.zeros(b, h, d, dv, device=q.device, dtype=h_kv_dtype or torch.float32))


def vllm_prefill_core(inp: VllmPrefillInputs, *, num_iter, ridge_strength, scale):
    """gka_forward.gka_chebyshev_gla_prefill step by step (fused_l2_norm, latent_chebyshev_prefill =
    chebyshev_prefill_gqa.py:chebyshev_iteration_prefill_gqa_fwd, alpha mix, chunk_simple_gla_gqa), so that
    x can be returned too. Returns (o, x, h_kk_final, h_kv_final) in the packed layout ([1, B*T, H, *])."""
    import torch

    f = vllm_modules().forward
    with torch.no_grad(), torch.cuda.device(inp.q.device):
        q, k = f.fused_l2_norm(inp.q, inp.k)
        if num_iter > 0:
            x, h_kk = f.latent_chebyshev_prefill(k=k, q=q, gk=inp.g, beta=inp.beta, ridge_ratio=ridge_strength,
                                                 num_iter=num_iter, h0=inp.h_kk0, output_final_state=True,
                                                 cu_seqlens=inp.cu_seqlens)
            q_mixed = q + inp.alpha[..., None] * (x - q)
        else:
            x, h_kk, q_mixed = q, None, q
        o, h_kv = f.chunk_simple_gla(q=q_mixed, k=k, v=inp.v, g=inp.g, beta=inp.beta, scale=scale,
                                     initial_state=inp.h_kv0, output_final_state=True, cu_seqlens=inp.cu_seqlens)
    return o, x, h_kk, h_kv


def vllm_prefill(q, k, v, beta, g, alpha, *, num_iter, ridge_strength, scale, dtype=None, gate_dtype=None,
                 h_kv_dtype=None):
    """vLLM-path GKA prefill from zero states, our layout in and out: (o, x, h_kk_final, h_kv_final).
    Note: vLLM L2-normalises q and k in place; here that happens on packed copies unless q/k already have
    the activation dtype and are contiguous (then the caller's q, k are renormalised, a no-op up to rounding)."""
    inp = vllm_prefill_inputs(q, k, v, beta, g, alpha, dtype=dtype, gate_dtype=gate_dtype, h_kv_dtype=h_kv_dtype)
    o, x, h_kk, h_kv = vllm_prefill_core(inp, num_iter=num_iter, ridge_strength=ridge_strength, scale=scale)
    b, t = q.shape[:2]
    return o.reshape(b, t, *o.shape[2:]), x.reshape(b, t, *x.shape[2:]), h_kk, h_kv


# ----------------------------------------------------------------------------- vLLM decode
class DecodeInputs(NamedTuple):
    """What the vLLM layer hands to gka_chebyshev_gla_decode for B one-token sequences (continuous batching)."""
    q: object              # [1, B, H, D] activation dtype (normalised inside the kernel)
    k: object              # [1, B, Hkv, D]
    v: object              # [1, B, Hkv, Dv]
    g: object              # [1, B, H] gate_dtype (also gk: the kernel requires g is gk)
    alpha: object          # [1, B, H] gate_dtype (zeros when num_iter == 0, as the vLLM layer)
    beta: object           # [1, B, H] gate_dtype, minus BETA_EPS
    cu_seqlens: object     # [B + 1] int32 = 0..B
    state_indices: object  # [B] int32 = 0..B-1: the state pool is the batch


def decode_inputs(q, k, v, beta, g, alpha, *, num_iter, dtype=None, gate_dtype=None) -> DecodeInputs:
    """Our decode layout (q [B, H, D], k/v [B, Hkv, *], beta/g/alpha [B, H]) -> vLLM's."""
    import torch

    dtype = dtype or q.dtype
    gate_dtype = gate_dtype or dtype
    b = q.shape[0]
    beta = torch.ones_like(g, dtype=torch.float32) if beta is None else beta.float()
    if num_iter == 0 or alpha is None:
        alpha = torch.full_like(g, 0.0 if num_iter == 0 else 1.0)
    return DecodeInputs(
        q=q.to(dtype)[None].contiguous(), k=k.to(dtype)[None].contiguous(), v=v.to(dtype)[None].contiguous(),
        g=g.to(gate_dtype)[None].contiguous(), alpha=alpha.to(gate_dtype)[None].contiguous(),
        beta=(beta - BETA_EPS).to(gate_dtype)[None].contiguous(),
        cu_seqlens=torch.arange(b + 1, device=q.device, dtype=torch.int32),
        state_indices=torch.arange(b, device=q.device, dtype=torch.int32))


_DECODE_TUNED: set = set()


def decode_core(inp: DecodeInputs, h_kk, h_kv, *, num_iter, ridge_strength, scale):
    """One vLLM decode step (gka_forward.gka_chebyshev_gla_decode -> chebyshev_iteration_gqa.py:
    chebyshev_iteration_gqa_fwd_kernel): h_kk [B, H, D, D] float32 and h_kv [B, H, D, Dv] are updated IN
    PLACE. Returns o [1, B, H, Dv]. The kernel autotunes with in-place state writes, so the first call per
    shape/dtype tunes on copies of the states first."""
    import torch

    f = vllm_modules().forward

    def call(kk, kv):
        return f.gka_chebyshev_gla_decode(
            q=inp.q, k=inp.k, v=inp.v, alpha=inp.alpha, g=inp.g, gk=inp.g, beta=inp.beta, gla_scale=scale,
            ridge_ratio=ridge_strength, num_iter=num_iter, h_kk=kk, h_kv=kv, cu_seqlens=inp.cu_seqlens,
            ssm_state_indices=inp.state_indices)[0]

    key = (tuple(inp.q.shape), tuple(inp.k.shape), tuple(inp.v.shape), num_iter,
           tuple(str(x.dtype) for x in (inp.q, inp.g, h_kk, h_kv)))
    with torch.no_grad(), torch.cuda.device(inp.q.device):
        if key not in _DECODE_TUNED:
            call(h_kk.clone(), h_kv.clone())
            _DECODE_TUNED.add(key)
        return call(h_kk, h_kv)


def decode(q, k, v, beta, g, alpha, h_kk, h_kv, *, num_iter, ridge_strength, scale, dtype=None, gate_dtype=None):
    """vLLM decode of one token per sequence, our layout: returns (o [B, H, Dv], h_kk, h_kv), the states
    being the caller's tensors updated in place. No x: the kernel fuses solve, mix and GLA."""
    inp = decode_inputs(q, k, v, beta, g, alpha, num_iter=num_iter, dtype=dtype, gate_dtype=gate_dtype)
    o = decode_core(inp, h_kk, h_kv, num_iter=num_iter, ridge_strength=ridge_strength, scale=scale)
    return o[0], h_kk, h_kv


def hf_decode(q, k, v, beta, g, alpha, h_kk, h_kv, *, num_iter, ridge_strength, scale, dtype=None):
    """The training repo's decode step (gka_chebyshev_solve.py:torch_decoding_one_step: the Triton kernel
    chebyshev_iteration_fro_inference_forward_kernel on H_prev, then fla fused_recurrent_simple_gla), our
    layout; states are not modified. Returns (o [B, H, Dv], h_kk_new (None if num_iter 0), h_kv_new)."""
    import torch

    m = hf_modules()
    inp = prefill_inputs(q[:, None], k[:, None], v[:, None], None if beta is None else beta[:, None],
                         g[:, None], None if alpha is None else alpha[:, None], dtype=dtype)
    with torch.no_grad(), torch.cuda.device(q.device):
        o, h_kk, h_kv = m.solve.torch_decoding_one_step(
            q=inp.q, k=inp.k, v=inp.v, alpha=inp.alpha, g=inp.g, gk=inp.g, gla_scale=scale,
            ridge_strength=ridge_strength, solver_type="chebyshev", num_iter=num_iter,
            prev_h_kk=None if h_kk is None else h_kk.float().contiguous(), prev_h_kv=h_kv.float().contiguous())
    return o[:, 0], h_kk, h_kv


# ----------------------------------------------------------------------------- whole layer
def layer_8b(batch, seq_len, dtype=None, *, num_iter=30, seed=0, device="cuda"):
    """The reference GatedKalmaNet layer (gka.py:GatedKalmaNet, random init, eval) with the Qwen3-8B GKA shape
    (hidden 4096, 32 query / 8 kv heads, head_dim 128, GKA_8B_CONFIG). Returns a callable running its
    prefill forward (no cache, no_grad) on a fixed random [batch, seq_len, 4096] input; the callable's
    ``.layer`` and ``.x`` attributes hold the module and the input. dtype default bfloat16."""
    import torch

    hf_modules()
    gka = importlib.import_module(GKA_PKG + ".gka")
    dtype = dtype or torch.bfloat16
    torch.manual_seed(seed)
    layer = gka.GatedKalmaNet(**QWEN3_8B_SHAPE, **dict(GKA_8B_CONFIG, num_iter=num_iter), layer_idx=0)
    layer = layer.to(device=device, dtype=dtype).eval()
    x = torch.randn(batch, seq_len, QWEN3_8B_SHAPE["hidden_size"], device=device, dtype=dtype,
                    generator=torch.Generator(device=device).manual_seed(seed + 1))

    def run():
        with torch.no_grad():
            return layer(x)[0]

    run.layer, run.x = layer, x
    return run


# ----------------------------------------------------------------------------- smoke test / timings
def random_inputs(batch, seq_len, *, heads=32, kv_heads=8, head_dim=128, seed=0, device=None):
    """Random float32 GKA inputs in our layout: (q, k, v, beta, g, alpha); q, k unit-norm, g in (-0.35, 0)."""
    import torch
    import torch.nn.functional as F

    device = device or DEVICE
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, device=device, generator=gen)

    q = F.normalize(randn(batch, seq_len, heads, head_dim), dim=-1)
    k = F.normalize(randn(batch, seq_len, kv_heads, head_dim), dim=-1)
    v = randn(batch, seq_len, kv_heads, head_dim)
    beta = torch.sigmoid(randn(batch, seq_len, heads)) + BETA_EPS
    g = -0.05 * F.softplus(randn(batch, seq_len, heads) + 1.0)
    alpha = torch.sigmoid(randn(batch, seq_len, heads))
    return q, k, v, beta, g, alpha


def main(argv=None):
    """Agreement of the reference paths with each other, then their timings (median ms), at the 8B shape."""
    import argparse

    import torch

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--decode-batch", default="1,32")
    parser.add_argument("--num-iter", type=int, default=30)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--layer", action="store_true", help="also time the whole reference layer")
    parser.add_argument("--max-configs", type=int, default=4,
                        help="autotune candidates kept per kernel (1: no autotuning); 0: the reference's lists")
    parser.add_argument("--no-check", action="store_true", help="skip the agreement checks (fp32 compiles)")
    args = parser.parse_args(argv)
    if args.max_configs:
        prune_autotune(max_configs=args.max_configs)
    dtype = getattr(torch, args.dtype)
    kw = dict(num_iter=args.num_iter, ridge_strength=0.02, scale=QWEN3_8B_SHAPE["head_dim"] ** -0.5)
    device = torch.cuda.get_device_name() if DEVICE == "cuda" else DEVICE
    print(f"# {device} torch {torch.__version__} B={args.batch} T={args.seq} num_iter={args.num_iter} "
          f"dtype={args.dtype}", flush=True)

    q, k, v, beta, g, alpha = random_inputs(args.batch, args.seq)
    if not args.no_check:
        check_agreement(q, k, v, beta, g, alpha, dtype, args.dtype, kw)
    timing_rows(q, k, v, beta, g, alpha, dtype, args, kw)


def check_agreement(q, k, v, beta, g, alpha, dtype, dtype_name, kw):
    """Prints the relative differences between the reference paths (fp32 and ``dtype``) on one input."""
    import time

    import torch

    rel = lambda a, b: float((a.float() - b.float()).norm() / b.float().norm())  # noqa: E731
    fmt = lambda xs: " ".join(f"{n}={rel(a, b):.1e}" for n, a, b in xs if a is not None)  # noqa: E731
    names = ("o", "x", "h_kk", "h_kv")
    t0 = time.time()
    ref = prefill(q, k, v, beta, g, alpha, dtype=torch.float32, **kw)
    print(f"hf prefill fp32 (first call {time.time() - t0:.0f}s)", flush=True)
    vl = vllm_prefill(q.clone(), k.clone(), v, beta, g, alpha, dtype=torch.float32, gate_dtype=torch.float32, **kw)
    print("vllm fp32 vs hf fp32:", fmt(zip(names, vl, ref)), flush=True)
    low = prefill(q, k, v, beta, g, alpha, dtype=dtype, **kw)
    print(f"hf {dtype_name} vs hf fp32:", fmt(zip(names, low, ref)), flush=True)
    vl = vllm_prefill(q.clone(), k.clone(), v, beta, g, alpha, dtype=dtype, **kw)
    print(f"vllm {dtype_name} vs hf fp32:", fmt(zip(names, vl, ref)), flush=True)
    step = [a[:, 0] for a in (q, k, v, beta, g, alpha)]
    h_kk0 = torch.zeros_like(ref[3]) if ref[2] is None else ref[2]  # no h_kk state when num_iter == 0
    o_hf, kk_hf, kv_hf = hf_decode(*step, h_kk0, ref[3], dtype=torch.float32, **kw)
    o_vl, kk_vl, kv_vl = decode(*step, h_kk0.clone(), ref[3].clone(), dtype=torch.float32,
                                gate_dtype=torch.float32, **kw)
    print("decode vllm vs hf (fp32):", fmt([("o", o_vl, o_hf), ("h_kk", kk_vl, kk_hf), ("h_kv", kv_vl, kv_hf)]))


def timing_rows(q, k, v, beta, g, alpha, dtype, args, kw):
    """Times each reference piece in ``dtype`` (median ms; CUDA-graph replays for the vLLM decode)."""
    import time

    import torch

    heads, head_dim = QWEN3_8B_SHAPE["num_q_heads"], QWEN3_8B_SHAPE["head_dim"]

    inp = prefill_inputs(q, k, v, beta, g, alpha, dtype=dtype)
    x, _ = prefill_solve(inp, num_iter=args.num_iter, ridge_strength=0.02)
    q_mixed = prefill_mix(inp, x)
    vinp = vllm_prefill_inputs(q, k, v, beta, g, alpha, dtype=dtype)
    rows = [
        ("hf prefill_solve", lambda: prefill_solve(inp, num_iter=args.num_iter, ridge_strength=0.02), False),
        ("hf prefill_gla", lambda: prefill_gla(inp, q_mixed, scale=kw["scale"]), False),
        ("hf prefill_core", lambda: prefill_core(inp, **kw), False),
        ("vllm prefill_core", lambda: vllm_prefill_core(vinp, **kw), False),
    ]
    for b in [int(s) for s in args.decode_batch.split(",") if s]:
        dq, dk, dv, dbeta, dg, dalpha = [a[:, 0] for a in random_inputs(b, 1, seed=1)]
        dinp = decode_inputs(dq, dk, dv, dbeta, dg, dalpha, num_iter=args.num_iter, dtype=dtype)
        h_kk = torch.zeros(b, heads, head_dim, head_dim, device=DEVICE)
        h_kv = torch.zeros(b, heads, head_dim, head_dim, device=DEVICE)
        rows.append((f"vllm decode B={b} (graph)",
                     lambda dinp=dinp, h_kk=h_kk, h_kv=h_kv: decode_core(dinp, h_kk, h_kv, **kw), True))
        step = (dq, dk, dv, dbeta, dg, dalpha)
        rows.append((f"hf decode B={b} (incl. GQA expand)",
                     lambda step=step, h_kk=h_kk, h_kv=h_kv: hf_decode(*step, h_kk, h_kv, dtype=dtype, **kw), False))
    if args.layer:
        rows.append((f"hf layer_8b forward B={args.batch} T={args.seq}",
                     layer_8b(args.batch, args.seq, dtype, num_iter=args.num_iter, device=DEVICE), False))
    for name, fn, graph in rows:
        t0 = time.time()
        fn()
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        first = time.time() - t0
        print(f"{name:<40s} {time_cuda(fn, graph=graph):9.3f} ms   (first call {first:.1f}s)", flush=True)


if __name__ == "__main__":
    main()
