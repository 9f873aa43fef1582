"""Hugging Face causal LMs as our trainer and strategies see them.

The model is wrapped in :class:`HFCausalLM`: ``forward(idx, targets) -> loss`` as our trainer
calls it, ``blocks`` the decoder's own layer list (so checkpointing, per-block compile and
FSDP2 work on it), and :meth:`HFCausalLM.adapter` the :class:`HFAdapter` strategies ask.
:class:`HFStage` is a pipeline stage of a Llama-layout model.

Targets are not shifted twice: our loader gives ``y`` = ids shifted by one already, and HF's
own loss would shift ``labels`` again, so the loss is computed here from the logits and ``y``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from autotune.errors import UserError
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
from autotune.workloads.hf_config import attn_implementations, default_seq_len, layer_types


def tied_head(model: nn.Module) -> bool:
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
        tied = (self.embedding(), self.hf.get_output_embeddings()) if tied_head(self.hf) else ()
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


STAGE_MASKS = ("full_attention", "sliding_attention")
"""The layer types whose masks a pipeline stage makes (:class:`HFStage`)."""


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
