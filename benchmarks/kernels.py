"""GKA kernels on the GPU: exactness and speed against the XLA path and the reference's Triton kernels.

    python benchmarks/kernels.py                        # everything (GPU; reference if .ref/.whl are set up)
    python benchmarks/kernels.py --no-reference --quick # ours only, small

Shapes: B=1, H=32 query heads, Hkv=8, D=Dv=128, chunk 64, bf16 activations, fp32 states and gates (the 8B
model's GKA layer). Sections:
  * errors: each Pallas kernel and the whole prefill / decode against the pure-JAX path (fp32, HIGHEST) and
    against float64 (the same chunked reference evaluated in float64: on CPU it equals the per-token
    float64 oracle to 1e-10, see tests/test_kernels.py); the reference's outputs against float64 too;
  * prefill: state pass, solve, GLA and the whole prefill, ms (median of CUDA-synchronised calls), ours vs
    the XLA path vs the reference (training path: latent_chebyshev + fla chunk_simple_gla; vLLM path:
    chebyshev_prefill_gqa + chunk_simple_gla_gqa) at T = 4K and 16K, num_iter 30 and 10;
  * decode: one token at batch 1, 32, 128; ms per step (GPU time of 16 steps in one jitted loop; the reference
    as a CUDA-graph replay), and the fp32 h_kk + h_kv bytes read and written as a fraction of the copy
    bandwidth measured in the same run (torch device-to-device copy);
  * layer: the whole 8B-shape GKA layer (projections, convs, gates, norm, output) at T = 4K and 16K.
Writes the rows as JSON lines to --out (default $OUT or .) and prints markdown tables last.
"""

from __future__ import annotations

import argparse
import functools
import glob
import json
import os
import statistics
import sys
import tempfile
import time
import traceback

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.45")  # leave room for torch in the same process

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gka_jax import kernels  # noqa: E402
from gka_jax.kernels import gluon_solve, pallas_chunk, pallas_decode, pallas_prefill, pallas_solve, reference  # noqa: E402,E501

HIGHEST = jax.lax.Precision.HIGHEST
RIDGE = 0.02
H, HKV, D = 32, 8, 128
SCALE = D ** -0.5
ROWS: list[dict] = []
PALLAS = "pallas"   # "pallas_interpret" with --smoke (CPU check of this script at tiny shapes)
INTERPRET = False


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def record(section, **row):
    row = dict(section=section, **row)
    ROWS.append(row)
    print(json.dumps(row), flush=True)


