"""Triton kernels, each beside its plain-torch reference (installed as ``autotune.kernels``).

Laid out as Liger-Kernel's ops: one module per op holds its Triton kernels, their launchers and
its ``autograd.Function`` with a functional entry point (``fused_linear_cross_entropy``); the
references, which the tests and the benchmarks share, are in ``reference`` and need no triton.
"""
