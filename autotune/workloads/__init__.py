"""What to train: the built-in GPT presets and the protocol for a user's own model.

A workload is a model factory plus what the trainer and the strategies need to know about
it. A user brings one as ``--workload package.module:factory``, where ``factory()`` returns
a :class:`Workload`. The model's ``forward(idx, targets)`` takes (B, T) int64 token ids and
returns the scalar mean loss. Structure that strategies may rely on is declared in
``structure``; a strategy whose needs are not declared is left out, with the reason shown:

- ``"blocks"``: ``model.blocks`` is an ``nn.ModuleList`` of identical transformer blocks
  (activation checkpointing, per-block compile, FSDP, pipeline stages);
- ``"attention"`` / ``"mlp"``: each block has ``.attn`` / ``.mlp`` submodules;
- ``"embed"`` / ``"head"``: ``model.embed`` (``nn.Embedding``) and ``model.head``
  (``nn.Linear`` to the vocabulary), e.g. for vocab padding;
- ``"vocab"``: its vocabulary can be padded (vocab padding);
- ``"tp"`` / ``"sp"`` / ``"pp"``: its adapter has a tensor-parallel plan, one that splits the norms
  along the sequence too, and can cut it into pipeline stages;
- ``"loss"``: its adapter computes the loss from the head's output itself, so a fused head +
  cross-entropy may replace both.

The tokens are what the model's adapter serves (``autotune.workloads.adapter.STRUCTURE``): the
built-in GPT's workloads declare all of them, an hf: model's its adapter's ``supports()``.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from autotune.errors import UserError

if TYPE_CHECKING:
    from autotune.workloads.structure import ModelShape

GPT_STRUCTURE = frozenset({"blocks", "attention", "mlp", "embed", "head", "vocab", "tp", "sp", "pp", "loss"})
"""What the built-in GPT's adapter serves (``GPTAdapter.supports``), spelled out: this module loads without torch."""


@dataclass(kw_only=True, slots=True)
class Workload:
    name: str
    """Preset name or ``module:factory`` import path; goes into plans."""
    build_model: Callable[[], Any]
    """Makes a freshly initialised ``nn.Module`` on the CPU (the trainer moves it)."""
    vocab_size: int
    """Token ids in the data are below this."""
    seq_len: int
    """Tokens per sample."""
    structure: frozenset[str] = frozenset()
    """What strategies may rely on (see the module docstring)."""
    config: Any = None
    """The model config when there is one (GPTConfig for presets), for the cost model."""
    global_batch: int | None = None
    """Samples per optimizer step over all processes that the recipe trains with. The planner
    keeps it fixed and searches only how to split it (micro-batch x accumulation x data
    parallel), so every plan learns what the recipe learns; None lets the search choose."""
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    """The settings it was built from beside its name (a plan's ``workload.overrides``): a plan
    made from it records them, so trials and runs rebuild the same model."""
    shape: ModelShape | None = None
    """The model's shape (its adapter's :meth:`shape`), computed once from a model built on
    the meta device, for the cost model: None where it is not known (no cost predictions)."""
    no_shape: str = ""
    """Why ``shape`` is None (``autotune strategies --explain`` says it), where it was looked for."""


# Presets. Arithmetic: N_matmul = 12 L d^2 (+ V d for the tied head).
PRESETS: dict[str, dict[str, int]] = {
    # CPU default: trains in seconds on 2 cores. ~0.8M block params.
    "tiny": dict(vocab_size=2048, seq_len=128, d_model=128, n_layers=4, n_heads=4),
    # The roadmap's "Phase 8 Small": 8 x 12 x 512^2 = 25M block params + 25.7M head.
    "phase8-small": dict(vocab_size=50257, seq_len=1024, d_model=512, n_layers=8, n_heads=8),
    # phase8-small at seq 8192: where attention, not the matmuls, dominates (sparse attention).
    "phase8-long": dict(vocab_size=50257, seq_len=8192, d_model=512, n_layers=8, n_heads=8),
    # GPT-2 small: 85M block params + 38.6M head = 124M.
    "gpt2-124m": dict(vocab_size=50257, seq_len=1024, d_model=768, n_layers=12, n_heads=12),
    # ~1.0B: 18 x 12 x 2048^2 = 906M block params + 103M head.
    "gpt-1b": dict(vocab_size=50257, seq_len=2048, d_model=2048, n_layers=18, n_heads=16),
    # Qwen3's vocabulary at Qwen3-0.6B's width: 12 x 12 x 1024^2 = 151M block params + 155.6M
    # head, the largest matmul of the model; where the choice of fused loss matters (issue 28).
    "gpt-vocab152k": dict(vocab_size=151936, seq_len=1024, d_model=1024, n_layers=12, n_heads=16),
}