def time_jax(fn, *args, iters=10, warmup=2) -> float:
    """Median ms of fn(*args) (already jitted), each call synchronised."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def time_decode(step, x, h_kk, h_kv, *, iters=20, warmup=3) -> float:
    """Median ms of ``step(x, h_kk, h_kv) -> (o, h_kk, h_kv)`` jitted with the states donated: each call
    feeds the states the previous one returned (donated buffers cannot be reused)."""
    for _ in range(warmup):
        _, h_kk, h_kv = step(x, h_kk, h_kv)
    jax.block_until_ready((h_kk, h_kv))
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        out = step(x, h_kk, h_kv)
        jax.block_until_ready(out)
        _, h_kk, h_kv = out
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def time_decode_loop(step, x, h_kk, h_kv, *, steps=16, iters=5) -> float:
    """ms per step of ``steps`` decode steps run in one jitted ``fori_loop`` (states carried and donated):
    the GPU time of a step, from a ``jax.profiler`` trace of one call (first kernel start to last kernel end,
    over ``steps``), as the reference's CUDA-graph replay is timed with CUDA events. Where the trace has no
    GPU kernels (CPU), the median wall time per step over ``iters`` calls."""
    run = decode_loop(step, steps)
    for _ in range(2):
        h_kk, h_kv = run(x, h_kk, h_kv)
    jax.block_until_ready((h_kk, h_kv))
    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir)
        h_kk, h_kv = jax.block_until_ready(run(x, h_kk, h_kv))
        jax.profiler.stop_trace()
        events = gpu_kernel_events(trace_dir)
    if events:
        return (events[-1][1] + events[-1][2] - events[0][1]) / steps / 1e6
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        h_kk, h_kv = jax.block_until_ready(run(x, h_kk, h_kv))
        times.append((time.perf_counter() - start) * 1e3 / steps)
    return statistics.median(times)


def decode_loop(step, steps: int):
    """``steps`` decode steps in one jitted, unrolled ``fori_loop``: (x, h_kk, h_kv) -> (h_kk, h_kv), the
    states donated."""
    def many(x, h_kk, h_kv):
        def body(_, carry):   # o is summed into the carry: the solve feeds only o, so XLA would drop it
            o, h_kk, h_kv = step(x, *carry[1:])
            return carry[0] + o.astype(jnp.float32), h_kk, h_kv
        return jax.lax.fori_loop(0, steps, body, (jnp.zeros(x["q"].shape, jnp.float32), h_kk, h_kv),
                                 unroll=True)[1:]   # unrolled: no per-step loop condition
    return jax.jit(many, donate_argnums=(1, 2))


def gpu_kernel_events(trace_dir) -> list:
    """[(name, start_ns, duration_ns)] of the GPU kernels in the ``jax.profiler`` trace in ``trace_dir``."""
    from jax.profiler import ProfileData
    events = []
    for path in glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True):
        for plane in ProfileData.from_file(path).planes:
            if plane.name.startswith("/device:GPU"):
                for line in plane.lines:
                    if "stream" in line.name.lower() and "memcpy" not in line.name.lower():
                        events += [(e.name, e.start_ns, e.duration_ns) for e in line.events]
    return sorted(events, key=lambda e: e[1])


# ----------------------------------------------------------------------------- inputs
def make_inputs(seed, b, t, decode=False):
    """Unit-norm q/k, random v, beta in (0, 1] + 1e-6, decays g in the model's range, alpha in (0, 1)."""
    h, hkv, d = H, HKV, D
    rng = np.random.default_rng(seed)
    shape = (b, h) if decode else (b, t, h)
    kv_shape = (b, hkv) if decode else (b, t, hkv)

    def unit(x):
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    return dict(
        q=unit(rng.standard_normal(shape + (d,))).astype(np.float32),
        k=unit(rng.standard_normal(kv_shape + (d,))).astype(np.float32),
        v=rng.standard_normal(kv_shape + (d,)).astype(np.float32),
        beta=(1 / (1 + np.exp(-rng.standard_normal(shape))) + 1e-6).astype(np.float32),
        g=(-np.exp(rng.uniform(-6, 0, shape))).astype(np.float32),
        alpha=rng.uniform(size=shape).astype(np.float32),
    )


def decode_states(seed, b, tokens=64):
    """Realistic states: h_kk = sum of outer products of unit keys (symmetric PSD)."""
    h, d = H, D
    rng = np.random.default_rng(seed)
    keys = rng.standard_normal((b, h, tokens, d)).astype(np.float32)
    keys /= np.linalg.norm(keys, axis=-1, keepdims=True)
    h_kk = np.einsum("bhnd,bhne->bhde", keys, keys).astype(np.float32)
    h_kv = np.einsum("bhnd,bhne->bhde", keys, rng.standard_normal((b, h, tokens, d))).astype(np.float32)
    return h_kk, h_kv


def to_jax(inp, act_dtype):
    """q, k, v, alpha in the activation dtype; beta, g float32 (as the model computes them)."""
    out = {n: jnp.asarray(x, act_dtype if n in ("q", "k", "v", "alpha") else jnp.float32) for n, x in inp.items()}
    return out


def f64(inp_jax):
    return {n: np.asarray(jnp.asarray(x, jnp.float32), np.float64) for n, x in inp_jax.items()}


# ----------------------------------------------------------------------------- ours
def prefill_fns(num_iter, precision, tuning=None):
    common = dict(num_iter=num_iter, ridge_strength=RIDGE, scale=SCALE, chunk_size=64)

    def run(backend, x, h_kk, h_kv, prec=precision):
        extra = {"tuning": tuning} if tuning and backend == "pallas" else {}
        return kernels.gka_prefill(x["q"], x["k"], x["v"], x["beta"], x["g"], x["alpha"], h_kk, h_kv,
                                   backend=backend, precision=prec, **common, **extra)
    return run


