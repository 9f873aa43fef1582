"""autotune: find the fastest correct way to train a model on the hardware in front of it."""

__version__ = "0.1.0"
