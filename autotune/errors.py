"""Errors that the CLI turns into one clear line and an exit code.

``UserError`` is bad input (a malformed plan, an unknown strategy, a missing file): exit 2,
nothing written. Anything else that escapes a command is a failure while running: exit 1.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user. The message is shown as one line; exit status 2."""


def first_line(e: BaseException) -> str:
    """The first line of ``e``'s message (its type's name where it has none): what a one-line
    error or a trial's result quotes of a long message (SQLAlchemy's, a traceback's)."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


class SchemaError(UserError):
    """A saved document (plan, profile) does not match its schema. Names the field."""

    def __init__(self, where: str, message: str) -> None:
        self.where = where
        super().__init__(f"{where}: {message}" if where else message)
