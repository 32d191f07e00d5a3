"""Typed configuration from defaults → YAML/JSON/TOML file → command-line overrides, with clear errors."""

from __future__ import annotations

import json
import tomllib
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from backends.errors import ConfigError

__all__ = ["apply_overrides", "kind_of", "load_config", "read_document", "read_mapping", "validate", "yaml_load"]

M = TypeVar("M", bound=BaseModel)

_LOADER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def yaml_load(text: str) -> Any:
    """Parse YAML safely, with libyaml's C loader where PyYAML has it (~50× faster on large files)."""
    return yaml.load(text, Loader=_LOADER)


def read_document(path: str | Path) -> Any:
    """Read a YAML, JSON or TOML file as whatever it holds; errors name the file and say what is wrong."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"{file}: no such file")
    try:
        text = file.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{file}: not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start}); "
            "re-save the file as UTF-8"
        ) from None
    try:
        if file.suffix == ".json":
            return json.loads(text)
        if file.suffix == ".toml":
            return tomllib.loads(text)
        return yaml_load(text)
    except (yaml.YAMLError, json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        kind = {".json": "JSON", ".toml": "TOML"}.get(file.suffix, "YAML")
        raise ConfigError(f"{file}: not valid {kind}: {exc}") from None


def read_mapping(path: str | Path) -> dict[str, Any]:
    """Read a YAML, JSON or TOML file holding a mapping; errors name the file and say what is wrong."""
    file = Path(path)
    data = read_document(file)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{file}: the top level must be a mapping of keys, not {type(data).__name__}")
    return data


def _parse_value(text: str) -> Any:
    try:
        return yaml_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(data: Mapping[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Apply ``dotted.key=value`` overrides (values parsed as YAML) to a nested mapping."""
    result: dict[str, Any] = json.loads(json.dumps(data, default=str))
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like key.path=value")
        parts = key.split(".")
        node: Any = result
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            if isinstance(node, list):  # a list index: engine.groups.policy.0.base_url
                if not part.isdigit() or int(part) > len(node):
                    raise ConfigError(f"override {item!r}: {'.'.join(parts[:depth]) or 'the value'} is a list of "
                                      f"{len(node)}; {part!r} is not an index in 0..{len(node)}")
                index = int(part)
                if index == len(node):
                    node.append({})
                if last:
                    node[index] = _parse_value(raw)
                elif not isinstance(node[index], dict | list):
                    node[index] = {}
                node = node[index]
                continue
            if last:
                node[part] = _parse_value(raw)
                break
            child = node.get(part)
            if not isinstance(child, dict | list):
                child = {}
                node[part] = child
            node = child
    return result


def _model_types(annotation: Any, infix: str = "") -> list[tuple[str, type[BaseModel]]]:
    """The pydantic models inside an annotation (``X | None``, ``list[X]``, ``dict[str, list[X]]``), each with
    the path parts between the field and it (``.0`` for a list item, ``.<key>`` for a mapping's value)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [(infix, annotation)]
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (list, tuple, set):
        return [m for arg in args for m in _model_types(arg, f"{infix}.0")]
    if origin is dict and len(args) == 2:
        return _model_types(args[1], f"{infix}.<key>")
    if isinstance(annotation, types.UnionType) or origin is typing.Union:
        return [m for arg in args for m in _model_types(arg, infix)]
    return []


def _paths_to(model: type[BaseModel], name: str, prefix: str = "", depth: int = 0) -> list[str]:
    """Dotted paths under ``model`` whose last key is ``name``."""
    found: list[str] = []
    if depth > 5:
        return found
    for field_name, field in model.model_fields.items():
        path = f"{prefix}{field_name}"
        if field_name == name:
            found.append(path)
        for infix, inner in _model_types(field.annotation):
            found += _paths_to(inner, name, f"{path}{infix}.", depth + 1)
    return found


def _step(annotation: Any, part: Any) -> Any:
    """The annotation one path part below ``annotation`` (a field of a model, an item of a list, a mapping's
    value), or None when the part does not fit."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        field = annotation.model_fields.get(str(part))
        return None if field is None else field.annotation
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (list, tuple, set) and isinstance(part, int) and args:
        return args[0]
    if origin is dict and len(args) == 2:
        return args[1]
    if isinstance(annotation, types.UnionType) or origin is typing.Union:
        for arg in args:
            if arg is not type(None) and (found := _step(arg, part)) is not None:
                return found
    return None


