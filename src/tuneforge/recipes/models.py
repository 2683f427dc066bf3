"""The model registry as a table for `tuneforge models`: every built-in (and any local model
named) with size, context, languages and licence, and with a data file, how each tokenises it.

The registry itself is models_registry.yaml (read by models.py); printing is cli/models.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tuneforge.data.formats import load_examples
from tuneforge.data.stats import token_stats
from tuneforge.data.templates import apply_template
from tuneforge.models import (
    BUILTIN_MODELS,
    builtin_cached,
    builtin_installed,
    load_tokenizer,
    model_config,
    tokenizer_dir,
)
from tuneforge.train.estimate import Architecture, parameter_counts


def model_rows(
    data: str | None = None,
    *,
    max_length: int = 512,
    template: str | None = None,
    extra: Sequence[str] = (),
    limit: int | None = 2000,
) -> list[dict[str, Any]]:
    """One row per model; with `data`, tokens per character and the share of rows over
    `max_length` (the first `limit` rows), measured with each installed model's tokenizer.
    A tokenizer without a chat template renders with `template` (default chatml)."""
    examples = None
    if data is not None:
        examples = load_examples(data, "auto", on_bad_row="skip").examples[:limit]
    rows = []
    for name in [*BUILTIN_MODELS, *extra]:
        entry = BUILTIN_MODELS.get(name)
        arch = Architecture.from_config(model_config(name))
        row: dict[str, Any] = {
            "name": name,
            "params": parameter_counts(arch)["total"],
            "context": entry.context_length if entry else _context(name),
            "languages": ", ".join(entry.languages) if entry else "?",
            "license": entry.license if entry else "see the model's card",
            "accept_license": bool(entry and entry.license_terms),
            "installed": (builtin_installed(name) or builtin_cached(name)) if entry else True,
            "install": entry.install if entry else "",
        }
        if examples is not None and row["installed"]:
            tokenizer = load_tokenizer(tokenizer_dir(name))
            if not getattr(tokenizer, "chat_template", None):
                apply_template(tokenizer, template or "chatml")
            elif template:
                apply_template(tokenizer, template)
            stats = token_stats(tokenizer, examples, max_length)
            row |= {
                "tokens_per_char": stats.tokens_per_char,
                "over_max_length": stats.over_share,
                "rows": stats.rows,
                "max_length": max_length,
            }
        rows.append(row)
    return rows


def _context(name: str) -> int | None:
    return model_config(name).get("max_position_embeddings")
