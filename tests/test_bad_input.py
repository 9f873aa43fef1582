"""Every bad plan is one line and exit 2, from `autotune run` and `autotune show` alike, with
nothing written and nothing imported that the user did not choose."""

import json
import sys

import pytest

from autotune import catalog
from autotune import plan as planmod
from autotune.workloads import PRESETS
from tests.conftest import DEFAULT_PLAN


def _plan(**changes) -> dict:
    data = json.loads(DEFAULT_PLAN.read_text())
    data["hardware"] = {"fingerprint": None, "summary": {}}
    for key, value in changes.items():
        section, _, name = key.partition(".")
        if name:
            data[section][name] = value
        else:
            data[section] = value
    return data


def _strategies(**knobs) -> list[dict]:
    return [{"name": name, "knobs": k} for name, k in knobs.items()]


DEEP = "[" * 100_000 + "]" * 100_000
HUGE = '{"schema_version": ' + "9" * 5000 + "}"

# (id, plan text or bytes, words the one line must contain)
BAD = [
    ("min_lr_ratio", _plan(**{"train.min_lr_ratio": -3}), "min_lr_ratio must be in [0, 1]"),
    ("weight_decay", _plan(**{"train.weight_decay": -1}), "weight_decay"),
    ("grad_clip", _plan(**{"train.grad_clip": -1}), "grad_clip"),
    ("beta1", _plan(**{"train.beta1": 5}), "beta1"),
    ("lr_nan", _plan(**{"train.lr": float("nan")}), "lr must be"),
    ("lr_inf", _plan(**{"train.lr": float("inf")}), "lr must be"),
    ("lr_huge", _plan(**{"train.lr": 1e308}), "lr must be"),
    (
        "lr_beyond_float",
        json.dumps(_plan(**{"train.lr": 0})).replace('"lr": 0', '"lr": ' + "9" * 400),
        "train.lr: number out of range",
    ),
    ("seed_negative", _plan(**{"train.seed": -1}), "seed"),
    ("seed_huge", _plan(**{"train.seed": 2**70}), "seed"),
    ("eval_batches", _plan(**{"train.eval_batches": 0, "train.eval_interval": 10}), "eval_batches"),
    ("micro_batch", _plan(**{"train.micro_batch_size": 10**12}), "micro_batch_size must be at most"),
    # Each setting bounded, their product against this machine (autotune.limits), before anything is built.
    (
        "eval_too_big",
        _plan(**{"train.eval_batches": 65536, "train.eval_interval": 1, "train.micro_batch_size": 512}),
        "for 65,536 validation micro-batches",
    ),
    (
        "nproc_over_cores",
        _plan(strategies=_strategies(ddp={}), **{"launch.nproc_per_node": 1024}),
        "processes a node on the CPU",
    ),
    ("nnodes_huge", _plan(**{"launch.nnodes": 10**6, "launch.rdzv_endpoint": "h:1"}), "nnodes at most 65536"),
    ("override_layers", _plan(workload={"name": "tiny", "overrides": {"n_layers": -1}}), "n_layers"),
    ("override_seq_len", _plan(workload={"name": "tiny", "overrides": {"seq_len": 0}}), "seq_len"),
    ("override_type", _plan(workload={"name": "tiny", "overrides": {"d_model": "wide"}}), "d_model"),
    ("override_unknown", _plan(workload={"name": "tiny", "overrides": {"depth": 3}}), "unknown setting"),
    ("workload_colon", _plan(workload={"name": ":"}), "unknown workload ':'"),
    ("workload_no_attr", _plan(workload={"name": "a:"}), "unknown workload 'a:'"),
    ("workload_no_module", _plan(workload={"name": ":b"}), "unknown workload ':b'"),
    ("workload_space", _plan(workload={"name": "a b:c"}), "unknown workload 'a b:c'"),
    ("workload_os_abort", _plan(workload={"name": "os:abort"}), "would import module os; pass --trust-workload"),
    ("binary", bytes(range(256)) * 4, "not a text file"),
    ("deep", DEEP, "nested too deeply"),
    ("huge_int", HUGE, "invalid JSON"),
    ("not_json", "{plan", "invalid JSON"),
    ("schema_version", _plan(schema_version=99), "unsupported version 99"),
    ("unknown_strategy", _plan(strategies=_strategies(warp_drive={})), "unknown strategy 'warp_drive'"),
    ("unknown_knob", _plan(strategies=_strategies(precision={"speed": 2})), "knobs.speed: unknown key"),
    ("grad_accum", _plan(strategies=_strategies(grad_accum={"steps": 1000})), "steps must be from 1 to 128"),
    (
        "prefetch",
        _plan(strategies=_strategies(dataloader={"prefetch": 10**7, "pin_memory": False})),
        "prefetch must be from 0 to 64",
    ),
    (
        "ac_every",
        _plan(strategies=_strategies(activation_checkpoint={"mode": "selective", "every": 1000})),
        "every must be from 1 to 64",
    ),
    ("vocab_multiple", _plan(strategies=_strategies(vocab_padding={"multiple": 7})), "multiple must be a power of two"),
    ("zero_optimizer", _plan(strategies=_strategies(zero={}, optimizer={})), "conflicts with"),
    ("pp_tp", _plan(strategies=_strategies(tensor_parallel={}, pipeline_parallel={})), "conflicts with"),
    (
        "ddp_fsdp2",
        _plan(strategies=_strategies(ddp={}, fsdp2={}), **{"launch.nproc_per_node": 2}),
        "ddp conflicts with fsdp2",
    ),
    ("processes_alone", _plan(**{"launch.nproc_per_node": 2}), "needs one of the strategies"),
    # Approximate strategies (issue 13): their settings are checked like any other's.
    (
        "moe_top_k",
        _plan(strategies=_strategies(moe={"num_experts": 4, "top_k": 5})),
        "top_k must be between 1 and num_experts (4)",
    ),
    ("moe_tp", _plan(strategies=_strategies(moe={}, tensor_parallel={})), "conflicts with"),
    (
        "sparse_window_over_seq",
        _plan(strategies=_strategies(sparse_attention={"window": 4096})),
        "window 4096 is longer than the sequence (seq_len 128)",
    ),
    # FA4's head widths (issue 28): multiples of 8 up to 256 (Hopper), 128 and 256 (Blackwell).
    (
        "fa4_head_width",
        _plan(
            workload={"name": "tiny", "overrides": {"d_model": 48, "n_heads": 4}},
            strategies=_strategies(attention={"backend": "fa4"}),
        ),
        "attention fa4 cannot take this model's heads of width 12 on Hopper or Blackwell",
    ),
    ("sparse_and_attention", _plan(strategies=_strategies(sparse_attention={}, attention={})), "conflicts with"),
    (
        "compile_cudagraphs_accum",
        _plan(strategies=_strategies(compile={"mode": "reduce-overhead"}, grad_accum={"steps": 2})),
        "cannot run with gradient accumulation",
    ),
]


