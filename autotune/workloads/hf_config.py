"""Reading an ``hf:`` workload's model config: ``--workload hf:<model_type>``.

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
hf[:<type>] --workload-config PATH``.

Imports neither torch nor transformers at module level: transformers is imported when a
config is read.
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
from pathlib import Path
from typing import Any

from autotune.errors import UserError
from autotune.workloads import PROBE_LAYERS

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


def transformers_module() -> Any:
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
    except (UserError, *rejections()):
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
    transformers = transformers_module()
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
        with quiet(
            transformers
        ):  # a copy: transformers writes into the dicts it is given (rope_theta into rope_scaling)
            return transformers.AutoConfig.for_model(settings.model_type, **copy.deepcopy(settings.config))
    except rejections() as e:
        raise UserError(
            f"hf:{settings.model_type}: transformers {transformers.__version__} rejects this config ({one_line(e)})"
        ) from None


def unread_fields(model_type: str, fields: dict[str, Any]) -> list[str]:
    """The fields the family's config does not define, which transformers keeps as plain
    attributes (a typo among them trains the default): GPT-2's published ``n_ctx``, say."""
    transformers = transformers_module()
    default = transformers.AutoConfig.for_model(model_type)
    known = set(default.to_dict()) | set(getattr(default, "attribute_map", {}))
    with quiet(transformers):
        kept = transformers.AutoConfig.for_model(model_type, **copy.deepcopy(fields)).to_dict()
    return sorted(k for k in fields if k not in known and k not in OURS and k in kept)


def rejections() -> tuple[type[BaseException], ...]:
    """What transformers raises for a config it rejects: huggingface_hub's strict-dataclass
    validation (a type mismatch, a failed check), and plain errors of older checks."""
    from huggingface_hub.errors import StrictDataclassError

    return (StrictDataclassError, TypeError, ValueError, KeyError, AttributeError)


def one_line(e: BaseException) -> str:
    text = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
    return text if isinstance(e, ValueError) and text else f"{type(e).__name__}: {text}"


class quiet:
    """transformers' advice while a config or model is built (token ids outside a scaled-down
    vocabulary, deprecated names) stays off the screen: a command prints one line or its result."""

    def __init__(self, transformers: Any) -> None:
        self.logging = transformers.utils.logging

    def __enter__(self) -> None:
        self.level = self.logging.get_verbosity()
        self.logging.set_verbosity_error()

    def __exit__(self, *exc: object) -> None:
        self.logging.set_verbosity(self.level)


def dataclasses_copy(config: Any) -> Any:
    """A private copy: each model gets its own config (resizing writes vocab_size into it)."""
    return type(config).from_dict(config.to_dict())


def default_seq_len(config: Any) -> int:
    positions = getattr(config, "max_position_embeddings", None)
    return min(positions, DEFAULT_SEQ_LEN) if positions else DEFAULT_SEQ_LEN


def layer_types(config: Any) -> list[str]:
    """Each layer's attention type, as the model builds its masks: the config's
    ``layer_types`` (Gemma 2, Qwen), else sliding wherever the config has a window (Mistral,
    Phi-3), else full."""
    types = getattr(config, "layer_types", None)
    if types is None:
        sliding = getattr(config, "sliding_window", None) is not None
        types = ["sliding_attention" if sliding else "full_attention"] * config.num_hidden_layers
    return list(types)


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