def pieces_pallas(x, num_iter, precision, tuning=None):
    """The Pallas kernels of the prefill separately (jitted each), for timing: the default path (segmented
    state pass for both states, solve with the q mix, gla_output) and the fused path's two kernels."""
    zeros_kk = jnp.zeros((x["q"].shape[0], H, D, D), jnp.float32)
    operands = pallas_prefill._operand_dtype(precision)
    common = dict(chunk_size=64, precision=pallas_prefill._kernel_precision(precision), interpret=INTERPRET)
    tune = {} if INTERPRET else pallas_prefill._fit_blocks(tuning or pallas_prefill.GPU_TUNING, D, D)
    fused = {} if INTERPRET else pallas_prefill._fit_blocks(pallas_prefill.FUSED_GLA, D, D)

    def opts(table, name):
        return {k: v for k, v in table.get(name, {}).items() if k not in ("fused", "kernel")}

    state = jax.jit(lambda x: pallas_chunk.state_pass_segmented(
        x["k"], x["v"], x["beta"], x["g"], None, zeros_kk, zeros_kk, starts_dtype=operands, **common,
        **opts(tune, "state_pass")))
    (kk_starts, kv_starts), _ = state(x)
    solve = jax.jit(lambda x, s: pallas_solve.chebyshev_solve(
        x["q"], x["k"], x["beta"], x["g"], s, num_iter=num_iter, ridge_strength=RIDGE, alpha=x["alpha"],
        x_dtype=x["q"].dtype, mixed_dtype=operands, operand_dtype=operands, **common, **opts(tune, "solve")))
    _, q_mixed = solve(x, kk_starts)
    pieces = {}
    if not INTERPRET and gluon_solve.AVAILABLE:   # the default solve on a GPU (pallas_prefill.solve_kernel)
        gluon = jax.jit(lambda x, s: gluon_solve.chebyshev_solve(
            x["q"], x["k"], x["beta"], x["g"], s, num_iter=num_iter, ridge_strength=RIDGE, alpha=x["alpha"],
            x_dtype=x["q"].dtype, mixed_dtype=operands))
        pieces["solve (gluon)"] = (gluon, (x, kk_starts))
    output = jax.jit(lambda x, qm, s: pallas_chunk.gla_output(
        qm, x["k"], x["v"], x["beta"], x["g"], s, scale=SCALE, operand_dtype=operands, out_dtype=x["q"].dtype,
        **common, **opts(tune, "gla")))
    kk_pass = jax.jit(lambda x: pallas_chunk.state_pass_segmented(
        x["k"], None, x["beta"], x["g"], None, zeros_kk, None, kk_only=True, starts_dtype=operands, **common,
        **opts(fused, "state_pass")))
    gla = jax.jit(lambda x, qm: pallas_chunk.gla_fused(
        qm, x["k"], x["v"], x["beta"], x["g"], zeros_kk, scale=SCALE, operand_dtype=operands,
        out_dtype=x["q"].dtype, **common, **opts(fused, "gla")))
    return {"state_pass": (state, (x,)), **pieces, "solve (pallas)": (solve, (x, kk_starts)),
            "gla_output": (output, (x, q_mixed, kv_starts)), "fused path: kk state pass": (kk_pass, (x,)),
            "fused path: gla_fused": (gla, (x, q_mixed))}


def _state(**changes):
    return {"state_pass": {**pallas_prefill.GPU_TUNING["state_pass"], **changes}}


