"""`autotune data`: tokenize text into memory-mapped token files, or build the default corpus."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from autotune.cli.app import app
from autotune.errors import UserError

data_app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
app.add_typer(data_app, name="data", help="Tokenize text into train/val token files for training.")


@data_app.command("prepare")
def prepare_cmd(
    out: Annotated[
        Path, typer.Option("--out", help="Dataset directory to write: a new or empty one, or a dataset to write again.")
    ],
    vocab: Annotated[int, typer.Option("--vocab", help="Vocabulary size (token ids are below it).")],
    text: Annotated[
        Optional[list[Path]],
        typer.Option("--text", help="UTF-8 text file; the paths after it are text files too (--text a.txt b.txt)."),
    ] = None,
    more: Annotated[
        Optional[list[Path]], typer.Argument(metavar="PATH", help="More text files.", show_default=False)
    ] = None,
    tokenizer: Annotated[
        Optional[Path], typer.Option("--tokenizer", help="Use this tokenizer.json instead of training one.")
    ] = None,
) -> None:
    """Tokenize text files into OUT/train.bin, val.bin, tokenizer.json and meta.json."""
    from autotune.data import prepare

    # One option takes one value in click: `--text a.txt b.txt` gives b.txt as an argument.
    texts = [*(text or []), *(more or [])]
    if not texts:
        raise UserError("give the text files: --text PATH...")
    start = time.perf_counter()
    try:
        meta = prepare(texts, out, vocab, tokenizer_file=tokenizer)
    except OSError as e:  # a full or failing disk while writing: one line, exit 1
        typer.echo(f"autotune: error: cannot write {e.filename or out} ({e.strerror or e})", err=True)
        raise typer.Exit(1) from None
    seconds = time.perf_counter() - start
    typer.echo(
        f"{out}: train {meta.train_tokens:,} tokens, val {meta.val_tokens:,} tokens, "
        f"vocab {meta.vocab_size} (tokenizer has {meta.tokenizer_vocab_size}), {seconds:.1f} s"
    )


@data_app.command("default")
def default_cmd(
    vocab: Annotated[int, typer.Option("--vocab", help="Vocabulary size (token ids are below it).")],
) -> None:
    """Build (once) the default corpus from the Python standard library; print its directory.

    It is cached under $AUTOTUNE_CACHE/data (default ~/.cache/autotune/data).
    """
    from autotune.data import default_dataset

    typer.echo(default_dataset(vocab))
