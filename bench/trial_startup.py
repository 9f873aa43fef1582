"""Where a trial's start-up goes: the seconds from the process's start to a built Trainer, by
phase (imports, the device's first use, the Trainer's build), then cProfile's largest
cumulative entries of the build. A trial on an H100 reports "built on cuda:0 in 13.5-15.2 s
since start" (bench/results/phase8-small-kernels-h100/*/trials/): this says what of that is ours.

    python3 bench/trial_startup.py PLAN [--device cuda] [--top 30]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("plan", type=Path)
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args()
    from autotune.runtime.measure import _process_start

    t0 = time.monotonic()
    import torch

    t1 = time.monotonic()
    from autotune import plan as planmod
    from autotune.runtime.trainer import Trainer

    t2 = time.monotonic()
    plan = planmod.load(args.plan)
    if plan.launch.device and plan.launch.device.startswith("cuda"):
        torch.zeros(1, device="cuda")  # the context
        torch.cuda.synchronize()
    t3 = time.monotonic()
    profile = cProfile.Profile()
    profile.enable()
    trainer = Trainer(plan)
    profile.disable()
    t4 = time.monotonic()
    print(
        f"interpreter + before main {t0 - _process_start():.2f} s; import torch {t1 - t0:.2f} s; "
        f"import autotune's trainer {t2 - t1:.2f} s; device's first use {t3 - t2:.2f} s; "
        f"Trainer build {t4 - t3:.2f} s; since start {t4 - _process_start():.2f} s (on {trainer.device})"
    )
    out = io.StringIO()
    pstats.Stats(profile, stream=out).sort_stats("cumulative").print_stats(args.top)
    print(out.getvalue())


if __name__ == "__main__":
    main()
