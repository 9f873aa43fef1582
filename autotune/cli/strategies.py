"""`autotune strategies` (being written)."""

from autotune.cli import app  # noqa: F401
