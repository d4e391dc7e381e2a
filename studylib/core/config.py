"""Flat config dataclasses from YAML overlays: merged in order, type-checked and validated once.

`params/*.yaml` are overlays only: every key must be a field of the dataclass (an unknown key is an
error naming the allowed keys), and values are checked against the field's annotated type. Write
floats as `3.0e-4` in YAML (PyYAML reads `3e-4` as a string; we say so when that happens).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class UserError(ValueError):
    """A mistake in what the user gave (a file, a folder, a key, a value): the message is one line naming it
    and what is allowed. The CLIs print it as `studylib <command>: <message>` and exit 2; library callers
    (notebooks) get an ordinary ValueError."""


class ConfigError(UserError):
    """A bad key or value; the message is one line naming the key and what is allowed."""


def _check_type(key: str, value: Any, annotation: Any) -> Any:
    """`value` converted to the annotated type (int -> float, list -> tuple), or ConfigError."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _check_type(key, value, arg)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: got {value!r}, expected {annotation}")
    if origin is tuple:
        (item, *_rest) = typing.get_args(annotation)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: got {value!r}, expected a list")
        return tuple(_check_type(key, v, item) for v in value)
    if annotation is float:
        if isinstance(value, str):
            hint = " (write floats as 3.0e-4: PyYAML reads 3e-4 as a string)" if "e" in value.lower() else ""
            raise ConfigError(f"{key}: got the string {value!r}, expected a number{hint}")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: got {value!r}, expected a number")
        return float(value)
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: got {value!r}, expected an integer")
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: got {value!r}, expected true or false")
        return value
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: got {value!r}, expected a string")
        return value
    raise TypeError(f"config field {key} has an unsupported annotation {annotation}")


MAX_NODES = 1_000_000  # values a params file may expand to: a "billion laughs" file (9^9 items by aliases) hangs


def _safe_yaml(text: str, where: str) -> Any:
    """yaml.safe_load, refusing a document whose aliases would expand it past MAX_NODES values (counted on the
    composed node graph, where an alias is one shared node: nothing is expanded to count it)."""
    node = yaml.compose(text, Loader=yaml.SafeLoader)
    sizes: dict[int, int] = {}

    def size(n: yaml.Node) -> int:
        if id(n) not in sizes:
            sizes[id(n)] = 1  # a recursive alias counts once (safe_load refuses it anyway)
            children = [v for pair in n.value for v in pair] if isinstance(n, yaml.MappingNode) else \
                n.value if isinstance(n, yaml.SequenceNode) else []
            sizes[id(n)] = min(1 + sum(size(c) for c in children), MAX_NODES + 1)
        return sizes[id(n)]

    if node is not None and (count := size(node)) > MAX_NODES:
        raise ConfigError(f"{where}: its YAML aliases expand it to over {MAX_NODES:,} values (got {count:,}+); "
                          "a params file that large is refused")
    return yaml.safe_load(text)


def read_overlay(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such params file")
    try:
        data = _safe_yaml(path.read_text(), str(path)) or {}
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read the params file ({_reason(e)})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({_yaml_problem(e)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of key: value, got {type(data).__name__}")
    return data


def parse_set(assignment: str) -> tuple[str, Any]:
    """`key=value` with the value read as YAML (so `lr=3.0e-4`, `sync=false`, `bandwidths=[1.5, 6.0]`)."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set {assignment!r}: expected key=value")
    try:
        return key.strip(), _safe_yaml(raw, f"--set {key.strip()}")
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {assignment!r}: the value is not valid YAML ({_yaml_problem(e)})") from None


def _yaml_problem(error: yaml.YAMLError) -> str:
    """PyYAML's many-line message as one line: what is wrong and where (1-based line and column)."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark else problem


def _reason(error: Exception) -> str:
    return getattr(error, "strerror", None) or f"{type(error).__name__}: {error}"


def build(cls: type[T], overlays: list[dict[str, Any]]) -> T:
    """An instance of the flat dataclass `cls` from overlays applied in order over its defaults."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    merged: dict[str, Any] = {}
    for overlay in overlays:
        for key, value in overlay.items():
            if key not in hints:
                raise ConfigError(f"{key}: unknown key; allowed keys: {', '.join(names)}")
            merged[key] = _check_type(key, value, hints[key])
    try:
        return cls(**merged)
    except ConfigError:
        raise
    except ValueError as e:  # __post_init__ validation: already names the field
        raise ConfigError(str(e)) from None


def load(cls: type[T], paths: list[str | Path] = (), sets: list[str] = ()) -> T:
    """`cls` from YAML files (in order) then `key=value` assignments."""
    overlays = [read_overlay(p) for p in paths]
    overlays.append(dict(parse_set(s) for s in sets))
    return build(cls, overlays)


def to_dict(config: Any) -> dict[str, Any]:
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}


def config_hash(config: Any, exclude: tuple[str, ...] = ()) -> str:
    """Short stable hash of the resolved config (run folders and manifests name it). Fields the config's class
    lists in `HASH_NEUTRAL` (added after runs were committed) count only when they differ from the value
    given there, so the runs from before them keep their hash."""
    neutral = getattr(type(config), "HASH_NEUTRAL", {})
    items = {k: v for k, v in to_dict(config).items()
             if k not in exclude and not (k in neutral and v == neutral[k])}
    return hashlib.sha256(json.dumps(items, sort_keys=True, default=list).encode()).hexdigest()[:10]


def check_choice(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{key}: got {value!r}, allowed {allowed}")


def check_option(name: str, value: Any, low: float, high: float = math.inf, integer: bool = False,
                 low_open: bool = False) -> None:
    """A command-line option's value in range: UserError naming the option and what is allowed otherwise (None,
    an option left out, passes). NaN and infinities are refused, as every non-number."""
    if value is None:
        return
    number = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    ok = number and (not integer or float(value).is_integer()) and (value > low if low_open else value >= low) \
        and value <= high
    if not ok:
        kind = "an integer" if integer else "a number"
        bound = f"> {low:g}" if low_open else f">= {low:g}"
        allowed = f"{kind} {bound}" + (f" and <= {high:g}" if math.isfinite(high) else "")
        raise UserError(f"{name}: got {value!r}, allowed {allowed}")