# Tuning variants timed beside the defaults (pallas_prefill.GPU_TUNING) at the 8B shapes, num_iter 30.
VARIANTS = {
    "fused GLA": pallas_prefill.FUSED_GLA,
    "segments of 32": _state(segment_chunks=32),
    "segments of 64": _state(segment_chunks=64),
    "state block_v 32": _state(block_v=32),
    "gla_output block_v 64": {"gla": {"fused": False, "block_v": 64, "num_warps": 4, "num_stages": 1}},
    "solve: pallas": {"solve": {**pallas_prefill.GPU_TUNING["solve"], "kernel": "pallas"}},
    "solve: pallas masked loop only": {"solve": {**pallas_prefill.GPU_TUNING["solve"], "kernel": "pallas",
                                                 "loop": "masked"}},
    "state pass bf16 operands": _state(operand_dtype="bfloat16"),
}


# ----------------------------------------------------------------------------- sections
def section_errors(args, ref):
    """Errors at a size the float64 path handles quickly: B=2, T=1000 (not a multiple of 64)."""
    b, t = 2, 1000 if not args.quick else 200
    if args.smoke:
        t = 100
    for num_iter in (30,):
        raw = make_inputs(1, b, t)
        x32 = to_jax(raw, jnp.float32)
        zeros = jnp.zeros((b, H, D, D), jnp.float32)
        xbf = to_jax(raw, jnp.bfloat16)

        def exact(inputs):  # float64 result for these (already rounded) inputs
            with jax.enable_x64(True):
                x64 = {n: jnp.asarray(v, jnp.float64) for n, v in f64(inputs).items()}
                z64 = jnp.zeros((b, H, D, D), jnp.float64)
                res = jax.jit(prefill_fns(num_iter, HIGHEST), static_argnums=0)("xla", x64, z64, z64)
                return jax.tree.map(np.asarray, res)

        want32, want_bf = exact(x32), exact(xbf)
        runs = {
            "xla fp32 HIGHEST": jax.jit(prefill_fns(num_iter, HIGHEST), static_argnums=0)("xla", x32, zeros, zeros),
            "pallas fp32 HIGHEST": jax.jit(prefill_fns(num_iter, HIGHEST), static_argnums=0)(PALLAS, x32, zeros, zeros),
            "pallas HIGH (TF32)": jax.jit(prefill_fns(num_iter, jax.lax.Precision.HIGH), static_argnums=0)(
                PALLAS, x32, zeros, zeros),
            "pallas DEFAULT (bf16 solve and GLA operands)": jax.jit(prefill_fns(num_iter, jax.lax.Precision.DEFAULT),
                                                            static_argnums=0)(PALLAS, x32, zeros, zeros),
        }
        runs["pallas bf16 act, DEFAULT"] = jax.jit(prefill_fns(num_iter, jax.lax.Precision.DEFAULT),
                                                static_argnums=0)(PALLAS, xbf, zeros, zeros)
        pallas_solve_tuning = {**pallas_prefill.GPU_TUNING, "solve": {"kernel": "pallas"}}
        runs["pallas bf16 act, DEFAULT, Pallas solve"] = jax.jit(
            prefill_fns(num_iter, jax.lax.Precision.DEFAULT, pallas_solve_tuning), static_argnums=0)(
                PALLAS, xbf, zeros, zeros)
        if ref is not None:
            for name, fn in (("reference training bf16", ref.prefill), ("reference vLLM bf16", ref.vllm_prefill)):
                try:
                    o, xs, h_kk, h_kv = fn(*ref_args(xbf), num_iter=num_iter, ridge_strength=RIDGE, scale=SCALE)
                    runs[name] = reference.GKAResult(*(np.asarray(a.float().cpu()) for a in (o, xs, h_kk, h_kv)))
                except Exception as exc:  # noqa: BLE001 - report and go on
                    record("errors", what=name, failed=repr(exc)[:300])
        bf16_inputs = {"pallas bf16 act, DEFAULT", "pallas bf16 act, DEFAULT, Pallas solve", "reference training bf16",
                       "reference vLLM bf16"}
        for name, res in runs.items():
            want = want_bf if name in bf16_inputs else want32
            record("errors", what=f"prefill {name}", num_iter=num_iter, B=b, T=t,
                   o=rel(res.o, want.o), x=rel(res.x, want.x), h_kk=rel(res.h_kk, want.h_kk),
                   h_kv=rel(res.h_kv, want.h_kv))
        # decode (float32 inputs for ours; the reference's bf16 run is compared with its rounded inputs)
        draw = make_inputs(2, 8, 1, decode=True)
        kk, kv = decode_states(3, 8)
        d32, dbf = to_jax(draw, jnp.float32), to_jax(draw, jnp.bfloat16)

        def exact_decode(inputs):
            with jax.enable_x64(True):
                d64 = {n: jnp.asarray(v, jnp.float64) for n, v in f64(inputs).items()}
                res = reference.gka_decode(d64["q"], d64["k"], d64["v"], d64["beta"], d64["g"], d64["alpha"],
                                           jnp.asarray(kk, jnp.float64), jnp.asarray(kv, jnp.float64),
                                           num_iter=num_iter, ridge_strength=RIDGE, scale=SCALE)
                return jax.tree.map(np.asarray, res)

        want = exact_decode(d32)
        gpu_rows = () if INTERPRET else (("pallas split", PALLAS, {"kernel": "pallas"}),)
        for label, backend, options in (("xla", "xla", {}), (PALLAS, PALLAS, {})) + gpu_rows:
            res = kernels.gka_decode(d32["q"], d32["k"], d32["v"], d32["beta"], d32["g"], d32["alpha"],
                                     jnp.asarray(kk), jnp.asarray(kv), num_iter=num_iter, ridge_strength=RIDGE,
                                     scale=SCALE, precision=HIGHEST, backend=backend, **options)
            record("errors", what=f"decode {label} fp32", num_iter=num_iter, B=8, o=rel(res.o, want.o),
                   x=rel(res.x, want.x), h_kk=rel(res.h_kk, want.h_kk), h_kv=rel(res.h_kv, want.h_kv))
        if ref is not None:
            try:
                import torch
                tk, tv = torch.tensor(kk, device="cuda"), torch.tensor(kv, device="cuda")
                o, h_kk, h_kv = ref.decode(*ref_args(dbf), tk, tv, num_iter=num_iter, ridge_strength=RIDGE,
                                           scale=SCALE)
                want = exact_decode(dbf)
                record("errors", what="decode reference vLLM bf16", num_iter=num_iter, B=8,
                       o=rel(o.float().cpu(), want.o), h_kk=rel(h_kk.cpu(), want.h_kk),
                       h_kv=rel(h_kv.float().cpu(), want.h_kv))
            except Exception as exc:  # noqa: BLE001
                record("errors", what="decode reference", failed=repr(exc)[:300])


