"""Hugging Face causal LMs as workloads: ``--workload hf:<model_type>``.

A plan writes such a workload as data, the whole config inline::

    "workload": {"name": "hf:llama", "overrides": {"hidden_size": 512, "num_hidden_layers": 8, ...,
                                                   "seq_len": 1024, "attn_implementation": "sdpa"}}

``overrides`` holds the model config's own fields, given to ``AutoConfig.for_model`` as they
are: what transformers accepts is accepted (its legacy names such as ``rope_theta`` mapped,
fields the family does not define kept as attributes, as ``from_pretrained`` keeps them), and
what it rejects is one line. ``torch_dtype``/``dtype`` is kept but does not choose how we
train: the model is always built in fp32 (the precision strategy decides the compute dtype).
Three keys are ours: ``seq_len`` (tokens per sample; default the config's
``max_position_embeddings`` up to :data:`DEFAULT_SEQ_LEN`), ``attn_implementation`` (eager,
sdpa, flex_attention, flash_attention_2 where installed; default sdpa) and ``weights`` (a
``.safetensors`` file or a folder of them, loaded after building; nothing is ever
downloaded). :func:`overrides_from_config` turns a local ``config.json`` (or a folder holding
one) into those overrides, and :func:`from_command_line` does it for ``--workload
hf[:<type>] --workload-config PATH``. A factory returning a ``PreTrainedModel`` becomes a
workload through :func:`workload_from_model`.

The model is wrapped in :class:`HFCausalLM`: ``forward(idx, targets) -> loss`` as our trainer
calls it, ``blocks`` the decoder's own layer list (so checkpointing, per-block compile and
FSDP2 work on it), and :meth:`HFCausalLM.adapter` the :class:`HFAdapter` strategies ask.

Targets are not shifted twice: our loader gives ``y`` = ids shifted by one already, and HF's
own loss would shift ``labels`` again, so the loss is computed here from the logits and ``y``.

``transformers`` is imported only by this module, which only ``hf:`` workloads load.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import json
import logging
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from autotune.errors import UserError
from autotune.workloads import PROBE_LAYERS, Workload, with_layers
from autotune.workloads.adapter import (
    STRUCTURE,
    Attend,
    HeadLoss,
    ModelShape,
    NotSupported,
    block_matmul_params,
    masked_cross_entropy,
    mlp_matrices,
    padded_width,
    params_of,
)
from autotune.workloads.generic import find_blocks

PREFIX = "hf:"
OURS = ("seq_len", "attn_implementation", "weights")
"""Override keys that are ours, not the model config's."""
DEFAULT_SEQ_LEN = 1024
"""Tokens per sample when neither the plan nor ``--seq-len`` says, capped by the model's
positions. Not the positions themselves: Llama 3.2 has 131,072, a length to choose on purpose
(its attention and activations grow with it), not to fall into."""
MAX_LAYERS = 2**16
"""Layers of a config beyond any model's (published ones have up to 126)."""
_DROPPED = frozenset({"model_type", "transformers_version", "architectures", "_name_or_path"})
"""config.json keys that describe the file, not the model."""


def _transformers() -> Any:
    for name, noise in IMPORT_NOISE.items():
        logging.getLogger(name).addFilter(noise)  # a logger keeps a filter once
    try:
        import transformers
    except ImportError:
        raise UserError("hf: workloads need transformers: pip install -e '.[hf]' in autotune's clone") from None
    return transformers


class _Drop(logging.Filter):
    """Drops the log records whose message matches ``pattern`` (at its start)."""

    def __init__(self, pattern: str) -> None:
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.match(record.getMessage())


IMPORT_NOISE = {
    "torchao": _Drop(r"Failed to load .*torchao/_C_(mxfp8|cutlass_90a)"),
    "torch.utils._pytree": _Drop(r"<enum '\w+'> is an Enum subclass and is now natively supported"),
}
"""Log records of importing transformers, which imports torchao where it is installed, that say
nothing about the run: torchao failing to load its CUDA-only extensions (mxfp8, sm90a CUTLASS)
on a machine without them, and torch's pytree deprecating the Enum constants torchao registers.
Matched by logger and message; every other record passes."""


def attn_implementations() -> tuple[str, ...]:
    """Attention implementations usable here; flash_attention_2 only where flash_attn is installed."""
    names = ("sdpa", "eager", "flex_attention")
    return names + ("flash_attention_2",) if importlib.util.find_spec("flash_attn") else names


@dataclasses.dataclass(kw_only=True, slots=True)
class HFSettings:
    """What an ``hf:`` workload is, parsed from its name and overrides."""

    model_type: str
    """transformers' name of the family (llama, gpt2, qwen2, mistral, ...)."""
    config: dict[str, Any]
    """Fields of the model config (a config.json's, as they are), given to ``AutoConfig.for_model``."""
    seq_len: int | None = None
    """Tokens per sample; None: the config's positions, up to DEFAULT_SEQ_LEN."""
    attn_implementation: str = "sdpa"
    """HF's attention implementation."""
    weights: str | None = None
    """A .safetensors file or a folder of them; None: freshly initialised."""


