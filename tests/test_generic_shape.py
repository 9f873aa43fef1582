"""A ``module:factory`` workload's shape, read off its model by the generic adapter: the cost
model predicts its memory as it does the built-in GPT's; where the module lacks what the shape
needs, ``strategies --explain`` says what."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from torch import nn

from autotune import catalog, costmodel
from autotune.workloads import Workload, load_workload
from autotune.workloads.adapter import GPTAdapter, NotSupported
from autotune.workloads.generic import GenericAdapter
from autotune.workloads.gpt import GPT, GPTConfig

ROOT = Path(__file__).resolve().parents[1]
CFG = GPTConfig(vocab_size=256, seq_len=32, d_model=64, n_layers=3, n_heads=4)


class Wrapped(nn.Module):
    """The tiny GPT inside a module the adapters do not know: only the generic one serves it."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = GPT(CFG)

    def forward(self, idx, targets):
        return self.inner(idx, targets)


def build() -> Workload:
    return Workload(
        name="tests.test_generic_shape:build", build_model=Wrapped, vocab_size=CFG.vocab_size, seq_len=CFG.seq_len
    )


def test_the_generic_shape_counts_what_the_gpts_adapter_counts():
    model = Wrapped()
    generic, gpt = GenericAdapter(model).shape(CFG.seq_len), GPTAdapter(model.inner).shape()
    same = (
        "d_model",
        "n_layers",
        "d_ff",
        "vocab_size",
        "seq_len",
        "matmul_params",
        "block_params",
        "other_params",
        "vocab_tables",
    )
    assert {k: getattr(generic, k) for k in same} == {k: getattr(gpt, k) for k in same}
    assert generic.n_heads == 0 and generic.flops_per_token() == 6 * gpt.matmul_params  # no attention term: not known


def test_a_generic_workload_gets_memory_predictions():
    workload = load_workload("tests.test_generic_shape:build")
    assert workload.shape is not None and workload.no_shape == ""
    gpt = dataclasses.replace(workload, shape=GPTAdapter(GPT(CFG)).shape())
    for configs in ({}, {"precision": catalog.get("precision").parse({"dtype": "bf16"})}):
        ours, theirs = costmodel.estimate(workload, 4, configs).breakdown, costmodel.estimate(gpt, 4, configs).breakdown
        for part in ("weights", "optimizer", "gradients", "logits"):
            assert ours[part] == theirs[part], part
        # The activations without the attention's q, k, v widths (3 of the GPT's 16 per block).
        assert 0.8 * theirs["activations"] < ours["activations"] < theirs["activations"]


@pytest.mark.parametrize(
    "model, reason",
    [
        (nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10)), "no nn.ModuleList of two or more blocks"),
        (
            nn.ModuleDict({"blocks": nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)]), "head": nn.Linear(4, 10)}),
            "no nn.Embedding of the vocabulary",
        ),
        (
            nn.ModuleDict({"blocks": nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)]), "embed": nn.Embedding(10, 4)}),
            "no output head",
        ),
    ],
)
def test_without_what_the_shape_needs_it_says_what_is_missing(model, reason):
    with pytest.raises(NotSupported, match=reason):
        GenericAdapter(model).shape(8)


def test_explain_says_why_a_workload_has_no_predictions(run_cli, monkeypatch):
    monkeypatch.chdir(ROOT)
    code, out, _ = run_cli("strategies", "--workload", "examples.custom_workload:build", "--explain")
    assert code == 0
    line = (
        "cost model: no memory or time predictions for workload examples.custom_workload:build: "
        "ConvLM: no nn.ModuleList of two or more blocks of one class was found"
    )
    assert line in out.splitlines()
    code, out, _ = run_cli("strategies", "--workload", "tests.test_generic_shape:build", "--explain")
    assert code == 0 and "cost model:" not in out
