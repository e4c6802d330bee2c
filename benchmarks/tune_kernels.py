"""Sweep the Pallas GKA kernels' tunables on the GPU (8B shapes: B=1, H=32, Hkv=8, D=128, chunk 64).

    python benchmarks/tune_kernels.py [--T 16384] [--num-iter 30]

For each kernel and setting: median ms and, for the solve, the error of x against float64 (T=1024).
Prints one table per kernel; the chosen defaults live in the kernel modules (docs/kernels.md says why).
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import traceback

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.kernels import (decode_states, make_inputs, markdown_table, rel, time_decode, time_jax,  # noqa: E402
                               to_jax)
from gka_jax.kernels import pallas_chunk, pallas_decode, pallas_solve, reference  # noqa: E402

DEFAULT = jax.lax.Precision.DEFAULT
HIGHEST = jax.lax.Precision.HIGHEST
H, D, RIDGE = 32, 128, 0.02


def sweep(name, fn, grid):
    rows = []
    for values in itertools.product(*grid.values()):
        opts = dict(zip(grid, values))
        row = {k: (getattr(v, "__name__", None) or str(v)) for k, v in opts.items()}
        try:
            row.update(fn(**opts))
        except Exception as exc:  # noqa: BLE001 - a config that does not compile is a result too
            row["error"] = repr(exc).splitlines()[0][:120]
            traceback.print_exc(limit=1)
        rows.append(row)
        print(name, row, flush=True)
    markdown_table(name, rows, digits=4)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--T", type=int, default=16384)
    parser.add_argument("--num-iter", type=int, default=30)
    parser.add_argument("--kernels", default="solve,state_pass,gla,decode")
    args = parser.parse_args()
    n_iter, t = args.num_iter, args.T
    x = to_jax(make_inputs(4, 1, t), jnp.bfloat16)
    zeros = jnp.zeros((1, H, D, D), jnp.float32)
    bf16 = jnp.bfloat16  # the DEFAULT (bf16 model) path: bf16 starts, q' and output-dot operands
    kk_starts, kv_starts, _, _ = jax.jit(lambda x: pallas_chunk.state_pass(
        x["k"], x["v"], x["beta"], x["g"], None, zeros, zeros, precision=DEFAULT, starts_dtype=bf16))(x)

    # float64 x for the solve's error, at T = 1024
    small = to_jax(make_inputs(7, 1, 1024), jnp.bfloat16)
    with jax.enable_x64(True):
        s64 = {n: jnp.asarray(np.asarray(jnp.asarray(v, jnp.float32), np.float64)) for n, v in small.items()}
        z64 = jnp.zeros((1, H, D, D), jnp.float64)
        want_x = np.asarray(reference.gka_prefill(s64["q"], s64["k"], s64["v"], s64["beta"], s64["g"], None, z64, z64,
                                                  num_iter=n_iter, ridge_strength=RIDGE, scale=D ** -0.5).x)
    small_starts = jax.jit(lambda x: pallas_chunk.state_pass(
        x["k"], x["v"], x["beta"], x["g"], None, zeros, zeros, precision=HIGHEST))(small)[0]

    kernels_wanted = args.kernels.split(",")
    if "solve" in kernels_wanted:
        def solve(loop, num_iter, num_warps):
            def run(inputs, starts):
                return pallas_solve.chebyshev_solve(
                    inputs["q"], inputs["k"], inputs["beta"], inputs["g"], starts, num_iter=num_iter,
                    ridge_strength=RIDGE, precision=DEFAULT, operand_dtype=bf16, num_warps=num_warps, num_stages=1,
                    alpha=inputs["alpha"], x_dtype=bf16, mixed_dtype=bf16, loop=loop)
            fn = jax.jit(run)
            row = {"ms": time_jax(fn, x, kk_starts.astype(bf16))}
            if num_iter == n_iter:
                row["x rel err"] = rel(fn(small, small_starts.astype(bf16))[0], want_x)
            return row
        # num_iter 0 times everything but the iterations (loads, Frobenius norms, stores)
        sweep("solve (bf16)", solve, dict(loop=list(pallas_solve.LOOPS), num_iter=sorted({0, 1, 10, n_iter}),
                                          num_warps=[4]))
    if "state_pass" in kernels_wanted:
        def state(block_v, block_k, num_warps, num_stages):
            fn = jax.jit(lambda x: pallas_chunk.state_pass(
                x["k"], x["v"], x["beta"], x["g"], None, zeros, zeros, precision=DEFAULT, block_v=block_v,
                block_k=block_k, num_warps=num_warps, num_stages=num_stages, starts_dtype=bf16))
            return {"ms": time_jax(fn, x)}

        sweep("state_pass (both, bf16 starts)", state, dict(block_v=[32, 64], block_k=[64, 128], num_warps=[4, 8],
                                                           num_stages=[1, 2]))
    if "gla" in kernels_wanted:
        def gla(block_v, num_warps, num_stages):
            fn = jax.jit(lambda x, s: pallas_chunk.gla_output(
                x["q"], x["k"], x["v"], x["beta"], x["g"], s, scale=D ** -0.5, precision=DEFAULT, block_v=block_v,
                num_warps=num_warps, num_stages=num_stages, operand_dtype=bf16))
            return {"ms": time_jax(fn, x, kv_starts)}

        sweep("gla_output bf16", gla, dict(block_v=[32, 64, 128], num_warps=[4, 8], num_stages=[1]))

        def fused(block_v, num_warps, num_stages):
            fn = jax.jit(lambda x: pallas_chunk.gla_fused(
                x["q"], x["k"], x["v"], x["beta"], x["g"], zeros, scale=D ** -0.5, precision=DEFAULT,
                block_v=block_v, num_warps=num_warps, num_stages=num_stages, operand_dtype=bf16))
            return {"ms": time_jax(fn, x)}

        sweep("gla_fused bf16", fused, dict(block_v=[16, 32, 64], num_warps=[4, 8], num_stages=[2]))
    if "decode" in kernels_wanted:
        for b in (32, 128):
            xd = to_jax(make_inputs(5, b, 1, decode=True), jnp.bfloat16)
            kk, kv = decode_states(6, b)
            bytes_moved = b * H * 2 * D * D * 4 * 2

            def dec(matvec, num_warps):
                def run(x, h_kk, h_kv):
                    res = pallas_decode.gka_decode(
                        x["q"], x["k"], x["v"], x["beta"], x["g"], x["alpha"], h_kk, h_kv, num_iter=n_iter,
                        ridge_strength=RIDGE, scale=D ** -0.5, num_warps=num_warps, matvec=matvec)
                    return res.o, res.h_kk, res.h_kv

                step = jax.jit(run, donate_argnums=(1, 2))
                ms = time_decode(step, xd, jnp.asarray(kk), jnp.asarray(kv))
                return {"ms": ms, "GB/s": bytes_moved / ms / 1e6}

            sweep(f"decode split B={b}", dec, dict(matvec=["sym", "sum"], num_warps=[4, 8]))


if __name__ == "__main__":
    main()
