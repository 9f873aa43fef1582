"""The model adapter protocol: the built-in GPT's adapter and the generic one (any nn.Module)."""

import subprocess
import weakref

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from autotune.strategies.attention import naive_attention
from autotune.workloads.adapter import GPTAdapter, ModelAdapter, NotSupported, adapter_for, declared, pipeline_split
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
    assert (
        shape.d_model,
        shape.n_layers,
        shape.n_heads,
        shape.n_kv_heads,
        shape.d_ff,
        shape.vocab_size,
        shape.seq_len,
    ) == (32, 2, 4, 4, 128, 96, 16)
    ids = torch.randint(0, 96, (3, 16))
    assert train_step_flops(model, ids, ids) == adapter.flops_per_token() * ids.numel()
    assert adapter.flops_per_token() == model.flops_per_token()


def test_gpt_adapter_vocab_padding_pipeline_and_tp_plan():
    model = tiny_gpt()
    adapter = adapter_for(model)
    ids, targets = torch.randint(0, 96, (2, 16)), torch.randint(0, 96, (2, 16))
    before = adapter.loss(ids, targets)
    assert (
        adapter.pad_vocab(64) == 128
        and model.head.weight.shape == (128, 32)
        and model.head.weight is model.embed.weight
    )
    assert torch.equal(adapter.loss(ids, targets), before)
    # Two stages chained give the whole model's loss.
    (a, b), (c, d) = pipeline_split(2, 2)
    first, last = (
        adapter.pipeline_stage(a, b, first=True, last=False),
        adapter.pipeline_stage(c, d, first=False, last=True),
    )
    assert torch.allclose(adapter.logits_loss(last(first(ids)), targets), before, atol=1e-6)
    assert set(adapter.tp_plan()) == {"blocks.*.attn.qkv", "blocks.*.attn.proj", "blocks.*.mlp.fc", "blocks.*.mlp.proj"}
    assert adapter.supports() >= {"blocks", "attention", "mlp", "embed", "head"}
    with pytest.raises(NotSupported):
        pipeline_split(2, 3)


def _reference_head_loss(hidden, weight, targets, vocab_size):
    """A HeadLoss in plain torch (the kernels' reference): the model's own maths, reordered."""
    from autotune.kernels.reference import linear_cross_entropy

    return linear_cross_entropy(hidden, weight, targets, vocab_size=vocab_size)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_gpt_head_loss_replaces_head_and_loss_with_the_same_gradients(tied):
    """set_head_loss: the loss from the final norm's output, the head's (padded) weight and the
    targets; the same loss and gradients as the model's own, the logits without targets unchanged."""
    model = tiny_gpt(tie_embeddings=tied)
    adapter = adapter_for(model)
    adapter.pad_vocab(64)  # 96 -> 128 rows: the padded columns stay out of the softmax
    ids, targets = torch.randint(0, 96, (2, 16)), torch.randint(0, 96, (2, 16))
    results = []
    for fn in (None, _reference_head_loss):
        adapter.set_head_loss(fn)
        model.zero_grad()
        loss = model(ids, targets)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, model(ids)))
    (own, own_grads, own_logits), (fused, fused_grads, fused_logits) = results
    torch.testing.assert_close(fused, own)
    for name, grad in own_grads.items():
        torch.testing.assert_close(fused_grads[name], grad, atol=1e-6, rtol=1e-5, msg=name)
    assert torch.equal(fused_logits, own_logits) and fused_logits.shape[-1] == 96


def test_generic_adapter_cannot_replace_a_loss_it_does_not_know():
    with pytest.raises(NotSupported, match="does not know its head and loss"):
        adapter_for(Plain()).set_head_loss(_reference_head_loss)


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
    assert adapter.flops_per_token() == 6 * sum(
        p.numel() for n, p in model.named_parameters() if not n.startswith("embed")
    )
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


def test_gpt_adapter_sequence_parallel_plan_and_dropout():
    adapter = adapter_for(tiny_gpt(dropout=0.1))
    assert adapter.attention_dropout() == 0.1
    plan = adapter.tp_plan(sequence_parallel=True)
    assert {k for k, v in plan.items() if type(v).__name__ == "SequenceParallel"} == {
        "blocks.*.norm1",
        "blocks.*.norm2",
    }
    assert {k for k, v in plan.items() if type(v).__name__ == "PrepareModuleInput"} == {
        "blocks.*.attn",
        "blocks.*.mlp",
        "blocks.0",
        "norm",
    }


def test_declared_structure_of_the_gpt_stands_for_its_adapter():
    from autotune.workloads import GPT_STRUCTURE

    assert declared(GPT_STRUCTURE) >= GPTAdapter(tiny_gpt()).supports()
    assert declared(frozenset({"blocks", "embed", "head"})) == {"blocks", "embed", "head"}


def test_pipeline_stages_have_adapters_with_their_blocks():
    model = tiny_gpt(n_layers=4)
    first = adapter_for(model).pipeline_stage(0, 2, first=True, last=False)
    stage = adapter_for(first)
    assert stage.blocks() is first.blocks and isinstance(stage.blocks()[3], nn.Identity)
    assert stage.supports() == {"blocks"} and stage.flops_per_token() == model.flops_per_token()


