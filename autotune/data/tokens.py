"""The token file format: a flat array of token ids behind a fixed header, memory-mapped.

Token file format, version 1. A fixed 256-byte header, little-endian, then the ids::

    offset  size  field
         0     8  magic b"ATTOKENS"
         8     4  format version, uint32 (= 1)
        12     4  dtype code, uint32: 2 = uint16 ids (vocab size < 65536), 4 = uint32 ids
        16     8  token count, uint64
        24     4  vocab size, uint32 (every id is below it)
        28   228  reserved, zero
       256     -  token count ids of the dtype's width
"""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from autotune.errors import UserError
from autotune.schema import write_bytes_atomic

MAGIC = b"ATTOKENS"
FORMAT_VERSION = 1
HEADER_BYTES = 256
_HEADER = struct.Struct("<8sIIQI")  # magic, version, dtype code, token count, vocab size
_DTYPES = {2: np.dtype("<u2"), 4: np.dtype("<u4")}


@dataclass(kw_only=True, slots=True)
class TokenFile:
    tokens: np.ndarray
    """The token ids, memory-mapped read-only (uint16 or uint32)."""
    vocab_size: int
    """Every id is below this."""


def _dtype_code(vocab_size: int) -> int:
    return 2 if vocab_size < 65536 else 4


def write_tokens(path: str | os.PathLike, ids: Sequence[int] | np.ndarray, vocab_size: int) -> None:
    """Write ``ids`` as a token file, atomically (temporary file, fsync, rename)."""
    if not 0 < vocab_size < 2**32:
        raise ValueError(f"vocab_size {vocab_size} out of range")
    code = _dtype_code(vocab_size)
    ids = np.asarray(ids)
    if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
        raise ValueError(f"ids must be a flat integer array, got {ids.dtype} of shape {ids.shape}")
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        raise ValueError(f"token ids must lie in [0, {vocab_size}), got [{ids.min()}, {ids.max()}]")
    header = _HEADER.pack(MAGIC, FORMAT_VERSION, code, ids.size, vocab_size).ljust(HEADER_BYTES, b"\0")
    body = np.ascontiguousarray(ids, dtype=_DTYPES[code])
    write_bytes_atomic(path, [header, memoryview(body).cast("B")])


def read_tokens(path: str | os.PathLike) -> TokenFile:
    """Memory-map a token file after checking its header. A bad file is a UserError."""
    p = Path(path)
    try:
        size = p.stat().st_size
        with p.open("rb") as f:
            header = f.read(HEADER_BYTES)
    except FileNotFoundError:
        raise UserError(f"token file {p}: no such file") from None
    except OSError as e:
        raise UserError(f"token file {p}: cannot read ({e.strerror})") from None
    dtype, count, vocab_size = _parse_header(header, size, p)
    if count == 0:  # an empty file cannot be mapped
        return TokenFile(tokens=np.empty(0, dtype), vocab_size=vocab_size)
    tokens = np.memmap(p, dtype=dtype, mode="r", offset=HEADER_BYTES, shape=(count,))
    return TokenFile(tokens=tokens, vocab_size=vocab_size)


def _parse_header(header: bytes, size: int, p: Path) -> tuple[np.dtype, int, int]:
    def bad(problem: str) -> UserError:
        return UserError(f"token file {p}: {problem}")

    if not header.startswith(MAGIC) and not MAGIC.startswith(header):
        raise bad(f"not an autotune token file (magic {header[:8]!r}, expected {MAGIC!r})")
    if len(header) < HEADER_BYTES:
        raise bad(f"truncated header ({size} bytes, expected at least {HEADER_BYTES})")
    _, version, code, count, vocab_size = _HEADER.unpack_from(header)
    if version != FORMAT_VERSION:
        raise bad(f"format version {version} is not supported (expected {FORMAT_VERSION})")
    if code not in _DTYPES or vocab_size == 0 or code != _dtype_code(vocab_size):
        raise bad(f"dtype code {code} does not fit vocab size {vocab_size}")
    if any(header[_HEADER.size :]):
        raise bad("reserved header bytes are not zero")
    expected = HEADER_BYTES + count * code
    if size != expected:
        what = "truncated" if size < expected else "trailing bytes"
        raise bad(f"{what}: header says {count} tokens ({expected} bytes), file has {size} bytes")
    return _DTYPES[code], count, vocab_size