def ref_args(x):
    """Our jax inputs -> torch CUDA tensors (same values) in our layout, for the reference harness."""
    import torch
    out = []
    for n in ("q", "k", "v", "beta", "g", "alpha"):
        a = np.asarray(jnp.asarray(x[n], jnp.float32))
        t = torch.tensor(a, device="cuda")
        out.append(t.to(torch.bfloat16) if x[n].dtype == jnp.bfloat16 else t)
    return out


def section_prefill(args, ref):
    lengths = (200,) if args.smoke else (4096,) if args.quick else tuple(int(n) for n in args.lengths.split(","))
    for t in lengths:
        raw = make_inputs(4, 1, t)
        xbf = to_jax(raw, jnp.bfloat16)
        zeros = jnp.zeros((1, H, D, D), jnp.float32)
        for num_iter in (30, 10):
            row = dict(T=t, num_iter=num_iter)
            for name, (fn, fargs) in pieces_pallas(xbf, num_iter, jax.lax.Precision.DEFAULT).items():
                row[f"ours {name}"] = time_jax(fn, *fargs)
            if not args.smoke and num_iter == 30 and not args.no_variants:
                for variant, tuning in VARIANTS.items():
                    if args.variants and variant not in args.variants.split(","):
                        continue
                    merged = {**pallas_prefill.GPU_TUNING, **tuning}
                    fn = jax.jit(functools.partial(prefill_fns(num_iter, jax.lax.Precision.DEFAULT, merged), PALLAS))
                    try:
                        row[f"ours total [{variant}]"] = time_jax(fn, xbf, zeros, zeros)
                    except Exception as exc:  # noqa: BLE001 - a variant that does not compile is a result too
                        row[f"ours total [{variant}]"] = f"failed: {exc!r}"[:80]
            for label, backend, prec in (("ours total", PALLAS, jax.lax.Precision.DEFAULT),
                                         ("ours total TF32", PALLAS, jax.lax.Precision.HIGH),
                                         ("xla total", "xla", jax.lax.Precision.DEFAULT)):
                fn = jax.jit(functools.partial(prefill_fns(num_iter, prec), backend))
                row[label] = time_jax(fn, xbf, zeros, zeros, iters=5 if backend == "xla" else 10)
            if ref is not None:
                row.update(time_reference_prefill(ref, xbf, num_iter))
            record("prefill", **row)


