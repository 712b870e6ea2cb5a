"""YAML values checked against dataclass field annotations, with messages a YAML user can act on: "section
'train', key 'lr': expected a float, got the string '0.00l'". Used by ``gsae.config`` before any ``__post_init__``
compares values; YAML lists become tuples for tuple fields, and an int is a valid float (kept as it is, so config
hashes do not change)."""

from __future__ import annotations

import types
import typing
from pathlib import Path
from typing import Any

import yaml

from .paths import ROOT


class ConfigError(ValueError):
    """A configuration value is invalid; the message says which one and what to do."""


class TypeMismatch(ValueError):
    """A value does not fit its field's annotation; the message names section, key, expected type and value."""


class _Mismatch(Exception):
    """A value does not fit a field's annotation; ``args[0]`` is an extra detail ("" or " (item 2 is ...)")."""


_SCALARS: dict[Any, tuple[str, str]] = {int: ("an integer", "integers"), float: ("a float", "floats"),
                                        bool: ("true or false", "booleans"), str: ("a string", "strings"),
                                        type(None): ("null", "nulls")}


def _expected(tp: Any, plural: bool = False) -> str:
    """How a YAML user reads annotation ``tp``: "a float", "a list of integers", "a string or null", ..."""
    if tp in _SCALARS:
        return _SCALARS[tp][plural]
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_expected(a, plural) for a in args)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return f"{'lists' if plural else 'a list'} of {_expected(args[0], True)}"
    if origin is tuple and args and len(set(args)) == 1:
        return f"{'lists' if plural else 'a list'} of {len(args)} {_expected(args[0], True)}"
    if origin is tuple:
        return f"{'lists' if plural else 'a list'} of {len(args)} items: {', '.join(_expected(a) for a in args)}"
    if origin in (list, set, frozenset):
        return f"{'lists' if plural else 'a list'} of {_expected(args[0], True) if args else 'values'}"
    if origin is dict and len(args) == 2:
        return f"{'mappings' if plural else 'a mapping'} of {_expected(args[0], True)} to {_expected(args[1], True)}"
    return getattr(tp, "__name__", str(tp))


def describe(value: Any) -> str:
    """A parsed YAML value as its reader wrote it: "the string '0.00l'", "the integer 3", "null", ..."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    kind = {int: "integer", float: "float", str: "string", list: "list", tuple: "list", dict: "mapping"}.get(
        type(value), type(value).__name__)
    text = repr(list(value) if isinstance(value, tuple) else value)
    return f"the {kind} {text if len(text) <= 80 else text[:77] + '...'}"


def _coerce(tp: Any, value: Any) -> Any:
    """``value`` (parsed YAML) as field type ``tp``: YAML lists become tuples for tuple fields; an int is a valid
    float (kept as it is, so config hashes do not change); anything else that does not fit raises ``_Mismatch``.
    An annotation not handled here passes the value through (``__post_init__`` judges it)."""
    if tp is Any:
        return value
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        for a in args:
            try:
                return _coerce(a, value)
            except _Mismatch:
                pass
        raise _Mismatch("")
    if tp in _SCALARS:
        ok = {bool: isinstance(value, bool), type(None): value is None,
              int: isinstance(value, int) and not isinstance(value, bool),
              float: isinstance(value, (int, float)) and not isinstance(value, bool),
              str: isinstance(value, str)}[tp]
        if not ok:
            raise _Mismatch("")
        return value
    if origin in (tuple, list, set, frozenset):
        if not isinstance(value, (list, tuple)):
            raise _Mismatch("")
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                raise _Mismatch(f" ({len(value)} items, not {len(args)})")
            item_types = list(args)
        else:
            item_types = [args[0] if args else Any] * len(value)
        out = []
        for i, (t, v) in enumerate(zip(item_types, value, strict=True)):
            try:
                out.append(_coerce(t, v))
            except _Mismatch:
                raise _Mismatch(f" (item {i + 1} is {describe(v)})") from None
        return tuple(out) if origin is tuple else origin(out)
    if origin is dict:
        if not isinstance(value, dict):
            raise _Mismatch("")
        kt, vt = args if len(args) == 2 else (Any, Any)
        out_d = {}
        for k, v in value.items():
            try:
                out_d[_coerce(kt, k)] = _coerce(vt, v)
            except _Mismatch:
                raise _Mismatch(f" (key {k!r} maps to {describe(v)})") from None
        return out_d
    return value


def typed_kwargs(cls: type, section: str, raw: dict[str, Any]) -> dict[str, Any]:
    """``raw``'s values checked against ``cls``'s field annotations (before its ``__post_init__`` compares them)."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in raw.items():
        tp = hints.get(key, Any)
        try:
            kwargs[key] = _coerce(tp, value)
        except _Mismatch as m:
            hint = ""
            if isinstance(value, str) and typing.get_origin(tp) is None and tp in (int, float):
                try:
                    float(value)
                    hint = " (YAML reads a number without a decimal point in its mantissa, such as 1e-3, as a " \
                           "string: write 1.0e-3)"
                except ValueError:
                    pass
            raise TypeMismatch(f"section '{section}', key '{key}': expected {_expected(tp)}, got "
                               f"{describe(value)}{m.args[0] if m.args else ''}{hint}") from None
    return kwargs


def shown_path(p: Path) -> str:
    """``p`` as error messages name it: relative to the repository (profiles/x.yaml) when inside it."""
    try:
        return str(p.resolve().relative_to(ROOT))
    except ValueError:
        return str(p)


def read_yaml(p: Path) -> Any:
    """The parsed YAML file ``p``; a syntax error is one line, ``<file>:<line>:<column>: invalid YAML: ...``."""
    try:
        return yaml.safe_load(p.read_text())
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{shown_path(p)}:{mark.line + 1}:{mark.column + 1}" if mark else shown_path(p)
        what = " ".join(str(e.problem or "").split()) or "syntax error"
        context = " ".join(str(e.context or "").split())
        raise ConfigError(f"{where}: invalid YAML: {what}{f' ({context})' if context else ''}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{shown_path(p)}: invalid YAML: {' '.join(str(e).split())}") from None
