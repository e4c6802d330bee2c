"""Calling Gluon kernels (Triton's explicit-layout dialect) from JAX through jax-triton.

jax-triton 0.3.1, the release that fits the GPU machine's triton 3.6, compiles only ``@triton.jit`` kernels:
it traces them to Triton IR and runs the ``make_ttir`` passes, which do not apply to Gluon's Triton GPU IR.
(Gluon support arrived in jax-triton 0.4, which needs triton >= 3.7.) ``triton_call`` here is
``jax_triton.triton_call`` with one addition: a ``gluon.jit`` kernel is compiled by Triton's own Gluon
pipeline (``triton.compile`` of a ``GluonASTSource``), and the resulting PTX goes into the same
``TritonKernel`` custom call that jax-triton builds for Triton kernels. Everything else (grid, outputs,
``input_output_aliases``, scalar arguments, the compile cache) is jax-triton's.

A kernel's ``MAXNREG`` constexpr argument, if it has one, becomes Triton's ``maxnreg`` option (the per-thread
register cap passed to ptxas), so that several programs fit on an SM.

Global scratch (TMA descriptors made on the device): Triton appends two hidden pointers to every kernel, the
global scratch (where ``make_tensor_descriptor`` writes each program's descriptors) and the profile scratch,
and jaxlib's launcher passes null for both (it does not allocate Triton's scratch). A kernel that needs global
scratch therefore takes it as an ordinary output named ``scratch_ptr`` of ``SCRATCH_BYTES`` (a constexpr)
bytes per program, and ``route_global_scratch`` points the compiled kernel's scratch reads at that argument.
"""

from __future__ import annotations

import functools
import os
import re
import tempfile

try:  # Triton with Gluon: enough to define and compile kernels (also without a GPU)
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental import gluon  # noqa: F401  (re-exported for the kernel modules)
    from triton.experimental.gluon import language as gl  # noqa: F401
    from triton.experimental.gluon.language.nvidia.ampere import async_copy  # noqa: F401
    from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma  # noqa: F401
    from triton.experimental.gluon._runtime import GluonASTSource, GluonJITFunction
    GLUON = True
except ImportError:  # no triton (CPU installs), or a triton without Gluon
    GLUON = False
# The releases the kernels and this adapter were written and tested against. The adapter wraps jax-triton
# 0.3's kernel-building function (0.4 has its own Gluon support, with another call signature), and Gluon is
# experimental: its API changes between Triton releases. With other releases the dispatcher keeps the
# Pallas kernels rather than fail at compile time.
SUPPORTED = {"triton": (3, 6), "jax_triton": (0, 3)}


def releases_supported(triton_version: str, jax_triton_version: str) -> bool:
    """Whether these Triton and jax-triton versions ("3.6.0", "0.3.1") are the releases in ``SUPPORTED``."""
    def major_minor(version):
        found = re.match(r"(\d+)\.(\d+)", version)
        return found and (int(found[1]), int(found[2]))
    return (major_minor(triton_version) == SUPPORTED["triton"]
            and major_minor(jax_triton_version) == SUPPORTED["jax_triton"])


_cache_dir = os.environ.get("TRITON_CACHE_DIR")
try:  # jax-triton: needed to call them from JAX (it imports only with a CUDA jaxlib)
    import jax_triton
    from jax_triton import triton_lib
    AVAILABLE = GLUON and releases_supported(triton.__version__, jax_triton.__version__)
except ImportError:
    AVAILABLE = False
finally:  # importing jax-triton empties TRITON_CACHE_DIR, which breaks other Triton users (torch)
    if _cache_dir is None:
        os.environ.pop("TRITON_CACHE_DIR", None)
    else:
        os.environ["TRITON_CACHE_DIR"] = _cache_dir

@functools.cache
def on_hopper() -> bool:
    """Whether the first GPU is a Hopper (compute capability 9.x: H100/H200): the generation with the wgmma
    instructions of the Gluon solve and the setmaxnreg of the pipelined decode's warp specialization, and
    the one the Gluon kernels were measured on."""
    try:
        import jax
        return str(jax.local_devices(backend="gpu")[0].compute_capability).startswith("9.")
    except (RuntimeError, AttributeError, IndexError):   # no GPU backend in this jax, or no GPU
        return False


_DIVISIBLE = [["tt.divisibility", 16]]   # jax-triton's assumption: every array is 16-byte aligned
_cache: dict = {}


