"""End-to-end generation throughput through ``gka_jax.generate`` (tokenizer-free: random prompt ids).

    python benchmarks/generate.py --tiny --batch 1,8 --context 256 --new 32            # CPU, the tiny model
    python benchmarks/generate.py --batch 1,8,32 --context 4096,16384 --num-iter 30,10  # GPU, 8B random

For each (num_iter, batch, context): a warm-up generate over one prefill group of rows (compiles the
prefill; generate prefills max_prefill_tokens at a time), then a timed one over the whole batch. Time to
first token = all prefill groups + first sample (plus the small one-off jits for this batch shape: cache
init/insert, first sample). Decode tokens/s = batch x (new - 2) / (last token time - second token time): the
first decode step, which compiles the decode for this batch shape, is left out. Prefill tokens/s =
batch x context / time to first token.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import gka_jax  # noqa: E402
from benchmarks.forward import TINY, ints  # noqa: E402
from gka_jax.generate import MAX_PREFILL_TOKENS  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="GKA-primed-HQwen3-8B-Reasoner")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--batch", default="1")
    parser.add_argument("--context", default="4096")
    parser.add_argument("--num-iter", default="30")
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args()

    cfg = TINY if args.tiny else gka_jax.preset(args.preset)
    model = gka_jax.random_model(cfg, args.dtype, seed=0)
    from gka_jax import kernels
    print(f"# {'tiny' if args.tiny else args.preset} random weights, {args.dtype}, {jax.devices()[0].device_kind} "
          f"({jax.default_backend()}), jax {jax.__version__}, GKA kernels: {kernels.select_backend()}", flush=True)
    rng = np.random.default_rng(0)
    rows = []
    for num_iter in ints(args.num_iter):
        for batch in ints(args.batch):
            for context in ints(args.context):
                prompts = [rng.integers(0, cfg.vocab_size, context).tolist() for _ in range(batch)]
                sampling = gka_jax.SamplingParams(temperature=1.0, top_p=0.95, max_tokens=args.new, seed=0)
                group = min(batch, max(1, MAX_PREFILL_TOKENS // context))
                warm = gka_jax.SamplingParams(temperature=1.0, top_p=0.95, max_tokens=2, seed=0)
                gka_jax.generate(model, prompts[:group], warm, num_iter=num_iter, eos_token_ids=[],
                                 max_length=context + args.new)
                stamps = []
                start = time.perf_counter()
                gka_jax.generate(model, prompts, sampling, num_iter=num_iter, eos_token_ids=[],
                                 max_length=context + args.new, on_token=lambda row, tok: stamps.append(time.perf_counter()) if row == 0 else None)
                ttft = stamps[0] - start
                decode = batch * (len(stamps) - 2) / (stamps[-1] - stamps[1])
                rows.append((num_iter, batch, context, ttft, decode))
                print(f"  num_iter={num_iter} batch={batch} context={context}: TTFT {ttft:.3f}s, "
                      f"prefill {batch * context / ttft:,.0f} tok/s, decode {decode:,.1f} tok/s", flush=True)
    print()
    print("| num_iter | batch | context | new tokens | time to first token s | prefill tok/s | decode tok/s (all rows) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for n, b, c, ttft, dec in rows:
        print(f"| {n} | {b} | {c} | {args.new} | {ttft:.3f} | {b * c / ttft:,.0f} | {dec:,.1f} |")


if __name__ == "__main__":
    main()
