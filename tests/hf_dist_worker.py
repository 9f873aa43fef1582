"""The multi-process half of tests/test_hf_distributed.py: run under torchrun with 2 processes.

    python -m torch.distributed.run --standalone --nproc-per-node 2 -m tests.hf_dist_worker OUT

One launch trains the tiny Llama (``LLAMA``) under each case of ``CASES`` in turn, in one
process group, each a real ``autotune.runtime.trainer.run`` of a 2-process plan writing its log under
``OUT/<case>/``. ``OUT/checks.json`` (rank 0) holds what can only be seen from inside
(how the strategy changed the model). The test compares the logs with one-process runs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from autotune import plan as planmod
from autotune.runtime.trainer import RunOptions, Trainer, run
from tests.conftest import DEFAULT_PLAN
from tests.strategy_suite import MICRO_BATCH, TINY, tiny_corpus

STEPS = 6
"""Optimizer steps of each compared run."""
LLAMA = dict(
    # GQA (4 query heads share 2 kv heads), SwiGLU, RoPE; tests/test_hf.py's tiny Llama with the
    # suite's corpus: its 2048 ids and TINY's 64 tokens a sample.
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    hidden_size=64,
    intermediate_size=128,
    vocab_size=2048,
    max_position_embeddings=64,
    bos_token_id=0,
    eos_token_id=1,
    seq_len=TINY["seq_len"],
)
CASES: dict[str, dict[str, dict[str, Any]]] = {
    "fsdp2": {"fsdp2": {"param_dtype": "fp32"}},
    "tensor_parallel": {"tensor_parallel": {"sequence_parallel": False}},
    # The model's own plan with the Llama layout's norms on slices of the sequence (HFAdapter.tp_plan).
    "tensor_parallel+sequence_parallel": {"tensor_parallel": {"sequence_parallel": True}},
    "pipeline_parallel": {"pipeline_parallel": {"microbatches": 2, "schedule": "1f1b"}},
    # Checkpointing after the cut finds the stage's layers through the stage's own adapter.
    "pipeline_parallel+activation_checkpoint": {
        "pipeline_parallel": {"microbatches": 2, "schedule": "gpipe"},
        "activation_checkpoint": {},
    },
}
"""The strategies of each run, by case name (tolerances in tests/test_hf_distributed.py)."""


def llama_plan(strategies: dict[str, dict[str, Any]], nproc: int) -> planmod.Plan:
    """The bundled tiny plan on the tiny Llama, the suite's corpus, ``strategies`` on."""
    data = json.loads(DEFAULT_PLAN.read_text())
    data["workload"] = {"name": "hf:llama", "overrides": LLAMA}
    data["train"].update(
        micro_batch_size=MICRO_BATCH, eval_interval=0, checkpoint_interval=0, log_interval=1, data=str(tiny_corpus())
    )
    data["launch"].update(device="cpu", nproc_per_node=nproc)
    data["strategies"] = [{"name": n, "knobs": k} for n, k in strategies.items()]
    return planmod.from_dict(data)


def checks() -> dict[str, Any]:
    """How each strategy changed the Llama, seen from inside the group."""
    out: dict[str, Any] = {}
    t = Trainer(llama_plan(CASES["tensor_parallel"], 2))
    layer = t.ctx.model.hf.model.layers[0]
    out["tp_local_shapes"] = {
        n: list(p.to_local().shape) for n, p in layer.named_parameters() if n.endswith("proj.weight")
    }
    t.close()
    t = Trainer(llama_plan(CASES["tensor_parallel+sequence_parallel"], 2))
    layer = t.ctx.model.hf.model.layers[0]
    seen: list[list[int]] = []
    handle = layer.post_attention_layernorm.register_forward_hook(
        lambda m, args, y: seen.append(list(args[0].to_local().shape))
    )
    t.train_step(0)
    handle.remove()
    out["sp_norm_input_shape"] = seen[0]  # (B, T/tp, C): this rank's slice of the sequence
    t.close()
    t = Trainer(llama_plan(CASES["pipeline_parallel+activation_checkpoint"], 2))
    names: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(names, sorted(t.ctx.model.state_dict()))
    out["pp_stage_keys"] = names
    wrapped = [
        type(m._checkpoint_wrapped_module).__name__
        for m in t.ctx.model.modules()
        if type(m).__name__ == "CheckpointWrapper"
    ]
    out["pp_checkpointed"] = wrapped.count("LlamaDecoderLayer")
    t.close()
    t = Trainer(llama_plan(CASES["fsdp2"], 2))
    out["fsdp2_param_type"] = type(next(t.ctx.model.parameters())).__name__
    t.close()
    return out


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    try:
        for name, strategies in CASES.items():
            run(llama_plan(strategies, 2), RunOptions(steps=STEPS, out_dir=out / name))
        found = checks()
        if dist.get_rank() == 0:
            (out / "checks.json").write_text(json.dumps(found))
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
