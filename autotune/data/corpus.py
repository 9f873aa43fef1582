"""Datasets: text tokenized once into a directory of token files, the default corpus, and
the identity of what a plan's figures were measured on.

The nanoGPT / llm.c convention: a dataset is a directory holding ``train.bin`` and
``val.bin`` (every token id of the text, one after another, in the format of
:mod:`autotune.data.tokens`), the ``tokenizer.json`` that made them (Hugging Face
``tokenizers``) and a small ``meta.json`` (:class:`DataMeta`).

Texts are separated by the tokenizer's ``<|endoftext|>`` token when it has one. With no data
given, :func:`default_dataset` builds a corpus from the Python standard library's sources,
so a fresh install can plan and train with nothing downloaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import sysconfig
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from autotune.data.tokens import FORMAT_VERSION, TokenFile, read_tokens, write_tokens
from autotune.errors import SchemaError, UserError
from autotune.schema import from_dict, fsync_dir, read_json, to_dict, write_bytes_atomic, write_json_atomic

EOT = "<|endoftext|>"
"""Special token appended after each text; id 0 in tokenizers trained here."""
_MIN_TRAINED_VOCAB = 257  # the 256 byte tokens and EOT
MAX_VOCAB = 2**20
"""Tokens of a vocabulary beyond any model's (published ones have up to 262,144). The tokenizers
library's trainer aborts the process on one of 2**31 (it allocates for every id first)."""
_DOC_CHARS = 1 << 14
"""Texts are cut into documents of about this many characters (train/val split unit)."""
_DOC_BREAK = re.compile(r"\n(?=\S)")
"""A line start before a non-space: a pre-token boundary, so cutting there changes no ids."""
_VAL_FRACTION = 0.02
"""Default share of the tokens held out for validation loss."""
_ENCODE_BATCH = 1024
"""Documents per encode_batch call: parallel, without holding every Encoding at once."""

_CORPUS_BUILD = 2
"""Bump when the default corpus's rules (file choice, split, tokenizer, meta) change.
2: meta.json records the recipe and the identity."""
_CORPUS_MAX_BYTES = 16_000_000
"""Cap on the default corpus: about 5 s to build at vocab 4096 on 2 cores."""
_CORPUS_SKIP = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "encodings"})
"""Directories left out of the default corpus: tests, third-party code, codec tables."""


# --- datasets: prepare, default corpus, open ----------------------------------------------


@dataclass(kw_only=True, slots=True)
class DataMeta:
    """``meta.json`` of a dataset directory."""

    format_version: int
    """Version of the token file format of train.bin and val.bin."""
    vocab_size: int
    """Token ids are below this: the vocabulary the model needs."""
    tokenizer_vocab_size: int
    """Tokens the tokenizer has; at most vocab_size (training may find fewer merges)."""
    train_tokens: int
    """Tokens in train.bin."""
    val_tokens: int
    """Tokens in val.bin."""
    source: str
    """Where the text came from, for people."""
    recipe: str = "prepared"
    """How the tokens were made: "prepared" (`autotune data prepare`) or "default corpus build N"."""
    identity: str | None = None
    """"sha256:<hex>" of the token files, the tokenizer and the recipe (:func:`data_identity`);
    None in datasets made before it was recorded (computed and cached on first use)."""


@dataclass(kw_only=True, slots=True)
class Dataset:
    path: Path
    """The dataset directory."""
    meta: DataMeta
    """Its meta.json."""
    train: TokenFile
    """train.bin, memory-mapped."""
    val: TokenFile
    """val.bin, memory-mapped."""


def open_dataset(path: str | os.PathLike) -> Dataset:
    """Open a dataset directory made by :func:`prepare` or :func:`default_dataset`."""
    p = Path(path)
    if not p.is_dir():
        raise UserError(f"dataset {p}: no such directory")
    meta = from_dict(DataMeta, read_json(p / "meta.json", "dataset meta"), str(p / "meta.json"))
    if meta.format_version != FORMAT_VERSION:
        raise SchemaError(str(p / "meta.json"), f"format version {meta.format_version} is not supported")
    return Dataset(path=p, meta=meta, train=read_tokens(p / "train.bin"), val=read_tokens(p / "val.bin"))


