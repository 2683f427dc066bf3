"""Typed run configuration: one YAML file plus `key=value` overrides, validated once.

Every key has a default, a type and a one-line doc. Method keys are validated by the options
model each method registers here (`register_method_options`); nothing here imports torch or
any method: the methods package imports this one, never the reverse.
"""

from tuneforge.config.base import (
    MethodSection,
    Section,
    method_names,
    options_model,
    register_method_options,
)
from tuneforge.config.loader import build_config, describe, load_config, parse_overrides
from tuneforge.config.scarce import AugmentSection, MetaSection
from tuneforge.config.sections import (
    CheckpointSection,
    DataSection,
    EarlyStoppingSection,
    EvalSection,
    LogSection,
    LrGroupSection,
    ModelSection,
    OutputSection,
    RunConfig,
    TrainSection,
    eval_metric_keys,
)

__all__ = [
    "AugmentSection",
    "CheckpointSection",
    "DataSection",
    "EarlyStoppingSection",
    "EvalSection",
    "LogSection",
    "LrGroupSection",
    "MetaSection",
    "MethodSection",
    "ModelSection",
    "OutputSection",
    "RunConfig",
    "Section",
    "TrainSection",
    "build_config",
    "describe",
    "eval_metric_keys",
    "load_config",
    "method_names",
    "options_model",
    "parse_overrides",
    "register_method_options",
]