def _write(tmp_path, content) -> str:
    path = tmp_path / "bad.plan.json"
    if isinstance(content, dict):
        content = json.dumps(content)  # NaN and Infinity as Python writes them
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return str(path)


@pytest.mark.parametrize("content, words", [pytest.param(c, w, id=i) for i, c, w in BAD])
def test_a_bad_plan_is_one_line_exit_2_and_nothing_written(tmp_path, run_cli, content, words):
    bad, out = _write(tmp_path, content), tmp_path / "out"
    code, stdout, err = run_cli("run", bad, "--out", out, "--steps", "2")
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("autotune: error: "), err
    assert words in err, err
    assert not out.exists()
    code, _, err = run_cli("show", bad)
    assert code == 2 and err.count("\n") == 1 and words in err, err


def test_a_local_module_is_not_imported_without_consent(tmp_path, run_cli, monkeypatch):
    # The module would leave a marker the moment it is imported, and its factory another.
    (tmp_path / "evilmod.py").write_text(
        "import pathlib\npathlib.Path('imported').write_text('x')\n"
        "def build():\n    pathlib.Path('built').write_text('x')\n    return None\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))  # the trusted call below adds the cwd
    bad = _write(tmp_path, _plan(workload={"name": "evilmod:build"}))
    for command in (["run", bad, "--out", tmp_path / "out"], ["show", bad]):
        code, _, err = run_cli(*command)
        assert code == 2 and err.count("\n") == 1 and "import module evilmod" in err, err
        assert not (tmp_path / "imported").exists() and "evilmod" not in sys.modules
    assert not (tmp_path / "out").exists()
    # With consent it is imported (and refused afterwards for returning no Workload).
    code, _, err = run_cli("show", bad, "--trust-workload")
    sys.modules.pop("evilmod", None)
    assert code == 2 and "must return autotune.workloads.Workload" in err
    assert (tmp_path / "imported").exists() and (tmp_path / "built").exists()


def test_a_plan_from_another_machine_is_refused(tmp_path, run_cli):
    # Without --adapt (tests/test_travel.py runs it with), one line naming the difference.
    data = _plan(hardware={"fingerprint": "0123456789ab", "summary": {"gpus": "8 x Imaginary GPU"}})
    data["train"].update(eval_interval=0, checkpoint_interval=0)
    code, _, err = run_cli("run", _write(tmp_path, data), "--steps", "1", "--json", "--out", tmp_path / "out")
    assert code == 2 and err.count("\n") == 1, err
    assert "0123456789ab" in err and "Imaginary GPU" in err and "--adapt" in err
    assert not (tmp_path / "out").exists()


def test_a_plan_naming_fa4_where_it_cannot_run_is_one_line_exit_2(tmp_path, run_cli):
    # Issue 28: on this machine (no GPU, and flash-attn-4 not installed) a plan with attention
    # fa4 is refused when strategies are applied, before the first step, naming both reasons.
    data = _plan(strategies=_strategies(precision={"dtype": "bf16"}, attention={"backend": "fa4"}))
    data["train"].update(eval_interval=0, checkpoint_interval=0)
    code, _, err = run_cli("run", _write(tmp_path, data), "--steps", "1", "--json", "--out", tmp_path / "out")
    assert code == 2 and err.count("\n") == 1, err
    assert "strategy attention {'backend': 'fa4'} cannot run here: needs CUDA, none found" in err
    assert not (tmp_path / "out").exists()


# Settings another knob's value is legal only with (the search samples them together).
COMPANIONS = {("moe", "num_experts"): {"top_k": 1}, ("zero", "offload_params"): {"stage": 3}}


def test_every_value_the_search_can_pick_is_legal():
    # Search ranges lie inside the legal bounds the configs enforce on load.
    for name, strategy in catalog.catalog().items():
        for knob in strategy.knobs:
            values = knob.choices or tuple(v for v in (knob.low, knob.high) if v is not None)
            for value in values:
                value = int(value) if knob.integer else value
                strategy.parse({knob.name: value} | COMPANIONS.get((name, knob.name), {}))
    # The accumulation the planner derives from a global batch, up to its cap.
    from autotune.planning.space import MAX_ACCUM

    catalog.get("grad_accum").parse({"steps": MAX_ACCUM})


@pytest.mark.parametrize(
    "path",
    sorted(
        p
        for p in DEFAULT_PLAN.parents[2].glob("**/*.plan.json")
        if not any(part.startswith(".") for part in p.relative_to(DEFAULT_PLAN.parents[2]).parts)
    ),
)
def test_committed_plans_pass_the_plan_check(path):
    from autotune import validate

    plan = planmod.load(path)
    assert plan.workload.name in PRESETS or plan.workload.name.startswith("hf:")  # data: no code to import
    validate.plan(plan, machine=True, trusted=False)