def prepare(
    texts: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    vocab_size: int,
    tokenizer_file: str | os.PathLike | None = None,
    val_fraction: float = _VAL_FRACTION,
) -> DataMeta:
    """Tokenize UTF-8 text files into a dataset directory; returns its meta.

    Trains a byte-level BPE tokenizer of ``vocab_size`` on the texts, or uses
    ``tokenizer_file`` (a ``tokenizer.json``) whose vocabulary must fit in ``vocab_size``.
    About ``val_fraction`` of the tokens, whole documents picked by a fixed seed, go to
    val.bin. Bad input is a UserError raised before anything is written.
    """
    if not 0 < val_fraction < 0.5:
        raise UserError(f"val fraction {val_fraction} must lie in (0, 0.5)")
    given: Tokenizer | None = None  # loaded before the (long) reading, to fail early
    if tokenizer_file is None:
        _check_trainable_vocab(vocab_size)
    else:
        _check_vocab(vocab_size)
        given = _load_tokenizer(Path(tokenizer_file), vocab_size)
    _check_out_dir(Path(out_dir))
    contents = [_read_text(Path(t)) for t in texts]
    if not any(contents):
        raise UserError("no text to tokenize")
    docs, ends = _documents(contents)
    tokenizer = given if given is not None else _train_tokenizer(docs, vocab_size)
    source = ", ".join(str(t) for t in texts)
    return _write_dataset(Path(out_dir), docs, ends, tokenizer, vocab_size, val_fraction, source)