def _owner(model: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The model that holds the last key of ``loc`` (``loc`` from a validation error of ``model``)."""
    node: Any = model
    for part in loc[:-1]:
        node = _step(node, part)
        if node is None:
            return None
    owners = [inner for infix, inner in _model_types(node) if not infix]
    return owners[0] if owners else None


def _renamed(owner: type[BaseModel] | None) -> dict[str, str]:
    """A model's ``_renamed_keys``: names other tools give its keys (old name → its name here)."""
    renamed: dict[str, str] = getattr(owner, "_renamed_keys", {}) if owner is not None else {}
    return renamed


def _unknown_key(model: type[BaseModel], loc: tuple[Any, ...]) -> str:
    """"unknown key" with a hint: the model's own for that key (``_key_hints``, ``_renamed_keys``: a key other
    tools spell differently), else where the key belongs when the model has it elsewhere."""
    name = str(loc[-1])
    owner = _owner(model, loc)
    hints: dict[str, str] = getattr(owner, "_key_hints", {}) if owner is not None else {}
    if name in hints:
        return f"unknown key {name} — {hints[name]}"
    if name in _renamed(owner):
        return f"unknown key {name} — rename it to {_renamed(owner)[name]}"
    here = ".".join(str(p) for p in loc[:-1] if not isinstance(p, int))
    paths = sorted(_paths_to(model, name), key=lambda p: (not p.startswith(here), len(p)))
    if not paths:
        return "unknown key (check the spelling)"
    return f"unknown key {name} — did you mean {' or '.join(paths[:3])}?"


def kind_of(value: Any) -> str:
    """What a value is, in a config file's words."""
    if value is None:
        return "empty (null)"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "text (a string)"
    if isinstance(value, list | tuple):
        return f"a list of {len(value)}"
    if isinstance(value, Mapping):
        return "a mapping"
    return type(value).__name__


MAX_ERRORS = 20
"""Validation problems listed before the rest are only counted."""


def _problems(model: type[BaseModel], exc: ValidationError) -> list[str]:
    """One line per problem, key path first. Left out: a list's "too short" when its items failed (the items
    that failed are not counted: the real problems are theirs), and a required key written under another
    tool's name for it (the unknown-key line says to rename it)."""
    errors = exc.errors()
    locs = [tuple(err["loc"]) for err in errors]
    renamed = {
        (*err["loc"][:-1], _renamed(_owner(model, tuple(err["loc"])))[str(err["loc"][-1])])
        for err in errors
        if err["type"] == "extra_forbidden" and err["loc"]
        and str(err["loc"][-1]) in _renamed(_owner(model, tuple(err["loc"])))
    }
    lines = []
    for err, loc in zip(errors, locs, strict=True):
        if err["type"] == "too_short" and any(len(other) > len(loc) and other[: len(loc)] == loc for other in locs):
            continue
        if err["type"] == "missing" and loc in renamed:
            continue
        where = ".".join(str(p) for p in loc) or "(top level)"
        if err["type"] == "extra_forbidden":
            message = _unknown_key(model, loc)
        elif err["type"].endswith("_type") and err["type"] != "literal_type":
            message = f"{err['msg']}, not {kind_of(err['input'])}"
        else:
            message = err["msg"]
        lines.append(f"  {where}: {message}")
    return lines


def validate(model: type[M], data: Mapping[str, Any], *, source: str = "config",
             context: Mapping[str, Any] | None = None) -> M:
    """Validate ``data`` into ``model`` (``context``: pydantic's validation context); every problem is listed
    with its key path (the first :data:`MAX_ERRORS`, then how many more)."""
    try:
        return model.model_validate(data, context=context)
    except ValidationError as exc:
        lines = _problems(model, exc)
        if len(lines) > MAX_ERRORS:
            lines = [*lines[:MAX_ERRORS], f"  … and {len(lines) - MAX_ERRORS} more errors"]
        raise ConfigError(f"{source}: invalid configuration\n" + "\n".join(lines)) from None


def load_config(
    model: type[M], path: str | Path | None = None, overrides: Iterable[str] = (), *, section: str | None = None
) -> M:
    """Defaults → file (optionally one ``section`` of it) → overrides, validated into ``model``."""
    data: dict[str, Any] = {}
    source = "command line"
    if path is not None:
        data = read_mapping(path)
        source = str(path)
        if section is not None:
            data = data.get(section) or {}
    data = apply_overrides(data, overrides)
    return validate(model, data, source=source)
