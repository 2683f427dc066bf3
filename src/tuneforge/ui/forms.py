"""The new-run form, generated from the typed config sections, and its round trip back to a config.

Every key, default, doc line and allowed value comes from `tuneforge.config`; validation is
`build_config`'s, unchanged: this module only turns form text into a raw mapping and puts each
error line beside the field its key path names.
"""

from __future__ import annotations

import json
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml
from pydantic import BaseModel

from tuneforge.config import RunConfig, build_config, method_names, options_model
from tuneforge.errors import ConfigError

#: Keys written to the saved YAML even when they hold their default, so that the file reads well.
ALWAYS_WRITTEN = ("model.name", "method.name", "data.train", "output.dir")


@dataclass
class FieldSpec:
    """One form input: `path` is the config key path (method keys: `method.KEY`)."""

    path: str
    kind: str  # choice | bool | text | yaml
    default: str  # the default as the input shows it
    doc: str
    choices: list[str] = field(default_factory=list)
    nullable: bool = False
    method: str | None = None  # the method a method key belongs to

    @property
    def input_name(self) -> str:
        return f"method:{self.method}:{self.path}" if self.method else self.path

    @property
    def key(self) -> str:
        return self.path.rsplit(".", 1)[-1]


@dataclass
class Section:
    name: str
    doc: str
    fields: list[FieldSpec]


def _unwrap(annotation: Any) -> tuple[list[Any], bool]:
    """The non-None members of a (possibly Optional / union) annotation, and whether None is one."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = list(typing.get_args(annotation))
        return [a for a in args if a is not type(None)], type(None) in args
    return [annotation], False


def show(value: Any, kind: str) -> str:
    """A config value as an input shows it: strings raw, null empty, the rest as flow YAML/JSON."""
    if value is None:
        return ""
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    if isinstance(value, str) and (kind in ("text", "choice") or _reads_back(value)):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value, ensure_ascii=False)


def _reads_back(text: str) -> bool:
    """Whether YAML reads `text` back as the same string (then it needs no quotes)."""
    try:
        return yaml.safe_load(text) == text
    except yaml.YAMLError:
        return False


def field_spec(path: str, info: Any, method: str | None = None) -> FieldSpec:
    members, nullable = _unwrap(info.annotation)
    first = members[0]
    if len(members) == 1 and typing.get_origin(first) is Literal:
        kind, choices = "choice", [str(c) for c in typing.get_args(first)]
    elif len(members) == 1 and first is bool:
        kind, choices = "bool", ["true", "false"]
    elif len(members) == 1 and first is str:
        kind, choices = "text", []
    else:  # numbers, lists, tuples, sub-sections, unions: typed as YAML, like a CLI override
        kind, choices = "yaml", []
    default = None if info.is_required() else info.get_default(call_default_factory=True)
    return FieldSpec(
        path=path,
        kind=kind,
        default=show(default, kind),
        doc=info.description or "",
        choices=choices,
        nullable=nullable,
        method=method,
    )


def sections() -> list[Section]:
    """Every config section as form fields, in RunConfig's order; `method` holds every method."""
    out = []
    for name, info in RunConfig.model_fields.items():
        if name == "method":
            specs = [
                field_spec(f"method.{key}", sub, method=m)
                for m in method_names()
                for key, sub in options_model(m).model_fields.items()
                if key != "name"
            ]
            out.append(Section("method", "Fine-tuning method and its own options.", specs))
            continue
        model = info.annotation
        if not hasattr(
            model, "model_fields"
        ):  # an optional section (e.g. meta: MetaSection | None)
            model = next(a for a in typing.get_args(model) if hasattr(a, "model_fields"))
        specs = [field_spec(f"{name}.{key}", sub) for key, sub in model.model_fields.items()]
        doc = ((model.__doc__ or "").strip().splitlines() or [""])[0]
        out.append(Section(name, doc, specs))
    return out


def all_fields() -> list[FieldSpec]:
    return [spec for section in sections() for spec in section.fields]


