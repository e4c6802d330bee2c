"""End-to-end generation throughput through ``gka_jax.generate`` (tokenizer-free: random prompt ids).

    python benchmarks/generate.py --tiny --batch 1,8 --context 256 --new 32            # CPU, the tiny model
    python benchmarks/generate.py --batch 1,8,32 --context 4096,16384 --num-iter 30,10  # GPU, 8B random

For each (num_iter, batch, context): one warm-up generate (compiles), then a timed one. Time to first
token = prefill + first sample; decode tokens/s = batch x (new - 1) / (last token time - first token time).
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
    print(f"# {'tiny' if args.tiny else args.preset} random weights, {args.dtype}, {jax.devices()[0].device_kind} "
          f"({jax.default_backend()}), jax {jax.__version__}", flush=True)
    rng = np.random.default_rng(0)
    rows = []
    for num_iter in ints(args.num_iter):
        for batch in ints(args.batch):
            for context in ints(args.context):
                prompts = [rng.integers(0, cfg.vocab_size, context).tolist() for _ in range(batch)]
                sampling = gka_jax.SamplingParams(temperature=1.0, top_p=0.95, max_tokens=args.new, seed=0)
                for timed in (False, True):
                    stamps = []
                    start = time.perf_counter()
                    gka_jax.generate(model, prompts, sampling, num_iter=num_iter, eos_token_ids=[],
                                     on_token=lambda row, tok: stamps.append(time.perf_counter()) if row == 0 else None)
                ttft = stamps[0] - start
                decode = batch * (len(stamps) - 1) / (stamps[-1] - stamps[0])
                rows.append((num_iter, batch, context, ttft, decode))
                print(f"  num_iter={num_iter} batch={batch} context={context}: TTFT {ttft:.3f}s, "
                      f"decode {decode:,.1f} tok/s", flush=True)
    print()
    print("| num_iter | batch | context | new tokens | time to first token s | decode tok/s (all rows) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for n, b, c, ttft, dec in rows:
        print(f"| {n} | {b} | {c} | {args.new} | {ttft:.3f} | {dec:,.1f} |")


if __name__ == "__main__":
    main()