# The recipes' global batch (samples per optimizer step). GPT-2 small trains on 0.5M tokens
# a step (nanoGPT: 480 x 1024); gpt-1b the same tokens at seq 2048. phase8-small takes 192 x
# 1024 = 196k tokens, a batch its 50M parameters train well with, and 192 is a multiple of
# every micro-batch up to 96 (12, 24, 48 and 64 included); phase8-long the same tokens at seq
# 8192 (24 x 8192). tiny: 64 x 128 = 8k tokens. gpt-vocab152k: 64 x 1024, as the Qwen3-shaped
# runs of issue 26.
GLOBAL_BATCH: dict[str, int] = {
    "tiny": 64,
    "phase8-small": 192,
    "phase8-long": 24,
    "gpt2-124m": 480,
    "gpt-1b": 256,
    "gpt-vocab152k": 64,
}


def gpt_workload(name: str, overrides: dict[str, Any] | None = None) -> Workload:
    """A GPT preset with ``overrides``, its shape counted from its config (:func:`gpt_shape`:
    no torch, so a plan's checks read it wherever they run)."""
    from autotune.workloads.gpt_config import GPTConfig

    params = dict(PRESETS[name])
    known = {f.name for f in dataclasses.fields(GPTConfig)}
    for key, value in (overrides or {}).items():
        if key not in known:
            raise UserError(
                f"workload.overrides.{key}: unknown setting for {name} (expected one of: {', '.join(sorted(known))})"
            )
        params[key] = value
    try:
        cfg = GPTConfig(**params)
    except (TypeError, ValueError) as e:
        raise UserError(f"workload {name}: {e}") from None
    return Workload(
        name=name,
        build_model=lambda: _build_gpt(cfg),
        shape=gpt_shape(cfg),
        vocab_size=cfg.vocab_size,
        seq_len=cfg.seq_len,
        structure=GPT_STRUCTURE,
        config=cfg,
        global_batch=GLOBAL_BATCH[name],
        overrides=dict(overrides or {}),
    )


def _build_gpt(cfg: Any) -> Any:
    from autotune.workloads.gpt import GPT

    return GPT(dataclasses.replace(cfg))


PROBE_LAYERS = 256
"""Most blocks of a model built on the meta device to read its shape (about a millisecond a
block): a deeper model is read off its first PROBE_LAYERS blocks, the rest counted like them
(:func:`with_layers`), so a plan's size is checked before anything of its size is built."""


def gpt_shape(cfg: Any) -> ModelShape:
    """The shape of the GPT of ``cfg``, counted from its config (no torch, nothing built: a
    plan is checked before any model is; tests/test_limits.py holds it equal to the shape
    :class:`~autotune.workloads.adapter.GPTAdapter` reads off a built model). Each block holds
    qkv and proj (4 d^2), fc and proj (2 d d_ff) without biases, and two LayerNorm scales."""
    from autotune.workloads.structure import ModelShape

    d, layers = cfg.d_model, cfg.n_layers
    matrices = 4 * d * d + 2 * d * cfg.d_ff
    return ModelShape(
        d_model=d,
        n_layers=layers,
        n_heads=cfg.n_heads,
        n_kv_heads=cfg.n_heads,
        head_dim=cfg.head_dim,
        d_ff=cfg.d_ff,
        vocab_size=cfg.vocab_size,
        seq_len=cfg.seq_len,
        matmul_params=layers * matrices + cfg.vocab_size * d,
        block_params=layers * (matrices + 2 * d),
        other_params=cfg.seq_len * d + d,  # the position table and the final norm
        vocab_tables=1 if cfg.tie_embeddings else 2,
        mlp_matrices=2,
    )


def with_layers(shape: ModelShape, n_layers: int) -> ModelShape:
    """``shape``, read off a model of fewer blocks, for ``n_layers`` blocks like them: the
    blocks' parameters and matmul weights grow with their count, nothing else does."""
    if n_layers == shape.n_layers:
        return shape
    head = shape.vocab_size * shape.d_model  # the output head's matmul weights, in matmul_params

    def scaled(n: int) -> int:
        return n * n_layers // shape.n_layers

    return dataclasses.replace(
        shape,
        n_layers=n_layers,
        matmul_params=scaled(shape.matmul_params - head) + head,
        block_params=scaled(shape.block_params),
    )


FACTORY_OVERRIDES = ("seq_len",)
"""What a ``package.module:factory`` workload takes in ``workload.overrides`` (``--seq-len``)."""

_IMPORT_PATH = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*")


def import_module_name(name: str) -> str | None:
    """The module a workload name would import: None for a preset; a UserError for a name
    that is neither a preset nor ``package.module:factory``."""
    if name in PRESETS or (isinstance(name, str) and name.startswith("hf:")):
        return None  # a preset, or a Hugging Face family: data, no user code imported
    if not isinstance(name, str) or not _IMPORT_PATH.fullmatch(name):
        raise UserError(f"unknown workload {name!r}: expected one of {', '.join(PRESETS)} or package.module:factory")
    return name.partition(":")[0]