def time_reference_prefill(ref, xbf, num_iter):
    out = {}
    try:
        q, k, v, beta, g, alpha = ref_args(xbf)
        inp = ref.prefill_inputs(q, k, v, beta, g, alpha)
        x, _ = ref.prefill_solve(inp, num_iter=num_iter, ridge_strength=RIDGE)
        q_mixed = ref.prefill_mix(inp, x)
        out["ref solve"] = ref.time_cuda(lambda: ref.prefill_solve(inp, num_iter=num_iter, ridge_strength=RIDGE))
        out["ref gla"] = ref.time_cuda(lambda: ref.prefill_gla(inp, q_mixed, scale=SCALE))
        out["ref total"] = ref.time_cuda(lambda: ref.prefill_core(inp, num_iter=num_iter, ridge_strength=RIDGE,
                                                                  scale=SCALE))
    except Exception as exc:  # noqa: BLE001
        out["ref failed"] = repr(exc)[:300]
        traceback.print_exc()
    try:
        vin = ref.vllm_prefill_inputs(*ref_args(xbf))
        out["ref vllm total"] = ref.time_cuda(lambda: ref.vllm_prefill_core(vin, num_iter=num_iter,
                                                                            ridge_strength=RIDGE, scale=SCALE))
    except Exception as exc:  # noqa: BLE001
        out["ref vllm failed"] = repr(exc)[:300]
        traceback.print_exc()
    return out


def section_decode(args, ref, copy_gbps):
    """ms per step: "<variant> ms" is the GPU time (16 steps in one jitted loop, ``time_decode_loop``; the
    XLA path per call, see below); "call ms" one jitted call per step of the default (dispatch included);
    the reference's "ref graph ms" replays a CUDA graph of its step (no launch overhead, as vLLM runs
    decode) and "ref ms" launches it from Python."""
    batches = (1, 2) if args.smoke else (1, 32) if args.quick else (1, 32, 128)
    for b in batches:
        raw = make_inputs(5, b, 1, decode=True)
        xbf = to_jax(raw, jnp.bfloat16)
        kk, kv = decode_states(6, b)
        bytes_moved = b * H * (D * D + D * D) * 4 * 2
        for num_iter in (30, 10):
            row = dict(B=b, num_iter=num_iter, state_MB=bytes_moved / 2 / 1e6)
            for label, backend, options in DECODE_VARIANTS:
                if args.smoke and options or any(part and part in label for part in args.skip_decode.split(",")):
                    continue
                step = jax.jit(functools.partial(decode_step, backend=backend, num_iter=num_iter, options=options),
                               donate_argnums=(1, 2))
                # The XLA path is timed per call: in one jitted loop XLA fuses the steps' state updates.
                timer = time_decode if backend == "xla" else time_decode_loop
                ms = timer(step, xbf, jnp.asarray(kk), jnp.asarray(kv))
                row[f"{label} ms"] = ms
                if copy_gbps:
                    row[f"{label} % of copy BW"] = 100 * bytes_moved / ms / 1e6 / copy_gbps
                if label == DECODE_VARIANTS[0][0]:
                    row["call ms"] = time_decode(step, xbf, jnp.asarray(kk), jnp.asarray(kv))
            if ref is not None:
                try:
                    import torch
                    args_t = ref_args(xbf)
                    tk, tv = torch.tensor(kk, device="cuda"), torch.tensor(kv, device="cuda")
                    inp = ref.decode_inputs(*args_t, num_iter=num_iter)

                    def ref_step():
                        return ref.decode_core(inp, tk, tv, num_iter=num_iter, ridge_strength=RIDGE, scale=SCALE)
                    for key, graph in (("ref graph ms", True), ("ref ms", False)):
                        try:
                            row[key] = ref.time_cuda(ref_step, iters=20, graph=graph)
                        except Exception as exc:  # noqa: BLE001
                            row[f"{key} failed"] = repr(exc)[:200]
                    if "ref graph ms" in row and copy_gbps:
                        row["ref % of copy BW"] = 100 * bytes_moved / row["ref graph ms"] / 1e6 / copy_gbps
                except Exception as exc:  # noqa: BLE001
                    row["ref failed"] = repr(exc)[:300]
                    traceback.print_exc()
            record("decode", **row)


