"""Triton kernels, each beside its plain-torch reference (installed as ``autotune.kernels``)."""
