"""Hugging Face causal LMs as workloads: ``--workload hf:<model_type>``.

- :mod:`~autotune.workloads.hf_config`: the workload's settings and the model config, read
  from a plan's overrides or a local ``config.json`` (the format is described there).
- :mod:`~autotune.workloads.hf_adapter`: :class:`HFCausalLM` (the model as our trainer calls
  it), :class:`HFAdapter` (what strategies ask) and :class:`HFStage` (a pipeline stage).
- here: building the model (:func:`build_hf_model`, fresh or with local weights) and the
  workloads: ``hf:<model_type>`` (:func:`hf_workload`), and a factory returning a
  ``PreTrainedModel`` (:func:`workload_from_model`).

``transformers`` is imported only by these three modules, which only ``hf:`` workloads load.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from autotune.errors import UserError
from autotune.workloads import Workload, with_layers
from autotune.workloads.hf_adapter import HFAdapter, HFCausalLM, HFStage, decoder_layers_fqn, tied_head
from autotune.workloads.hf_config import (
    HFSettings,
    attn_implementations,
    build_config,
    checked_seq_len,
    dataclasses_copy,
    one_line,
    overrides_from_config,
    parse,
    probe_config,
    quiet,
    rejections,
    transformers_module,
)


def build_hf_model(settings: HFSettings, config: Any) -> nn.Module:
    """A freshly initialised (or weight-loaded) PreTrainedModel on the CPU, in fp32 whatever
    the config's ``torch_dtype`` (``from_config`` would build in it), never remote code."""
    transformers = transformers_module()
    if settings.attn_implementation not in attn_implementations():
        raise UserError(
            f"attn_implementation {settings.attn_implementation!r}: expected one of {', '.join(attn_implementations())}"
        )
    try:
        with quiet(transformers):
            model = transformers.AutoModelForCausalLM.from_config(
                dataclasses_copy(config),
                attn_implementation=settings.attn_implementation,
                dtype=torch.float32,
                trust_remote_code=False,
            )
    except ImportError as e:
        raise UserError(f"hf:{settings.model_type}: {str(e).splitlines()[0]}") from None
    except (
        *rejections(),
        AssertionError,
        RuntimeError,
        IndexError,
    ) as e:  # e.g. a pad_token_id outside the vocabulary
        raise UserError(f"hf:{settings.model_type}: cannot build the model from this config ({one_line(e)})") from None
    if settings.weights:
        load_weights(model, settings.weights)
    return model


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
    tied = {"lm_head.weight"} if model.get_output_embeddings() is not None and tied_head(model) else set()
    missing = sorted(set(result.missing_keys) - tied)
    if missing or result.unexpected_keys:
        raise UserError(
            f"weights {path}: do not match the config (missing {missing[:3]}, unexpected {result.unexpected_keys[:3]})"
        )


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