@pytest.mark.parametrize(
    "strategy, knobs, message",
    [
        ("tensor_parallel", {}, "has no tensor-parallel plan"),
        ("pipeline_parallel", {}, "cannot be cut into pipeline stages"),
        ("vocab_padding", {}, "cannot pad its vocabulary"),
    ],
)
def test_strategies_refuse_a_workload_whose_adapter_lacks_what_they_need(strategy, knobs, message):
    # A user's workload naming blocks, attention, mlp, embed and head by hand: the generic
    # adapter serves blocks only, so a plan asking for TP, PP or padding is refused before launch.
    import dataclasses

    from autotune import catalog, validate
    from autotune.errors import UserError
    from autotune.workloads import load_workload

    wl = dataclasses.replace(
        load_workload("tiny"), name="mine:model", structure=frozenset({"blocks", "attention", "mlp", "embed", "head"})
    )
    s = catalog.get(strategy)
    assert s.needs.structure <= wl.structure  # the declared tokens are there
    with pytest.raises(UserError, match=message):
        validate.settings({strategy: s.parse(knobs)}, workload=wl)
    validate.settings({strategy: s.parse(knobs)}, workload=load_workload("tiny"))  # the GPT's adapter serves all three


def tiny_hf(family: str, **extra):
    pytest.importorskip("transformers")
    from autotune.workloads import load_workload

    base = dict(
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=250,
        bos_token_id=0,
        eos_token_id=1,
        seq_len=16,
        hidden_size=64,
    )
    config = {
        "llama": dict(intermediate_size=128, num_key_value_heads=2, max_position_embeddings=64),
        "gpt2": dict(n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
    }[family]
    torch.manual_seed(0)
    wl = load_workload(f"hf:{family}", {**base, **config, **extra})
    return wl, wl.build_model()


def test_hf_adapters_support_exactly_what_they_serve():
    import dataclasses

    from autotune.workloads.adapter import STRUCTURE

    llama, model = tiny_hf("llama")
    assert llama.structure == STRUCTURE
    gpt2, gpt2_model = tiny_hf("gpt2", attn_pdrop=0.25)
    assert gpt2.structure == STRUCTURE - {"tp", "sp", "pp"}
    with pytest.raises(NotSupported, match="no tensor-parallel plan"):
        adapter_for(gpt2_model).tp_plan()
    with pytest.raises(NotSupported, match="Llama layout"):
        adapter_for(gpt2_model).pipeline_stage(0, 1, first=True, last=False)
    assert adapter_for(gpt2_model).attention_dropout() == 0.25 and adapter_for(model).attention_dropout() == 0.0
    sp = adapter_for(model).tp_plan(sequence_parallel=True)
    assert {k for k, v in sp.items() if type(v).__name__ == "SequenceParallel"} == {
        "hf.model.layers.*.input_layernorm",
        "hf.model.layers.*.post_attention_layernorm",
    }
    assert sp["hf.model.layers.*.mlp.down_proj"].output_layouts[0].is_shard(1)  # reduce-scatter
    # ... and a plan asking for TP on GPT-2 is refused before launch.
    from autotune import catalog, validate
    from autotune.errors import UserError

    tp = catalog.get("tensor_parallel")
    with pytest.raises(UserError, match="has no tensor-parallel plan"):
        validate.settings({"tensor_parallel": tp.parse({"sequence_parallel": False})}, workload=gpt2)
    with pytest.raises(UserError, match="use sequence_parallel false"):
        validate.settings(
            {"tensor_parallel": tp.parse({"sequence_parallel": True})},
            workload=dataclasses.replace(llama, structure=llama.structure - {"sp"}),
        )
    validate.settings(
        {"tensor_parallel": tp.parse({}), "pipeline_parallel": catalog.get("pipeline_parallel").parse({})},
        workload=llama,
    )


def test_hf_tp_plan_keeps_a_tied_head_whole():
    _, untied = tiny_hf("llama")
    assert "hf.lm_head" in adapter_for(untied).tp_plan()
    _, tied = tiny_hf("llama", tie_word_embeddings=True)
    assert tied.hf.lm_head.weight is tied.hf.model.embed_tokens.weight
    plan = adapter_for(tied).tp_plan()
    assert not {"hf.lm_head", "hf.model.embed_tokens"} & set(plan) and "hf.model.layers.*.self_attn.q_proj" in plan


def test_hf_llama_stage_adapter_and_flops():
    _, model = tiny_hf("llama")
    adapter = adapter_for(model)
    last = adapter.pipeline_stage(1, 2, first=False, last=True)
    stage = adapter_for(last)
    assert stage.blocks() is last.hf.model.layers and isinstance(stage.blocks()[0], nn.Identity)
    assert last.flops_per_token() == adapter.flops_per_token()


def test_gpt_frees_the_final_norms_output_before_the_loss():
    """Under autocast the head keeps its bf16 input for the backward, and the norm keeps its own
    input: the norm's fp32 output is a temporary, gone before the loss runs (a local holding it
    cost phase8-small 64 MiB of peak memory in eager mode: bench/README.md, the house A/B)."""
    model = tiny_gpt()
    adapter_for(model).pad_vocab(64)
    outputs, alive_at_loss = [], []
    model.norm.register_forward_hook(lambda module, args, out: outputs.append(weakref.ref(out)))
    own_loss = model.loss

    def loss(logits, targets):
        alive_at_loss.append(outputs[-1]() is not None)
        return own_loss(logits, targets)

    model.loss = loss
    ids, targets = torch.randint(0, 96, (2, 16)), torch.randint(0, 96, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(ids, targets).backward()
    assert alive_at_loss == [False]