# (label, backend, extra options); the first row is the default GPU decode (the Gluon kernel where
# jax-triton is installed, kernels.decode_kernel), then the Pallas split kernels and Gluon tunings.
DECODE_VARIANTS = [
    ("pallas", "pallas", {}),
    ("pallas split", "pallas", {"kernel": "pallas"}),
    ("gluon item", "pallas", {"kernel": "gluon", "form": "item"}),
    ("gluon pipelined 2 slots", "pallas", {"kernel": "gluon", "form": "pipelined", "slots": 2}),
    ("gluon pipelined 4 blocks", "pallas", {"kernel": "gluon", "form": "pipelined", "blocks": 4}),
    ("gluon pipelined mirror", "pallas", {"kernel": "gluon", "form": "pipelined", "mirror": True}),
    ("gluon pipelined no mirror", "pallas", {"kernel": "gluon", "form": "pipelined", "mirror": False}),
    ("gluon pipelined value partition", "pallas", {"kernel": "gluon", "form": "pipelined", "value_partition": True}),
    ("gluon pipelined previous default", "pallas",
     {"kernel": "gluon", "form": "pipelined", "value_partition": False, "spread_store": 0, "inputs_ahead": False}),
    ("gluon pipelined value readback", "pallas",
     {"kernel": "gluon", "form": "pipelined", "value_partition": "readback"}),
    ("xla", "xla", {}),
]


def decode_step(x, h_kk, h_kv, *, backend, num_iter, options=None):
    if backend == "pallas" and INTERPRET:
        backend = PALLAS
    res = kernels.gka_decode(x["q"], x["k"], x["v"], x["beta"], x["g"], x["alpha"], h_kk, h_kv, num_iter=num_iter,
                             ridge_strength=RIDGE, scale=SCALE, precision=jax.lax.Precision.DEFAULT, backend=backend,
                             **(options or {}))
    return res.o, res.h_kk, res.h_kv


def section_layer(args, ref):
    import gka_jax
    from flax import nnx
    from gka_jax.cache import init_cache
    from gka_jax.config import GKA as GKA_KIND
    from gka_jax.gka import GKA as GKALayer

    cfg = gka_jax.preset("GKA-primed-HQwen3-8B-Reasoner")
    layer = GKALayer(cfg, jnp.bfloat16, jax.lax.Precision.DEFAULT, nnx.Rngs(0))
    graphdef, params = nnx.split(layer)
    gka_index = cfg.layer_types.index(GKA_KIND)
    for t in ((4096,) if args.quick else (4096, 16384)):
        x = jax.random.normal(jax.random.PRNGKey(1), (1, t, cfg.hidden_size), jnp.bfloat16)
        valid = jnp.ones((1, t), bool)
        cache = init_cache(cfg, 1, 16, jnp.bfloat16).layers[gka_index]
        row = dict(T=t, num_iter=30)
        for backend in (PALLAS, "xla"):
            fn = jax.jit(lambda p, x, c, backend=backend: nnx.merge(graphdef, p)(x, valid, c, num_iter=30,
                                                                               backend=backend)[0])
            row[f"{backend} ms"] = time_jax(fn, params, x, cache, iters=5)
        if ref is not None:
            try:
                import torch
                run = ref.layer_8b(1, t, torch.bfloat16, num_iter=30)
                row["ref ms"] = ref.time_cuda(run, iters=5)
                del run
                torch.cuda.empty_cache()
            except Exception as exc:  # noqa: BLE001
                row["ref failed"] = repr(exc)[:300]
                traceback.print_exc()
        record("layer", **row)


