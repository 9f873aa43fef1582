"""The XLA tests: torch-xla's real runtime on XLA's CPU backend, in the XLA environment
(``make xla-env``: torch 2.9 + torch-xla 2.9), with ``PJRT_DEVICE=CPU`` (``make test`` runs them
so, as one test of the main suite: tests/test_xla_environment.py). Without torch-xla they fail,
never skip: the main suite leaves this folder out of its own collection instead (tests/conftest.py)."""

from __future__ import annotations

import os

if os.environ.get("PJRT_DEVICE") != "CPU":
    raise RuntimeError("the XLA tests run on XLA's CPU backend: set PJRT_DEVICE=CPU (make test does)")

import torch_xla  # noqa: E402,F401  (fails here, loudly, outside the XLA environment)