def _check_out_dir(out: Path) -> None:
    """``out`` must be a new folder, an empty one, or a dataset to write again (it holds
    meta.json) in a folder this process may write: never a run's or anything else's."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / "meta.json").is_file():
        raise UserError(
            f"--out {out}: a folder holding other files, not a dataset (no meta.json); give a new or empty folder"
        )
    existing = next(p for p in (out, *out.absolute().parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"--out {out}: cannot write in {existing}")


def _read_text(p: Path) -> str:
    if p.exists() and not p.is_dir() and not p.is_file():  # a device or a pipe: it may never end
        raise UserError(f"text file {p}: not a regular file")
    try:
        return p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"text file {p}: no such file") from None
    except IsADirectoryError:
        raise UserError(f"text file {p}: is a directory (give the files)") from None
    except UnicodeDecodeError as e:
        raise UserError(f"text file {p}: not UTF-8 (byte {e.start})") from None
    except OSError as e:
        raise UserError(f"text file {p}: cannot read ({e.strerror})") from None


def _documents(texts: Sequence[str]) -> tuple[list[str], list[bool]]:
    """Cut texts into documents of about _DOC_CHARS at line starts.

    Returns the documents and, for each, whether it ends its text (EOT goes after it).
    """
    docs: list[str] = []
    ends: list[bool] = []
    for text in texts:
        start = 0
        while start < len(text):
            cut = _DOC_BREAK.search(text, start + _DOC_CHARS)
            end = cut.end() if cut else len(text)
            docs.append(text[start:end])
            ends.append(end == len(text))
            start = end
    return docs, ends


def _check_trainable_vocab(vocab_size: int) -> None:
    if vocab_size < _MIN_TRAINED_VOCAB:
        raise UserError(f"vocab size {vocab_size} is too small: a byte-level BPE needs {_MIN_TRAINED_VOCAB}")
    _check_vocab(vocab_size)


def _check_vocab(vocab_size: int) -> None:
    if vocab_size > MAX_VOCAB:
        raise UserError(f"vocab size {vocab_size:,} is more than {MAX_VOCAB:,} tokens")


def _train_tokenizer(docs: list[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE (GPT-2 style), deterministic for the same documents."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(docs, trainer, length=len(docs))
    return tokenizer


def _load_tokenizer(p: Path, vocab_size: int) -> Tokenizer:
    if not p.is_file():
        raise UserError(f"tokenizer {p}: no such file")
    try:
        tokenizer = Tokenizer.from_file(str(p))
    except Exception as e:  # tokenizers raises a bare Exception on bad JSON
        raise UserError(f"tokenizer {p}: not a tokenizers JSON file ({str(e).splitlines()[0]})") from None
    have = tokenizer.get_vocab_size(with_added_tokens=True)
    if have > vocab_size:
        raise UserError(f"tokenizer {p} has {have} tokens, more than the requested vocab size {vocab_size}")
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer


def _encode(tokenizer: Tokenizer, docs: list[str], ends: list[bool]) -> list[np.ndarray]:
    """Token ids of each document, EOT appended where a text ends (if the tokenizer has EOT)."""
    eot = tokenizer.token_to_id(EOT)
    out: list[np.ndarray] = []
    for i in range(0, len(docs), _ENCODE_BATCH):
        batch = tokenizer.encode_batch(docs[i : i + _ENCODE_BATCH], add_special_tokens=False)
        for enc, end in zip(batch, ends[i : i + _ENCODE_BATCH]):
            ids = enc.ids + [eot] if end and eot is not None else enc.ids
            out.append(np.array(ids, dtype=np.uint32))
    return out


def _val_mask(sizes: np.ndarray, fraction: float) -> np.ndarray:
    """Which documents form the validation split: a seeded random pick, about ``fraction``
    of the tokens, never all of them."""
    if len(sizes) < 2:
        raise UserError(f"too little text to split into train and val (need over {_DOC_CHARS} characters)")
    order = np.random.default_rng(0).permutation(len(sizes))
    reached = np.cumsum(sizes[order]) >= fraction * sizes.sum()
    n_val = min(int(np.argmax(reached)) + 1, len(sizes) - 1)
    mask = np.zeros(len(sizes), dtype=bool)
    mask[order[:n_val]] = True
    return mask


def _write_dataset(
    out: Path,
    docs: list[str],
    ends: list[bool],
    tokenizer: Tokenizer,
    vocab_size: int,
    val_fraction: float,
    source: str,
    recipe: str = "prepared",
) -> DataMeta:
    ids = _encode(tokenizer, docs, ends)
    is_val = _val_mask(np.array([len(d) for d in ids]), val_fraction)
    train = np.concatenate([d for d, v in zip(ids, is_val) if not v])
    val = np.concatenate([d for d, v in zip(ids, is_val) if v])
    meta = DataMeta(
        format_version=FORMAT_VERSION,
        vocab_size=vocab_size,
        tokenizer_vocab_size=tokenizer.get_vocab_size(with_added_tokens=True),
        train_tokens=len(train),
        val_tokens=len(val),
        source=source,
        recipe=recipe,
    )
    out.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(out / "tokenizer.json", tokenizer.to_str().encode())
    write_tokens(out / "train.bin", train, vocab_size)
    write_tokens(out / "val.bin", val, vocab_size)
    meta.identity = _compute_identity(out, meta)
    write_json_atomic(out / "meta.json", to_dict(meta))  # last: marks the dataset complete
    return meta


def default_dataset(vocab_size: int, cache_dir: str | os.PathLike | None = None) -> Path:
    """The default corpus (Python standard library sources) at ``vocab_size``; its directory.

    Built once per machine and vocab size under ``cache_dir`` (default
    ``$AUTOTUNE_CACHE/data``, else ``~/.cache/autotune/data``); later calls only check that
    it is there. Safe when several processes call it at once: one builds (into a temporary
    directory, renamed into place when complete), the others wait and use the result.
    """
    _check_trainable_vocab(vocab_size)
    stdlib, files = _stdlib_files()
    root = Path(cache_dir) if cache_dir is not None else _cache_root()
    final = root / f"stdlib-v{vocab_size}-{_corpus_key(vocab_size, files)}"
    if (final / "meta.json").is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    with _file_lock(root / f".{final.name}.lock"):
        if not (final / "meta.json").is_file():
            _build_default(stdlib, files, vocab_size, final)
    return final


def _cache_root() -> Path:
    return Path(os.environ.get("AUTOTUNE_CACHE") or "~/.cache/autotune").expanduser() / "data"


def _stdlib_files() -> tuple[Path, list[tuple[str, int]]]:
    """The standard library's .py files (relative path, size), sorted, up to the size cap."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    found: list[tuple[str, int]] = []
    for dirpath, dirnames, filenames in os.walk(stdlib):
        dirnames[:] = [d for d in dirnames if d not in _CORPUS_SKIP]  # prune: don't walk them
        for name in filenames:
            p = Path(dirpath, name)
            if name.endswith(".py") and p.is_file():
                found.append((p.relative_to(stdlib).as_posix(), p.stat().st_size))
    files: list[tuple[str, int]] = []
    total = 0
    for rel, size in sorted(found):
        if total + size > _CORPUS_MAX_BYTES:
            break
        files.append((rel, size))
        total += size
    if not files:
        raise UserError(f"no Python sources under {stdlib} to build the default corpus from; give --text")
    return stdlib, files


