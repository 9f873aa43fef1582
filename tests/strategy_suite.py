"""The shared test suite that every strategy's tests subclass (like Optuna's
``BasicSamplerTestCase``).

A subclass names its strategy and lists cases: knob settings to train with on the CPU (and, as
tests marked ``gpu``, on CUDA), each with the tolerance of its losses against the plain run and
a comment saying why. The suite checks that the strategy

- is in the catalog, implemented, with knob ranges whose values parse;
- round-trips its config (parse -> dump -> parse) and rejects an unknown knob;
- enforces what it declares it needs: settings that a machine without a GPU cannot run have
  unmet needs there and are refused with a UserError when applied on the CPU, and a workload
  without the structure a setting needs is refused the same way;
- trains the suite's model (``StrategySuite.model``: the tiny GPT, or :data:`LLAMA`, a tiny
  Hugging Face Llama) through the real Trainer with a visible effect (``check_applied``), its
  20 losses equal to the plain run's of the same model within the case's tolerance (rounding
  for an exact strategy; for an approximate one, how far it may drift);
- checkpoints and resumes bit for bit, with the plain model's state-dict keys.

``tests/test_strategies.py`` imports ``pytest_generate_tests`` from here, which gives each case
its own test item; ``tests/test_hf_strategies.py`` runs the same classes on :data:`LLAMA`.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch

from autotune import catalog
from autotune import plan as planmod
from autotune.contract.context import TrainContext
from autotune.contract.strategy import Facts, Strategy, unmet_needs
from autotune.data import default_dataset
from autotune.errors import SchemaError, UserError
from autotune.runtime.trainer import Trainer
from autotune.workloads import Workload, load_workload
from autotune.workloads.adapter import adapter_for
from tests.conftest import DEFAULT_PLAN

STEPS = 20
"""Optimizer steps whose losses are compared."""
TINY = {"n_layers": 2, "seq_len": 64}
"""The tiny preset made smaller still: 2 blocks of d128, 64 tokens."""
MICRO_BATCH = 8


@dataclass(frozen=True, kw_only=True)
class SuiteModel:
    """A workload the suite trains, small enough for 20 CPU steps in about a second."""

    name: str
    """The workload's name (``tiny``, ``hf:llama``)."""
    overrides: dict[str, Any]
    """Its settings; a case's ``overrides`` go over them."""
    tied: bool
    """Whether its head shares the embedding's weight."""
    attend: str
    """The attribute of an attention module that holds the kernel ``set_attention(kernel=...)`` put in."""

    def workload(self, overrides: dict[str, Any] | None = None) -> Workload:
        return load_workload(self.name, {**self.overrides, **(overrides or {})})


GPT = SuiteModel(name="tiny", overrides=TINY, tied=True, attend="attend")
"""The built-in GPT: 2 blocks of d128, 64 tokens, vocab 2048."""
LLAMA = SuiteModel(
    name="hf:llama",
    # As tests/test_hf.py's CONFIGS (GQA: 4 query heads share 2 kv heads, SwiGLU, RoPE, an
    # untied head), with the tiny GPT's vocab and sequence: the same corpus feeds both.
    overrides=dict(
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
    ),
    tied=False,
    attend="_autotune_attend",
)
"""A tiny Hugging Face Llama (transformers' LlamaForCausalLM): 2 layers of d64, 64 tokens, vocab 2048."""


@dataclass(frozen=True, kw_only=True)
class Case:
    """One setting of the strategy under test, and how close its losses must stay."""

    knobs: dict[str, Any]
    """The strategy's knobs."""
    rtol: float
    """Largest relative difference of any of the losses from the plain run's (0: equal)."""
    base: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Other strategies on in both runs (e.g. precision bf16 under flash attention)."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """Workload settings of both runs, over the suite model's (e.g. a vocabulary that needs padding)."""

    @property
    def id(self) -> str:
        knobs = ",".join(f"{k}={v}" for k, v in {**self.knobs, **self.overrides}.items()) or "defaults"
        return "+".join([knobs, *self.base])


