"""Text from plans, studies and trials, made safe to print.

Plans travel between machines, so a plan's strings (its data path, hardware summary, command,
a trial's error) are someone else's text. Printed raw, an escape sequence in them retitles the
terminal or writes the clipboard (OSC 0, OSC 52), and a ``[link=…]`` in a rich markup string
becomes a hyperlink. ``visible`` shows such characters as escapes (``\\x1b``) instead, and
``escape`` also quotes rich markup: apply it to every foreign string put into a markup string.
Both cut a string past ``MAX_SHOWN`` characters: rich takes time quadratic in the length of an
unbroken word it wraps (a plan's 3 MB field kept ``show`` busy for minutes).
Torch-free and rich-free at import.
"""

from __future__ import annotations

_CONTROL = [*range(0x00, 0x20), *range(0x7F, 0xA0)]
"""C0 (newline and tab included: a foreign string must not start a line of its own), DEL and C1."""
_BIDI = [0x061C, 0x200E, 0x200F, *range(0x202A, 0x202F), *range(0x2066, 0x206A)]
"""Bidirectional marks, embeddings, overrides and isolates: they reorder what is shown (CVE-2021-42574)."""
MAX_SHOWN = 2000
"""Characters of one foreign string that are printed; the rest is counted, not shown."""
_VISIBLE = {c: f"\\x{c:02x}" for c in _CONTROL} | {c: f"\\u{c:04x}" for c in _BIDI}
_VISIBLE |= {ord("\t"): "\\t", ord("\n"): "\\n", ord("\r"): "\\r"}


def visible(value: object) -> str:
    """``str(value)`` with control and bidirectional-override characters written as escapes,
    cut to ``MAX_SHOWN`` characters and an ellipsis saying how many more there are."""
    text = str(value)
    if len(text) > MAX_SHOWN:
        text = f"{text[:MAX_SHOWN]}… ({len(text) - MAX_SHOWN:,} more characters)"
    return text.translate(_VISIBLE)


def escape(value: object) -> str:
    """``visible(value)`` quoted for rich markup, so that rich prints it as it is."""
    from rich.markup import escape as markup_escape

    return markup_escape(visible(value))
