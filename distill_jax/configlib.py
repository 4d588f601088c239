"""Typed experiment configs: load ``configs/NAME.py``, override fields from the command line,
and save / compare them as JSON.

A config file is a Python file with a function ``get_config()`` returning a (nested)
dataclass. Command-line overrides are ``dotted.field=value`` strings; the value is parsed
according to the field's annotation (int, float, bool, str, Optional[...], tuple[...],
Literal-like choices are checked by the dataclass itself in ``__post_init__``).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import types
import typing
from collections.abc import Sequence
from typing import Any

from distill_jax.errors import UserError


def load_config_file(path: str) -> Any:
    """Runs ``get_config()`` from a Python config file and returns its dataclass."""
    if not os.path.isfile(path):
        raise UserError(f"config file {path} does not exist")
    spec = importlib.util.spec_from_file_location(
        f"distill_jax_config_{abs(hash(os.path.abspath(path)))}", path
    )
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        if not hasattr(module, "get_config"):
            raise UserError(f"config file {path} defines no get_config()")
        config = module.get_config()
    except UserError:
        raise
    except SyntaxError as err:  # the file itself does not parse
        file = (
            path
            if not err.filename or os.path.abspath(err.filename) == os.path.abspath(path)
            else err.filename
        )
        where = f"{file}, line {err.lineno}" if err.lineno else file
        raise UserError(f"config file {where}: syntax error: {err.msg}") from None
    except Exception as err:  # noqa: BLE001 (running the file failed: an import, a name, ...)
        raise UserError(
            f"config file {_failing_line(err, path)}: {type(err).__name__}: {err}"
        ) from None
    if not dataclasses.is_dataclass(config):
        raise UserError(f"{path}: get_config() returned {type(config).__name__}, not a dataclass")
    return config


def _failing_line(err: BaseException, path: str) -> str:
    """ "PATH, line N" of the last traceback frame inside the config file (``path`` alone
    when none is)."""
    import traceback

    target = os.path.abspath(path)
    line = None
    for frame in traceback.extract_tb(err.__traceback__):
        if os.path.abspath(frame.filename) == target:
            line = frame.lineno
    return path if line is None else f"{path}, line {line}"


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected a boolean (true/false), got {text!r}")


def _parse_value(text: str, annotation: Any) -> Any:
    """Parses ``text`` into a value of type ``annotation``."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if text.strip().lower() in ("none", "null") and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _parse_value(text, arg)
            except ValueError as err:
                errors.append(str(err))
        raise ValueError("; ".join(errors))
    if origin is typing.Literal:
        for choice in args:
            if str(choice) == text:
                return choice
        raise ValueError(f"expected one of {list(args)}, got {text!r}")
    if origin in (tuple, list):
        items = [item for item in text.strip("()[] ").split(",") if item.strip()]
        item_type = args[0] if args else str
        values = [_parse_value(item.strip(), item_type) for item in items]
        return tuple(values) if origin is tuple else values
    if annotation is bool:
        return _parse_bool(text)
    if annotation is int:
        return int(text)
    if annotation is float:
        return float(text)
    if annotation is str or annotation is Any:
        return text
    raise ValueError(f"cannot parse a value of type {annotation}")


def override(config: Any, assignments: Sequence[str]) -> Any:
    """Returns ``config`` with ``["a.b=1", ...]`` applied. Unknown fields and values that do
    not parse raise :class:`UserError` naming the field and the value."""
    for assignment in assignments:
        if "=" not in assignment:
            raise UserError(f"override {assignment!r} is not of the form field.path=value")
        dotted, text = assignment.split("=", 1)
        config = _override_one(config, dotted.strip().split("."), text, dotted.strip())
    return config


def _override_one(node: Any, path: list[str], text: str, dotted: str) -> Any:
    if not dataclasses.is_dataclass(node):
        raise UserError(f"override {dotted}: {type(node).__name__} has no fields")
    hints = typing.get_type_hints(type(node))
    names = [f.name for f in dataclasses.fields(node)]
    head = path[0]
    if head not in names:
        raise UserError(
            f"override {dotted}: {type(node).__name__} has no field {head!r} "
            f"(fields: {', '.join(names)})"
        )
    if len(path) > 1:
        child = _override_one(getattr(node, head), path[1:], text, dotted)
        return _replace(node, head, child, dotted)
    try:
        value = _parse_value(text, hints[head])
    except ValueError as err:
        raise UserError(f"override {dotted}={text}: {err}") from None
    return _replace(node, head, value, dotted)


def _replace(node: Any, name: str, value: Any, dotted: str) -> Any:
    try:
        return dataclasses.replace(node, **{name: value})
    except (ValueError, TypeError) as err:  # __post_init__ validation
        raise UserError(f"override {dotted}: {err}") from None


def to_dict(config: Any) -> dict:
    """A JSON-able dict of a (nested) dataclass config."""
    return json.loads(json.dumps(dataclasses.asdict(config), default=str))


_NO_DEFAULT = "<no default>"


def declared_defaults(config: Any) -> dict:
    """The declared default of every field of a (nested) dataclass config, JSON-able, nested
    like :func:`to_dict` (fields without a default map to a marker that equals no value)."""
    out = {}
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if dataclasses.is_dataclass(value):
            out[field.name] = declared_defaults(value)
        elif field.default is not dataclasses.MISSING:
            out[field.name] = field.default
        elif field.default_factory is not dataclasses.MISSING:
            out[field.name] = field.default_factory()
        else:
            out[field.name] = _NO_DEFAULT
    return json.loads(json.dumps(out, default=str))


def diff(saved: dict, current: dict, prefix: str = "", defaults: dict | None = None) -> list[str]:
    """Dotted names of fields whose values differ between two config dicts.

    With ``defaults`` (:func:`declared_defaults` of the current config), a field that the
    saved config lacks -- one added to the code after that run was saved, alone or with its
    whole section -- counts as unchanged while it keeps its default, so older runs still
    resume."""
    out = []
    defaults = defaults or {}
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        name = f"{prefix}{key}"
        if isinstance(b, dict) and (isinstance(a, dict) or key not in saved):
            # (a section the saved config lacks: each field against its default)
            sub = defaults.get(key)
            out.extend(
                diff(
                    a if isinstance(a, dict) else {},
                    b,
                    name + ".",
                    sub if isinstance(sub, dict) else None,
                )
            )
        elif key not in saved and key in defaults and defaults[key] == b:
            continue
        elif a != b:
            out.append(f"{name}: {a!r} -> {b!r}")
    return out