def _corpus_key(vocab_size: int, files: list[tuple[str, int]]) -> str:
    spec = {"format": FORMAT_VERSION, "build": _CORPUS_BUILD, "vocab": vocab_size, "files": files}
    return hashlib.sha256(json.dumps(spec).encode()).hexdigest()[:16]


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    import fcntl  # POSIX only, like the rest of the training stack

    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _build_default(stdlib: Path, files: list[tuple[str, int]], vocab_size: int, final: Path) -> None:
    texts = [(stdlib / rel).read_text(encoding="utf-8", errors="replace") for rel, _ in files]
    docs, ends = _documents(texts)
    tokenizer = _train_tokenizer(docs, vocab_size)
    megabytes = sum(size for _, size in files) / 1e6
    version = ".".join(map(str, sys.version_info[:3]))
    source = f"Python {version} standard library, {len(files)} files ({megabytes:.1f} MB) under {stdlib}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        recipe = f"default corpus build {_CORPUS_BUILD}"
        _write_dataset(tmp, docs, ends, tokenizer, vocab_size, _VAL_FRACTION, source, recipe)
        os.rename(tmp, final)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (final / "meta.json").is_file():  # not a lost race (no working lock): a real error
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(final.parent)


# --- identity: what a plan's figures were measured on ------------------------------------

_IDENTITY_FILES = ("train.bin", "val.bin", "tokenizer.json")
"""The files whose bytes the identity covers (a missing one counts as empty)."""


def data_identity(path: str | os.PathLike) -> str:
    """ "sha256:<hex>" of the dataset in ``path``: its token files' and tokenizer's bytes and
    its recipe (format, vocab, how it was made; not ``source``, which names local paths).

    Read from meta.json when recorded there; else computed (a hash of the files, about a
    second per 100 MB) and cached in meta.json, best effort (a read-only directory is fine)."""
    p = Path(path)
    meta_path = p / "meta.json"
    meta = from_dict(DataMeta, read_json(meta_path, "dataset meta"), str(meta_path))
    if meta.identity is not None:
        return meta.identity
    meta.identity = _compute_identity(p, meta)
    try:
        write_json_atomic(meta_path, to_dict(meta))
    except OSError:
        pass  # not ours to write: computed again next time
    return meta.identity


def _compute_identity(path: Path, meta: DataMeta) -> str:
    outer = hashlib.sha256()
    for name in _IDENTITY_FILES:
        inner = hashlib.sha256()
        if (path / name).is_file():
            with (path / name).open("rb") as f:
                while chunk := f.read(1 << 20):
                    inner.update(chunk)
        outer.update(f"{name}:{inner.hexdigest()}\n".encode())
    recipe = {"format_version": meta.format_version, "vocab_size": meta.vocab_size, "recipe": meta.recipe}
    outer.update(json.dumps(recipe, sort_keys=True).encode())
    return f"sha256:{outer.hexdigest()}"


def source_identity(source: str, vocab_size: int) -> str:
    """The identity of a plan's ``train.data`` (``"default"`` or a dataset directory) at the
    workload's ``vocab_size``; "default" is built first if it is not there yet."""
    if source == "default":
        return data_identity(default_dataset(vocab_size))
    if not (Path(source) / "meta.json").is_file():
        raise UserError(f"data {source}: no meta.json there (make one with `autotune data prepare`)")
    return data_identity(source)


def plan_data_identity(plan: Any, override: str | None = None) -> str | None:
    """The identity of the data ``plan`` trains on (``override``: a --data directory instead);
    None for random tokens."""
    if plan.train.random_tokens:
        return None
    from autotune.workloads import load_workload

    vocab = load_workload(plan.workload.name, plan.workload.overrides, with_shape=False).vocab_size
    return source_identity(override or plan.train.data, vocab)