def load_workload(
    name: str, overrides: dict[str, Any] | None = None, *, trusted: bool = True, with_shape: bool = True
) -> Workload:
    """A preset by name, ``hf:<model_type>`` (autotune.workloads.hf), or ``package.module:factory``
    returning a :class:`Workload`.

    Importing a module runs its code, so a workload named by a file (a plan someone sent)
    is imported only when ``trusted``: the CLI passes False unless the user named the
    module on the command line or said ``--trust-workload``. Library callers choose. With
    ``with_shape`` False a factory's workload keeps the ``shape`` it came with (None: reading
    one builds its model on torch's meta device); a preset's is counted from its config, and
    an hf: model's read off the meta device, either way."""
    if name == "hf":
        raise UserError("workload hf: name the model type (hf:llama) or give its config (--workload-config PATH)")
    module_name = import_module_name(name)
    if name.startswith("hf:"):
        from autotune.workloads.hf import hf_workload

        return hf_workload(name, overrides)
    if module_name is None:
        return gpt_workload(name, overrides)
    if not trusted:
        raise UserError(
            f"workload {name}: not a built-in preset, and running it would import module {module_name}; "
            "pass --trust-workload if you trust that code"
        )
    extra = sorted(set(overrides or {}) - set(FACTORY_OVERRIDES))
    if extra:
        raise UserError(
            f"workload.overrides.{extra[0]}: a factory's workload takes only {', '.join(FACTORY_OVERRIDES)} ({name})"
        )
    seq_len = (overrides or {}).get("seq_len")
    attr = name.partition(":")[2]
    if os.getcwd() not in sys.path:  # like `python -m`: modules beside the user resolve
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise UserError(f"workload {name}: cannot import {module_name} ({e})") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise UserError(f"workload {name}: {module_name} has no callable {attr!r}")
    workload = factory()
    transformers = sys.modules.get("transformers")  # imported already if it returned a PreTrainedModel
    if transformers is not None and isinstance(workload, transformers.PreTrainedModel):
        from autotune.workloads.hf import workload_from_model

        workload = workload_from_model(factory, seq_len=seq_len, name=name, probe=workload)
    elif not isinstance(workload, Workload):
        raise UserError(
            f"workload {name}: {attr}() must return autotune.workloads.Workload or a transformers PreTrainedModel, "
            f"got {type(workload).__name__}"
        )
    elif seq_len is not None:
        workload = with_seq_len(workload, seq_len)
    workload = dataclasses.replace(workload, name=name, overrides=dict(overrides or {}))
    return workload if workload.shape is not None or not with_shape else shaped(workload)


def with_seq_len(workload: Workload, seq_len: Any) -> Workload:
    """``workload`` trained on ``seq_len`` tokens per sample (``--seq-len``): the model must
    take them (one with fewer positions fails in the baseline trial, saying so)."""
    if not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len < 1:
        raise UserError(f"workload.overrides.seq_len: {seq_len!r} must be a positive whole number")
    shape = None if workload.shape is None else dataclasses.replace(workload.shape, seq_len=seq_len)
    return dataclasses.replace(workload, seq_len=seq_len, shape=shape)


def shaped(workload: Workload) -> Workload:
    """``workload`` with the shape its model's adapter reads off a model built on the meta
    device (no memory, no init; a preset's from its config, :func:`gpt_shape`), or with the
    reason there is none in ``no_shape``."""
    from autotune.workloads.gpt_config import GPTConfig

    if isinstance(workload.config, GPTConfig):  # a preset: counted from its config, never built whole
        return dataclasses.replace(workload, shape=gpt_shape(workload.config))
    import torch

    from autotune.workloads.adapter import NotSupported, adapter_for
    from autotune.workloads.generic import GenericAdapter

    try:
        with torch.device("meta"):
            model = workload.build_model()
    except Exception as e:  # a user's model that cannot be built without memory
        why = f"its model cannot be built on the meta device ({type(e).__name__}: {e})"
        return dataclasses.replace(workload, no_shape=why)
    adapter = adapter_for(model)
    try:  # the generic adapter knows the model alone, not the sequence it is trained on
        shape = adapter.shape(workload.seq_len) if isinstance(adapter, GenericAdapter) else adapter.shape()
    except NotSupported as e:
        return dataclasses.replace(workload, no_shape=str(e))
    return dataclasses.replace(workload, shape=shape)


def flops_per_token(model: Any, workload: Workload) -> int:
    """Training FLOPs per token: the model's own count if it has one (PaLM appendix B for
    the GPT, counted by its adapter), else 6 x parameters that are not embedding tables."""
    from autotune.workloads.adapter import GPTAdapter
    from autotune.workloads.gpt import GPT

    if isinstance(model, GPT):  # through the adapter: routed experts count their active share
        return GPTAdapter(model).flops_per_token()
    if hasattr(model, "flops_per_token"):
        return int(model.flops_per_token())
    import math

    import torch

    from autotune.workloads.gpt import param_shape

    embeds = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    n = sum(math.prod(param_shape(p)) for p in model.parameters() if id(p) not in embeds)
    return 6 * n


__all__ = ["Workload", "PRESETS", "load_workload", "gpt_workload", "flops_per_token"]
