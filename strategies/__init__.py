"""Training optimizations, one module each (installed as ``autotune.strategies``)."""
