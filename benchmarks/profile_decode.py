"""Where a decode step's GPU time goes. Two modes (shapes as benchmarks/kernels.py: H = 32, Hkv = 8,
D = 128, bf16 q/k/v, fp32 states):

``--trace`` (default): each configuration runs the 16-step jitted loop of ``kernels.decode_loop`` once under
``jax.profiler``; from the trace (CUPTI), the table gives per step the wall time, the GPU span (first kernel
start to last kernel end, divided by 16), the decode kernel's mean duration, and the other kernels' summed
duration; "% of copy BW" is the state bytes over the decode kernel's duration against torch's device copy.

``--ncu``: each configuration is compiled and warmed up, then one step runs between cuProfilerStart and
cuProfilerStop, so that Nsight Compute sees only those steps, in the order printed. On the GPU machine
(Firecracker: ncu reads the counters):

    ncu --profile-from-start off --clock-control none --kernel-name regex:decode \\
        --section SpeedOfLight --section WarpStateStats python3 benchmarks/profile_decode.py --ncu

Configurations: ``--forms item,pipelined:slots=3:loader_warps=4`` (a gluon_decode form, then options as
name=integer), ``--batches``, ``--num-iter``.
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import functools
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from kernels import (H, D, copy_bandwidth, decode_loop, decode_states, decode_step, gpu_kernel_events,  # noqa: E402
                     make_inputs, to_jax)

STEPS = 16


def trace_row(step, x, kk, kv, copy_gbps, config):
    run = decode_loop(step, STEPS)
    h_kk, h_kv = run(x, jnp.asarray(kk), jnp.asarray(kv))
    h_kk, h_kv = jax.block_until_ready(run(x, h_kk, h_kv))
    start = time.perf_counter()
    h_kk, h_kv = jax.block_until_ready(run(x, h_kk, h_kv))
    wall_ms = (time.perf_counter() - start) * 1e3 / STEPS
    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir)
        jax.block_until_ready(run(x, h_kk, h_kv))
        jax.profiler.stop_trace()
        events = gpu_kernel_events(trace_dir)
    decode = [e for e in events if "decode" in e[0]]
    others = collections.Counter()
    for name, _, duration in events:
        if "decode" not in name:
            others[name[:40]] += duration / STEPS / 1e3
    kernel_us = sum(e[2] for e in decode) / max(len(decode), 1) / 1e3
    span_us = (events[-1][1] + events[-1][2] - events[0][1]) / STEPS / 1e3 if events else float("nan")
    state_bytes = 2 * 2 * config["B"] * H * D * D * 4
    return dict(config, wall_us=round(wall_ms * 1e3, 1), gpu_span_us=round(span_us, 1),
                decode_kernels=len(decode), decode_kernel_us=round(kernel_us, 1),
                pct_copy_bw_kernel=round(100 * state_bytes / (kernel_us * 1e3) / copy_gbps, 1) if copy_gbps else None,
                pct_copy_bw_wall=round(100 * state_bytes / (wall_ms * 1e6) / copy_gbps, 1) if copy_gbps else None,
                other_kernels_us={k: round(v, 2) for k, v in others.most_common(4)})


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="32,128")
    parser.add_argument("--num-iter", default="30", help="comma-separated")
    parser.add_argument("--forms", default="item,pipelined",
                        help="comma-separated form[:name=integer...] (gluon_decode options)")
    parser.add_argument("--ncu", action="store_true", help="one profiled step per configuration, for ncu")
    args = parser.parse_args()
    cuda = ctypes.CDLL("libcuda.so.1") if args.ncu else None
    copy_gbps = None if args.ncu else copy_bandwidth()
    rows = []
    configs = [(int(b), int(n)) for n in args.num_iter.split(",") for b in args.batches.split(",")]
    for b, num_iter in configs:
        x = to_jax(make_inputs(5, b, 1, decode=True), jnp.bfloat16)
        kk, kv = decode_states(6, b)
        for spec in args.forms.split(","):
            form, *rest = spec.split(":")
            options = {"kernel": "gluon", "form": form}
            for option in rest:        # name=integer, e.g. slots=3
                name, value = option.split("=")
                options[name] = int(value)
            config = dict(B=b, num_iter=num_iter, **options)
            step = functools.partial(decode_step, backend="pallas", num_iter=num_iter, options=options)
            if args.ncu:
                jitted = jax.jit(step, donate_argnums=(1, 2))
                h_kk, h_kv = jnp.asarray(kk), jnp.asarray(kv)
                for _ in range(3):
                    _, h_kk, h_kv = jitted(x, h_kk, h_kv)
                jax.block_until_ready(h_kk)
                cuda.cuProfilerStart()
                _, h_kk, h_kv = jax.block_until_ready(jitted(x, h_kk, h_kv))
                cuda.cuProfilerStop()
                rows.append(config)
            else:
                rows.append(trace_row(step, x, kk, kv, copy_gbps, config))
    print(f"copy bandwidth {copy_gbps} GB/s")
    for number, row in enumerate(rows):
        print(f"{'profiled step' if args.ncu else 'row'} {number}: {json.dumps(row)}")


if __name__ == "__main__":
    main()