def make_plan(
    strategies: dict[str, dict[str, Any]],
    device: str,
    overrides: dict[str, Any] | None = None,
    model: SuiteModel = GPT,
    **train: Any,
) -> planmod.Plan:
    """The bundled tiny plan, for ``model`` (made smaller), with ``strategies`` on, training on ``device``."""
    data = json.loads(DEFAULT_PLAN.read_text())
    data["workload"] = {"name": model.name, "overrides": {**model.overrides, **(overrides or {})}}
    data["train"].update({"micro_batch_size": MICRO_BATCH, "eval_interval": 0, "checkpoint_interval": 0, **train})
    data["train"]["data"] = str(tiny_corpus())  # also for a wider vocab: ids stay below 2048
    data["launch"]["device"] = device
    data["strategies"] = [{"name": n, "knobs": k} for n, k in strategies.items()]
    return planmod.from_dict(data)


@functools.cache
def tiny_corpus() -> Path:
    return default_dataset(load_workload("tiny").vocab_size)


def train_losses(trainer: Trainer, steps: int, start: int = 0) -> list[float]:
    """Losses of ``steps`` optimizer steps from ``start``, through the executor's own step."""
    return torch.stack([trainer.train_step(s) for s in range(start, start + steps)]).float().tolist()


def run_plan(plan: planmod.Plan) -> tuple[list[float], Trainer]:
    trainer = Trainer(plan)
    try:
        return train_losses(trainer, STEPS), trainer
    finally:
        trainer.close()


_plain: dict[str, list[float]] = {}


def plain_losses(case: Case, device: str, model: SuiteModel = GPT) -> list[float]:
    """Losses of the plain run of ``case`` (only its base on) on ``model``, computed once per session."""
    key = json.dumps([model.name, case.base, case.overrides, device], sort_keys=True)
    if key not in _plain:
        _plain[key] = run_plan(make_plan(case.base, device, case.overrides, model))[0]
    return _plain[key]


def setting_strategy(strategy: Strategy, cfg: Any) -> Strategy:
    """``strategy`` with the needs of setting ``cfg`` (see TrainContext.check_needs)."""
    return dataclasses.replace(strategy, needs=cfg.needs()) if hasattr(cfg, "needs") else strategy


def bare_workload(model: SuiteModel = GPT) -> Workload:
    """``model``'s workload (the tiny GPT), declaring no structure (as a user's model may)."""
    return dataclasses.replace(model.workload(), name="bare", structure=frozenset())


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """One test item per case: ``cpu_cases`` for test_cpu_case, ``cuda_cases`` for test_cuda_case."""
    if "case" in metafunc.fixturenames:
        cases = metafunc.cls.cuda_cases if metafunc.function.__name__ == "test_cuda_case" else metafunc.cls.cpu_cases
        metafunc.parametrize("case", cases, ids=[c.id for c in cases])


