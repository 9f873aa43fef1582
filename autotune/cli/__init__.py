"""The ``autotune`` command. Thin: one small module per subcommand.

Subcommand modules import torch and friends inside their functions, so ``autotune --help``
stays fast. Exit codes: 0 success, 1 failure while running, 2 bad input (usage, invalid
plan, missing file); bad input prints one line and no traceback. As pip does, ``autotune``
alone prints the help and exits 0; ``-h`` is ``--help`` on every command.
"""

from __future__ import annotations

import os
import sys
import time

import typer

from autotune.cli.app import ARGS, STARTED, app, started, version
from autotune.errors import UserError
from autotune.terminal import visible

__all__ = ["ARGS", "app", "entry", "main", "started", "version"]


def _register() -> None:
    # Each module adds its command(s) to `app`; order here is the order in --help.
    from autotune.cli import compare, data, export, plan, profile, report, run, show, strategies, trials  # noqa: F401


def main(argv: list[str] | None = None, *, started_at: float | None = None) -> int:
    """Run one command; ``started_at`` (time.monotonic()) is when it began, now if None: the
    console script passes its process's start, so that a budget counts the interpreter's start
    and the imports, what a user's wall clock sees. Called in a long-lived process (tests, a
    notebook), the command begins at the call."""
    STARTED[0] = time.monotonic() if started_at is None else started_at
    _register()
    ARGS[:] = sys.argv[1:] if argv is None else argv
    try:
        # Outside standalone mode click returns a typer.Exit's code instead of raising it.
        code = app(args=argv, standalone_mode=False)
    except UserError as e:
        print(f"autotune: error{_rank()}: {visible(e)}", file=sys.stderr)  # one line, whatever a plan says
        return 2
    except typer.Exit as e:
        return e.exit_code
    except typer.Abort:
        print("autotune: aborted", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("autotune: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        # Usage errors (unknown option, bad value) from click, which typer may vendor as
        # typer._click: recognised by their interface and shown as one line, exit 2.
        message, code = getattr(e, "format_message", None), getattr(e, "exit_code", None)
        if not (callable(message) and isinstance(code, int)):
            raise
        if type(e).__name__ == "NoArgsIsHelpError":
            e.show()  # `autotune` or `autotune data` alone: the help, and success as pip's
            return 0
        else:
            print(f"autotune: error: {message()}", file=sys.stderr)
        return code
    return code if isinstance(code, int) else 0


def _rank() -> str:
    """ " (rank R of N)" in a process of a multi-process run, else nothing."""
    world = os.environ.get("WORLD_SIZE", "1")
    return f" (rank {os.environ.get('RANK', '?')} of {world})" if world != "1" else ""


def entry() -> None:  # console script, `python -m autotune`: the process is the command
    import psutil

    # CUDA's caching allocator with expandable segments, as torchtitan runs by default, in this
    # process and every one it starts (trials, ranks): a Qwen3-style model's trial on one H100
    # ran out of memory allocating the 18.6 GiB logits while 16.4 GiB sat reserved but unused
    # in fixed-size segments (bench/results/issue26-h100-420s). A user's own setting wins.
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

    age = max(0.0, time.time() - psutil.Process().create_time())
    sys.exit(main(started_at=time.monotonic() - age))
