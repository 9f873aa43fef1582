"""Hugging Face causal LMs as workloads (hf:<model_type>), configs built locally, on the CPU."""

import json
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

pytest.importorskip("transformers")

from autotune.errors import UserError  # noqa: E402
from autotune.strategies.attention import naive_attention  # noqa: E402
from autotune.workloads import load_workload  # noqa: E402
from autotune.workloads.adapter import adapter_for, pipeline_split  # noqa: E402
from autotune.workloads.hf import overrides_from_config  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SMALL = dict(num_hidden_layers=2, num_attention_heads=4, vocab_size=250, bos_token_id=0, eos_token_id=1, seq_len=16)
CONFIGS = {
    # GQA (4 query heads share 2 kv heads), SwiGLU, RoPE.
    "llama": dict(SMALL, hidden_size=64, intermediate_size=128, num_key_value_heads=2, max_position_embeddings=64),
    "qwen2": dict(SMALL, hidden_size=64, intermediate_size=128, num_key_value_heads=2, max_position_embeddings=64),
    "gpt2": dict(SMALL, hidden_size=64, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
}


def build(family: str, **extra):
    torch.manual_seed(0)
    wl = load_workload(f"hf:{family}", {**CONFIGS[family], **extra})
    return wl, wl.build_model()


def test_llama_shape_and_flops_match_flop_counter():
    _, model = build("llama", attn_implementation="eager")  # eager attention is plain matmuls
    adapter = adapter_for(model)
    s = adapter.shape()
    assert (s.d_model, s.n_layers, s.n_heads, s.n_kv_heads, s.head_dim, s.d_ff, s.vocab_size, s.seq_len) == (64, 2, 4, 2, 16, 128, 250, 16)
    ids = torch.randint(0, 250, (2, 16))
    with FlopCounterMode(display=False) as counter:
        model(ids, ids).backward()
    # Beside PaLM's count, RoPE's table is one small matmul: inv_freq (hs/2) x positions (T), forward only.
    rope = 2 * (s.head_dim // 2) * 16
    assert counter.get_total_flops() == adapter.flops_per_token() * ids.numel() + rope


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_loss_is_the_plain_models_without_a_second_shift(family):
    _, model = build(family)
    seq = torch.randint(0, 250, (2, 17))
    x, y = seq[:, :-1], seq[:, 1:]  # what our loader gives: y is x shifted by one already
    ours = model(x, y)
    # HF shifts labels itself: its loss on the whole sequence is ours on (x, y).
    assert torch.allclose(ours, model.hf(input_ids=seq, labels=seq).loss, atol=1e-6)
    manual = torch.nn.functional.cross_entropy(model.hf(input_ids=x).logits.flatten(0, 1), y.flatten())
    assert torch.allclose(ours, manual, atol=1e-6)
    assert not torch.allclose(ours, model.hf(input_ids=x, labels=y).loss, atol=1e-3)  # shifted twice


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_vocab_padding_is_exact(family):
    _, model = build(family)
    adapter = adapter_for(model)
    x, y = torch.randint(0, 250, (2, 16)), torch.randint(0, 250, (2, 16))
    before = model(x, y)
    before.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    assert adapter.pad_vocab(64) == 256 and adapter.embedding().num_embeddings == 256
    after = model(x, y)
    after.backward()
    assert torch.equal(after, before) and model(x).shape[-1] == 250
    for n, p in model.named_parameters():
        g = p.grad[:250] if p.shape != grads[n].shape else p.grad  # padded rows: the new ones
        assert torch.allclose(g, grads[n], atol=1e-7), n


def test_llama_attention_kernels_pipeline_stages_and_tp_plan():
    _, model = build("llama")
    adapter = adapter_for(model)
    x, y = torch.randint(0, 250, (2, 16)), torch.randint(0, 250, (2, 16))
    ref = model(x, y)
    adapter.set_attention(kernel=naive_attention)  # our kernel through HF's attention interface (GQA repeated)
    assert torch.allclose(model(x, y), ref, atol=1e-5)
    adapter.set_attention("eager")
    assert torch.allclose(model(x, y), ref, atol=1e-5)
    (a, b), (c, d) = pipeline_split(2, 2)
    first, last = adapter.pipeline_stage(a, b, first=True, last=False), adapter.pipeline_stage(c, d, first=False, last=True)
    assert torch.allclose(adapter.logits_loss(last(first(x)), y), ref, atol=1e-5)
    assert set(first.state_dict()) | set(last.state_dict()) == set(model.state_dict())
    plan = adapter.tp_plan()
    assert type(plan["hf.model.layers.*.self_attn.q_proj"]).__name__ == "ColwiseParallel"
    assert type(plan["hf.model.layers.*.mlp.down_proj"]).__name__ == "RowwiseParallel"
    assert model.blocks is model.hf.model.layers


def test_gpt2_has_no_tp_plan_or_stages():
    wl, model = build("gpt2")
    assert "tp" not in wl.structure and "pp" not in wl.structure and "blocks" in wl.structure
    assert model.blocks is model.hf.transformer.h


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2"])
def test_autotune_run_trains_a_tiny_hf_model(run_cli, tmp_path, family):
    data = json.loads((ROOT / "profiles" / "default" / "tiny.plan.json").read_text())
    data["workload"] = {"name": f"hf:{family}", "overrides": CONFIGS[family]}
    data["train"].update(micro_batch_size=4, steps=3, random_tokens=True, eval_interval=0, checkpoint_interval=0, log_interval=1)
    (tmp_path / "plan.json").write_text(json.dumps(data))
    code, out, err = run_cli("run", tmp_path / "plan.json", "--out", tmp_path / "run")
    assert code == 0, err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps_done"] == 3


def test_config_files_and_folders(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", **CONFIGS["llama"], "architectures": ["LlamaForCausalLM"]}))
    model_type, overrides = overrides_from_config(tmp_path)
    assert model_type == "llama" and "architectures" not in overrides and "weights" not in overrides
    assert load_workload("hf:llama", overrides).seq_len == 16


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda p: p.mkdir(), "holds no config.json"),
        (lambda p: p.write_text("{not json"), "not a JSON model config"),
        (lambda p: p.write_text('{"model_type": "nosuchfamily"}'), "knows no model type 'nosuchfamily'"),
    ],
)
def test_bad_configs_are_one_line_user_errors(tmp_path, setup, message):
    path = tmp_path / "cfg"
    setup(path)
    with pytest.raises(UserError, match=message) as e:
        model_type, overrides = overrides_from_config(path)
        load_workload(f"hf:{model_type}", overrides)
    assert "\n" not in str(e.value)


def test_bad_plans_exit_2_with_one_line(run_cli, tmp_path):
    data = json.loads((ROOT / "profiles" / "default" / "tiny.plan.json").read_text())
    for workload, expected in [
        ({"name": "hf:nosuchfamily", "overrides": {}}, "knows no model type"),
        ({"name": "hf:llama", "overrides": {"hiden_size": 64}}, "workload.overrides.hiden_size"),
    ]:
        data["workload"] = workload
        (tmp_path / "plan.json").write_text(json.dumps(data))
        code, _, err = run_cli("run", tmp_path / "plan.json", "--out", tmp_path / "run")
        assert code == 2 and expected in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "run").exists()
