"""`autotune run` (being written)."""

from autotune.cli import app  # noqa: F401
