"""A workload that fails on purpose, chosen by micro-batch size, for fault-isolation tests.

Each failure is the real thing in a real child process: the OOM is torch's own exception
type, the NaN comes out of the loss, the hang never returns, the kill is SIGKILL.
"""

import os
import signal
import time

import torch
import torch.nn.functional as F
from torch import nn

from autotune.workloads import Workload

OOM, NAN, HANG, SIGKILL, RANK1_RAISES, RANK1_HANGS = 3, 5, 6, 7, 9, 10  # micro-batch sizes that trigger each fault
HANG_ONCE = 11
"""Hangs the first time (creating the file named by $AUTOTUNE_TEST_HANG_ONCE), runs after."""
SLOW = 12
"""Every step sleeps 0.3 s: a trial far slower than the others, for the pruner."""
# With $AUTOTUNE_TEST_ALWAYS_NAN set, every loss is NaN: no trial of a search succeeds.


class Faulty(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(2048, 32)
        self.out = nn.Linear(32, 2048)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        batch = idx.shape[0]
        if batch == OOM:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB (simulated)")
        if batch == HANG:
            time.sleep(3600)
        if batch == HANG_ONCE:
            marker = os.environ["AUTOTUNE_TEST_HANG_ONCE"]
            if not os.path.exists(marker):
                open(marker, "w").close()
                time.sleep(3600)
        if batch == SLOW:
            time.sleep(0.3)
        if batch == SIGKILL:
            os.kill(os.getpid(), signal.SIGKILL)
        if batch in (RANK1_RAISES, RANK1_HANGS) and os.environ.get("RANK") == "1":
            if batch == RANK1_HANGS:  # far past the tests' 5 s collective timeout, short of torchrun's 30 s grace
                time.sleep(15)
            raise RuntimeError("simulated failure on rank 1")
        loss = F.cross_entropy(self.out(self.embed(idx)).flatten(0, 1), targets.flatten())
        return loss * float("nan") if batch == NAN or os.environ.get("AUTOTUNE_TEST_ALWAYS_NAN") else loss


def build() -> Workload:
    return Workload(name="tests.faults:build", build_model=Faulty, vocab_size=2048, seq_len=32)
