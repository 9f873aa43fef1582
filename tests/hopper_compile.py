"""Compile the kernels in kernels/ for Hopper (sm_90) on a machine
without a GPU, with the ptxas and cuobjdump of the triton wheel, and print one JSON line per
kernel: its registers, stack (spilled registers) and shared memory. tests/test_kernels.py runs
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
from triton.backends.compiler import GPUTarget

from autotune.kernels import fused_linear_cross_entropy as flce

HOPPER = GPUTarget("cuda", 90, 32)
CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
KERNELS = {
    # (kernel, its runtime arguments' types in order, constexprs): Qwen3's vocabulary (151,936)
    # with the gradient pass, GPT-2's padded to 64 without it.
    "loss_and_grad": (
        flce._loss_and_grad_kernel,
        "*bf16 i32 *i64 *fp32 *fp32",
        {"V": 151936, "WIDTH": 151936, "IGNORE_INDEX": -100, "GRAD": True, "BLOCK_V": flce.BLOCK_V},
    ),
    "loss_only": (
        flce._loss_and_grad_kernel,
        "*bf16 i32 *i64 *fp32 *fp32",
        {"V": 50257, "WIDTH": 50304, "IGNORE_INDEX": -100, "GRAD": False, "BLOCK_V": flce.BLOCK_V},
    ),
}
OPTIONS = {"num_warps": 8, "num_stages": 3}
"""As the launcher in kernels/fused_linear_cross_entropy.py calls it."""


def compile_for_hopper(name: str, fn, types: str, constants: dict) -> dict:
    """``fn`` compiled with ``constants``: ``types`` of its runtime arguments in order."""
    signature = {**dict(zip(fn.arg_names, types.split())), **{name: "constexpr" for name in constants}}
    aligned = {(i,): [["tt.divisibility", 16]] for i, t in enumerate(types.split()) if t.startswith("*")}
    source = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constants, attrs=aligned)
    kernel = triton.compile(source, target=HOPPER, options=OPTIONS)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(kernel.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([CUOBJDUMP, "-res-usage", cubin.name], capture_output=True, text=True, check=True).stdout
    registers, stack = map(int, re.search(r"REG:(\d+) STACK:(\d+)", usage).groups())
    return {"kernel": name, "registers": registers, "stack": stack, "shared": kernel.metadata.shared}


if __name__ == "__main__":
    for name, (fn, types, constants) in KERNELS.items():
        print(json.dumps(compile_for_hopper(name, fn, types, constants)), flush=True)