def parse(name: str, overrides: dict[str, Any] | None) -> HFSettings:
    model_type = name.removeprefix(PREFIX)
    if not model_type:
        raise UserError(f"workload {name!r}: expected hf:<model_type>, e.g. hf:llama")
    fields = dict(overrides or {})
    ours = {key: fields.pop(key) for key in OURS if key in fields}
    return HFSettings(model_type=model_type, config=fields, **ours)


def overrides_from_config(path: str | os.PathLike) -> tuple[str, dict[str, Any]]:
    """(model_type, overrides) from a local config.json, or a folder holding one (then its
    safetensors, if any, become the ``weights``)."""
    p = Path(path)
    folder = p if p.is_dir() else None
    file = p / "config.json" if folder else p
    if folder and not file.is_file():
        raise UserError(f"{p}: the folder holds no config.json")
    try:
        data = json.loads(file.read_text())
    except FileNotFoundError:
        raise UserError(f"{file}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{file}: not a JSON model config ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("model_type"), str):
        raise UserError(f"{file}: a model config must be a JSON object with a model_type")
    overrides = {k: v for k, v in data.items() if k not in _DROPPED}
    if folder and any(folder.glob("*.safetensors")):
        overrides["weights"] = str(folder.resolve())
    return data["model_type"], overrides


def from_command_line(workload: str, config: str | os.PathLike) -> tuple[str, dict[str, Any]]:
    """(workload name, overrides) for ``--workload W --workload-config PATH``: ``W`` is ``hf``
    (the model type is the config's) or ``hf:<model_type>``, which must be the config's."""
    if workload != "hf" and not workload.startswith(PREFIX):
        raise UserError(f"--workload-config is for hf: workloads (--workload hf or hf:<model_type>), not {workload!r}")
    model_type, overrides = overrides_from_config(config)
    named = workload.removeprefix(PREFIX) if workload != "hf" else ""
    if named and named != model_type:
        raise UserError(
            f"--workload {workload}: {config} is a {model_type!r} config; give --workload hf:{model_type} (or hf)"
        )
    try:
        unread = unread_fields(model_type, {k: v for k, v in overrides.items() if k not in OURS})
    except (UserError, *_rejections()):
        unread = []  # loading the workload says what is wrong, in one line
    if unread:  # accepted, as transformers accepts them; said, since a typo among them trains the default
        print(
            f"autotune: note: {config}: {', '.join(unread)}: "
            f"not fields of transformers' {model_type} config, kept as plain attributes",
            file=sys.stderr,
        )
    return PREFIX + model_type, overrides


def build_config(settings: HFSettings) -> Any:
    """The transformers config: what ``AutoConfig.for_model`` makes of the fields. What
    transformers rejects (a type mismatch, a failed validation) is a one-line UserError."""
    transformers = _transformers()
    try:
        default = transformers.AutoConfig.for_model(settings.model_type)
    except (ValueError, KeyError):
        raise UserError(
            f"hf:{settings.model_type}: transformers {transformers.__version__} "
            f"knows no model type {settings.model_type!r}"
        ) from None
    # Checked before transformers builds the config: it validates each layer's type (5 s for a million).
    own = getattr(default, "attribute_map", {}).get("num_hidden_layers")
    for key in filter(None, (own, "num_hidden_layers")):  # the family's name for it (GPT-2's n_layer) or the common one
        layers = settings.config.get(key)
        if isinstance(layers, int) and not isinstance(layers, bool) and layers > MAX_LAYERS:
            raise UserError(f"hf:{settings.model_type}: {key} {layers:,} is more than {MAX_LAYERS:,} layers")
    try:
        with _quiet(
            transformers
        ):  # a copy: transformers writes into the dicts it is given (rope_theta into rope_scaling)
            return transformers.AutoConfig.for_model(settings.model_type, **copy.deepcopy(settings.config))
    except _rejections() as e:
        raise UserError(
            f"hf:{settings.model_type}: transformers {transformers.__version__} rejects this config ({_one_line(e)})"
        ) from None


def unread_fields(model_type: str, fields: dict[str, Any]) -> list[str]:
    """The fields the family's config does not define, which transformers keeps as plain
    attributes (a typo among them trains the default): GPT-2's published ``n_ctx``, say."""
    transformers = _transformers()
    default = transformers.AutoConfig.for_model(model_type)
    known = set(default.to_dict()) | set(getattr(default, "attribute_map", {}))
    with _quiet(transformers):
        kept = transformers.AutoConfig.for_model(model_type, **copy.deepcopy(fields)).to_dict()
    return sorted(k for k in fields if k not in known and k not in OURS and k in kept)


def _rejections() -> tuple[type[BaseException], ...]:
    """What transformers raises for a config it rejects: huggingface_hub's strict-dataclass
    validation (a type mismatch, a failed check), and plain errors of older checks."""
    from huggingface_hub.errors import StrictDataclassError

    return (StrictDataclassError, TypeError, ValueError, KeyError, AttributeError)


def _one_line(e: BaseException) -> str:
    text = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
    return text if isinstance(e, ValueError) and text else f"{type(e).__name__}: {text}"


class _quiet:
    """transformers' advice while a config or model is built (token ids outside a scaled-down
    vocabulary, deprecated names) stays off the screen: a command prints one line or its result."""

    def __init__(self, transformers: Any) -> None:
        self.logging = transformers.utils.logging

    def __enter__(self) -> None:
        self.level = self.logging.get_verbosity()
        self.logging.set_verbosity_error()

    def __exit__(self, *exc: object) -> None:
        self.logging.set_verbosity(self.level)


def build_hf_model(settings: HFSettings, config: Any) -> nn.Module:
    """A freshly initialised (or weight-loaded) PreTrainedModel on the CPU, in fp32 whatever
    the config's ``torch_dtype`` (``from_config`` would build in it), never remote code."""
    transformers = _transformers()
    if settings.attn_implementation not in attn_implementations():
        raise UserError(
            f"attn_implementation {settings.attn_implementation!r}: expected one of {', '.join(attn_implementations())}"
        )
    try:
        with _quiet(transformers):
            model = transformers.AutoModelForCausalLM.from_config(
                dataclasses_copy(config),
                attn_implementation=settings.attn_implementation,
                dtype=torch.float32,
                trust_remote_code=False,
            )
    except ImportError as e:
        raise UserError(f"hf:{settings.model_type}: {str(e).splitlines()[0]}") from None
    except (
        *_rejections(),
        AssertionError,
        RuntimeError,
        IndexError,
    ) as e:  # e.g. a pad_token_id outside the vocabulary
        raise UserError(f"hf:{settings.model_type}: cannot build the model from this config ({_one_line(e)})") from None
    if settings.weights:
        load_weights(model, settings.weights)
    return model


def dataclasses_copy(config: Any) -> Any:
    """A private copy: each model gets its own config (resizing writes vocab_size into it)."""
    return type(config).from_dict(config.to_dict())


def load_weights(model: nn.Module, path: str) -> None:
    from safetensors.torch import load_file

    p = Path(path)
    files = sorted(p.glob("*.safetensors")) if p.is_dir() else [p]
    if not files or not all(f.is_file() for f in files):
        raise UserError(f"weights {path}: no .safetensors file there")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    result = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if model.get_output_embeddings() is not None and _tied(model) else set()
    missing = sorted(set(result.missing_keys) - tied)
    if missing or result.unexpected_keys:
        raise UserError(
            f"weights {path}: do not match the config (missing {missing[:3]}, unexpected {result.unexpected_keys[:3]})"
        )


def _tied(model: nn.Module) -> bool:
    head = model.get_output_embeddings()
    return head is not None and head.weight is model.get_input_embeddings().weight


def decoder_layers_fqn(model: nn.Module) -> str:
    """FQN of the decoder layers: the ModuleList of the classes named in ``_no_split_modules``
    (the units HF itself never splits), else the largest ModuleList of one class."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    for fqn, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) and all(type(m).__name__ in names for m in module):
            return fqn
    found = find_blocks(model)
    if found is None:
        raise UserError(
            f"{type(model).__name__}: no decoder layers found (no ModuleList of {sorted(names) or 'one class'})"
        )
    return found[0]


class HFCausalLM(nn.Module):
    """A PreTrainedModel as our trainer calls a model: ``forward(idx, targets) -> loss``."""

    def __init__(self, hf: nn.Module, *, vocab_size: int | None = None) -> None:
        super().__init__()
        self.hf = hf
        self.vocab_size = vocab_size or hf.config.vocab_size
        """The true vocabulary: logits past it are padding."""
        self._blocks_fqn = "hf." + decoder_layers_fqn(hf)
        self.head_loss: HeadLoss | None = None
        """Replaces head + loss in training (``HFAdapter.set_head_loss``); None: the model's own."""

    @property
    def blocks(self) -> nn.ModuleList:
        """The decoder's own layer list (not a copy, and not registered twice)."""
        return self.get_submodule(self._blocks_fqn)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """``idx``, ``targets``: (B, T) ids, targets already shifted. Mean loss, or the
        (unpadded) logits without targets."""
        if targets is not None and self.head_loss is not None:
            # The decoder's output is the final norm's: what the CausalLM's head reads
            # (supports() lists "loss" only for the families where nothing comes between).
            hidden = self.hf.base_model(input_ids=idx, use_cache=False).last_hidden_state
            return self.head_loss(hidden, self.hf.get_output_embeddings().weight, targets, self.vocab_size)
        logits = self.hf(input_ids=idx, use_cache=False).logits  # (B, T, V padded)
        if targets is None:
            return logits[..., : self.vocab_size]
        return masked_cross_entropy(logits, targets, self.vocab_size)

    def adapter(self) -> HFAdapter:
        return HFAdapter(self)

    def flops_per_token(self) -> int:
        return self.adapter().flops_per_token()


_PLAIN_HEAD = frozenset(
    {
        "llama",
        "mistral",
        "mixtral",
        "qwen2",
        "qwen2_moe",
        "qwen3",
        "qwen3_moe",
        "gemma",
        "gemma2",
        "gpt2",
        "gpt_neox",
        "phi3",
        "olmo2",
        "starcoder2",
    }
)
"""Families whose CausalLM's training logits are its head applied to the decoder's output, as
transformers 5.17 writes them (Gemma 2's soft-capping is refused on its own). The zoo tests hold
the fused path equal to the model's own loss for each family they build."""

_TP_STYLES = ("colwise", "rowwise", "colwise_gather_output", "sequence_parallel")


def _tp_style(style: str) -> Any:
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, SequenceParallel

    return {
        "colwise": ColwiseParallel,
        "rowwise": RowwiseParallel,
        "colwise_gather_output": lambda: ColwiseParallel(output_layouts=Replicate()),
        "sequence_parallel": SequenceParallel,
    }[style]()


class HFAdapter:
    """The :class:`ModelAdapter` of an :class:`HFCausalLM`."""

    def __init__(self, model: HFCausalLM) -> None:
        self.model = model
        self.hf = model.hf

    # Structure.

    def supports(self) -> frozenset[str]:
        out = set(STRUCTURE)
        if self.hf.get_output_embeddings() is None:
            out -= {"head", "vocab"}
        try:
            self._tp_styles()
        except NotSupported:
            out -= {"tp", "sp"}
        if self._sp_base() is None:
            out.discard("sp")
        if self._llama_layout() is None:
            out.discard("pp")
        for token, find in (("attention", self.attention), ("mlp", self.mlp)):
            try:
                find(self.blocks()[0])
            except NotSupported:
                out.discard(token)
        if "attention" in out and self.plain_attention_refusal() is not None:
            out.discard("attention")  # our kernels would compute another attention
        if self.plain_head_refusal() is not None:
            out.discard("loss")
        return frozenset(out)

    def plain_head_refusal(self) -> str | None:
        """Why the training loss is not the cross-entropy of the head's matmul of the decoder's
        output (None: it is, and a fused head + loss may replace them): logit soft-capping
        (Gemma 2), a head with a bias, or a family whose CausalLM scales the hidden states or
        the logits around its head (Cohere, Granite, MiniCPM: any family not in _PLAIN_HEAD)."""
        config = self.hf.config
        if getattr(config, "final_logit_softcapping", None):
            return "its logits are soft-capped after the head"
        head = self.hf.get_output_embeddings()
        if head is None:
            return f"{type(self.hf).__name__} has no output embeddings"
        if getattr(head, "bias", None) is not None:
            return "its head has a bias"
        if config.model_type not in _PLAIN_HEAD:
            return f"model_type {config.model_type!r} is not known to read its logits straight off the head"
        return None

    def set_head_loss(self, fn: HeadLoss | None) -> None:
        why = self.plain_head_refusal()
        if fn is not None and why is not None:
            raise NotSupported(f"{type(self.hf).__name__}: no fused head and loss: {why}")
        self.model.head_loss = fn

    def plain_attention_refusal(self) -> str | None:
        """Why the model's attention is not what our kernels compute, causal
        softmax(QK^T / sqrt(hs)) V over the whole sequence (None: it is): logit soft-capping
        (Gemma 2), another scale (Gemma 2's query_pre_attn_scalar, GPT-2's by layer), a sliding
        window shorter than the sequence (Mistral, Qwen with use_sliding_window)."""
        c = self.hf.config
        if getattr(c, "attn_logit_softcapping", None):
            return f"it soft-caps its attention logits (attn_logit_softcapping {c.attn_logit_softcapping})"
        seq_len = getattr(self.model, "seq_len", None) or default_seq_len(c)
        for i, block in enumerate(self.blocks()):
            attn = self.attention(block)
            hs = (
                getattr(attn, "head_dim", None)
                or getattr(attn, "head_size", None)
                or c.hidden_size // c.num_attention_heads
            )
            scaling = getattr(attn, "scaling", None)
            if scaling is not None and abs(scaling - hs**-0.5) > 1e-12:
                return f"layer {i} scales its attention by {scaling:.6g}, not 1/sqrt({hs})"
            window = (
                getattr(attn, "sliding_window")
                if hasattr(attn, "sliding_window")
                else getattr(c, "sliding_window", None)
            )
            if window is not None and window < seq_len:
                return (
                    f"layer {i} attends within a sliding window of {window} tokens, "
                    f"shorter than the sequence ({seq_len})"
                )
        return None

    def blocks(self) -> nn.ModuleList:
        return self.model.blocks

    def attention(self, block: nn.Module) -> nn.Module:
        for name in ("self_attn", "attn", "attention"):
            if isinstance(getattr(block, name, None), nn.Module):
                return getattr(block, name)
        raise NotSupported(f"{type(block).__name__}: no self_attn/attn submodule")

    def mlp(self, block: nn.Module) -> nn.Module:
        for name in ("mlp", "feed_forward"):
            if isinstance(getattr(block, name, None), nn.Module):
                return getattr(block, name)
        raise NotSupported(f"{type(block).__name__}: no mlp submodule")

    # Attention.

    def attention_implementations(self) -> tuple[str, ...]:
        return attn_implementations()

    def set_attention(self, implementation: str | None = None, kernel: Attend | None = None) -> None:
        """HF selects attention by name for the whole model (the layers share one config).
        A kernel of ours goes in as the implementation "autotune", which calls each attention
        module's own ``_autotune_attend``."""
        if kernel is not None and (why := self.plain_attention_refusal()) is not None:
            raise NotSupported(f"our kernels cannot run this model's attention: {why}")
        if kernel is not None:
            _register_bridge()
            for block in self.blocks():
                self.attention(block)._autotune_attend = kernel
            implementation = "autotune"
        elif implementation not in attn_implementations():
            raise NotSupported(
                f"attn_implementation {implementation!r}: expected one of {', '.join(attn_implementations())}"
            )
        self.hf.set_attn_implementation(implementation)

    def attention_dropout(self) -> float:
        """The config's attention dropout (Llama's ``attention_dropout``, GPT-2's ``attn_pdrop``)."""
        c = self.hf.config
        return float(getattr(c, "attention_dropout", None) or getattr(c, "attn_pdrop", None) or 0.0)

    # Vocabulary.

    def embedding(self) -> nn.Embedding:
        return self.hf.get_input_embeddings()

    def head(self) -> nn.Module:
        head = self.hf.get_output_embeddings()
        if head is None:
            raise NotSupported(f"{type(self.hf).__name__} has no output embeddings")
        return head

    def pad_vocab(self, multiple: int) -> int:
        rows = padded_width(self.model.vocab_size, multiple)
        if rows != self.embedding().num_embeddings:
            # mean_resizing draws the new rows from the old ones' distribution: no point for
            # rows that are never looked up and whose logits the loss masks out.
            self.hf.resize_token_embeddings(rows, mean_resizing=False)
            # resize may swap a parameter's data in place, which leaves autograd's cached
            # shape behind: fresh parameters (the tie kept) start clean.
            embed, head = self.embedding(), self.head()
            tied = head.weight is embed.weight
            embed.weight = nn.Parameter(embed.weight.detach())
            head.weight = embed.weight if tied else nn.Parameter(head.weight.detach())
        return rows

    # Parallelism.

    def _tp_plan_raw(self) -> dict[str, str] | None:
        plan = getattr(self.hf, "_tp_plan", None) or None
        if plan is None:
            base = getattr(self.hf.config, "base_model_tp_plan", None)
            prefix = getattr(self.hf, "base_model_prefix", "")
            plan = {f"{prefix}.{k}" if prefix else k: v for k, v in base.items()} if base else None
        return plan

    def _tp_styles(self) -> dict[str, str]:
        """The model's own plan as HF writes it (FQN -> style name), what of it we apply."""
        raw = self._tp_plan_raw()
        if raw is None:
            raise NotSupported(f"{type(self.hf).__name__} has no tensor-parallel plan (base_model_tp_plan)")
        # A head tied to the embedding stays whole, and so does the embedding (HF's plan splits
        # both by vocabulary then): sharding one would give it a parameter of its own and
        # silently untie them. Whole on every rank, as the built-in GPT's.
        tied = (self.embedding(), self.hf.get_output_embeddings()) if _tied(self.hf) else ()
        whole = {n for n, m in self.hf.named_modules() if any(m is t for t in tied)}
        styles = {fqn: style for fqn, style in raw.items() if fqn not in whole}
        odd = sorted({s for s in styles.values() if s not in _TP_STYLES})
        if odd:
            raise NotSupported(
                f"{type(self.hf).__name__}: tensor-parallel style {odd[0]!r} is not one of {', '.join(_TP_STYLES)}"
            )
        return styles

    def tp_plan(self, sequence_parallel: bool = False) -> dict[str, Any]:
        """The model's own plan (``base_model_tp_plan``, and its head's), as torch styles
        under this wrapper's FQNs. HF's plans name no norms: sequence parallel adds the Llama
        layout's (:meth:`_sequence_parallel`)."""
        styles = self._tp_styles()
        plan = {f"hf.{fqn}": _tp_style(style) for fqn, style in styles.items()}
        if sequence_parallel:
            base = self._sp_base()
            if base is None:
                raise NotSupported(
                    f"{type(self.hf).__name__}: sequence parallel needs the Llama layout's layers "
                    "(input_layernorm, self_attn, post_attention_layernorm, mlp) (use sequence_parallel false)"
                )
            plan = self._sequence_parallel(plan, styles, base)
        return plan

    _SP_PARTS = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")
    """A Llama-layout layer's parts, in order: norm, attention, norm, MLP."""

    def _sp_base(self) -> str | None:
        """FQN (under this wrapper) of the base model when sequence parallel can be laid over
        the model's plan: the Llama layout, every layer made of :attr:`_SP_PARTS`."""
        base = self._llama_layout()
        if base is None or not all(self._sp_layer(layer) for layer in base.layers):
            return None
        return f"hf.{self.hf.base_model_prefix}"

    def _sp_layer(self, layer: nn.Module) -> bool:
        """The layer has the four parts and no other weights (Gemma 2's two more norms would
        see slices of the sequence with no plan to sum their gradients)."""
        parts = all(isinstance(getattr(layer, n, None), nn.Module) for n in self._SP_PARTS)
        return parts and all(name in self._SP_PARTS or params_of(child) == 0 for name, child in layer.named_children())

    def _sequence_parallel(self, plan: dict[str, Any], styles: dict[str, str], base: str) -> dict[str, Any]:
        """``plan`` with the norms between the parallel regions working on this rank's slice of
        the sequence (B, T/tp, C), as the built-in GPT's: the layers' row-wise linears
        reduce-scatter, attention and MLP gather the whole sequence first."""
        from torch.distributed.tensor import Replicate, Shard
        from torch.distributed.tensor.parallel import PrepareModuleInput, RowwiseParallel, SequenceParallel

        layers = f"{base}.layers"
        out = {
            fqn: RowwiseParallel(output_layouts=Shard(1))
            if styles[fqn.removeprefix("hf.")] == "rowwise" and fqn.startswith(layers)
            else style
            for fqn, style in plan.items()
        }

        def gather() -> PrepareModuleInput:
            return PrepareModuleInput(
                input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),), use_local_output=True
            )

        out.update(
            {
                f"{layers}.*.input_layernorm": SequenceParallel(),
                # The layer calls its attention with hidden_states=..., its MLP positionally.
                f"{layers}.*.self_attn": PrepareModuleInput(
                    input_kwarg_layouts={"hidden_states": Shard(1)},
                    desired_input_kwarg_layouts={"hidden_states": Replicate()},
                    use_local_output=True,
                ),
                f"{layers}.*.post_attention_layernorm": SequenceParallel(),
                f"{layers}.*.mlp": gather(),
                # The whole embedding output enters the first layer as this rank's slice; the last
                # layer's slices are gathered for the final norm and head.
                f"{layers}.0": PrepareModuleInput(
                    input_layouts=(Replicate(),), desired_input_layouts=(Shard(1),), use_local_output=True
                ),
                f"{base}.norm": gather(),
            }
        )
        return out

    def _llama_layout(self) -> nn.Module | None:
        """The base model when it is laid out as Llama's (embed_tokens, rotary_emb, layers,
        norm): the layout pipeline stages are written for."""
        base = getattr(self.hf, getattr(self.hf, "base_model_prefix", ""), None)
        if not all(
            isinstance(getattr(base, n, None), nn.Module) for n in ("embed_tokens", "rotary_emb", "layers", "norm")
        ):
            return None
        return base if set(layer_types(self.hf.config)) <= set(STAGE_MASKS) else None

    def pipeline_stage(self, start: int, stop: int, *, first: bool, last: bool) -> nn.Module:
        if self._llama_layout() is None:
            raise NotSupported(
                f"{type(self.hf).__name__}: pipeline stages are written for "
                "the Llama layout (embed_tokens, rotary_emb, layers, norm)"
            )
        return HFStage(self.model, start, stop, first=first, last=last)

    # Loss and shape.

    def loss(self, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.model(ids, targets)

    def logits_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return masked_cross_entropy(logits, targets, self.model.vocab_size)

    def shape(self, seq_len: int | None = None) -> ModelShape:
        from autotune.workloads.adapter import saved_layout

        c = self.hf.config
        d, heads = c.hidden_size, c.num_attention_heads
        d_ff = getattr(c, "intermediate_size", None) or getattr(c, "n_inner", None) or 4 * d
        blocks = sum(params_of(b) for b in self.blocks())
        embed, head = self.hf.get_input_embeddings(), self.hf.get_output_embeddings()
        tables = 1 if head is None or head.weight is embed.weight else 2
        vocab = params_of(embed) + (params_of(head) if tables == 2 else 0)
        return ModelShape(
            d_model=d,
            n_layers=len(self.blocks()),
            n_heads=heads,
            n_kv_heads=getattr(c, "num_key_value_heads", None) or heads,
            head_dim=getattr(c, "head_dim", None) or d // heads,
            d_ff=d_ff,
            vocab_size=self.model.vocab_size,
            seq_len=seq_len or getattr(self.model, "seq_len", None) or default_seq_len(c),
            matmul_params=block_matmul_params(self.blocks()) + self.model.vocab_size * d,
            block_params=blocks,
            other_params=params_of(self.model) - blocks - vocab,
            vocab_tables=tables,
            mlp_matrices=mlp_matrices(self),
            **saved_layout(self, c),  # what a block keeps for its backward (the cost model's activations)
        )

    def flops_per_token(self) -> int:
        return self.shape().flops_per_token()


def default_seq_len(config: Any) -> int:
    positions = getattr(config, "max_position_embeddings", None)
    return min(positions, DEFAULT_SEQ_LEN) if positions else DEFAULT_SEQ_LEN


STAGE_MASKS = ("full_attention", "sliding_attention")
"""The layer types whose masks a pipeline stage makes (:class:`HFStage`)."""


def layer_types(config: Any) -> list[str]:
    """Each layer's attention type, as the model builds its masks: the config's
    ``layer_types`` (Gemma 2, Qwen), else sliding wherever the config has a window (Mistral,
    Phi-3), else full."""
    types = getattr(config, "layer_types", None)
    if types is None:
        sliding = getattr(config, "sliding_window", None) is not None
        types = ["sliding_attention" if sliding else "full_attention"] * config.num_hidden_layers
    return list(types)


class HFStage(nn.Module):
    """Layers ``[start, stop)`` of a Llama-layout model, with the embedding if first and the
    final norm and head if last, under the whole model's parameter names (placeholders keep
    the other layers' indices), so a stage's state dict is a slice of the model's."""

    def __init__(self, model: HFCausalLM, start: int, stop: int, *, first: bool, last: bool) -> None:
        super().__init__()
        hf = model.hf
        prefix = hf.base_model_prefix
        base = getattr(hf, prefix)
        self.first, self.last, self.span, self.config = first, last, (start, stop), hf.config
        shell = nn.Module()
        inner = nn.Module()
        setattr(shell, prefix, inner)
        if first:
            inner.embed_tokens = base.embed_tokens
        inner.rotary_emb = base.rotary_emb
        inner.layers = nn.ModuleList(
            layer if start <= i < stop else nn.Identity() for i, layer in enumerate(base.layers)
        )
        if last:
            inner.norm = base.norm
            shell.lm_head = hf.get_output_embeddings()
        self.hf, self._prefix = shell, prefix
        self.layer_types = layer_types(hf.config)
        self._flops = HFAdapter(model).flops_per_token()

    def flops_per_token(self) -> int:
        """The whole model's (MFU counts every stage's work)."""
        return self._flops

    def adapter(self) -> Any:
        """The stage's own: its layer list (placeholders included), for the strategies
        applied after the cut (checkpointing, per-block compile)."""
        from autotune.workloads.generic import StageAdapter

        return StageAdapter(self, getattr(self.hf, self._prefix).layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """First stage: ids (B, T); others: the stream (B, T, C). Last: logits (B, T, V)."""
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        base = getattr(self.hf, self._prefix)
        if self.first:
            x = base.embed_tokens(x)  # Gemma's scale by sqrt(C) is the embedding module's own
        position_ids = torch.arange(x.shape[1], device=x.device).unsqueeze(0)
        kwargs = dict(
            config=self.config, inputs_embeds=x, attention_mask=None, past_key_values=None, position_ids=position_ids
        )
        # Each layer's mask as the whole model makes it, by its type (:func:`layer_types`).
        makers = dict(zip(STAGE_MASKS, (create_causal_mask, create_sliding_window_causal_mask)))
        masks = {kind: makers[kind](**kwargs) for kind in set(self.layer_types[slice(*self.span)])}
        rope = base.rotary_emb(x, position_ids=position_ids)
        for i in range(*self.span):
            x = base.layers[i](
                x, attention_mask=masks[self.layer_types[i]], position_embeddings=rope, position_ids=position_ids
            )
        if not self.last:
            return x
        logits = self.hf.lm_head(base.norm(x))
        cap = getattr(self.config, "final_logit_softcapping", None)
        return torch.tanh(logits / cap) * cap if cap else logits  # (B, T, V)


_BRIDGE_REGISTERED = False


def _register_bridge() -> None:
    """Register the implementation "autotune": HF's attention call in, our Attend out."""
    global _BRIDGE_REGISTERED
    if _BRIDGE_REGISTERED:
        return
    from transformers import AttentionInterface

    AttentionInterface.register("autotune", _bridge)
    _BRIDGE_REGISTERED = True


def _bridge(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **_: Any,
) -> tuple[torch.Tensor, None]:
    """q (B, nh, T, hs), k and v (B, nkv, T, hs) -> ((B, T, nh, hs), no weights). Our kernels
    are causal over the whole sequence with scale 1/sqrt(hs): anything else is refused (the
    adapter leaves such models' attention out beforehand: :meth:`HFAdapter.plain_attention_refusal`)."""
    hs, T = query.shape[-1], query.shape[-2]
    if scaling is not None and abs(scaling - hs**-0.5) > 1e-12:
        raise NotSupported(
            f"attention scale {scaling} is not 1/sqrt({hs}): our kernels cannot run this model's attention"
        )
    if softcap or (sliding_window is not None and sliding_window < T):
        raise NotSupported("soft-capped or sliding-window attention: our kernels cannot run this model's attention")
    groups = query.shape[1] // key.shape[1]
    if groups > 1:  # grouped kv heads: each serves `groups` query heads
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    y = module._autotune_attend(query, key, value, dropout)
    return y.transpose(1, 2), None


def hf_workload(name: str, overrides: dict[str, Any] | None = None) -> Workload:
    """The workload ``hf:<model_type>`` with ``overrides`` (see the module docstring). The
    model is built once on the meta device here, so a bad config fails before anything runs."""
    settings = parse(name, overrides)
    config = build_config(settings)
    with torch.device("meta"):
        probe = HFCausalLM(build_hf_model(dataclasses.replace(settings, weights=None), probe_config(config)))
    seq_len = checked_seq_len(settings.seq_len, config, "workload.overrides.seq_len")
    if settings.weights:
        p = Path(settings.weights)
        if not p.exists():
            raise UserError(f"weights {settings.weights}: no such file or folder")

    def build() -> nn.Module:
        model = HFCausalLM(build_hf_model(settings, config))
        model.seq_len = seq_len
        return model

    probe.seq_len = seq_len
    return Workload(
        name=name,
        build_model=build,
        vocab_size=config.vocab_size,
        seq_len=seq_len,
        structure=HFAdapter(probe).supports(),
        overrides=dict(overrides or {}),
        shape=with_layers(HFAdapter(probe).shape(seq_len), config.num_hidden_layers),
    )


def probe_config(config: Any) -> Any:
    """``config`` cut to its first PROBE_LAYERS layers, for the model built on the meta device
    to read the shape of (:func:`autotune.workloads.with_layers` counts the rest)."""
    if config.num_hidden_layers <= PROBE_LAYERS:
        return config
    probe = dataclasses_copy(config)
    probe.num_hidden_layers = PROBE_LAYERS
    if getattr(config, "layer_types", None) is not None:
        probe.layer_types = config.layer_types[:PROBE_LAYERS]
    return probe


def checked_seq_len(seq_len: Any, config: Any, what: str) -> int:
    """``seq_len``, or the default (:func:`default_seq_len`) for None; a length the model's
    positions do not cover is a UserError naming ``what``."""
    positions = getattr(config, "max_position_embeddings", None)
    seq_len = default_seq_len(config) if seq_len is None else seq_len
    if not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len < 1 or (positions and seq_len > positions):
        raise UserError(f"{what}: {seq_len!r} must be a whole number from 1 to the model's {positions} positions")
    return seq_len


def workload_from_model(
    factory: Callable[[], nn.Module], *, seq_len: int | None = None, name: str = "hf", probe: nn.Module | None = None
) -> Workload:
    """A workload from ``factory() -> PreTrainedModel`` (``--workload module:factory``): the
    same adapter, structure and search as ``hf:`` models. ``seq_len``: tokens per sample, None
    the default (:func:`default_seq_len`); ``probe``: a model the factory already returned,
    else one is built on the meta device (on the CPU where the factory cannot do that).
    Floating-point weights are trained in fp32 whatever dtype the factory gave them."""
    if probe is None:
        try:
            with torch.device("meta"):
                probe = factory()
        except Exception:  # a factory that loads weights, say: built as it is
            probe = factory()
    if not hasattr(probe, "get_input_embeddings") or not hasattr(probe, "config"):
        raise UserError(
            f"workload {name}: the factory must return a transformers PreTrainedModel, got {type(probe).__name__}"
        )
    seq_len = checked_seq_len(seq_len, probe.config, f"workload {name}: seq_len")
    wrapped = HFCausalLM(probe)
    wrapped.seq_len = seq_len

    def build() -> nn.Module:
        model = HFCausalLM(factory().float())
        model.seq_len = seq_len
        return model

    return Workload(
        name=name,
        build_model=build,
        vocab_size=probe.config.vocab_size,
        seq_len=seq_len,
        structure=HFAdapter(wrapped).supports(),
        shape=HFAdapter(wrapped).shape(seq_len),
    )


__all__ = [
    "HFSettings",
    "HFCausalLM",
    "HFAdapter",
    "HFStage",
    "hf_workload",
    "workload_from_model",
    "overrides_from_config",
    "decoder_layers_fqn",
]
