"""Every error a user can fix, in one place: the CLI catches `TuneforgeError` once and exits.

Each type carries its exit code; nothing here imports anything of ours or any third party.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

USER_ERROR_EXIT = 2  # a problem the user can fix: config, data, model, paths, checkpoints
NONFINITE_EXIT = 3  # training stopped on a non-finite loss or gradient


class TuneforgeError(Exception):
    """Base of every user-facing error: printed as `error: <message>`, never as a traceback."""

    exit_code = USER_ERROR_EXIT


class ConfigError(TuneforgeError, ValueError):
    """A config problem, reported as one `key.path: reason` line per problem."""


class UsageError(TuneforgeError, ValueError):
    """A command-line argument that cannot be used (named in the message)."""


class DataError(TuneforgeError, ValueError):
    """A data file cannot be used as asked; `bad_rows` holds every row behind the error."""

    def __init__(self, message: str, bad_rows: Sequence[Any] = ()) -> None:
        super().__init__(message)
        self.bad_rows = list(bad_rows)


class TemplateError(DataError):
    """The chat template cannot render a conversation the way training needs."""


class ModelError(TuneforgeError, ValueError):
    """The model name cannot be resolved to local weights, or the weights cannot be used."""


class UnsafePathError(TuneforgeError, ValueError):
    """A user-supplied name would escape its root directory."""


class RunDirError(TuneforgeError, ValueError):
    """The run directory cannot be used (not empty, or not a tuneforge run)."""


class CheckpointError(TuneforgeError, ValueError):
    """A checkpoint is missing, incomplete or corrupt, or cannot be used for this run."""


class ResumeRefused(CheckpointError):
    """The run changed since the checkpoint in a way that breaks an exact resume."""


class ExportError(TuneforgeError, ValueError):
    """A run cannot be exported as asked (method, architecture, quant type, files, output dir)."""


class ServeError(TuneforgeError, ValueError):
    """The server cannot serve what was asked (a model, an adapter, a key file, an option)."""


class FeedbackError(TuneforgeError, ValueError):
    """Feedback or retrain input that cannot be used (a row, a field, an option), named."""


class StoreUnavailable(FeedbackError):
    """The feedback database cannot be reached, is locked or is not a feedback store."""


class NonFiniteError(TuneforgeError, RuntimeError):
    """Training stopped on a non-finite loss or gradient; the message names the step and rows."""

    exit_code = NONFINITE_EXIT


class PlanError(TuneforgeError, ValueError):
    """A run is predicted not to fit in memory (or no setting would); the message names the fix."""


class OutputError(TuneforgeError):
    """An output cannot be written: the disk is full, the directory is read-only or not ours."""
