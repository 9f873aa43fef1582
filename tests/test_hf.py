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
from autotune.workloads.adapter import NotSupported, adapter_for, pipeline_split  # noqa: E402
from autotune.workloads.hf_config import DEFAULT_SEQ_LEN, overrides_from_config, unread_fields  # noqa: E402

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
    assert (s.d_model, s.n_layers, s.n_heads, s.n_kv_heads, s.head_dim, s.d_ff, s.vocab_size, s.seq_len) == (
        64,
        2,
        4,
        2,
        16,
        128,
        250,
        16,
    )
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
    first, last = (
        adapter.pipeline_stage(a, b, first=True, last=False),
        adapter.pipeline_stage(c, d, first=False, last=True),
    )
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
    data["train"].update(
        micro_batch_size=4, steps=3, random_tokens=True, eval_interval=0, checkpoint_interval=0, log_interval=1
    )
    (tmp_path / "plan.json").write_text(json.dumps(data))
    code, out, err = run_cli("run", tmp_path / "plan.json", "--out", tmp_path / "run")
    assert code == 0, err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps_done"] == 3


def test_config_files_and_folders(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "llama", **CONFIGS["llama"], "architectures": ["LlamaForCausalLM"]})
    )
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
        ({"name": "hf:llama", "overrides": {"hidden_size": "64"}}, "Field 'hidden_size' expected int"),
    ]:
        data["workload"] = workload
        (tmp_path / "plan.json").write_text(json.dumps(data))
        code, _, err = run_cli("run", tmp_path / "plan.json", "--out", tmp_path / "run")
        assert code == 2 and expected in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "run").exists()


def _tiny_llama(**extra):
    return {**CONFIGS["llama"], **extra}


@pytest.mark.parametrize(
    "dtype", [{"torch_dtype": "bfloat16"}, {"dtype": "float16"}, {"torch_dtype": "bfloat16", "dtype": "bfloat16"}]
)
def test_the_configs_dtype_does_not_choose_how_we_train(dtype):
    """from_config builds in the config's dtype (transformers 5.17's _from_config): we build in
    fp32 and the precision strategy decides the compute dtype, as for the GPT."""
    wl = load_workload("hf:llama", _tiny_llama(**dtype))
    model = wl.build_model()
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert model.hf.config.dtype == torch.float32  # the built model's config says what it holds


def test_fields_transformers_accepts_are_accepted_and_kept():
    """Legacy names mapped (rope_theta, rope_scaling into rope_parameters), fields the family does
    not define kept as attributes (as from_pretrained keeps them), and the plan's dicts left as
    they were (transformers writes rope_theta into the rope_scaling it is given)."""
    rope = {
        "factor": 32.0,
        "high_freq_factor": 4.0,
        "low_freq_factor": 1.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    }
    overrides = _tiny_llama(
        rope_theta=500000.0,
        rope_scaling=dict(rope),
        architectures=["LlamaForCausalLM"],
        max_position_embeddings=131072,
        hiden_size=8,
        n_ctx=1024,
    )
    before = json.dumps(overrides, sort_keys=True)
    wl = load_workload("hf:llama", overrides)
    config = wl.build_model().hf.config
    assert (
        config.rope_parameters == {**rope, "rope_theta": 500000.0}
        and config.hidden_size == 64
        and config.hiden_size == 8
    )
    assert json.dumps(overrides, sort_keys=True) == before and wl.overrides == overrides
    assert unread_fields("llama", {k: v for k, v in overrides.items() if k != "seq_len"}) == ["hiden_size", "n_ctx"]


@pytest.mark.parametrize(
    "family, fields, message",
    [
        (
            "llama",
            {"hidden_size": "abc"},
            "Field 'hidden_size' expected int, got str",
        ),  # huggingface_hub's strict dataclass
        ("llama", {"num_hidden_layers": 2.5}, "Field 'num_hidden_layers' expected int, got float"),
        ("llama", {"num_attention_heads": 5}, "not a multiple of the number of attention heads"),
        ("llama", {"rope_scaling": {"rope_type": "llama3", "factor": 32.0}}, "Missing required keys"),
        ("llama", {"torch_dtype": "bfloat17"}, "bfloat17"),
        ("llama", {"hidden_act": "nonsense"}, r"cannot build the model from this config \(KeyError: 'nonsense'\)"),
        (
            "phi3",
            {
                "hidden_size": 64,
                "num_hidden_layers": 1,
                "num_attention_heads": 4,
                "vocab_size": 512,
                "pad_token_id": 32000,
            },
            "Padding_idx must be within num_embeddings",
        ),  # the published pad id in a scaled-down vocabulary
    ],
)
def test_what_transformers_rejects_is_one_line(family, fields, message):
    overrides = {**_tiny_llama(), **fields} if family == "llama" else fields
    with pytest.raises(UserError, match=message) as e:
        load_workload(f"hf:{family}", overrides)
    assert "\n" not in str(e.value) and str(e.value).startswith(f"hf:{family}: ")


