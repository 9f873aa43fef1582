"""What a workload declares it supports, without torch: the structure tokens, the adapters'
refusal, the model's shape (:class:`ModelShape`) and the arithmetic strategies check a plan
with before anything is built.

The model adapters (:mod:`autotune.workloads.adapter`, which imports torch) re-export these,
so a strategy's ``check_workload`` and ``autotune show`` read them without loading torch.
"""

from __future__ import annotations

from dataclasses import dataclass

STRUCTURE = frozenset({"blocks", "attention", "mlp", "embed", "head", "vocab", "tp", "sp", "pp", "loss"})
"""Every token :meth:`ModelAdapter.supports` may return (see ``autotune.workloads``)."""


class NotSupported(Exception):
    """The adapter cannot do what was asked; the message says why (shown by --explain)."""


def declared(structure: frozenset[str]) -> frozenset[str]:
    """What a workload's declared ``structure`` lets strategies ask of its adapter.

    The tokens themselves: the built-in GPT's workloads declare everything its adapter serves
    (``autotune.workloads.GPT_STRUCTURE``), an hf: model's are its adapter's ``supports()``, a
    user's workload declares its own by hand."""
    return frozenset(structure)


def pipeline_split(n_blocks: int, stages: int) -> list[tuple[int, int]]:
    """Block ranges ``[start, stop)`` of ``stages`` pipeline stages, as even as they come."""
    if not 1 <= stages <= n_blocks:
        raise NotSupported(f"{stages} pipeline stages need at least as many blocks, the model has {n_blocks}")
    return [(i * n_blocks // stages, (i + 1) * n_blocks // stages) for i in range(stages)]


@dataclass(kw_only=True, slots=True)
class ModelShape:
    """The numbers the cost model, MFU and the mesh checks need, whatever the model's own
    config calls them."""

    d_model: int
    """Width of the residual stream."""
    n_layers: int
    """Number of repeated blocks."""
    n_heads: int
    """Query heads per block."""
    n_kv_heads: int
    """Key/value heads per block (= n_heads without grouped-query attention)."""
    head_dim: int
    """Width of one head (d_model / n_heads for most models, not all)."""
    d_ff: int
    """Hidden width of the MLP (of each of gate and up for a gated MLP)."""
    vocab_size: int
    """Tokens the model emits (the true vocabulary; padding never changes it)."""
    seq_len: int
    """Tokens per sample the workload trains on."""
    matmul_params: int
    """Weights taking part in a matmul per token: the blocks' matrices plus the output head
    (vocab_size x d_model); embedding lookups are not matmuls. Routed experts count with the
    share a token passes through (top_k / num_experts, see :func:`block_matmul_params`)."""
    block_params: int = 0
    """Every parameter of the blocks (matrices, norm scales, biases, all experts): what the
    weights, gradients and optimizer states are counted over. 0: not known (the cost model then
    takes the blocks' matrices)."""
    other_params: int = 0
    """Parameters outside the blocks and the vocabulary tables: position table, final norm."""
    vocab_tables: int = 1
    """Vocabulary-by-width tables held: 1 when the head shares the embedding's weight, else 2."""
    mlp_matrices: int = 2
    """Matrices of one block's MLP, in units of d_model x d_ff: 2 for fc/proj (GPT), 3 for a
    gated MLP (gate, up, down: SwiGLU; Phi-3's fused gate_up counts as two)."""
    # What one block keeps for its backward (the cost model's activations, see
    # costmodel.block_bytes), read off the block by :func:`saved_layout`. The defaults are the
    # built-in GPT's: two nn.LayerNorms, a fused qkv, GELU.
    norm_saved: int = 2
    """Tensors of width d_model (fp32) the block's norms keep: each norm's input, once where
    two norms read one (GPT-NeoX's parallel residual), and the normalised value of a norm
    written in Python (Hugging Face's RMSNorm: 4 for Llama's two, 8 for Gemma 2's four)."""
    norm_inputs: int = 2
    """Distinct inputs of the block's norms (what a compiled block keeps of them)."""
    attn_in_linears: int = 1
    """Linears reading the attention's input: 3 for separate q, k, v projections, 1 fused.
    Under autocast each casts that input to bf16 for itself, and each copy is kept."""
    mlp_in_linears: int = 1
    """Linears reading the MLP's input: 2 for separate gate and up, else 1."""
    mlp_saved: int = 2
    """Tensors of width d_ff the MLP keeps, eager: 2 for a plain MLP with a built-in
    activation (its input and output), 4 for a gated one (gate, act(gate), up, product), more
    where the activation is written in Python (GPT-2's gelu_new keeps 4 of its own: 5)."""
    rope_copies: bool = False
    """q and k are rotated out of a fused qkv output: the rotated q and k are new tensors, and
    the kernel's v (a view) keeps the whole fused output alive (Phi-3, GPT-NeoX)."""
    qk_norm: bool = False
    """q and k are normalised per head before attention (Qwen3, OLMo 2)."""
    logit_softcap: bool = False
    """The logits go through tanh soft-capping before the loss (Gemma 2): one more tensor of
    the vocabulary's width kept."""

    @property
    def attn_dim(self) -> int:
        """Width of the concatenated query heads: what attention's T x T matmuls run over."""
        return self.n_heads * self.head_dim

    def flops_per_token(self) -> int:
        """Training FLOPs per token, PaLM appendix B: 6 N + 12 L (nh hs) T (forward +
        backward). Grouped kv heads shrink N (smaller k/v projections), not the attention
        term: every query head still attends over T keys."""
        return 6 * self.matmul_params + 12 * self.n_layers * self.attn_dim * self.seq_len
