"""Strict conversion between dataclasses and JSON: the one codec for every saved file.

Plans and hardware profiles are a public format. Loading is strict: an unknown key, a
missing required key or a value of the wrong type is a :class:`SchemaError` that names the
field (``strategies[1].knobs``). Saving never mutates the object being saved and writes
atomically (temporary file, fsync, rename), so a crash never leaves half a file behind.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import types
import typing
from pathlib import Path
from typing import Any, TypeVar, Union

from autotune.errors import SchemaError, UserError

T = TypeVar("T")

_JSON_SCALARS = (str, int, float, bool, type(None))


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` (parsed JSON) against the annotation ``tp`` and build the typed value."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, where)
            except SchemaError as e:
                errors.append(str(e))
        raise SchemaError(where, f"expected {' or '.join(_type_name(a) for a in args)}, got {_describe(value)}")
    if origin is typing.Literal:
        if value not in args:
            raise SchemaError(where, f"expected one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise SchemaError(where, f"expected a list, got {_describe(value)}")
        (item,) = args or (Any,)
        return [_convert(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise SchemaError(where, f"expected an object, got {_describe(value)}")
        _, item = args or (str, Any)
        return {str(k): _convert(v, item, f"{where}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SchemaError(where, f"expected a number, got {_describe(value)}")
        try:
            return float(value)
        except OverflowError:  # an integer beyond any float
            raise SchemaError(where, f"number out of range ({len(str(value))} digits)") from None
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise SchemaError(where, f"expected an integer, got {_describe(value)}")
        return value
    if tp in (str, bool):
        if not isinstance(value, tp):
            raise SchemaError(where, f"expected {_type_name(tp)}, got {_describe(value)}")
        return value
    if tp is type(None):
        if value is not None:
            raise SchemaError(where, f"expected null, got {_describe(value)}")
        return None
    raise TypeError(f"schema: unsupported annotation {tp!r} at {where}")


def _describe(value: Any) -> str:
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    return f"{type(value).__name__} {value!r}"


def from_dict(cls: type[T], data: Any, where: str = "") -> T:
    """Build dataclass ``cls`` from parsed JSON, strictly. Errors name the field."""
    if not isinstance(data, dict):
        raise SchemaError(where, f"expected an object, got {_describe(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        key = unknown[0]
        raise SchemaError(_join(where, key), f"unknown key (expected one of: {', '.join(fields)})")
    kwargs = {}
    for name, f in fields.items():
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise SchemaError(_join(where, name), "missing required key")
            continue
        kwargs[name] = _convert(data[name], hints[name], _join(where, name))
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:  # __post_init__ validation
        raise SchemaError(where, str(e)) from None


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def to_dict(obj: Any) -> Any:
    """JSON-ready copy of a dataclass tree. The object itself is left untouched."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, _JSON_SCALARS):
        return obj
    raise TypeError(f"cannot save {type(obj).__name__} as JSON")


def read_json(path: str | os.PathLike, what: str) -> Any:
    """Parse a JSON file, turning a missing file or bad JSON into a one-line UserError."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{what} {p}: no such file") from None
    except UnicodeDecodeError:
        raise UserError(f"{what} {p}: not a text file (not UTF-8)") from None
    except OSError as e:
        raise UserError(f"{what} {p}: cannot read ({e.strerror})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{what} {p}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except RecursionError:
        raise UserError(f"{what} {p}: JSON nested too deeply") from None
    except ValueError as e:  # Python's limit on the digits of an integer
        raise UserError(f"{what} {p}: invalid JSON: {e}".splitlines()[0]) from None


def check_writable(path: Path, what: str) -> None:
    """Refuse, before the work that ends in writing it (a search, a minute of measuring), a
    file that could not be written: its folder (or the nearest one that exists, where the rest
    would be created) must be a writable folder."""
    if path.is_dir():
        raise UserError(f"{what} {path}: is a directory, expected a file")
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise UserError(f"{what} {path}: {folder} is not a directory")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"{what} {path}: cannot write in {folder}")


def check_writable_dir(path: Path, what: str) -> None:
    """The same for a directory of outputs (--report)."""
    if path.exists() and not path.is_dir():
        raise UserError(f"{what} {path}: exists and is not a directory")
    check_writable(path / "x", what)


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """Write JSON so that readers see the old file or the new one, never a partial one."""
    write_bytes_atomic(path, (json.dumps(data, indent=2) + "\n").encode())


def write_bytes_atomic(path: str | os.PathLike, payload: bytes | list[bytes | memoryview]) -> None:
    """Write ``payload`` (one buffer, or several streamed in turn so big arrays are not
    copied) so that readers see the old file or the new one, never a partial one."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600: give the file the mode open() would
        with os.fdopen(fd, "wb") as f:
            for part in [payload] if isinstance(payload, bytes) else payload:
                f.write(part)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(p.parent)


def _umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it: put it straight back
    os.umask(mask)
    return mask


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename in ``path`` durable."""
    dir_fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
