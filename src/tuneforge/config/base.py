"""The base of every config section, and the registry of method options models.

Each method registers its options model here when `tuneforge.methods` is imported; the config
validates `method.*` with it and never imports a method.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tuneforge.config.messages import format_errors, not_one_of
from tuneforge.errors import ConfigError

#: Every method's options model by method name; `tuneforge.methods.register` fills it.
_METHOD_OPTIONS: dict[str, type[MethodSection]] = {}


class Section(BaseModel):
    """Base for config sections: unknown keys are errors, values are checked on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class MethodSection(BaseModel):
    """Base of every method's options; each method subclasses it with its own keys."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    name: str = Field("lora", description="Fine-tuning method.")
    init_from: str | None = Field(
        None,
        description="Start from the adapter of this run directory (e.g. a meta-train run) "
        "instead of a fresh one; adapter methods only, with the same shapes.",
    )


def register_method_options(name: str, options: type[MethodSection]) -> None:
    """Make `method.name: NAME` validate with `options` (called by the method registry)."""
    if name in _METHOD_OPTIONS:
        raise ValueError(f"method {name!r} registered twice")
    _METHOD_OPTIONS[name] = options


def method_names() -> list[str]:
    """Every registered method name (empty until `tuneforge.methods` has been imported)."""
    return sorted(_METHOD_OPTIONS)


def options_model(name: str) -> type[MethodSection]:
    return _METHOD_OPTIONS[name]


def method_options(value: dict[str, Any]) -> MethodSection:
    """Validate the method section with the registered method's own options model."""
    if not _METHOD_OPTIONS:  # a programming error, not a user's: the registry was never loaded
        raise RuntimeError("no method is registered: import tuneforge.methods first")
    name = value.get("name", "lora")
    if not isinstance(name, str):
        raise ConfigError(f"method.name: expected one of {', '.join(method_names())}, got {name!r}")
    if name not in _METHOD_OPTIONS:
        raise ConfigError(f"method.name: {not_one_of(name, method_names())}")
    try:
        return options_model(name).model_validate(value)
    except ValidationError as err:
        raise ConfigError(
            "\n".join(format_errors(err, "method", root=options_model(name)))
        ) from None
