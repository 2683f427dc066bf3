"""Reading a run config: YAML plus `key=value` overrides, errors that name the key path.

The sections themselves (types, defaults, docs) are in `sections.py`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from tuneforge.config.base import method_names, method_options, options_model
from tuneforge.config.messages import format_errors
from tuneforge.config.sections import RunConfig
from tuneforge.errors import ConfigError


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`train.lr=1e-4 method.r=8` -> nested dict; values are parsed as YAML scalars."""
    tree: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"{item}: an override must look like key.path=value")
        path, raw = item.split("=", 1)
        keys = path.strip().split(".")
        if not all(keys):
            raise ConfigError(
                f"{item}: empty key in the override; write section.key=value, e.g. train.lr=1e-4"
            )
        node = tree
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{path}: conflicts with another override")
        node[keys[-1]] = _override_value(path, raw)
    return tree


def _override_value(path: str, raw: str) -> Any:
    """An override's value as a YAML scalar or flow collection (empty: null)."""
    if raw == "":
        return None
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or "not valid YAML"
        raise ConfigError(f"{path}: the value {raw!r} is not valid YAML ({problem})") from None


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def build_config(raw: dict[str, Any], overrides: list[str] | None = None) -> RunConfig:
    """Validate a raw mapping (plus overrides) into a RunConfig, or raise ConfigError."""
    merged = _merge(raw or {}, parse_overrides(overrides or []))
    problems: list[str] = []
    method = merged.pop("method", None)
    if isinstance(method, str):
        method = {"name": method}
    if method is not None and not isinstance(method, dict):
        problems.append("method: expected a mapping with a 'name' key")
    elif method is not None:
        try:
            merged["method"] = method_options(method)
        except ConfigError as err:
            problems.extend(str(err).splitlines())
    try:
        config = RunConfig.model_validate(merged)
    except ValidationError as err:
        problems.extend(format_errors(err, root=RunConfig))
    if problems:
        raise ConfigError("\n".join(problems))
    return config


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML run file (or nothing: all defaults) and apply `key=value` overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if path.is_dir():
            raise ConfigError(f"{path}: is a directory; give the path of a YAML config file")
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError as err:
            raise ConfigError(
                f"{path}: not a text file (invalid UTF-8 at byte {err.start}); give a YAML config"
            ) from None
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise ConfigError(f"{where}: not valid YAML: {problem}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return build_config(raw, overrides)


def describe(model: type[BaseModel] = RunConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key path, default, doc) for every key: used by `tuneforge config` to print the reference.

    Method keys are listed once per registered method, as `method.KEY [METHOD]`.
    """
    rows = []
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        if model is RunConfig and name == "method":
            for method in method_names():
                for key, doc_row in _field_rows(options_model(method), "method."):
                    rows.append((f"{key} [{method}]", *doc_row))
            continue
        ann = field.annotation
        subs = [
            a
            for a in getattr(ann, "__args__", (ann,))
            if isinstance(a, type) and issubclass(a, BaseModel)
        ]
        if subs:
            rows.extend(describe(subs[0], path + "."))
            continue
        rows.append((path, *_doc(field)))
    return rows


def _field_rows(model: type[BaseModel], prefix: str) -> list[tuple[str, tuple[str, str]]]:
    return [(f"{prefix}{name}", _doc(field)) for name, field in model.model_fields.items()]


def _doc(field: Any) -> tuple[str, str]:
    if field.is_required():  # keys of list items, e.g. train.lr_groups.pattern
        return "(required)", field.description or ""
    default = field.get_default(call_default_factory=True)
    if isinstance(default, BaseModel):
        default = default.model_dump(mode="json")
    return json.dumps(default, default=str), field.description or ""