class StrategySuite:
    """Subclass as ``TestX(StrategySuite)``, set the class attributes and ``check_applied``."""

    name: ClassVar[str]
    """The strategy under test."""
    model: ClassVar[SuiteModel] = GPT
    """The workload every case trains."""
    cpu_cases: ClassVar[tuple[Case, ...]]
    """Settings trained on the CPU and compared with the plain CPU run."""
    cuda_cases: ClassVar[tuple[Case, ...]] = ()
    """Settings trained on CUDA (tests marked gpu) and compared with the plain CUDA run."""
    cpu_refused: ClassVar[tuple[dict[str, Any], ...]] = ()
    """Knob settings that need what a machine without a GPU lacks."""
    check_resume: ClassVar[bool] = True
    """Check resume under the first CPU case (it builds three trainers)."""
    knob_company: ClassVar[dict[str, Any]] = {}
    """Other knobs each knob's values are parsed with, for a value that is valid only in their
    company (zero's offload_params needs stage 3)."""
    processes: ClassVar[int] = 1
    """Processes the strategy's CPU cases run with; a multi-process strategy's suite
    (tests/test_distributed.py) trains them under torchrun, overriding the training tests."""

    def check_applied(self, trainer: Trainer, cfg: Any) -> None:
        """Assert that ``cfg`` took visible effect on the trainer's model, loop or loader."""
        raise NotImplementedError

    def plain_losses(self, case: Case, device: str) -> list[float]:
        """The run this case is compared with; strategies that change the batch override it."""
        return plain_losses(case, device, self.model)

    def adapter(self, trainer: Trainer) -> Any:
        """The adapter of the trainer's model, for ``check_applied``."""
        return adapter_for(trainer.ctx.model)

    @property
    def strategy(self) -> Strategy:
        return catalog.get(self.name)

    def settings(self) -> list[dict[str, Any]]:
        return [{}] + [c.knobs for c in self.cpu_cases + self.cuda_cases] + list(self.cpu_refused)

    # -- the declaration ---------------------------------------------------------------

    def test_declaration(self) -> None:
        s = self.strategy
        assert s.implemented and s.summary and s.knobs
        for knob in s.knobs:
            values = knob.choices or (knob.low, knob.high)
            assert knob.choices or knob.low <= knob.high, knob
            for value in values:
                value = int(value) if knob.integer else value
                assert getattr(s.parse({**self.knob_company, knob.name: value}), knob.name) == value

    def test_config_round_trips(self) -> None:
        s = self.strategy
        for knobs in self.settings():
            cfg = s.parse(knobs)
            dumped = s.dump(cfg)
            assert dumped.items() >= knobs.items()
            assert s.parse(json.loads(json.dumps(dumped))) == cfg

    def test_unknown_knob_is_rejected(self) -> None:
        with pytest.raises(SchemaError, match="no_such_knob"):
            self.strategy.parse({"no_such_knob": 1})

    # -- needs -------------------------------------------------------------------------

    def test_cpu_refuses_what_it_lacks(self) -> None:
        cpu = Facts.of(None, self.model.workload(), processes=self.processes)
        for knobs in [c.knobs for c in self.cpu_cases] + list(self.cpu_refused):
            lacks = unmet_needs(setting_strategy(self.strategy, self.strategy.parse(knobs)), cpu)
            assert bool(lacks) == (knobs in self.cpu_refused), (knobs, lacks)
        for knobs in self.cpu_refused:
            with pytest.raises(UserError, match=f"strategy {self.name} .*cannot run here: needs"):
                Trainer(make_plan({self.name: knobs}, "cpu", model=self.model))

    def test_refuses_a_workload_without_its_structure(self) -> None:
        bare = bare_workload(self.model)
        for knobs in [c.knobs for c in self.cpu_cases]:
            cfg = self.strategy.parse(knobs)
            if not setting_strategy(self.strategy, cfg).needs.structure:
                continue
            assert any(
                "needs the workload to declare" in why
                for why in unmet_needs(setting_strategy(self.strategy, cfg), Facts.of(None, bare))
            )
            ctx = TrainContext(workload=bare, device=torch.device("cpu"), model=bare.build_model())
            with pytest.raises(UserError, match="needs the workload to declare"):
                self.strategy.apply(ctx, cfg)

    # -- training ----------------------------------------------------------------------

    def run_case(self, case: Case, device: str) -> None:
        losses, trainer = run_plan(make_plan({**case.base, self.name: case.knobs}, device, case.overrides, self.model))
        self.check_applied(trainer, self.strategy.parse(case.knobs))
        expected = self.plain_losses(case, device)
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(expected), rtol=case.rtol, atol=0.0)

    def test_cpu_case(self, case: Case) -> None:
        self.run_case(case, "cpu")

    @pytest.mark.gpu
    def test_cuda_case(self, case: Case) -> None:
        if not torch.cuda.is_available():
            pytest.skip("needs CUDA")
        try:
            self.run_case(case, "cuda")
        except UserError as e:
            if "cannot run here" not in str(e):
                raise
            pytest.skip(str(e))  # e.g. fa3 where flash_attn_interface does not import

    def test_resume_is_exact(self) -> None:
        if not self.check_resume:
            pytest.skip("resume is covered by another strategy's suite (rebuilding costs too much)")
        case = self.cpu_cases[0]
        plan = make_plan({**case.base, self.name: case.knobs}, "cpu", case.overrides, self.model)
        trainers: list[Trainer] = []
        try:
            # One after another: each Trainer seeds the process-wide RNG when it is built.
            trainers.append(Trainer(plan))
            expected = train_losses(trainers[-1], 6)
            trainers.append(Trainer(plan))
            train_losses(trainers[-1], 3)
            buf = io.BytesIO()
            torch.save(trainers[-1].state_dict(3), buf)  # as save_checkpoint does, then _resume
            state = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
            plain_keys = self.model.workload(case.overrides).build_model().state_dict().keys()
            assert state["model"].keys() == plain_keys
            trainers.append(Trainer(plan))
            start = trainers[-1].load_state_dict(state)
            assert train_losses(trainers[-1], 3, start) == expected[3:]
        finally:
            for t in trainers:
                t.close()
