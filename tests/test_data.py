"""Token files, dataset preparation, the default corpus, and the batch loaders (CPU only)."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from autotune import data
from autotune.cli import main
from autotune.data import (
    Batches,
    RandomBatches,
    corpus,
    default_dataset,
    open_dataset,
    prepare,
    read_tokens,
    val_batches,
    val_loss,
    write_tokens,
)
from autotune.errors import UserError

SYLLABLES = "ba ke ti lo mu ra se dor pan vel qui st ng ex".split()


def make_text(seed: int, n_lines: int) -> str:
    """Python-ish lines (indentation included) of made-up words, enough for 512 merges."""
    rng = np.random.default_rng(seed)
    words = ["".join(rng.choice(SYLLABLES, size=int(rng.integers(1, 5)))) for _ in range(2000)]
    lines = []
    for _ in range(n_lines):
        indent = "    " * int(rng.integers(0, 3))
        lines.append(indent + " ".join(rng.choice(words, size=int(rng.integers(1, 12)))))
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def texts(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("texts")
    paths = []
    for i in range(3):
        p = root / f"part{i}.txt"
        p.write_text(make_text(i, 1500))  # ~60 KB: a few documents each
        paths.append(p)
    return paths


@pytest.fixture(scope="module")
def dataset(texts: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ds") / "data"
    prepare(texts, out, 512)
    return out


# --- token files ----------------------------------------------------------------------------


@pytest.mark.parametrize(("vocab", "dtype"), [(512, np.uint16), (65535, np.uint16), (70_000, np.uint32)])
def test_header_round_trip(tmp_path: Path, vocab: int, dtype: type) -> None:
    ids = np.random.default_rng(0).integers(0, vocab, size=1000)
    ids[0] = vocab - 1
    write_tokens(tmp_path / "t.bin", ids, vocab)
    tf = read_tokens(tmp_path / "t.bin")
    assert tf.vocab_size == vocab
    assert tf.tokens.dtype == dtype
    np.testing.assert_array_equal(tf.tokens, ids)
    assert (tmp_path / "t.bin").stat().st_size == data.HEADER_BYTES + ids.size * np.dtype(dtype).itemsize
    assert [p.name for p in tmp_path.iterdir()] == ["t.bin"]  # no temporary file left


def test_empty_token_file(tmp_path: Path) -> None:
    write_tokens(tmp_path / "t.bin", [], 100)
    assert len(read_tokens(tmp_path / "t.bin").tokens) == 0


def test_write_rejects_ids_outside_vocab(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        write_tokens(tmp_path / "t.bin", [3, 10], 10)


def _corrupt(raw: bytes, how: str) -> bytes:
    b = bytearray(raw)
    if how == "magic":
        b[:8] = b"NOTTOKEN"
    elif how == "version":
        b[8] = 2
    elif how == "dtype":
        b[12] = 4  # uint32 code with a small vocab
    elif how == "reserved":
        b[100] = 1
    elif how == "truncated body":
        del b[-3:]
    elif how == "trailing bytes":
        b += b"\0\0"
    elif how == "truncated header":
        del b[20:]
    return bytes(b)


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("magic", "not an autotune token file"),
        ("version", "format version 2 is not supported"),
        ("dtype", "dtype code 4 does not fit vocab size 100"),
        ("reserved", "reserved header bytes"),
        ("truncated body", "truncated: header says 50 tokens"),
        ("trailing bytes", "trailing bytes"),
        ("truncated header", "truncated header"),
    ],
)
def test_corrupt_header_rejected(tmp_path: Path, how: str, message: str) -> None:
    path = tmp_path / "t.bin"
    write_tokens(path, np.arange(50), 100)
    path.write_bytes(_corrupt(path.read_bytes(), how))
    with pytest.raises(UserError, match=message) as info:
        read_tokens(path)
    assert str(path) in str(info.value)


def test_missing_token_file(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no such file"):
        read_tokens(tmp_path / "nope.bin")


# --- batches ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokens() -> np.ndarray:
    return np.random.default_rng(1).integers(0, 1000, size=20_000).astype(np.uint16)


def _batches(tokens: np.ndarray, **kw: object) -> Batches:
    args: dict = dict(batch_size=4, seq_len=32, seed=7, device="cpu")
    return Batches(tokens, **(args | kw))


def test_batches_shapes_and_targets_are_shifted_inputs(tokens: np.ndarray) -> None:
    with _batches(tokens) as b:
        x, y = b.get(3, 0)
        assert x.shape == y.shape == (4, 32)
        assert x.dtype == y.dtype == torch.int64
        assert x.is_contiguous() and y.is_contiguous()
        for row, start in enumerate(b.offsets(3, 0)):
            np.testing.assert_array_equal(x[row].numpy(), tokens[start : start + 32])
            np.testing.assert_array_equal(y[row].numpy(), tokens[start + 1 : start + 33])


def test_batches_are_a_function_of_seed_step_micro_rank(tokens: np.ndarray) -> None:
    with _batches(tokens, prefetch=0, micro_batches=2) as a, _batches(tokens, prefetch=0, micro_batches=2) as b:
        torch.testing.assert_close(a.get(5, 1), b.get(5, 1))
    with _batches(tokens, prefetch=0, micro_batches=2) as b:
        base = b.get(5, 1)[0]
        for other in (b.get(6, 1)[0], b.get(5, 0)[0]):
            assert not torch.equal(base, other)
        with pytest.raises(ValueError, match="out of range"):
            b.get(5, 2)
    for kw in ({"seed": 8}, {"rank": 1, "world_size": 2}):
        with _batches(tokens, prefetch=0, micro_batches=2, **kw) as c:
            assert not torch.equal(base, c.get(5, 1)[0])


@pytest.mark.parametrize("split", [(16, 1, 1), (8, 2, 1), (4, 2, 2), (2, 2, 4), (1, 16, 1)])
def test_a_steps_samples_do_not_depend_on_how_the_global_batch_is_split(
    tokens: np.ndarray, split: tuple[int, int, int]
) -> None:
    # micro-batch x accumulation x processes = 16 rows a step: the same 16 samples in every
    # split, each rank's micro-batches in order, so the plain reference sees the plan's batches.
    batch_size, micro_batches, world = split
    with _batches(tokens, batch_size=16, prefetch=0) as whole:
        expected = [whole.get(step, 0)[0] for step in range(3)]
    for step in range(3):
        rows = []
        for rank in range(world):
            with _batches(
                tokens, batch_size=batch_size, micro_batches=micro_batches, rank=rank, world_size=world, prefetch=0
            ) as b:
                rows += [b.get(step, m)[0] for m in range(micro_batches)]
        torch.testing.assert_close(torch.cat(rows), expected[step])


def test_prefetched_and_synchronous_batches_are_identical(tokens: np.ndarray) -> None:
    # In order (prefetch hits), then a jump back as on resume, then a jump forward.
    keys = [(s, m) for s in range(4) for m in range(3)] + [(1, 2), (2, 0), (9, 1), (9, 2), (10, 0)]
    with _batches(tokens, prefetch=0, micro_batches=3) as sync, _batches(tokens, prefetch=3, micro_batches=3) as pre:
        for key in keys:
            torch.testing.assert_close(pre.get(*key), sync.get(*key))


def _prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("autotune-batches")]


def test_batches_close_stops_the_thread(tokens: np.ndarray) -> None:
    before = len(_prefetch_threads())
    b = _batches(tokens, prefetch=2)
    b.get(0)
    assert len(_prefetch_threads()) == before + 1
    b.close()
    b.close()  # idempotent
    assert len(_prefetch_threads()) == before
    with pytest.raises(RuntimeError, match="after close"):
        b.get(1)


class _FailingBatches(Batches):
    def _host_windows(self, key: tuple[int, int]) -> torch.Tensor:
        if key == (2, 0):
            raise OSError("disk gone")
        return super()._host_windows(key)


def test_batches_thread_errors_reach_the_caller(tokens: np.ndarray) -> None:
    with _FailingBatches(tokens, batch_size=2, seq_len=8, seed=0, device="cpu", prefetch=2) as b:
        b.get(0)
        b.get(1)  # step 2 is being prepared in the background now
        with pytest.raises(OSError, match="disk gone"):
            b.get(2)
        b.get(3)


def test_batches_reject_too_little_data() -> None:
    with pytest.raises(UserError, match="too few"):
        Batches(np.arange(10), batch_size=1, seq_len=10, seed=0, device="cpu")


def test_random_batches() -> None:
    def make(rank: int = 0) -> RandomBatches:
        return RandomBatches(100, batch_size=3, seq_len=16, seed=1, device="cpu", rank=rank, world_size=2)

    x, y = make().get(4, 1)
    assert x.shape == (3, 16) and x.dtype == torch.int64
    assert 0 <= int(x.min()) and int(x.max()) < 100
    torch.testing.assert_close(x[:, 1:], y[:, :-1])
    torch.testing.assert_close(make().get(4, 1), (x, y))
    assert not torch.equal(make().get(4, 0)[0], x)
    assert not torch.equal(make(rank=1).get(4, 1)[0], x)


class _Bigram(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(1000, 1000)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(self.embed(idx).flatten(0, 1), targets.flatten())


def test_val_batches_and_loss(tokens: np.ndarray) -> None:
    first = val_batches(tokens, batch_size=2, seq_len=16, n_batches=3, device="cpu")
    again = val_batches(tokens, batch_size=2, seq_len=16, n_batches=3, device="cpu")
    assert len(first) == 3
    for (x, y), (x2, y2) in zip(first, again):
        assert x.shape == (2, 16) and x.dtype == torch.int64
        torch.testing.assert_close((x, y), (x2, y2))
        torch.testing.assert_close(x[:, 1:], y[:, :-1])
    np.testing.assert_array_equal(first[0][0][0].numpy(), tokens[:16])  # spread from the start...
    np.testing.assert_array_equal(first[-1][1][-1].numpy(), tokens[-16:])  # ...to the very end
    model = _Bigram().train()
    loss = val_loss(model, first)
    assert model.training
    assert loss == pytest.approx(np.log(1000), rel=0.5)


# --- prepare ------------------------------------------------------------------------------


def test_prepare_end_to_end(texts: list[Path], dataset: Path, tmp_path: Path) -> None:
    assert sorted(p.name for p in dataset.iterdir()) == ["meta.json", "tokenizer.json", "train.bin", "val.bin"]
    ds = open_dataset(dataset)
    assert ds.meta.vocab_size == ds.train.vocab_size == ds.val.vocab_size == 512
    assert ds.meta.train_tokens == len(ds.train.tokens) and ds.meta.val_tokens == len(ds.val.tokens)
    assert 0.005 < ds.meta.val_tokens / (ds.meta.train_tokens + ds.meta.val_tokens) < 0.3
    tokenizer = Tokenizer.from_file(str(dataset / "tokenizer.json"))
    assert tokenizer.get_vocab_size() == 512
    # Every character lands in exactly one split; one EOT per text file.
    decoded = tokenizer.decode(ds.train.tokens.tolist()) + tokenizer.decode(ds.val.tokens.tolist())
    assert len(decoded) == sum(len(p.read_text()) for p in texts)
    eot = tokenizer.token_to_id(data.EOT)
    assert (ds.train.tokens == eot).sum() + (ds.val.tokens == eot).sum() == len(texts)
    # Deterministic: the same input gives the same bytes.
    prepare(texts, tmp_path / "again", 512)
    for name in ("train.bin", "val.bin", "tokenizer.json", "meta.json"):
        assert (tmp_path / "again" / name).read_bytes() == (dataset / name).read_bytes(), name


def test_documents_cut_where_tokenization_is_unchanged(dataset: Path) -> None:
    tokenizer = Tokenizer.from_file(str(dataset / "tokenizer.json"))
    text = make_text(5, 3000)
    docs, ends = corpus._documents([text])
    assert len(docs) > 2 and ends == [False] * (len(docs) - 1) + [True]
    pieces = [tokenizer.encode(d).ids for d in docs]
    assert sum(pieces, []) == tokenizer.encode(text).ids


def test_prepare_with_given_tokenizer(texts: list[Path], dataset: Path, tmp_path: Path) -> None:
    meta = prepare(texts, tmp_path / "out", 1000, tokenizer_file=dataset / "tokenizer.json")
    assert meta.vocab_size == 1000 and meta.tokenizer_vocab_size == 512
    assert (tmp_path / "out" / "train.bin").read_bytes()[256:] == (dataset / "train.bin").read_bytes()[256:]


def test_prepare_rejects_bad_input_and_writes_nothing(texts: list[Path], dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(UserError, match="more than the requested vocab size 300"):
        prepare(texts, out, 300, tokenizer_file=dataset / "tokenizer.json")
    with pytest.raises(UserError, match="nope.txt: no such file"):
        prepare([texts[0], tmp_path / "nope.txt"], out, 512)
    with pytest.raises(UserError, match="too small"):
        prepare(texts, out, 100)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(UserError, match="not UTF-8"):
        prepare([tmp_path / "latin1.txt"], out, 512)
    assert not out.exists()


def test_cli_prepare(texts: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    args = ["data", "prepare", "--text", str(texts[0]), "--text", str(texts[1]), "--out", str(out), "--vocab", "512"]
    assert main(args) == 0
    assert "vocab 512" in capsys.readouterr().out
    assert (out / "meta.json").is_file()
    args[3] = str(tmp_path / "missing.txt")
    assert main(args[:-4] + ["--out", str(tmp_path / "none"), "--vocab", "512"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"autotune: error: text file {tmp_path / 'missing.txt'}: no such file"
    assert not (tmp_path / "none").exists()


# --- the default corpus -------------------------------------------------------------------


def test_default_corpus_is_deterministic_cached_and_safe_to_share(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    shared = tmp_path / "cache" / "data"
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(default_dataset(512, shared))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 2 and results[0] == results[1]
    path = results[0]
    assert [p.name for p in shared.iterdir() if not p.name.endswith(".lock")] == [path.name]  # no leftovers
    ds = open_dataset(path)
    assert ds.meta.train_tokens > 1_000_000 and ds.meta.val_tokens > 10_000
    assert "standard library" in ds.meta.source

    other = default_dataset(512, tmp_path / "elsewhere")
    for name in ("train.bin", "val.bin", "tokenizer.json", "meta.json"):
        assert (other / name).read_bytes() == (path / name).read_bytes(), name

    def no_build(*args: object) -> None:
        raise AssertionError("rebuilt a cached corpus")

    monkeypatch.setattr(corpus, "_build_default", no_build)
    assert default_dataset(512, shared) == path
    monkeypatch.setenv("AUTOTUNE_CACHE", str(tmp_path / "cache"))
    assert main(["data", "default", "--vocab", "512"]) == 0
    assert capsys.readouterr().out.strip() == str(path)


def test_cli_prepare_as_the_readme_writes_it(
    texts: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # `--text a.txt b.txt`: the paths after one --text are all text files.
    out = tmp_path / "readme"
    assert main(["data", "prepare", "--text", str(texts[0]), str(texts[1]), "--out", str(out), "--vocab", "512"]) == 0
    assert f"{texts[0]}, {texts[1]}" == data.open_dataset(out).meta.source


def _run_dir(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "summary.json").write_text("{}")
    return run


# (id, arguments after the text, words): each one line, exit 2 (1 where only writing finds it), nothing written.
BAD_PREPARE = [
    (
        "vocab_huge_given_tokenizer",
        lambda t: ["--out", t / "out", "--vocab", str(2**31), "--tokenizer", t / "tokenizer.json"],
        "is more than 1,048,576 tokens",
    ),
]


@pytest.mark.parametrize("args, words", [pytest.param(a, w, id=i) for i, a, w in BAD_PREPARE])
def test_cli_prepare_refuses_in_one_line(
    texts: list[Path], dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], args, words
) -> None:
    (tmp_path / "file.txt").write_text("a file, kept as it is\n")
    (tmp_path / "tokenizer.json").write_bytes((dataset / "tokenizer.json").read_bytes())
    args = [str(a) for a in args(tmp_path)]
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    code = main(["data", "prepare", "--text", str(texts[0]), *args])
    err = capsys.readouterr().err
    # Root may write in any folder (os.access says so): /proc refuses it only when written, exit 1.
    assert (
        code in ((1, 2) if "/proc" in words else (2,)) and err.count("\n") == 1 and err.startswith("autotune: error: ")
    ), err
    assert words in err, err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    assert (tmp_path / "file.txt").read_text() == "a file, kept as it is\n"
