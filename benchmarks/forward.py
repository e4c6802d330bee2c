"""Prefill and decode throughput of the whole model with random weights (default: the 8B architecture).

    python benchmarks/forward.py [--preset NAME | --tiny] [--batch 1,8] [--context 4096] [--num-iter 30,10]
                                 [--steps 32] [--dtype bfloat16]

For each (num_iter, batch, context): prefill of ``context`` tokens (jit compiled first, then timed over
``--repeats`` runs, median) and ``--steps`` decode steps on top (median per step). Prints a table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import gka_jax  # noqa: E402
from gka_jax.config import ATTENTION, GKA, ModelConfig, RopeConfig  # noqa: E402

TINY = ModelConfig(vocab_size=512, hidden_size=128, intermediate_size=128, num_heads=4, num_kv_heads=2,
                   head_dim=64, layer_types=(ATTENTION, GKA, ATTENTION, ATTENTION, GKA, GKA),
                   rope=RopeConfig(theta=5e6), dtype="float32")


def ints(text):
    return [int(x) for x in text.split(",") if x]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="GKA-primed-HQwen3-8B-Reasoner")
    parser.add_argument("--tiny", action="store_true", help="the tiny golden architecture instead")
    parser.add_argument("--batch", default="1")
    parser.add_argument("--context", default="4096")
    parser.add_argument("--num-iter", default="30,10")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args()

    cfg = TINY if args.tiny else gka_jax.preset(args.preset)
    model = gka_jax.random_model(cfg, args.dtype, seed=0)
    device = jax.devices()[0]
    print(f"# {'tiny' if args.tiny else args.preset} random weights, {args.dtype}, on {device.device_kind} "
          f"({jax.default_backend()}), jax {jax.__version__}", flush=True)
    rows = []
    rng = np.random.default_rng(0)
    for num_iter in ints(args.num_iter):
        for batch in ints(args.batch):
            for context in ints(args.context):
                prompt = jnp.asarray(rng.integers(0, cfg.vocab_size, (batch, context)), jnp.int32)
                max_len = context + args.steps + 1
                times = []
                for rep in range(args.repeats + 1):
                    cache = model.init_cache(batch, max_len)
                    start = time.perf_counter()
                    logits, cache = model.prefill(prompt, cache, num_iter=num_iter, last_only=True)
                    jax.block_until_ready(logits)
                    if rep:
                        times.append(time.perf_counter() - start)
                    else:
                        compile_s = time.perf_counter() - start
                prefill_s = statistics.median(times)
                token = jnp.argmax(logits[:, -1], -1)
                step_times = []
                for step in range(args.steps + 1):
                    start = time.perf_counter()
                    step_logits, cache = model.decode(token, cache, num_iter=num_iter, check_length=False)
                    jax.block_until_ready(step_logits)
                    if step:
                        step_times.append(time.perf_counter() - start)
                    token = jnp.argmax(step_logits, -1)
                step_s = statistics.median(step_times)
                rows.append((num_iter, batch, context, prefill_s, batch * context / prefill_s, step_s * 1e3,
                             batch / step_s, compile_s))
                print(f"  num_iter={num_iter} batch={batch} context={context}: prefill {prefill_s:.3f}s, "
                      f"decode {step_s * 1e3:.2f} ms/step (first call incl. compile {compile_s:.1f}s)", flush=True)
    print()
    print("| num_iter | batch | context | prefill s | prefill tok/s | decode ms/step | decode tok/s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for n, b, c, ps, pt, dms, dt, _ in rows:
        print(f"| {n} | {b} | {c} | {ps:.3f} | {pt:,.0f} | {dms:.2f} | {dt:,.1f} |")


if __name__ == "__main__":
    main()
