"""Conversion benchmark: a synthetic checkpoint with the full 8B architecture's names and shapes.

    python benchmarks/convert.py [--workdir DIR] [--dtype keep] [--mesh tp=4,dp=2]

Writes random bf16 tensors once (HF names/shapes of GKA-primed-HQwen3-8B-Reasoner, 2 GB shards, reused
on later runs), converts them with ``python -m gka_jax.convert`` in a child process and prints wall
seconds, MB/s and the child's peak RSS as the OS reports it (getrusage RUSAGE_CHILDREN).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

PRESET = "GKA-primed-HQwen3-8B-Reasoner"


def write_synthetic(folder: str, shard_bytes: int = 2 * 1024**3) -> int:
    import ml_dtypes
    from safetensors.numpy import save_file

    import gka_jax
    from gka_jax.params import param_table

    cfg = gka_jax.preset(PRESET)
    done = os.path.join(folder, ".complete")
    table = param_table(cfg)
    total = sum(int(np.prod(e.hf_shape)) * 2 for e in table)
    if os.path.exists(done):
        return total
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    rng = np.random.default_rng(0)
    shards, current, size = [], [], 0
    for entry in sorted(table, key=lambda e: e.hf_name):
        nbytes = int(np.prod(entry.hf_shape)) * 2
        if current and size + nbytes > shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(entry)
        size += nbytes
    shards.append(current)
    weight_map = {}
    start = time.perf_counter()
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for entry in shard:
            # Random bf16 bit patterns with exponents kept in [2^-16, 2^1): finite, non-trivial to compress.
            bits = rng.integers(0, 1 << 16, size=entry.hf_shape, dtype=np.uint16)
            bits = (bits & np.uint16(0x807F)) | (rng.integers(0x37, 0x40, size=entry.hf_shape, dtype=np.uint16) << 7)
            tensors[entry.hf_name] = bits.view(ml_dtypes.bfloat16)
        save_file(tensors, os.path.join(folder, name), metadata={"format": "pt"})
        weight_map.update({e.hf_name: name for e in shard})
        print(f"  wrote {name} ({time.perf_counter() - start:.0f}s)", flush=True)
        del tensors
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    hf = cfg.to_hf()
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(hf, f, indent=1)
    open(done, "w").close()
    return total


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default=os.path.expanduser("~/.cache/gka-jax-bench"))
    parser.add_argument("--dtype", default="keep")
    parser.add_argument("--mesh", default=None)
    parser.add_argument("--keep-output", action="store_true")
    args = parser.parse_args()

    src = os.path.join(args.workdir, "hqwen3-8b-synthetic-hf")
    dst = os.path.join(args.workdir, "hqwen3-8b-synthetic-orbax")
    print(f"source {src} (writing it if absent)", flush=True)
    total = write_synthetic(src)
    shutil.rmtree(dst, ignore_errors=True)
    cmd = [sys.executable, "-m", "gka_jax.convert", src, dst, "--quiet", "--dtype", args.dtype]
    if args.mesh:
        cmd += ["--mesh", args.mesh]
    env = {**os.environ, "PYTHONPATH": REPO}
    start = time.perf_counter()
    result = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode:
        sys.exit(f"conversion failed: {result.stderr.strip()}")
    peak_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # Linux reports KiB
    on_disk = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(dst) for f in fs)
    if not args.keep_output:
        shutil.rmtree(dst, ignore_errors=True)
    print()
    print("| checkpoint | bytes in | seconds | MB/s | peak RSS | bytes out |")
    print("| --- | --- | --- | --- | --- | --- |")
    print(f"| {PRESET} synthetic bf16, dtype {args.dtype}{', mesh ' + args.mesh if args.mesh else ''} | "
          f"{total / 1e9:.2f} GB | {seconds:.1f} | {total / 1e6 / seconds:.0f} | {peak_rss / 1e9:.2f} GB | "
          f"{on_disk / 1e9:.2f} GB |")


if __name__ == "__main__":
    main()