def _gluon_kernel(fn, arg_dtypes, scalar_args, *, num_warps, num_ctas, compute_capability, enable_fp_fusion,
                  metaparams):
    """(jaxlib TritonKernel, argument attributes) for a Gluon kernel, as jax-triton returns for Triton."""
    signature = {fn.arg_names[i]: dtype for i, dtype in enumerate(arg_dtypes)}
    scalar_positions = {i for i, _, _ in scalar_args}
    attrs = {(i,): [] if i in scalar_positions else _DIVISIBLE for i in range(len(arg_dtypes))}
    constants = dict(metaparams)
    constants.update({name: None for _, name, value in scalar_args if value is None})
    constants.update({fn.arg_names[i]: 1 for i, _, value in scalar_args if value == 1})
    for name in constants:
        signature[name] = "constexpr"
    options = {"num_warps": num_warps, "num_ctas": num_ctas, "num_stages": 1,
               "enable_fp_fusion": enable_fp_fusion}
    if metaparams.get("MAXNREG"):
        options["maxnreg"] = int(metaparams["MAXNREG"])
    key = (fn, tuple(signature.items()), tuple(sorted(constants.items())), tuple(sorted(options.items())),
           compute_capability)
    if key not in _cache:
        compiled = compile_gluon(GluonASTSource(fn, signature, constants, attrs), compute_capability, options)
        ptx = compiled.asm["ptx"]
        if compiled.metadata.global_scratch_size:
            if "scratch_ptr" not in signature or signature["scratch_ptr"] == "constexpr":
                raise RuntimeError(f"{fn.__name__} needs {compiled.metadata.global_scratch_size} bytes of global "
                                   "scratch per program, which jaxlib does not allocate: give the kernel a "
                                   "scratch_ptr output (gluon_call's docstring)")
            if compiled.metadata.global_scratch_size > int(metaparams.get("SCRATCH_BYTES", 0)):
                raise RuntimeError(f"{fn.__name__} needs {compiled.metadata.global_scratch_size} bytes of global "
                                   f"scratch per program; SCRATCH_BYTES={metaparams.get('SCRATCH_BYTES')}")
            arguments = [name for name, kind in signature.items() if kind != "constexpr"]
            ptx = route_global_scratch(ptx, compiled.metadata.name, arguments.index("scratch_ptr"), len(arguments))
        _cache[key] = triton_lib.triton_kernel_call_lib.TritonKernel(
            # num_warps: all partitions' warps of a warp-specialized kernel (Triton's total), else num_warps
            compiled.metadata.name, compiled.metadata.num_warps, num_ctas, compiled.metadata.shared,
            ptx, compiled.asm["ttgir"], compute_capability)
    return _cache[key], attrs


def route_global_scratch(ptx: str, name: str, scratch_index: int, num_arguments: int) -> str:
    """``ptx`` with the reads of Triton's hidden global-scratch parameter (the second-to-last, after the kernel's
    ``num_arguments`` own parameters) reading parameter ``scratch_index`` instead (an output buffer that the
    caller allocates; jaxlib passes null for the hidden one)."""
    declared = sorted({int(n) for n in re.findall(rf"\.param\s+[^\n]*?\b{re.escape(name)}_param_(\d+)\b", ptx)})
    if declared != list(range(num_arguments + 2)):
        raise RuntimeError(f"{name}: expected {num_arguments} parameters and Triton's two hidden ones in the PTX, "
                           f"found {len(declared)}")
    hidden = f"[{name}_param_{num_arguments}]"
    if not ptx.count(hidden):
        raise RuntimeError(f"{name}: the global-scratch parameter is never read")
    return ptx.replace(hidden, f"[{name}_param_{scratch_index}]")


def compile_gluon(source, compute_capability: int, options: dict):
    """``triton.compile`` for an NVIDIA target. jax-triton empties ``TRITON_CACHE_DIR`` (it keeps its own
    cache), but ``triton.compile`` needs a cache directory: a private temporary one is set meanwhile."""
    saved = os.environ.get("TRITON_CACHE_DIR")
    os.environ["TRITON_CACHE_DIR"] = _scratch_dir()
    try:
        return triton.compile(source, target=GPUTarget("cuda", compute_capability, 32), options=options)
    finally:
        if saved is None:
            del os.environ["TRITON_CACHE_DIR"]
        else:
            os.environ["TRITON_CACHE_DIR"] = saved


_scratch: list[str] = []


def _scratch_dir() -> str:
    if not _scratch:
        _scratch.append(tempfile.mkdtemp(prefix="gka-gluon-"))
    return _scratch[0]


def _install():
    """Route Gluon kernels of ``jax_triton.triton_call`` through ``_gluon_kernel`` (idempotent)."""
    original = triton_lib.get_or_create_triton_kernel
    if getattr(original, "_gka_gluon", False):
        return

    def get_or_create_triton_kernel(backend_init_func, platform, fn, arg_dtypes, scalar_args, *, num_warps,
                                    num_stages, num_ctas, compute_capability, enable_fp_fusion, metaparams, dump):
        if not isinstance(fn, GluonJITFunction):
            return original(backend_init_func, platform, fn, arg_dtypes, scalar_args, num_warps=num_warps,
                            num_stages=num_stages, num_ctas=num_ctas, compute_capability=compute_capability,
                            enable_fp_fusion=enable_fp_fusion, metaparams=metaparams, dump=dump)
        if platform != "cuda":
            raise ValueError(f"Gluon kernels run on NVIDIA GPUs only, not on {platform}")
        if compute_capability is None:
            compute_capability = triton_lib.triton_kernel_call_lib.get_compute_capability(0)
        return _gluon_kernel(fn, arg_dtypes, scalar_args, num_warps=num_warps or 4, num_ctas=num_ctas,
                             compute_capability=compute_capability, enable_fp_fusion=enable_fp_fusion,
                             metaparams=metaparams)

    get_or_create_triton_kernel._gka_gluon = True
    triton_lib.get_or_create_triton_kernel = get_or_create_triton_kernel


def triton_call(*args, **kwargs):
    """``jax_triton.triton_call`` that also accepts ``gluon.jit`` kernels."""
    if not AVAILABLE:
        raise RuntimeError("Gluon kernels need jax-triton and triton with Gluon (pip install 'gka-jax[gpu]')")
    _install()
    return jax_triton.triton_call(*args, **kwargs)
