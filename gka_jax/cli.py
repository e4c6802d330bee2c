"""The ``gka-jax`` command line.

    gka-jax convert SRC DST [--dtype bf16|fp32|keep] [--mesh tp=N,dp=M] [--verify] [--overwrite] [--compress]
                    [--quiet]
    gka-jax export ORBAX_DIR HF_DIR [--max-shard-size 2GB] [--overwrite]
    gka-jax generate [--model PATH] [--prompt TEXT | --chat] [--no-think] [--temperature 1.0 --top-p 1.0 ...]
                     [--num-iter N] [--max-new-tokens N] [--dtype bf16] [--mesh tp=N]

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


DEMO_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "demo")


class _Printer:
    """Streams one row's text: reasoning dimmed (on a terminal) or bracketed, then the answer."""

    def __init__(self, tokenizer, stream=sys.stdout):
        self.tokenizer, self.stream, self.ids, self.shown = tokenizer, stream, [], ("", "")
        self.tty = stream.isatty()

    def __call__(self, row, token):
        from .tokenizer import split_reasoning

        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=False)
        for special in ("<|im_end|>", "<|endoftext|>"):
            text = text.replace(special, "")
        reasoning, answer = split_reasoning(text)
        reasoning = reasoning or ""
        old_reasoning, old_answer = self.shown
        if reasoning != old_reasoning and reasoning.startswith(old_reasoning):
            if not old_reasoning:
                self.stream.write("\x1b[2m" if self.tty else "[reasoning] ")
            self.stream.write(reasoning[len(old_reasoning):])
        if answer != old_answer and answer.startswith(old_answer):
            if not old_answer and reasoning:
                self.stream.write("\x1b[0m\n\n" if self.tty else "\n[answer] ")
            self.stream.write(answer[len(old_answer):])
        self.stream.flush()
        self.shown = (reasoning, answer)

    def finish(self):
        if self.tty:
            self.stream.write("\x1b[0m")
        self.stream.write("\n")
        self.stream.flush()


def _cmd_generate(args) -> int:
    import time as _time

    from . import SamplingParams, generate, load
    from .sharding import parse_mesh

    path = args.model or DEMO_MODEL
    if args.model is None:
        print("using the bundled demo model (random weights: its text is noise; pass --model PATH for a real "
              "checkpoint)", file=sys.stderr)
    mesh = parse_mesh(args.mesh) if args.mesh else None
    dtype = {"bf16": "bfloat16", "fp32": "float32"}.get(args.dtype, args.dtype)
    model = load(path, dtype=dtype, num_iter=args.num_iter, mesh=mesh)
    if model.tokenizer is None:
        raise ValueError(f"{path} has no tokenizer.json: generate needs a tokenizer")
    sampling = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
                              repetition_penalty=args.repetition_penalty, presence_penalty=args.presence_penalty,
                              frequency_penalty=args.frequency_penalty, seed=args.seed, stop=args.stop or None,
                              max_tokens=args.max_new_tokens)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    state_dtype = {"bf16": "bfloat16", "fp32": "float32"}.get(args.state_dtype, args.state_dtype)

    def turn(user_text):
        if args.raw or model.tokenizer.chat_template is None:
            prompt = user_text
        else:
            messages.append({"role": "user", "content": user_text})
            prompt = model.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                         enable_thinking=not args.no_think)
        printer = _Printer(model.tokenizer)
        times = []

        def on_token(row, token):
            times.append(_time.perf_counter())
            printer(row, token)

        start = _time.perf_counter()
        out = generate(model, prompt, sampling, on_token=on_token, state_dtype=state_dtype,
                       report=(lambda line: print(line, file=sys.stderr)) if args.verbose else None)[0]
        printer.finish()
        if not args.raw and model.tokenizer.chat_template is not None:
            from .tokenizer import split_reasoning
            messages.append({"role": "assistant", "content": split_reasoning(out.text or "")[1]})
        n = len(out.token_ids)
        # The first decode step compiles on a model's first call: the rate counts the steps after it.
        decode = (n - 2) / (times[-1] - times[1]) if n > 2 else float("nan")
        print(f"[{n} tokens, {out.finish_reason}; prompt {len(out.prompt_token_ids)} tokens; time to first token "
              f"{times[0] - start:.2f}s (prefill, compilation included on the first call); decode "
              f"{decode:.1f} tokens/s after the first step]", file=sys.stderr)

    if args.chat:
        print("chat: empty line or /exit to quit", file=sys.stderr)
        while True:
            try:
                line = input("> ")
            except EOFError:
                break
            if not line.strip() or line.strip() == "/exit":
                break
            turn(line)
    else:
        turn(args.prompt if args.prompt is not None else "Hello! What is Gated KalmaNet?")
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

    p = sub.add_parser("generate", help="generate text (streams reasoning and answer)")
    p.add_argument("--model", default=None, help="HF or converted folder (default: the bundled demo model)")
    p.add_argument("--prompt", default=None, help="one user message (default: a greeting)")
    p.add_argument("--chat", action="store_true", help="interactive multi-turn chat")
    p.add_argument("--system", default=None, help="system message")
    p.add_argument("--no-think", action="store_true", help="thinking off (chat template enable_thinking=False)")
    p.add_argument("--raw", action="store_true", help="use the prompt as is, without the chat template")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=-1)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--presence-penalty", type=float, default=0.0)
    p.add_argument("--frequency-penalty", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--num-iter", type=int, default=None, help="GKA Chebyshev iterations (default: config)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--dtype", default=None, help="bf16 | fp32 (default: the checkpoint's)")
    p.add_argument("--mesh", default=None, help="e.g. tp=2")
    p.add_argument("--state-dtype", default="fp32", help="GKA state dtype: fp32 (default, advised) or bf16")
    p.add_argument("--verbose", action="store_true", help="report the cache's memory before allocating it")
    p.set_defaults(run=_cmd_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .config import ConfigError
    from .convert.layout import ConvertError
    from .hf_checkpoint import CheckpointError

    try:
        return args.run(args)
    except (ConfigError, CheckpointError, ConvertError, OSError, ValueError, KeyError, MemoryError) as e:
        print(f"gka-jax {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"gka-jax {args.command}: interrupted (nothing was left at the destination)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
