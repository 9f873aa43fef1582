"""Compile every autotuning config of the kernels in kernels/ for Hopper (sm_90) on a machine
without a GPU, with the ptxas and cuobjdump of the triton wheel, and print one JSON line per
config: its registers, stack (spilled registers) and shared memory. tests/test_kernels.py runs
it with TRITON_INTERPRET=0: the interpreter checks the maths, this checks what only the
compiler sees (dtypes of dot operands, layouts, register and shared-memory pressure).

Arguments are specialised as Triton's launcher does for aligned tensors (pointers divisible by
16 bytes, which lets loads be pipelined); shapes are those of a 1024-wide model.
"""

from __future__ import annotations

import json
import re
import subprocess
import tempfile
from pathlib import Path

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget

from autotune.kernels import fused_linear_cross_entropy as flce

HOPPER = GPUTarget("cuda", 90, 32)
CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
DOT = {"DOT_DTYPE": tl.bfloat16, "INPUT_PRECISION": "tf32"}
KERNELS = {
    flce._forward_kernel: (
        "*bf16 *bf16 *i64 *fp32 *fp32 i32 i32",
        {"D": 1024, "SPLIT_COLS": 76032, **DOT},
    ),
    flce._backward_kernel: (
        "*bf16 *bf16 *i64 *fp32 *fp32 *fp32 *fp32 i32 i32",
        {"D": 1024, "IGNORE_INDEX": -100, "GROUP_M": 8, **DOT},
    ),
}


def compile_for_hopper(autotuner, types: str, constants: dict, config: triton.Config) -> dict:
    """One config of ``autotuner``'s kernel, compiled: ``types`` of its runtime arguments in order."""
    fn = autotuner.fn
    constants = {**constants, **config.kwargs}
    signature = {**dict(zip(fn.arg_names, types.split())), **{name: "constexpr" for name in constants}}
    aligned = {(i,): [["tt.divisibility", 16]] for i, t in enumerate(types.split()) if t.startswith("*")}
    source = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constants, attrs=aligned)
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    kernel = triton.compile(source, target=HOPPER, options=options)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(kernel.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([CUOBJDUMP, "-res-usage", cubin.name], capture_output=True, text=True, check=True).stdout
    registers, stack = map(int, re.search(r"REG:(\d+) STACK:(\d+)", usage).groups())
    return {"kernel": fn.__name__, "config": str(config), "registers": registers, "stack": stack,
            "shared": kernel.metadata.shared}


if __name__ == "__main__":
    for autotuner, (types, constants) in KERNELS.items():
        for config in autotuner.configs:
            print(json.dumps(compile_for_hopper(autotuner, types, constants, config)), flush=True)
