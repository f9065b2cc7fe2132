"""TOML files ↔ typed dataclasses: the one reader, validator, ``--set`` parser and writer of the package.

Unknown keys and wrong types raise :class:`ConfigError` naming the key, the file and the nearest valid key.
"""

from __future__ import annotations

import dataclasses
import datetime
import difflib
import re
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, Literal

from hidream_ft.errors import UserError


class ConfigError(UserError, ValueError):
    """A configuration value is missing, unknown or of the wrong type."""


def read_toml(path: str | Path, what: str) -> dict:
    """A TOML file as a table; a missing file or a syntax error is a :class:`ConfigError` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} not found: {path}")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from None


def parse_literal(text: str) -> Any:
    """One TOML value written out, e.g. ``[1e-4, 3e-4]`` or ``'a b'``; :class:`ConfigError` if it is not one."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{text!r} is not a TOML value: {e}") from None


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {value!r}")
        return _build(tp, value, where)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(repr, choices))}")
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in typing.get_args(tp):
            if option is type(None):
                if value is None:
                    return None
                continue
            try:
                return _coerce(value, option, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: unexpected {value!r}")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list of {_type_name(item_tp)}, got {value!r}")
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {value!r}")
        return dict(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if tp is Any:
        return value
    raise ConfigError(f"{where}: unsupported type {tp}")


def _build(cls: type, table: dict, where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in table.items():
        if key not in names:
            near = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean '{near[0]}'?" if near else f"; valid keys: {', '.join(names)}"
            raise ConfigError(f"{where}: unknown key '{key}'{hint}")
        kwargs[key] = _coerce(value, hints[key], f"{where}.{key}" if where else key)
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if validate is not None:
        validate(where)
    return obj


def build_table(cls: type, table: dict, where: str = "") -> Any:
    """Validate a table into the dataclass ``cls``: every key known, every value of its field's type, then
    the dataclass's own ``validate(where)`` (nested dataclasses included)."""
    return _build(cls, table, where)


def apply_overrides(table: dict, overrides: typing.Iterable[str]) -> None:
    """Merge ``key.path=value`` items (``--set``) into ``table``; a value that is no TOML literal is a string."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set optim.lr=1e-4")
        key, raw = item.split("=", 1)
        try:
            value = parse_literal(raw)
        except ConfigError:
            value = raw  # bare strings need no quotes on the command line
        path = key.strip().split(".")
        node = table
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {'.'.join(path)}: '{part}' is not a table")
        node[path[-1]] = value


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_ESCAPES = {"\\": "\\\\", '"': '\\"', "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def _string(text: str) -> str:
    """A TOML basic string; control characters (which TOML forbids raw) are escaped."""
    return '"' + "".join(
        _ESCAPES.get(c) or (f"\\u{ord(c):04X}" if ord(c) < 0x20 or ord(c) == 0x7F else c) for c in text
    ) + '"'


def _key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else _string(key)


def toml_literal(value: Any) -> str:
    """``value`` as a TOML literal that reads back equal (TOML has no null: None cannot be written)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)  # floats: shortest round-trip form; nan and ±inf are TOML too
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, (datetime.datetime, datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, list):
        return "[" + ", ".join(toml_literal(v) for v in value) + "]"
    if isinstance(value, dict):
        items = [f"{_key(str(k))} = {toml_literal(v)}" for k, v in value.items() if v is not None]
        return "{ " + ", ".join(items) + " }" if items else "{}"
    raise TypeError(f"cannot write {value!r} as TOML")


def _is_table_array(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


def _table_lines(table: dict, path: list[str]) -> list[str]:
    """Plain keys first (they belong to the header above them), then sub-tables under their own headers.

    Tables directly under the document root become ``[sections]``; deeper ones stay inline."""
    def is_section(value: Any) -> bool:
        return _is_table_array(value) or (isinstance(value, dict) and not path)

    lines = [f"{_key(k)} = {toml_literal(v)}" for k, v in table.items() if v is not None and not is_section(v)]
    for key, value in table.items():
        if not is_section(value):
            continue
        name = ".".join(_key(part) for part in [*path, key])
        for item in value if isinstance(value, list) else [value]:
            header = f"[[{name}]]" if isinstance(value, list) else f"[{name}]"
            lines += ["", header, *_table_lines(item, [*path, key])]
    return lines


def write_toml(table: dict) -> str:
    """``table`` as a TOML document that :func:`tomllib.loads` reads back equal, keys whose value is None left
    out (TOML has no null)."""
    return "\n".join(_table_lines(table, [])).lstrip("\n") + "\n"