def parse_value(spec: FieldSpec, text: str) -> Any:
    """Form text -> the value handed to the config; wrong types are left for pydantic to name."""
    text = text.strip()
    if text == "" and spec.nullable:
        return None
    if spec.kind in ("text", "choice"):
        return None if spec.nullable and text == "null" else text
    if spec.kind == "bool":
        return {"true": True, "false": False}.get(text, text)
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text  # pydantic then says what type the key wants


def _set(tree: dict[str, Any], path: str, value: Any) -> None:
    *parents, last = path.split(".")
    for key in parents:
        tree = tree.setdefault(key, {})
    tree[last] = value


@dataclass
class FormResult:
    """The submitted text per input name, the raw config mapping, and what went wrong."""

    values: dict[str, str]
    raw: dict[str, Any]
    method: str
    config: RunConfig | None = None
    errors: dict[str, list[str]] = field(default_factory=dict)  # input name -> lines
    general: list[str] = field(default_factory=list)  # lines that name no form field

    @property
    def ok(self) -> bool:
        return self.config is not None and not self.errors and not self.general

    def add_error(self, line: str, specs: list[FieldSpec]) -> None:
        target = field_for_error(line, specs, self.method)
        if target is None:
            self.general.append(line)
        else:
            self.errors.setdefault(target.input_name, []).append(line)


def read_form(form: dict[str, str]) -> FormResult:
    """Build the raw config from the form (keys left at their default are not written)."""
    method = form.get("method.name", "lora")
    raw: dict[str, Any] = {"method": {"name": method}}
    values: dict[str, str] = {"method.name": method}
    for spec in all_fields():
        if spec.method not in (None, method) or spec.input_name not in form:
            continue
        text = form[spec.input_name]
        values[spec.input_name] = text
        if text.strip() != spec.default or spec.path in ALWAYS_WRITTEN:
            _set(raw, spec.path, parse_value(spec, text))
    return FormResult(values=values, raw=_ordered(raw), method=method)


def validate(result: FormResult) -> FormResult:
    """Run the CLI's own validation on the raw mapping; each error line goes to its field."""
    specs = [s for s in all_fields() if s.method in (None, result.method)]
    try:
        result.config = build_config(result.raw)
    except ConfigError as err:
        for line in str(err).splitlines():
            result.add_error(line, specs)
    return result


def field_for_error(line: str, specs: list[FieldSpec], method: str) -> FieldSpec | None:
    """The field whose key path starts the error line (the longest that does), or None."""
    if line.startswith("method.name:"):
        return FieldSpec("method.name", "choice", method, "")
    best = None
    for spec in specs:
        path = spec.path
        if line.startswith(path) and line[len(path) : len(path) + 1] in (":", " ", "."):
            if best is None or len(path) > len(best.path):
                best = spec
    return best


def _ordered(raw: dict[str, Any]) -> dict[str, Any]:
    """Sections in RunConfig's order, as a user would write them."""
    order = list(RunConfig.model_fields)
    return {k: raw[k] for k in sorted(raw, key=lambda k: order.index(k) if k in order else 99)}


def to_yaml(raw: dict[str, Any]) -> str:
    return yaml.safe_dump(raw, sort_keys=False, allow_unicode=True)


def values_from_config(raw: dict[str, Any]) -> dict[str, str]:
    """Form text for a config mapping read from a YAML file (absent keys keep their default)."""
    method = raw.get("method", {})
    method = {"name": method} if isinstance(method, str) else method or {}
    values = {"method.name": str(method.get("name", "lora"))}
    for spec in all_fields():
        section, key = spec.path.split(".", 1)
        if spec.method is not None:
            if spec.method == values["method.name"] and key in method:
                values[spec.input_name] = show(method[key], spec.kind)
        elif isinstance(raw.get(section), dict) and key in raw[section]:
            values[spec.input_name] = show(raw[section][key], spec.kind)
    return values