def copy_bandwidth() -> float | None:
    """Device-to-device copy bandwidth (read + write) in GB/s, measured with torch."""
    try:
        import torch
        src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
        dst = torch.empty_like(src)
        for _ in range(3):
            dst.copy_(src)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(20):
            dst.copy_(src)
        torch.cuda.synchronize()
        seconds = (time.perf_counter() - start) / 20
        del src, dst
        return 2 * 2**30 / seconds / 1e9
    except Exception:  # noqa: BLE001
        return None


def markdown_table(title, rows, digits=3):
    """Print ``rows`` (dicts; the union of their keys in first-seen order are the columns) as a markdown table
    under ``### title``; floats with ``digits`` significant digits."""
    keys = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    print(f"\n### {title}\n")
    print("| " + " | ".join(keys) + " |")
    print("|" + " --- |" * len(keys))
    for row in rows:
        cells = [f"{row.get(k, ''):.{digits}g}" if isinstance(row.get(k), float) else str(row.get(k, ""))
                 for k in keys]
        print("| " + " | ".join(cells) + " |", flush=True)


def print_tables():
    by_section: dict[str, list[dict]] = {}
    for row in ROWS:
        by_section.setdefault(row["section"], []).append({k: v for k, v in row.items() if k != "section"})
    for section, rows in by_section.items():
        markdown_table(section, rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-reference", action="store_true")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--sections", default="errors,prefill,decode,layer")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--lengths", default="4096,16384", help="prefill lengths T")
    parser.add_argument("--skip-decode", default="", help="comma-separated parts of decode variant labels to skip")
    parser.add_argument("--no-variants", action="store_true", help="skip the prefill tuning variants")
    parser.add_argument("--variants", default="", help="comma-separated names: only these prefill variants")
    parser.add_argument("--smoke", action="store_true",
                        help="CPU check of this script: tiny shapes, Pallas in interpret mode, no reference")
    args = parser.parse_args()
    if args.smoke:
        global H, HKV, D, SCALE, PALLAS, INTERPRET
        H, HKV, D, SCALE, PALLAS, INTERPRET = 4, 2, 16, 16 ** -0.5, "pallas_interpret", True
        args.quick, args.no_reference = True, True
        args.sections = args.sections.replace(",layer", "")
    print(f"# {jax.devices()[0].device_kind}, jax {jax.__version__}, backends here: "
          f"{kernels.available_backends()}", flush=True)
    ref = None
    if not args.no_reference:
        try:
            from benchmarks import reference_gka as ref
            ref.prune_autotune()
        except Exception as exc:  # noqa: BLE001
            print(f"# reference unavailable: {exc!r}", flush=True)
            ref = None
    copy_gbps = copy_bandwidth()
    record("machine", device=jax.devices()[0].device_kind, jax=jax.__version__, copy_GBps=copy_gbps,
           pallas=pallas_decode.AVAILABLE)
    for section in args.sections.split(","):
        start = time.perf_counter()
        try:
            if section == "errors":
                section_errors(args, ref)
            elif section == "prefill":
                section_prefill(args, ref)
            elif section == "decode":
                section_decode(args, ref, copy_gbps)
            elif section == "layer":
                section_layer(args, ref)
        except Exception as exc:  # noqa: BLE001 - one broken section must not hide the others
            traceback.print_exc()
            record(section, failed=repr(exc)[:500])
        print(f"# section {section}: {time.perf_counter() - start:.0f} s", flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "kernels.jsonl"), "w") as f:
        for row in ROWS:
            f.write(json.dumps(row) + "\n")
    print_tables()


if __name__ == "__main__":
    main()
