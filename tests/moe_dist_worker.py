"""The multi-process half of tests/test_moe_distributed.py: run under torchrun with 2 processes.

    python -m torch.distributed.run --standalone --nproc-per-node 2 -m tests.moe_dist_worker OUT

Trains the tiny GPT with moe at ep 2 and ddp for STEPS steps through the Trainer's own step
(each rank its share of the global batch), then writes ``OUT/ep.pt`` (rank 0): the global
losses (the ranks' mean) and every converted layer's router and whole expert weights (the
two ranks' halves, in rank order: rank r holds experts r E/2 ..). ``OUT/checks.json``: what
only the processes can see (the local expert shapes, the routers alike on both ranks).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from autotune.errors import UserError
from autotune.runtime.trainer import Trainer
from autotune.strategies.moe import MoeMLP
from tests.strategy_suite import make_plan

STEPS = 5
"""Optimizer steps of the compared runs."""
MOE = {"num_experts": 4, "top_k": 2, "capacity_factor": 1.0, "every_n_layers": 1, "aux_loss_coef": 0.01}
"""moe's knobs in both runs (capacity 1.0: some choices are dropped, so the slots matter)."""
MICRO_BATCH = 4
"""Rows per rank and step (the one-process run takes both ranks', 2 x this)."""


def plan(ep: int, micro_batch: int) -> object:
    strategies = {"moe": {**MOE, "ep": ep}} | ({"ddp": {}} if ep > 1 else {})
    out = make_plan(strategies, "cpu", micro_batch_size=micro_batch)
    out.launch.nproc_per_node = ep
    return out


def layers(model: torch.nn.Module) -> list[MoeMLP]:
    return [m for m in model.modules() if isinstance(m, MoeMLP)]


def main(out: Path) -> None:
    trainer = Trainer(plan(2, MICRO_BATCH))
    try:
        losses = []
        for step in range(STEPS):
            loss = trainer.train_step(step).detach().clone()
            dist.all_reduce(loss)
            losses.append(float(loss) / 2)
        state: dict[str, torch.Tensor] = {"losses": torch.tensor(losses, dtype=torch.float64)}
        routers_alike = True
        for i, layer in enumerate(layers(trainer.ctx.model)):
            for name in ("w_fc", "w_proj"):
                local = getattr(layer, name).detach().contiguous()
                parts = [torch.empty_like(local) for _ in range(2)]
                dist.all_gather(parts, local)
                state[f"{i}.{name}"] = torch.cat(parts)
            router = layer.router.weight.detach().clone()
            other = router.clone()
            dist.broadcast(other, src=1)
            routers_alike &= torch.equal(router, other)
            state[f"{i}.router"] = router
        if dist.get_rank() == 0:
            out.mkdir(parents=True, exist_ok=True)
            torch.save(state, out / "ep.pt")
            first = layers(trainer.ctx.model)[0]
            try:
                first.load_state_dict(first.state_dict())
                refused = ""
            except UserError as e:
                refused = str(e)
            checks = {
                "w_fc": list(first.w_fc.shape),
                "routers_alike": routers_alike,
                "notes": trainer.ctx.notes,
                "load_refused": refused,
            }
            (out / "checks.json").write_text(json.dumps(checks))
    finally:
        trainer.close()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
