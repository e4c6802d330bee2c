"""Load a hybrid GKA checkpoint (HF layout) and continue a prompt of token ids greedily.

    python examples/greedy.py PATH [--dtype float32] [--num-iter N] [--tokens 1,2,3] [--new 12] [--mesh tp=2]
"""

import argparse
import time

import jax.numpy as jnp
import numpy as np

import gka_jax


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", help="HF checkpoint folder (config.json + safetensors)")
    parser.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: the checkpoint's)")
    parser.add_argument("--num-iter", type=int, default=None, help="Chebyshev iterations (default: config)")
    parser.add_argument("--tokens", default="1,2,3,4,5,6,7,8", help="comma-separated prompt token ids")
    parser.add_argument("--new", type=int, default=12, help="tokens to generate")
    parser.add_argument("--mesh", default=None, help="e.g. tp=2,dp=1")
    args = parser.parse_args()

    mesh = gka_jax.parse_mesh(args.mesh) if args.mesh else None
    start = time.perf_counter()
    model = gka_jax.load(args.path, dtype=args.dtype, num_iter=args.num_iter, mesh=mesh)
    cfg = model.config
    print(f"loaded {args.path}: {cfg.num_layers} layers ({cfg.layer_types.count('gka')} GKA), "
          f"hidden {cfg.hidden_size}, vocab {cfg.vocab_size}, dtype {model.dtype}, "
          f"num_iter {model._num_iter(None)} in {time.perf_counter() - start:.2f}s")

    prompt = np.array([[int(t) for t in args.tokens.split(",")]], np.int32)
    start = time.perf_counter()
    logits, cache = model.prefill(prompt, max_length=prompt.shape[1] + args.new, last_only=True)
    token = jnp.argmax(logits[:, -1], axis=-1)
    generated = [int(token[0])]
    for _ in range(args.new - 1):
        step_logits, cache = model.decode(token, cache)
        token = jnp.argmax(step_logits, axis=-1)
        generated.append(int(token[0]))
    elapsed = time.perf_counter() - start
    print(f"prompt    {prompt[0].tolist()}")
    print(f"generated {generated}")
    print(f"{args.new} tokens in {elapsed:.2f}s (including compilation)")


if __name__ == "__main__":
    main()