def test_the_default_length_is_not_llama_3_2s_131072_positions():
    wl = load_workload(
        "hf:llama", {k: v for k, v in _tiny_llama(max_position_embeddings=131072).items() if k != "seq_len"}
    )
    assert wl.seq_len == DEFAULT_SEQ_LEN == 1024 and wl.shape.seq_len == 1024
    assert load_workload("hf:llama", _tiny_llama(max_position_embeddings=131072, seq_len=4096)).seq_len == 4096
    assert (
        load_workload("hf:llama", {k: v for k, v in _tiny_llama().items() if k != "seq_len"}).seq_len == 64
    )  # its 64 positions
    with pytest.raises(UserError, match="seq_len: 65 must be a whole number from 1 to the model's 64 positions"):
        load_workload("hf:llama", _tiny_llama(seq_len=65))


def _mistral(window: int | None, **extra):
    return {**CONFIGS["llama"], "sliding_window": window, **extra}


def test_a_sliding_window_shorter_than_the_sequence_runs_in_sdpa_and_keeps_our_kernels_out():
    ids = torch.randint(0, 250, (2, 16))
    losses = {}
    for impl in ("sdpa", "eager"):
        torch.manual_seed(0)
        losses[impl] = load_workload("hf:mistral", _mistral(4, attn_implementation=impl)).build_model()(ids, ids)
    torch.manual_seed(0)
    whole = load_workload("hf:mistral", _mistral(None)).build_model()(ids, ids)
    assert torch.allclose(losses["sdpa"], losses["eager"], atol=1e-5) and not torch.allclose(
        losses["sdpa"], whole, atol=1e-4
    )
    wl = load_workload("hf:mistral", _mistral(4))
    assert "attention" not in wl.structure and "attention" in load_workload("hf:mistral", _mistral(16)).structure
    adapter = adapter_for(wl.build_model())
    assert "sliding window of 4 tokens, shorter than the sequence (16)" in adapter.plain_attention_refusal()
    with pytest.raises(NotSupported, match="sliding window"):
        adapter.set_attention(kernel=naive_attention)


GEMMA2 = dict(
    CONFIGS["llama"],
    head_dim=16,
    query_pre_attn_scalar=256,
    attn_logit_softcapping=50.0,
    final_logit_softcapping=30.0,
    sliding_window=4,
    pad_token_id=0,
)


@pytest.mark.parametrize("family, overrides", [("gemma2", GEMMA2), ("mistral", _mistral(4))])
def test_pipeline_stages_make_each_layers_mask_and_cap_the_logits(family, overrides):
    """Gemma 2 alternates sliding and full layers and soft-caps its logits; Mistral slides every
    layer: two stages compute the whole model's loss."""
    torch.manual_seed(0)
    wl = load_workload(f"hf:{family}", overrides)
    model = wl.build_model()
    adapter = adapter_for(model)
    x, y = torch.randint(0, 250, (2, 16)), torch.randint(0, 250, (2, 16))
    first, last = (
        adapter.pipeline_stage(0, 1, first=True, last=False),
        adapter.pipeline_stage(1, 2, first=False, last=True),
    )
    assert torch.allclose(adapter.logits_loss(last(first(x)), y), model(x, y), atol=1e-5)
    # Gemma 2's layers have two norms more than sequence parallel's plan covers, and its logits
    # are capped after the head: no sp, no fused head + loss; its attention is not ours either.
    assert ({"sp", "loss", "attention"} & wl.structure == set()) == (family == "gemma2")


def test_a_factory_returning_a_pretrained_model_is_a_workload(tmp_path, monkeypatch):
    (tmp_path / "hf_factory_mod.py").write_text(
        "import transformers\n"
        "def build():\n"
        f"    config = transformers.AutoConfig.for_model('llama', **{_tiny_llama(max_position_embeddings=131072)!r})\n"
        "    return transformers.LlamaForCausalLM(config).to(dtype=__import__('torch').bfloat16)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    wl = load_workload("hf_factory_mod:build")
    assert wl.seq_len == DEFAULT_SEQ_LEN and wl.overrides == {} and wl.vocab_size == 250
    assert wl.structure == load_workload("hf:llama", _tiny_llama()).structure  # the hf: adapter's
    assert load_workload("hf_factory_mod:build", {"seq_len": 32}).seq_len == 32
    model = wl.build_model()
    assert {p.dtype for p in model.parameters()} == {torch.float32} and model.blocks is model.hf.model.layers
    with pytest.raises(UserError, match="workload.overrides.hidden_size: a factory's workload takes only seq_len"):
        load_workload("hf_factory_mod:build", {"hidden_size": 8})
    with pytest.raises(UserError, match="seq_len: 0 must be a whole number"):
        load_workload("hf_factory_mod:build", {"seq_len": 0})


def test_seq_len_is_the_one_override_a_factorys_workload_takes():
    """`plan --seq-len N` for a factory returning a Workload: its seq_len (and shape's) replaced."""
    wl = load_workload("examples.custom_workload:build", {"seq_len": 32})
    assert (
        wl.seq_len == 32
        and wl.overrides == {"seq_len": 32}
        and load_workload("examples.custom_workload:build").seq_len == 64
    )
    with pytest.raises(UserError, match="workload.overrides.vocab_size: a factory's workload takes only seq_len"):
        load_workload("examples.custom_workload:build", {"vocab_size": 8})
