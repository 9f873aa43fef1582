"""The model adapter protocol: the built-in GPT's adapter and the generic one (any nn.Module)."""

import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from autotune.strategies.attention import naive_attention
from autotune.workloads.adapter import GPTAdapter, ModelAdapter, NotSupported, adapter_for, pipeline_split
from autotune.workloads.generic import GenericAdapter, find_blocks
from autotune.workloads.gpt import GPT, GPTConfig


def train_step_flops(model: nn.Module, ids: torch.Tensor, targets: torch.Tensor) -> int:
    """FLOPs FlopCounterMode counts in one forward + backward."""
    with FlopCounterMode(display=False) as counter:
        model(ids, targets).backward()
    return counter.get_total_flops()


def tiny_gpt(**kw) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(**{**dict(vocab_size=96, seq_len=16, d_model=32, n_layers=2, n_heads=4), **kw}))


def test_gpt_adapter_shape_and_flops_match_flop_counter():
    # Naive attention is plain matmuls, so FlopCounterMode counts PaLM's 12 L d T exactly.
    model = tiny_gpt()
    adapter = adapter_for(model)
    assert isinstance(adapter, GPTAdapter) and isinstance(adapter, ModelAdapter)
    adapter.set_attention(kernel=naive_attention)
    shape = adapter.shape()
    assert (shape.d_model, shape.n_layers, shape.n_heads, shape.n_kv_heads, shape.d_ff, shape.vocab_size, shape.seq_len) == (32, 2, 4, 4, 128, 96, 16)
    ids = torch.randint(0, 96, (3, 16))
    assert train_step_flops(model, ids, ids) == adapter.flops_per_token() * ids.numel()
    assert adapter.flops_per_token() == model.flops_per_token()


def test_gpt_adapter_vocab_padding_pipeline_and_tp_plan():
    model = tiny_gpt()
    adapter = adapter_for(model)
    ids, targets = torch.randint(0, 96, (2, 16)), torch.randint(0, 96, (2, 16))
    before = adapter.loss(ids, targets)
    assert adapter.pad_vocab(64) == 128 and model.head.weight.shape == (128, 32) and model.head.weight is model.embed.weight
    assert torch.equal(adapter.loss(ids, targets), before)
    # Two stages chained give the whole model's loss.
    (a, b), (c, d) = pipeline_split(2, 2)
    first, last = adapter.pipeline_stage(a, b, first=True, last=False), adapter.pipeline_stage(c, d, first=False, last=True)
    assert torch.allclose(adapter.logits_loss(last(first(ids)), targets), before, atol=1e-6)
    assert set(adapter.tp_plan()) == {"blocks.*.attn.qkv", "blocks.*.attn.proj", "blocks.*.mlp.fc", "blocks.*.mlp.proj"}
    assert adapter.supports() >= {"blocks", "attention", "mlp", "embed", "head"}
    with pytest.raises(NotSupported):
        pipeline_split(2, 3)


class Layer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.lin(x).tanh()


class Plain(nn.Module):
    """A user's model: two heads in a mixed list, the trunk a list of six identical layers."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(16, 8)
        self.heads = nn.ModuleList([nn.Linear(8, 16), nn.Linear(8, 16), nn.Identity()])
        self.stem = nn.ModuleList([Layer(), Layer()])
        self.inner = nn.Sequential(nn.Identity(), nn.Sequential())
        self.inner[1].trunk = nn.ModuleList(Layer() for _ in range(6))

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = self.embed(idx)
        for layer in self.inner[1].trunk:
            x = layer(x)
        return nn.functional.cross_entropy(self.heads[0](x).flatten(0, 1), targets.flatten())


def test_generic_adapter_finds_the_largest_list_of_one_class():
    model = Plain()
    fqn, blocks = find_blocks(model)
    assert fqn == "inner.1.trunk" and blocks is model.inner[1].trunk
    adapter = adapter_for(model)
    assert isinstance(adapter, GenericAdapter) and adapter.supports() == {"blocks"}
    adapter.blocks()[0] = nn.Identity()  # replacing through the adapter replaces in the model
    assert isinstance(model.inner[1].trunk[0], nn.Identity)
    with pytest.raises(NotSupported, match="does not know its tensor-parallel plan"):
        adapter.tp_plan()
    assert adapter.flops_per_token() == 6 * sum(p.numel() for n, p in model.named_parameters() if not n.startswith("embed"))
    ids = torch.randint(0, 16, (2, 4))
    assert adapter.loss(ids, ids).ndim == 0


def test_generic_adapter_without_blocks_says_why():
    adapter = GenericAdapter(nn.Sequential(nn.Linear(2, 2)))
    assert adapter.supports() == frozenset()
    with pytest.raises(NotSupported, match="no nn.ModuleList"):
        adapter.blocks()


def test_loading_plans_and_the_adapters_does_not_import_transformers(python):
    code = (
        "import sys, autotune, autotune.plan, autotune.workloads.adapter, autotune.workloads.generic;"
        "from autotune.workloads import load_workload; load_workload('tiny');"
        "assert 'transformers' not in sys.modules, 'transformers imported'"
    )
    subprocess.run([python, "-c", code], check=True)
