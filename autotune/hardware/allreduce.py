"""All-reduce bandwidth, one process per GPU: the worker that ``autotune profile`` starts through torchrun.

    python -m torch.distributed.run --standalone --nproc-per-node N \\
        -m autotune.hardware.allreduce --device cuda --out result.json --sizes 1048576,16777216

Each rank all-reduces (sum) a random fp32 buffer of each size; the time of a repeat is the
slowest rank's, measured with CUDA events over NCCL (``--device cuda``, one GPU per rank) or
the host clock over gloo (``--device cpu``, for the tests).
Rank 0 writes a JSON list of AllReducePoint. Bus bandwidth follows nccl-tests:
busbw = algbw * 2(n-1)/n, the bytes each rank must send and receive in a ring all-reduce.
The parent sets NCCL_NVLS_ENABLE=0 and TORCH_SYMM_MEM_DISABLE_MULTICAST=1 (hardware.measure.allreduce_env).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from typing import Any

from autotune import devices
from autotune.hardware.measure import Clock, DeviceClock
from autotune.hardware.profile import AllReducePoint, Stat
from autotune.schema import to_dict, write_json_atomic

WARMUP = 5
"""Untimed all-reduces per size: NCCL sets up its channels on the first ones."""
ITERS = 20
"""All-reduces per timed repeat; the same on every rank, so no rank waits for a call that never comes."""
REPEATS = 10
"""Timed repeats per size; a figure is their median with min and max."""


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    import torch.distributed as dist

    kind = devices.get(args.device)
    device = kind.torch_device(int(os.environ.get("LOCAL_RANK", "0")))
    kind.make_current(device)
    # An accelerator's group is bound to its device (NCCL: barriers need no guess).
    dist.init_process_group(kind.backend, **kind.process_group_options(device))
    try:
        clock: Clock = DeviceClock(device)
        points = [_point(size, device, clock) for size in args.sizes]
        if dist.get_rank() == 0:
            write_json_atomic(args.out, to_dict(points))
    finally:
        dist.destroy_process_group()
    return 0


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--device",
        choices=devices.names(),
        required=True,
        help="the kind of device (autotune.devices), one a rank: its backend (NCCL on GPUs, gloo on the CPU)",
    )
    parser.add_argument("--out", required=True, help="JSON file rank 0 writes")
    parser.add_argument(
        "--sizes",
        required=True,
        type=lambda s: [int(x) for x in s.split(",")],
        help="message sizes in bytes, comma-separated",
    )
    return parser.parse_args(argv)


def _point(size: int, device: Any, clock: Clock) -> AllReducePoint:
    import torch
    import torch.distributed as dist

    world = dist.get_world_size()
    x = torch.empty(max(1, size // 4), dtype=torch.float32, device=device)
    x.normal_()

    def step() -> None:
        dist.all_reduce(x)

    clock.time(step, WARMUP)
    seconds = []
    for _ in range(REPEATS):
        x.normal_()  # fresh random data; repeated sums would otherwise grow without bound
        dist.barrier()
        elapsed = torch.tensor([clock.time(step, ITERS) / ITERS], dtype=torch.float64, device=device)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # the collective is as slow as its slowest rank
        seconds.append(elapsed.item())
    algbw = [x.numel() * 4 / s for s in seconds]
    return AllReducePoint(
        size_bytes=x.numel() * 4,
        algbw=Stat.of(algbw, "byte/s"),
        busbw=Stat.of([a * 2 * (world - 1) / world for a in algbw], "byte/s"),
    )


if __name__ == "__main__":
    raise SystemExit(main())
