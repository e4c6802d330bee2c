"""Offline sm_90a compile of the Gluon kernels: registers, spills, shared memory and the loops' SASS.

Needs no GPU: Triton compiles for a named target, and its wheel ships ptxas and cuobjdump. Run it where
gka-jax and triton 3.6 are installed (``pip install -e . triton==3.6.0``; jax-triton is not needed):

    python benchmarks/gluon_sass.py solve --d 128 --num-iter 30
    python benchmarks/gluon_sass.py decode --d 128 --num-iter 30 --const BLOCKS=8 MAXNREG=0
    python benchmarks/gluon_sass.py decode_ws --const SLOTS=3 LOADER_WARPS=4   # the pipelined decode
    python benchmarks/gluon_sass.py solve --const HAS_ALPHA=0 --keep /tmp/sass   # also writes ttgir/ptx/sass

It prints one line for the kernel (ptxas: registers, spill bytes; shared memory) and one per loop found in
the SASS (a backward branch): its instruction count and the counts of the instructions that matter for the
kernels' loops (local-memory spills STL/LDL, barriers, wgmma HGMMA, shuffles, shared-memory accesses, FMA).
This is how the docs' "no spill / one barrier in the loop" statements were checked.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gka_jax.kernels import gluon_call, gluon_decode, gluon_decode_ring, gluon_solve  # noqa: E402

# Argument types and the default constexprs of each kernel at the 8B shapes (bf16 activations, fp32 states).
DECODE_SIGNATURE = dict(q_ptr="*bf16", k_ptr="*bf16", v_ptr="*bf16", beta_ptr="*fp32", g_ptr="*fp32",
                        g_kk_ptr="*fp32", alpha_ptr="*bf16", h_kk_ptr="*fp32", h_kv_ptr="*fp32", scale="fp32",
                        ridge="fp32", num_items="i32", o_ptr="*bf16", x_ptr="*bf16", h_kk_out_ptr="*fp32",
                        h_kv_out_ptr="*fp32")
WS_SIGNATURE = dict(DECODE_SIGNATURE, scratch_ptr="*u8")
DECODE_CONSTANTS = dict(NUM_HEADS=32, GROUP=4, BLOCKS=gluon_decode.DEFAULT_BLOCKS, HAS_BETA=True, HAS_ALPHA=True,
                        HAS_G_KK=False, LANES=gluon_decode.DEFAULT_LANES)
KERNELS = {
    "solve": dict(
        fn=lambda: gluon_solve._solve_kernel,
        signature=dict(q_ptr="*bf16", k_ptr="*bf16", beta_ptr="*bf16", gcum_ptr="*fp32", start_ptr="*bf16",
                       alpha_ptr="*bf16", ridge="fp32", seq_len="i32", num_chunks="i32", x_ptr="*bf16",
                       mixed_ptr="*bf16"),
        constants=dict(NUM_HEADS=32, GROUP=4, C=64, HAS_BETA=True, HAS_ALPHA=True, HAS_MIXED=True, SPAN=150.0),
        warps=lambda d: 4),
    "decode": dict(
        fn=lambda: gluon_decode._decode_kernel,
        signature=DECODE_SIGNATURE,
        constants=dict(DECODE_CONSTANTS, MAXNREG=gluon_decode.DEFAULT_MAXNREG),
        warps=lambda d: d // 32),
    "decode_ws": dict(   # the pipelined form
        fn=lambda: gluon_decode_ring._decode_ws_kernel,
        signature=WS_SIGNATURE,
        constants=dict(DECODE_CONSTANTS, BLOCKS=gluon_decode.PIPELINED_BLOCKS, SLOTS=gluon_decode.DEFAULT_SLOTS,
                       COPY_ROWS=8,
                       SOLVER_REGS=gluon_decode.SOLVER_REGS, LOADER_REGS=gluon_decode.LOADER_REGS,
                       LOADER_WARPS=gluon_decode.DEFAULT_LOADER_WARPS, MIRROR=0, VALUE=0,
                       VALUE_REGS=gluon_decode.VALUE_REGS, SPREAD=0, AHEAD=0, TMA=0,
                       SCRATCH_BYTES=gluon_decode.SCRATCH_BYTES),
        warps=lambda d: d // 32),
}
COUNTED = ("STL", "LDL", "BAR.SYNC", "HGMMA", "SHFL", "LDS", "STS", "LDG", "STG", "FFMA", "MUFU")


def parse_constant(text: str):
    name, _, value = text.partition("=")
    for kind in (int, float):
        try:
            return name, kind(value)
        except ValueError:
            pass
    raise SystemExit(f"--const {text!r}: expected NAME=number")


def compile_kernel(kind: str, d: int, num_iter: int, overrides: dict):
    spec = KERNELS[kind]
    fn = spec["fn"]()
    constants = {**spec["constants"], "D": d, "NUM_ITER": num_iter, **overrides}
    warps = constants.pop("WARPS", None)   # --const WARPS=8: the kernel's num_warps
    signature = {**spec["signature"], **{name: "constexpr" for name in constants}}
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
             if signature[name].startswith("*")}
    options = {"num_warps": warps or spec["warps"](d), "num_stages": 1}
    if constants.get("MAXNREG"):
        options["maxnreg"] = int(constants["MAXNREG"])
    source = gluon_call.GluonASTSource(fn, signature, constants, attrs)
    return gluon_call.compile_gluon(source, 90, options)


def loop_statistics(sass: str):
    """(instructions, {opcode: count}) for each loop: a backward branch and the code it jumps back over."""
    lines = [line for line in sass.splitlines() if re.search(r"/\*[0-9a-f]{4,}\*/", line)]
    address = [int(re.search(r"/\*([0-9a-f]{4,})\*/", line)[1], 16) for line in lines]
    loops = []
    for i, line in enumerate(lines):
        branch = re.search(r"\bBRA\b[^;]*0x([0-9a-f]+)", line)
        if branch and int(branch[1], 16) < address[i]:
            start = address.index(int(branch[1], 16)) if int(branch[1], 16) in address else 0
            body = lines[start:i + 1]
            loops.append((len(body), {op: sum(op in b for b in body) for op in COUNTED}))
    return loops


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kernel", choices=sorted(KERNELS))
    parser.add_argument("--d", type=int, default=128, help="head dim D (= Dv)")
    parser.add_argument("--num-iter", type=int, default=30)
    parser.add_argument("--const", nargs="*", default=[], help="constexpr overrides NAME=value")
    parser.add_argument("--keep", help="folder for the ttgir, ptx and sass")
    args = parser.parse_args()
    if not gluon_call.GLUON:
        raise SystemExit("needs triton with Gluon (pip install triton==3.6.0)")
    overrides = dict(parse_constant(c) for c in args.const)
    compiled = compile_kernel(args.kernel, args.d, args.num_iter, overrides)
    tools = os.path.join(os.path.dirname(gluon_call.triton.__file__), "backends", "nvidia", "bin")
    with tempfile.TemporaryDirectory() as scratch:
        ptx = os.path.join(scratch, "kernel.ptx")
        cubin = os.path.join(scratch, "kernel.cubin")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        ptxas = subprocess.run([os.path.join(tools, "ptxas"), "-arch=sm_90a", "-v", ptx, "-o", os.devnull],
                               capture_output=True, text=True)
        sass = subprocess.run([os.path.join(tools, "cuobjdump"), "-sass", cubin], capture_output=True,
                              text=True).stdout
    report = " ".join(line.split(":", 1)[-1].strip() for line in (ptxas.stdout + ptxas.stderr).splitlines()
                      if "registers" in line or "spill" in line or "rror" in line)
    print(f"{args.kernel} D={args.d} num_iter={args.num_iter} {overrides or ''}: shared memory "
          f"{compiled.metadata.shared} bytes | {report}")
    for number, (size, counts) in enumerate(loop_statistics(sass)):
        print(f"  loop {number}: {size} instructions; " + " ".join(f"{op}={n}" for op, n in counts.items()))
    if args.keep:
        os.makedirs(args.keep, exist_ok=True)
        for ext, text in (("ttgir", compiled.asm["ttgir"]), ("ptx", compiled.asm["ptx"]), ("sass", sass)):
            with open(os.path.join(args.keep, f"{args.kernel}.{ext}"), "w") as f:
                f.write(text)


if __name__ == "__main__":
    main()
