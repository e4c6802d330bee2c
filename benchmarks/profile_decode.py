"""Decode steps for Nsight Compute: each configuration is compiled and warmed up, then one step runs
between cuProfilerStart and cuProfilerStop, so that ncu (``--profile-from-start off``) sees only the
profiled steps, in the order printed here. On the GPU machine (Firecracker: ncu reads the counters):

    ncu --profile-from-start off --clock-control none --kernel-name regex:decode \\
        --metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum \\
        python3 benchmarks/profile_decode.py --batches 32,128 --forms item,pipelined

Without ncu it just runs the steps (and prints the order). Shapes: H = 32, Hkv = 8, D = 128, bf16 q/k/v,
fp32 states, as benchmarks/kernels.py.
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from kernels import decode_states, decode_step, make_inputs, to_jax  # noqa: E402  (benchmarks/kernels.py)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="32,128")
    parser.add_argument("--num-iter", default="30", help="comma-separated")
    parser.add_argument("--forms", default="item,pipelined", help="gluon_decode forms, optionally form:slots:warps")
    args = parser.parse_args()
    cuda = ctypes.CDLL("libcuda.so.1")
    order = []
    configs = [(int(b), int(n)) for n in args.num_iter.split(",") for b in args.batches.split(",")]
    for b, num_iter in configs:
        x = to_jax(make_inputs(5, b, 1, decode=True), jnp.bfloat16)
        kk, kv = decode_states(6, b)
        for spec in args.forms.split(","):
            form, *rest = spec.split(":")
            options = {"kernel": "gluon", "form": form}
            if rest:
                options["slots"] = int(rest[0])
            if len(rest) > 1:
                options["loader_warps"] = int(rest[1])
            step = jax.jit(functools.partial(decode_step, backend="pallas", num_iter=num_iter,
                                             options=options), donate_argnums=(1, 2))
            h_kk, h_kv = jnp.asarray(kk), jnp.asarray(kv)
            for _ in range(3):
                _, h_kk, h_kv = step(x, h_kk, h_kv)
            jax.block_until_ready(h_kk)
            cuda.cuProfilerStart()
            _, h_kk, h_kv = jax.block_until_ready(step(x, h_kk, h_kv))
            cuda.cuProfilerStop()
            order.append(dict(B=b, num_iter=num_iter, **options))
    for number, config in enumerate(order):
        print(f"profiled step {number}: {json.dumps(config)}")


if __name__ == "__main__":
    main()
