"""An analytic cost model: peak memory and step time of a plan, before it is launched.

The planner prunes a trial predicted not to fit in device memory without launching it, and
reports the model's error against the trials that ran. Step time is FLOPs over the profile's
measured matmul rate at an achievable fraction, plus the memory-bound optimizer step.

Memory per process (bytes), for a model of P parameters, L layers, width h, vocab V, micro-batch
b and sequence s (t = b * s tokens), all read from the model adapter's ``ModelShape``:

    weights 4P + AdamW states 8P + gradients 4P                   (fp32 master copy)
    + activations  L * t * h * act_bytes(precision, compiled) * stored_fraction(checkpointing)
      * widths / 16 (the tensors a block saves, 16 of width h for the GPT; see layer_widths)
      (+ L * b * heads * s^2 * bytes for attention backends that store the score matrix)
    + logits       t * V_padded * logit_bytes(precision, compiled)

The per-token coefficients are counted from what autograd saves in this GPT (see
``Coefficients``) and fitted to peaks measured on an H200 (bench/results/single_device_h200.jsonl:
fp32 eager, bf16 eager with and without checkpointing, naive attention, accumulation and
bf16 + compile all land within 3% of the measured peak).
FLOPs follow PaLM appendix B: 6 N + 12 L h s per token, plus the replayed forward of every
checkpointed block; ``tests/test_costmodel.py`` checks them against FlopCounterMode.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from autotune.errors import UserError
from autotune.workloads import Workload

if TYPE_CHECKING:
    from autotune.workloads.adapter import ModelShape

# Attention backends that keep the (b, heads, s, s) score matrix for the backward pass.
_STORES_SCORES = {"naive", "math"}


@dataclass(frozen=True, kw_only=True, slots=True)
class Coefficients:
    """Bytes per token (per unit of width or vocab) that one step keeps alive."""

    act_eager_fp32: float = 64.0
    """Per layer per token per unit width, fp32 eager: 16 fp32 tensors of width h saved."""
    act_eager_mixed: float = 40.0
    """bf16/fp16 autocast eager: fp32 residual and norm inputs (4+4+4+4... ) plus bf16 matmul inputs."""
    act_compiled_fp32: float = 44.0
    """fp32 compiled: inductor recomputes pointwise ops instead of saving them."""
    act_compiled_mixed: float = 26.0
    """bf16/fp16 compiled."""
    logits_eager_fp32: float = 12.0
    """Per token per vocab entry, fp32 eager: logits, log-softmax, and their gradient."""
    logits_eager_mixed: float = 12.0
    """Autocast eager: bf16 logits, their fp32 upcast, log-softmax and gradient (fit: 11.7)."""
    logits_compiled_fp32: float = 8.0
    """Compiled fp32: the loss is fused; logits and their gradient remain."""
    logits_compiled_mixed: float = 3.0
    """Compiled bf16: the bf16 logits and a part of their gradient at a time (fit: 2.9)."""
    matmul_efficiency: float = 0.55
    """Fraction of the measured matmul rate a training step reaches on its matmuls."""
    eager_efficiency: float = 0.4
    """The same without compile (unfused pointwise work between matmuls)."""


@dataclass(kw_only=True, slots=True)
class Estimate:
    peak_memory_bytes: float
    """Predicted peak device memory per process."""
    step_time_s: float | None
    """Predicted optimizer-step time; None without a measured or datasheet matmul rate."""
    flops_per_step: float
    """Training FLOPs per optimizer step per process (recomputation included)."""
    breakdown: dict[str, float] = field(default_factory=dict)
    """Memory by part: weights, optimizer, gradients, activations, logits, scores."""


def _setting(configs: dict[str, Any], name: str, attr: str, default: Any) -> Any:
    cfg = configs.get(name)
    return getattr(cfg, attr, default) if cfg is not None else default


def checkpointed_blocks(configs: dict[str, Any], n_layers: int) -> int:
    """Blocks whose activations are recomputed in the backward pass."""
    cfg = configs.get("activation_checkpoint")
    if cfg is None:
        return 0
    if getattr(cfg, "mode", "full") == "full":
        return n_layers
    every = max(1, getattr(cfg, "every", 1))
    return len(range(0, n_layers, every))


def matmul_dtype(configs: dict[str, Any]) -> str:
    """The matmul rate a plan's steps run at: bf16 under bf16/fp16 autocast, tf32 when fp32
    matmuls may use it, else fp32 (PyTorch's default, the plain baseline's)."""
    dtype = _setting(configs, "precision", "dtype", "fp32")
    if dtype != "fp32":
        return "bf16"
    return "tf32" if _setting(configs, "precision", "tf32", False) else "fp32"


def padded_vocab(vocab: int, configs: dict[str, Any]) -> int:
    multiple = _setting(configs, "vocab_padding", "multiple", 1)
    return -(-vocab // multiple) * multiple


def shape_of(workload: Workload) -> ModelShape:
    """The workload's :class:`ModelShape` (its adapter's, computed once when it was loaded);
    a ValueError for a workload whose shape is not known."""
    if workload.shape is None:
        raise ValueError(f"the cost model needs the model's shape; workload {workload.name} has none")
    return workload.shape


def _block_matmuls(shape: ModelShape) -> int:
    """Matmul weights of all blocks: the model's minus the output head's."""
    return shape.matmul_params - shape.vocab_size * shape.d_model


def flops_per_step(workload: Workload, micro_batch: int, configs: dict[str, Any]) -> float:
    """Training FLOPs of one optimizer step in one process (PaLM: 6N + 12 L (nh hs) s per
    token, plus the replayed forward of every recomputed block)."""
    c = shape_of(workload)
    V = padded_vocab(c.vocab_size, configs)
    accum = _setting(configs, "grad_accum", "steps", 1)
    tokens = micro_batch * c.seq_len * accum
    block_params = _block_matmuls(c)
    attention = 12 * c.n_layers * c.attn_dim * c.seq_len
    total = 6 * (block_params + V * c.d_model) + attention
    k = checkpointed_blocks(configs, c.n_layers)
    # Recomputation replays a block's forward but stops early once every saved tensor is back
    # (torch.utils.checkpoint's early stop): the MLP's output projection is not replayed.
    recompute = 2 * block_params / c.n_layers + 4 * c.attn_dim * c.seq_len - 2 * c.d_model * c.d_ff
    return float(tokens * (total + k * recompute))


def layer_widths(shape: ModelShape) -> float:
    """Width-h tensors one block saves per token for its backward, counted as the GPT's: 16
    (``Coefficients.act_eager_fp32`` / 4 bytes) of which the MLP's hidden ones are 2 x d_ff
    (a gated MLP's 4 x d_ff: gate, up, act(gate), product), q/k/v 3 (grouped kv heads fewer),
    and 5 the norms, the residual and attention's output. 16 for the GPT at d_ff = 4h."""
    h = shape.d_model
    hidden = 2 * (shape.mlp_matrices - 1) * shape.d_ff
    qkv = shape.attn_dim + 2 * shape.n_kv_heads * shape.head_dim
    return (5 * h + hidden + qkv) / h


def estimate(
    workload: Workload,
    micro_batch: int,
    configs: dict[str, Any],
    *,
    matmul_flops: float | None = None,
    memory_bandwidth: float | None = None,
    coefficients: Coefficients = Coefficients(),
    processes: int = 1,
) -> Estimate:
    """Predict the cost of training ``workload`` at ``micro_batch`` with strategy ``configs``
    (name -> typed config, as from ``Plan.strategy_configs``) on each of ``processes``
    processes. Any workload whose :class:`ModelShape` is known (``workload.shape``: the
    built-in GPT's and Hugging Face models').

    Each chosen strategy's cost term then changes what the core counted, in apply order
    (:class:`CostTerms`, :func:`strategy_terms`). Several processes split the state as their
    mesh does (not yet checked against measured multi-GPU peaks: no two-GPU machine was lent
    since these strategies exist): tensor parallel divides each block's parameters and (with sequence
    parallel) activations by tp, pipeline parallel keeps L/pp blocks a stage and the
    micro-batches in flight, FSDP2 and ZeRO shard states over dp, offload moves them to the
    host. Step time divides the FLOPs by tp x pp and ignores communication."""
    c = shape_of(workload)
    k = coefficients
    dtype = _setting(configs, "precision", "dtype", "fp32")
    mixed = dtype != "fp32"
    compiled = "compile" in configs
    # Compiled block by block, the head and the loss stay eager: their logits cost what
    # eager logits cost (measured: 69 GiB at micro-batch 96, where the whole-model compile
    # takes 24 GiB; bench/results/plan-phase8-small, trial 7).
    loss_compiled = compiled and _setting(configs, "compile", "scope", "model") == "model"
    backend = _setting(configs, "attention", "backend", "sdpa")
    V = padded_vocab(c.vocab_size, configs)
    h, L, s, tokens = c.d_model, c.n_layers, c.seq_len, micro_batch * c.seq_len

    from autotune.mesh import mesh_shape

    dp, tp, pp = mesh_shape(processes, configs)
    block_params = c.block_params or _block_matmuls(c)
    # Embedding (and an untied head), position table and final norm stay whole (under TP
    # too); with PP the first and the last stage both hold the tied embedding/head.
    act_coef = {
        (False, False): k.act_eager_fp32, (False, True): k.act_eager_mixed,
        (True, False): k.act_compiled_fp32, (True, True): k.act_compiled_mixed,
    }[(compiled, mixed)]
    logit_coef = {
        (False, False): k.logits_eager_fp32, (False, True): k.logits_eager_mixed,
        (True, False): k.logits_compiled_fp32, (True, True): k.logits_compiled_mixed,
    }[(loss_compiled, mixed)]
    ckpt = checkpointed_blocks(configs, L)
    # A checkpointed block keeps only its fp32 input; one block is live again while recomputed.
    stored_layers = (L - ckpt) + ckpt * (4.0 / act_coef) * 16 / layer_widths(c) + (1 if ckpt else 0)
    # act_coef is per width-h tensor group of the GPT (16 of them); other shapes save other widths.
    activations = stored_layers * tokens * h * act_coef * layer_widths(c) / 16
    scores = 0.0
    if backend in _STORES_SCORES:
        # fp32: the softmax output; autocast: bf16 scores and the fp32 softmax (measured).
        score_bytes = 6 if mixed else 4
        scores = (L - ckpt + (1 if ckpt else 0)) * micro_batch * c.n_heads * s * s * score_bytes
    terms = CostTerms(
        shape=c, dp=dp, tp=tp, pp=pp, tokens_per_step=tokens * _setting(configs, "grad_accum", "steps", 1),
        block_params=block_params, other_params=c.vocab_tables * V * h + c.other_params,
        activations=activations, scores=scores, flops=flops_per_step(workload, micro_batch, configs),
    )
    for name, term in strategy_terms(configs):
        term(configs[name], terms)
    # The blocks' share of one process: tensor parallel splits each, pipeline stages hold L/pp.
    params = terms.block_params / terms.model_shards + terms.other_params
    breakdown = {
        "weights": 0.0 if terms.weights_on_host else 4.0 * params / terms.weight_shards,
        "optimizer": 0.0 if terms.optimizer_on_host else 8.0 * params / terms.optimizer_shards,
        "gradients": 4.0 * params / terms.gradient_shards,
        "activations": terms.activations,
        "logits": tokens * V * logit_coef,
        "scores": terms.scores / terms.model_shards,
    }
    flops = terms.flops / terms.model_shards
    step_time = None
    if matmul_flops:
        efficiency = k.matmul_efficiency if compiled else k.eager_efficiency
        step_time = flops / (matmul_flops * efficiency)
        if memory_bandwidth:
            # AdamW reads and writes weights, gradients and two moments: ~32 bytes per parameter.
            step_time += 32.0 * params / memory_bandwidth
    return Estimate(peak_memory_bytes=sum(breakdown.values()), step_time_s=step_time, flops_per_step=flops, breakdown=breakdown)


@dataclass(kw_only=True, slots=True)
class CostTerms:
    """One process's share of a training step as the core counts it from the model's shape,
    precision, compile, attention backend and checkpointing; each chosen strategy's declared
    term (``Strategy.cost``, see :func:`strategy_terms`) then changes it in place."""

    shape: ModelShape
    """The model's shape before any strategy (the workload's)."""
    dp: int
    """Data-parallel groups of the mesh."""
    tp: int
    """Tensor-parallel degree."""
    pp: int
    """Pipeline stages."""
    tokens_per_step: int
    """Tokens one process trains on per optimizer step (micro-batch x seq x accumulation)."""
    block_params: float
    """Parameters of all blocks of the whole model (a term adding experts adds here)."""
    other_params: float
    """Parameters every process holds whole: embedding, head, position table, final norm."""
    activations: float
    """Bytes of saved activations in this process."""
    scores: float
    """Bytes of stored attention scores, before :attr:`model_shards` divides them."""
    flops: float
    """Training FLOPs per optimizer step of the whole model, before :attr:`model_shards`."""
    model_shards: int = 1
    """Ways the blocks (their parameters, scores and FLOPs) are split: tp x pp."""
    weight_shards: float = 1.0
    """Data-parallel processes sharing one copy of the weights (ZeRO-3, FSDP2)."""
    gradient_shards: float = 1.0
    """... of the gradients (ZeRO-2 and up, FSDP2)."""
    optimizer_shards: float = 1.0
    """... of AdamW's moments (ZeRO-1 and up, FSDP2)."""
    weights_on_host: bool = False
    """The weights live in host memory (ZeRO-3 offload)."""
    optimizer_on_host: bool = False
    """AdamW's moments live in host memory (ZeRO offload)."""

    def shard(self, stage: int) -> None:
        """Shard over dp as ZeRO's ``stage`` does: 1 the moments, 2 also the gradients, 3 also the weights."""
        if stage >= 1:
            self.optimizer_shards = self.dp
        if stage >= 2:
            self.gradient_shards = self.dp
        if stage >= 3:
            self.weight_shards = self.dp


CostTerm = Callable[[Any, CostTerms], None]
"""A strategy's cost term: (its typed config, the terms) -> None, changing the terms."""


def strategy_terms(configs: dict[str, Any]) -> list[tuple[str, CostTerm]]:
    """The cost terms of the chosen strategies (each declares its ``Strategy.cost``), in apply order."""
    from autotune import catalog
    from autotune.apply import ORDER

    out = []
    for name in sorted(configs, key=lambda n: ORDER.index(n) if n in ORDER else len(ORDER)):
        try:
            term = catalog.get(name).cost
        except UserError:  # a name the catalog does not know has no term
            term = None
        if term is not None:
            out.append((name, term))
    return out


def __getattr__(name: str) -> Any:
    # The terms this module kept before their strategies declared them (``Strategy.cost``),
    # under their old names.
    if name in _MOVED_TERMS:
        from autotune import catalog

        return catalog.get(_MOVED_TERMS[name]).cost
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_MOVED_TERMS = {f"{n}_cost": n for n in ("tensor_parallel", "pipeline_parallel", "zero", "fsdp2")}
