"""An analytic cost model: peak memory and step time of a plan, before it is launched.

The planner prunes a trial predicted not to fit in device memory without launching it (with a
margin learned from the study's own trials, ``planning.summary.memory_correction``), and reports the
model's error against the trials that ran (``bench/costmodel_check.py``).

Memory per process (bytes), for a model of P parameters, L blocks, width h, vocab V and
micro-batch b of sequences of s tokens (t = b * s tokens), all read from the model adapter's
``ModelShape`` (Hugging Face models' included, whatever their family):

    weights 4P + AdamW states 8P + gradients 4P                   (fp32 master copy)
    + activations  t * L * block_bytes: what one block keeps for its backward per token,
                   counted from what autograd saves in each family's block (the norms, the
                   bf16 copy autocast makes of a matmul's input for each linear reading it,
                   the attention kernel's q, k, v (n_kv_heads x head_dim wide), output and
                   logsumexp, the MLP's hidden tensors: 2 of d_ff for GELU, 4 for SwiGLU);
                   what inductor's partitioner keeps when compiled; a checkpointed block
                   keeps its fp32 input only
      (+ L * b * heads * s^2 * bytes where the kernel stores the scores: attention written
         out, SDPA's math backend, which SDPA in fp32 on grouped kv heads falls back to)
    + logits       t * V_padded * 12 eager: the forward keeps the fp32 log-softmax (the loss
                   upcasts bf16 logits), and where the backward starts its gradient and the
                   logits' are live with it; 2 compiled with the model (the bf16 logits)
    + casts        autocast's bf16 copies of the weights, kept for the backward (eager)

``tests/test_costmodel.py`` checks the activation and logit terms against the bytes autograd
saves in tiny models of each Hugging Face family (llama, qwen2, qwen3, mistral, gemma2, gpt2,
gpt_neox, phi3) on the CPU, FLOPs against FlopCounterMode, and the whole against the peaks and
step times of 45 trials measured on an H200 (the built-in GPT's and a Hugging Face Llama's).

Step time: the FLOPs (PaLM appendix B: 6 N + 12 L s (n_heads head_dim) per token, N the
matmul weights with the head, tied or not, plus the replayed forward of every checkpointed
block) over the profile's measured matmul rate at an efficiency that grows with the width
(a causal half-precision kernel doing half the attention term), plus the memory-bound passes
over the profile's copy bandwidth: the pointwise work around each block's matmuls (a multiple
of the bytes it keeps, smaller compiled), stored scores, the cross-entropy over the b x s x V
logits (several passes eager, about two compiled), AdamW's pass over the state; and at least
the host's time to launch each micro-batch's kernels.

The core counts the plain model: fp32, eager, SDPA's own attention kernel, every block's
activations kept, the model's own head and loss, one micro-batch a step, the whole model in
every process. What a strategy changes of that (autocast's dtype, a compiled model, a padded
vocabulary, checkpointed blocks, experts, sharded state, ...) is its own declared term
(``Strategy.cost``), which changes the :class:`CostTerms` the core counts from, in apply order.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from autotune.contract.cost import AttentionKernel, CostTerm, CostTerms, block_matmuls
from autotune.errors import UserError
from autotune.workloads import Workload

if TYPE_CHECKING:
    from autotune.workloads.structure import ModelShape


@dataclass(frozen=True, kw_only=True, slots=True)
class Coefficients:
    """What the counts leave to measurement: fitted to peaks and step times measured on an H200
    (and the compiled counts to the H100 studies since)."""

    logits_compiled_fp32: float = 8.0
    """Bytes per token and vocab entry when the loss is compiled with the model, fp32: the
    logits and their gradient."""
    logits_compiled_mixed: float = 2.0
    """... bf16/fp16: the bf16 logits; inductor's fused loss makes their gradient a part at a
    time. Fitted together with the compiled block's count (:func:`block_bytes`) once trials
    with our fused loss, which holds no logits, told the two apart: at 3.0 with blocks that
    kept neither the norms' outputs nor the whole MLP output, the unfused trials came out right
    (the logits over-counted what the blocks under-counted) and the fused ones 18-22% under
    (bench/results/vocab152k-plans-h100, phase8-small-kernels-h100)."""
    matmul_efficiency: float = 0.95
    """Fraction of the measured matmul rate (8192^3 products) a step's bf16 and tf32 matmuls
    reach on a wide model; narrower ones reach less (:attr:`matmul_half_width`)."""
    matmul_half_width: float = 200.0
    """Width at which they reach half of :attr:`matmul_efficiency`: the efficiency is
    matmul_efficiency x h / (h + this) (0.68 at h 512, 0.75 at 768, 0.80 at 1024, 0.86 at
    2048). Fitted with the coefficients below to 45 trials on an H200 (bench/costmodel_check.py)."""
    fp32_efficiency: float = 1.0
    """... its plain fp32 matmuls: slow enough that they run at the measured rate."""
    unaligned_head: float = 0.3
    """The same for the head's matmuls, eager in bf16 or tf32, when the (padded) vocabulary is
    not a multiple of 64 (cuBLAS' unaligned kernels; inductor pads them itself)."""
    pointwise_eager: float = 10.0
    """Bytes moved by the pointwise work around the matmuls per byte a block keeps, eager (the
    forward writes each, the backward reads it and writes its gradient)."""
    pointwise_compiled: float = 3.0
    """... compiled (fused: what is recomputed is never written)."""
    loss_passes_eager: float = 60.0
    """Bytes moved per logit by the eager loss: bf16 logits, their fp32 copy, log-softmax (its
    max and sum passes too), the nll gradient, log-softmax's backward and the cast back."""
    loss_passes_compiled: float = 10.0
    """... compiled with the model: the logits written and read in about two fused passes."""
    loss_passes_fused: float = 8.0
    """... by a fused head + loss (``CostTerms.head_loss_bytes``): the bf16 logits of each chunk
    written, read twice and written over with their gradient. Not fitted yet (no study on a GPU
    has one)."""
    optimizer_bytes: float = 44.0
    """Bytes per parameter of the optimizer step: AdamW reads weights, gradients, two moments
    and writes three (28), and clipping reads the gradients and scales them in place."""
    score_passes: float = 140.0
    """Bytes moved per element of the (b, heads, s, s) scores by the kernels that write them
    (``AttentionKernel.keeps_scores``): the scores, the mask, the softmax, and their gradients."""
    launch_eager_s: float = 2.5e-3
    """Host time to launch one block's forward and backward kernels, eager: a micro-batch
    takes at least L times this (the GPU waits on the host when its kernels are short)."""
    launch_compiled_s: float = 0.6e-3
    """... compiled (fewer, fused kernels)."""


@dataclass(kw_only=True, slots=True)
class Estimate:
    peak_memory_bytes: float
    """Predicted peak device memory per process."""
    step_time_s: float | None
    """Predicted optimizer-step time; None without a measured or datasheet rate of its matmul dtype."""
    flops_per_step: float
    """Training FLOPs per optimizer step per process (recomputation included)."""
    matmul_dtype: str
    """The matmul rate the step runs at: fp32, tf32 or bf16 (``CostTerms.matmul_dtype``)."""
    breakdown: dict[str, float] = field(default_factory=dict)
    """Memory by part: weights, optimizer, gradients, activations, logits, scores, casts, and
    recompute (a checkpointed block live again, where more than the logits' part)."""
    time_breakdown: dict[str, float] = field(default_factory=dict)
    """Step time by part (seconds): matmuls, pointwise, loss, optimizer."""


def sdpa_default(shape: ModelShape, *, autocast: bool) -> AttentionKernel:
    """The kernel SDPA picks itself: flash or memory-efficient, except that in fp32 with grouped
    kv heads it runs its math backend (the memory-efficient kernel takes no grouped heads and
    flash no fp32), which repeats k and v and keeps the scores (measured: the HF Llama-125M
    fp32 baseline's 9.8 GiB above the count, bench/results/hf-llama-125m-h200)."""
    math = not autocast and 0 < shape.n_kv_heads < shape.n_heads
    return AttentionKernel(keeps_scores=math, repeated_kv=math)


def shape_of(workload: Workload) -> ModelShape:
    """The workload's :class:`ModelShape` (its adapter's, computed once when it was loaded);
    a ValueError for a workload whose shape is not known."""
    if workload.shape is None:
        raise ValueError(f"the cost model needs the model's shape; workload {workload.name} has none")
    return workload.shape


def parameters(shape: ModelShape) -> int:
    """Parameters of the whole model: its blocks (their matrices where the rest is not known),
    the vocabulary tables and the rest (position table, final norm)."""
    return (
        (shape.block_params or block_matmuls(shape))
        + shape.vocab_tables * shape.vocab_size * shape.d_model
        + shape.other_params
    )


def plain_terms(shape: ModelShape, micro_batch: int, *, dp: int = 1, tp: int = 1, pp: int = 1) -> CostTerms:
    """The terms of the plain model: fp32, eager, SDPA's own attention kernel, every block's
    activations kept, the model's own head and loss, one micro-batch a step, the whole model in
    every process of a (dp, tp, pp) mesh."""
    attention = 12 * shape.n_layers * shape.attn_dim * shape.seq_len
    return CostTerms(
        shape=shape,
        dp=dp,
        tp=tp,
        pp=pp,
        micro_batch=micro_batch,
        vocab=shape.vocab_size,
        block_params=shape.block_params or block_matmuls(shape),
        block_flops=6 * block_matmuls(shape) + attention,
        attention_flops=attention,
    )


def flops_per_step(workload: Workload, micro_batch: int, configs: dict[str, Any]) -> float:
    """Training FLOPs of one optimizer step in one process (PaLM: 6N + 12 L (nh hs) s per
    token, as the chosen strategies' terms change them: the replayed forward of every
    recomputed block)."""
    return estimate(workload, micro_batch, configs).flops_per_step


def block_bytes(
    shape: ModelShape,
    *,
    mixed: bool,
    compiled: bool,
    repeated_kv: bool = False,
) -> float:
    """Bytes one block keeps for its backward per token. Eager, as autograd saves them: the
    norms' fp32 inputs (and normalised values, for norms written in Python), each matmul
    input (under autocast a bf16 copy per reading linear: 3 for separate q, k, v), the
    kernel's q, k, v, output and fp32 logsumexp (the rotated q, k beside a fused qkv output;
    per-head q/k norms' inputs and values), the MLP's hidden tensors. ``repeated_kv``: the
    kernel gets k and v repeated to every query head (``AttentionKernel.repeated_kv``).
    Compiled, inductor's partitioner recomputes the rest of the pointwise work: it keeps the
    norms' fp32 inputs and their outputs in the matmuls' dtype (the linears' inputs), the
    kernel's tensors and the MLP's hidden tensors (pre-activations and the activation's output).
    Measured: this count with 2 bytes a logit (``Coefficients.logits_compiled_mixed``) puts the
    compiled trials of every committed study within 4.4% (median 1.0%; 26 trials on an H200 and
    H100s, two with the fused loss); the earlier count (no norm outputs, half the GELU MLP's
    output) with 3 bytes a logit had a median of 5.4%, worst 17%, and the fused-loss trials
    under by 18-22%."""
    h, ff, heads = shape.d_model, shape.d_ff, shape.n_heads
    q = shape.attn_dim
    kv = q if repeated_kv else shape.n_kv_heads * shape.head_dim
    out = q or h  # the output projection's input: d_model wide where the heads are not known
    a = 2 if mixed else 4  # bytes of an activation: bf16 under autocast; norms and residual stay fp32
    if compiled:
        kept = (4 + a) * h * shape.norm_inputs + a * (q + 2 * kv + out) + 4 * heads + a * ff * shape.mlp_matrices
        return kept + (a * (q + kv) if shape.qk_norm else 0)
    linears = a * h * (shape.attn_in_linears + shape.mlp_in_linears) if mixed else 4 * h * 2
    attention = a * (q + 2 * kv + out) + 4 * heads
    if shape.rope_copies:
        attention += a * (q + kv)
    if shape.qk_norm:  # fp32 copies of q and k, the fp32 rsqrt a head, the normalised values
        attention += (4 + a) * (q + kv) + 4 * (heads + shape.n_kv_heads)
    return 4 * h * shape.norm_saved + linears + attention + a * ff * shape.mlp_saved


def outside_bytes(shape: ModelShape, *, mixed: bool, compiled: bool) -> float:
    """Bytes kept per token outside the blocks and the logits: the final norm's input (and
    normalised value), the head's input, the token ids."""
    h = shape.d_model
    if compiled:
        return 4 * h + 8
    norm = 4 * h * shape.norm_saved / max(1, shape.norm_inputs)
    return norm + (2 if mixed else 4) * h + 8


def logit_bytes(
    shape: ModelShape, *, mixed: bool, loss_compiled: bool, coefficients: Coefficients = Coefficients()
) -> tuple[float, float]:
    """(kept by the forward, live at the peak) bytes per token and vocab entry. Eager, the
    forward keeps the fp32 log-softmax (4: the loss upcasts bf16 logits; the bf16 logits are
    freed), and at the start of the backward its gradient and the logits' are live with it
    (12). Soft-capped logits (Gemma 2) keep tanh's output too. Compiled with the model:
    fitted (``Coefficients.logits_compiled_*``)."""
    a = 2 if mixed else 4
    cap = a if shape.logit_softcap else 0
    if loss_compiled:
        kept = coefficients.logits_compiled_mixed if mixed else coefficients.logits_compiled_fp32
        return kept, kept
    return 4.0 + cap, 12.0 + cap


def estimate(
    workload: Workload,
    micro_batch: int,
    configs: dict[str, Any],
    *,
    matmul_flops: Mapping[str, float] | None = None,
    memory_bandwidth: float | None = None,
    coefficients: Coefficients = Coefficients(),
    processes: int = 1,
) -> Estimate:
    """Predict the cost of training ``workload`` at ``micro_batch`` with strategy ``configs``
    (name -> typed config, as from ``Plan.strategy_configs``) on each of ``processes``
    processes. Any workload whose :class:`ModelShape` is known (``workload.shape``: the
    built-in GPT's and Hugging Face models'). ``matmul_flops``: the measured matmul rates by
    dtype (fp32, tf32, bf16, as a profile holds them), of which the step's matmul dtype picks
    one; the step time is None without it.

    The core counts the plain model (:func:`plain_terms`), each chosen strategy's cost term
    then changes the terms, in apply order (:func:`strategy_terms`). Several processes split
    the state as the terms say (not yet checked against measured multi-GPU peaks: no two-GPU
    machine was lent since those strategies exist); step time divides the FLOPs by the blocks'
    shards and ignores communication."""
    from autotune.contract.mesh import mesh_shape

    c = shape_of(workload)
    k = coefficients
    dp, tp, pp = mesh_shape(processes, configs)
    terms = plain_terms(c, micro_batch, dp=dp, tp=tp, pp=pp)
    for name, term in strategy_terms(configs):
        term(configs[name], terms)
    mixed, compiled = terms.autocast, terms.compiled
    kernel = terms.attention or sdpa_default(c, autocast=mixed)
    V = terms.vocab
    h, L, s, tokens = c.d_model, c.n_layers, c.seq_len, terms.tokens
    per_block = block_bytes(c, mixed=mixed, compiled=compiled, repeated_kv=kernel.repeated_kv)
    ckpt = terms.checkpointed
    # A checkpointed block keeps only its fp32 input.
    activations = tokens * ((L - ckpt) * per_block + ckpt * 4 * h)
    activations += tokens * outside_bytes(c, mixed=mixed, compiled=compiled)
    block_scores = 0.0
    if kernel.keeps_scores:
        # fp32: the softmax output; autocast: bf16 scores and the fp32 softmax (measured).
        block_scores = micro_batch * c.n_heads * s * s * (6 if mixed else 4)
    # The blocks' share of one process; every process holds the vocabulary tables and the rest whole.
    whole = c.vocab_tables * V * h + c.other_params
    params = terms.block_params / terms.model_shards + whole
    _, logits_peak = logit_bytes(c, mixed=mixed, loss_compiled=terms.loss_compiled, coefficients=k)
    casts = 0.0
    if mixed and not compiled:
        # Autocast's bf16 copy of each weight a matmul reads is kept for the backward.
        casts = 2.0 * (block_matmuls(c) * (L - ckpt) / L / terms.model_shards + V * h)
    breakdown = {
        "weights": 0.0 if terms.weights_on_host else 4.0 * params / terms.weight_shards,
        "optimizer": 0.0 if terms.optimizer_on_host else 8.0 * params / terms.optimizer_shards,
        "gradients": 4.0 * params / terms.gradient_shards,
        "activations": activations * terms.activation_share,
        "logits": tokens * V * logits_peak if terms.head_loss_bytes is None else terms.head_loss_bytes,
        "scores": (L - ckpt) * block_scores / terms.model_shards,
        "casts": casts,
    }
    # The peak is where the backward starts (the logits' gradients live), or where a
    # checkpointed block is recomputed (the logits freed by then) if its activations are more.
    recomputed = (tokens * per_block + block_scores) / terms.tp if ckpt else 0.0
    breakdown["recompute"] = max(0.0, recomputed - breakdown["logits"])
    flops = float(tokens * terms.micro_batches * (terms.block_flops + 6 * V * h)) / terms.model_shards
    step_time, times = None, {}
    rate = (matmul_flops or {}).get(terms.matmul_dtype)
    if rate:
        times = step_times(
            terms,
            kernel,
            flops=flops,
            params=params,
            per_block=per_block,
            matmul_flops=rate,
            memory_bandwidth=memory_bandwidth,
            coefficients=k,
        )
        step_time = sum(times.values())
    return Estimate(
        peak_memory_bytes=sum(breakdown.values()),
        step_time_s=step_time,
        flops_per_step=flops,
        matmul_dtype=terms.matmul_dtype,
        breakdown=breakdown,
        time_breakdown=times,
    )


def step_times(
    terms: CostTerms,
    kernel: AttentionKernel,
    *,
    flops: float,
    params: float,
    per_block: float,
    matmul_flops: float,
    memory_bandwidth: float | None,
    coefficients: Coefficients = Coefficients(),
) -> dict[str, float]:
    """Seconds of one optimizer step by part: the matmuls (and attention) at the measured
    rate's achievable share, then, with a measured bandwidth, the memory-bound passes (the
    pointwise work around the matmuls, the stored scores, the loss over the logits, AdamW),
    and the host's launch time where it exceeds the GPU's work of a micro-batch."""
    k, c = coefficients, terms.shape
    mixed, compiled = terms.autocast, terms.compiled
    V, h, L = terms.vocab, c.d_model, c.n_layers
    tokens = terms.tokens * terms.micro_batches
    ckpt = terms.checkpointed
    fp32 = terms.matmul_dtype == "fp32"
    rate = matmul_flops * (k.fp32_efficiency if fp32 else k.matmul_efficiency * h / (h + k.matmul_half_width))
    # PaLM's attention term counts the whole s x s square; a causal half-precision kernel
    # skips the tiles above the diagonal (of those a term kept: a sparse mask's share). In
    # fp32 SDPA runs the memory-efficient kernel without tensor cores: it was measured as slow
    # as the whole square at the fp32 rate (phase8-long, seq 8192).
    attention = float(tokens * terms.attention_flops)
    causal = mixed and not kernel.keeps_scores
    skipped = 0.5 * attention / terms.model_shards if causal else 0.0
    times = {"matmuls": (flops - skipped) / rate}
    if not compiled and not fp32 and V % 64:
        head = 6.0 * tokens * V * h  # forward and backward of the head
        times["matmuls"] += head / rate * (1.0 / k.unaligned_head - 1.0)
    if memory_bandwidth:
        pointwise = k.pointwise_compiled if compiled else k.pointwise_eager
        # A recomputed block's forward runs twice: about half its pointwise traffic again.
        kept = (L + 0.5 * ckpt) * per_block + outside_bytes(c, mixed=mixed, compiled=compiled)
        times["pointwise"] = pointwise * tokens * kept / terms.model_shards / memory_bandwidth
        if kernel.keeps_scores:
            scores = (L + ckpt) * tokens * c.n_heads * c.seq_len  # b x heads x s^2 per block
            times["scores"] = k.score_passes * scores / terms.model_shards / memory_bandwidth
        passes = k.loss_passes_compiled if terms.loss_compiled else k.loss_passes_eager
        if terms.head_loss_bytes is not None:
            passes = k.loss_passes_fused
        times["loss"] = passes * tokens * V / memory_bandwidth
        times["optimizer"] = k.optimizer_bytes * params / max(terms.optimizer_shards, 1.0) / memory_bandwidth
    # The host launches each micro-batch's kernels; the GPU waits where they are short.
    host = terms.micro_batches * L / max(terms.pp, 1) * (k.launch_compiled_s if compiled else k.launch_eager_s)
    device = sum(v for name, v in times.items() if name != "optimizer")
    if host > device:
        times["launch"] = host - device
    return times


def strategy_terms(configs: dict[str, Any]) -> list[tuple[str, CostTerm]]:
    """The cost terms of the chosen strategies (each declares its ``Strategy.cost``), in apply order."""
    from autotune import catalog
    from autotune.apply import order

    applied = order()
    out = []
    for name in sorted(configs, key=lambda n: applied.index(n) if n in applied else len(applied)):
        try:
            term = catalog.get(name).cost
        except UserError:  # a name the catalog does not know has no term
            term = None
        if term is not None:
            out.append((name, term))
    return out
