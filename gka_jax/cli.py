"""The ``gka-jax`` command line.

    gka-jax convert SRC DST [--dtype bf16|fp32|keep] [--mesh tp=N,dp=M] [--verify] [--overwrite] [--compress]
                    [--quiet]
    gka-jax export ORBAX_DIR HF_DIR [--max-shard-size 2GB] [--overwrite]

Errors print one line naming the problem and exit with status 1 (no traceback).
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def _use_cpu_devices(count: int) -> None:
    """Conversion runs on the host: CPU devices, as many as the mesh needs (before jax starts a backend)."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={count}".strip()
    import jax

    jax.config.update("jax_platforms", "cpu")


def _mesh_size(spec: str | None) -> int:
    if not spec:
        return 1
    size = 1
    for part in spec.split(","):
        _, _, value = part.partition("=")
        size *= int(value) if value.strip().isdigit() else 1
    return size


def _cmd_convert(args) -> int:
    _use_cpu_devices(_mesh_size(args.mesh))
    from .convert import convert
    from .sharding import parse_mesh

    mesh = parse_mesh(args.mesh) if args.mesh else None
    start = time.perf_counter()
    meta = convert(args.src, args.dst, dtype=args.dtype, mesh=mesh, verify=args.verify, overwrite=args.overwrite,
                   quiet=args.quiet, compress=args.compress)
    seconds = time.perf_counter() - start
    if not args.quiet:
        mb = meta["param_bytes"] / 1e6
        print(f"wrote {args.dst}: {len(meta['tensors'])} tensors, {meta['param_count']:,} parameters, "
              f"{meta['dtype']}, {mb:,.0f} MB in {seconds:.1f}s ({mb / seconds:,.0f} MB/s)"
              + (f", sharded {meta['mesh']}" if meta["mesh"] else "") + (", verified" if args.verify else ""))
    return 0


def _cmd_export(args) -> int:
    _use_cpu_devices(1)
    from .convert import export
    from .convert.orbax_to_hf import parse_size

    index = export(args.src, args.dst, max_shard_bytes=parse_size(args.max_shard_size), overwrite=args.overwrite)
    if not args.quiet:
        files = sorted(set(index["weight_map"].values()))
        print(f"wrote {args.dst}: {len(index['weight_map'])} tensors in {len(files)} file(s)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gka-jax", description="Gated KalmaNet hybrid models in JAX.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="HF safetensors checkpoint -> Orbax (streaming, bounded memory)")
    p.add_argument("src", help="HF checkpoint folder, or a hub id (needs huggingface_hub and the network)")
    p.add_argument("dst", help="output folder (written atomically)")
    p.add_argument("--dtype", default="keep", choices=["bf16", "fp32", "keep"], help="parameter dtype (default keep)")
    p.add_argument("--mesh", default=None, help="write arrays sharded for this mesh, e.g. tp=4,dp=2")
    p.add_argument("--verify", action="store_true", help="read everything back and compare checksums")
    p.add_argument("--overwrite", action="store_true", help="replace an existing DST")
    p.add_argument("--compress", action="store_true", help="zstd-compress the arrays (smaller, slower)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    p.set_defaults(run=_cmd_convert)

    p = sub.add_parser("export", help="Orbax checkpoint written by convert -> HF safetensors folder")
    p.add_argument("src", help="folder written by gka-jax convert")
    p.add_argument("dst", help="HF output folder")
    p.add_argument("--max-shard-size", default="2GB", help="largest safetensors file (default 2GB)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing DST")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(run=_cmd_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .config import ConfigError
    from .convert.layout import ConvertError
    from .hf_checkpoint import CheckpointError

    try:
        return args.run(args)
    except (ConfigError, CheckpointError, ConvertError, OSError, ValueError) as e:
        print(f"gka-jax {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"gka-jax {args.command}: interrupted (nothing was left at the destination)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
