"""How the fused loss splits its tokens into chunks: arithmetic only (no torch, no triton), so
the cost model (``strategies/triton_kernels.py``'s term) counts the chunk the kernel holds."""

from __future__ import annotations

CHUNK_BYTES = 1 << 30
"""The logits of one chunk of tokens take at most about this much memory."""


def chunk_tokens(n_tokens: int, width: int, element_size: int, chunk_bytes: int = CHUNK_BYTES) -> int:
    """Tokens per chunk: as many as keep a chunk's logits (``width`` columns of
    ``element_size`` bytes) within ``chunk_bytes`` (at least 128), spread evenly over the chunks
    that takes."""
    most = max(128, chunk_bytes // max(width * element_size, 1))
    chunks = max(1, -(-n_tokens // most))
    return max(1, -(-n_tokens // chunks))
