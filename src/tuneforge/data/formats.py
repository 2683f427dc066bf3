"""Read JSONL / JSON / CSV / Parquet rows into typed examples; bad rows become `file:line: reason`.

Leaves chat templates, tokens and truncation to templates.py and pipeline.py (and imports no torch).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuneforge.constants import DATA_FORMATS as FORMATS
from tuneforge.errors import ConfigError, DataError
from tuneforge.paths import write_text_atomic

ON_BAD_ROW = ("fail", "skip")
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}
MAX_LISTED_ROWS = 20
_JSON_COLUMNS = ("messages", "conversations")  # CSV cells holding a JSON conversation
_JSON_TYPES = {bool: "boolean", int: "integer", float: "number", str: "string", list: "array", dict: "object"}  # fmt: skip


@dataclass(frozen=True)
class Example:
    """One training example: a conversation, or plain text for language modelling."""

    messages: list[dict[str, str]] = field(default_factory=list)
    text: str | None = None
    label: str | None = None
    source: str = ""


@dataclass(frozen=True)
class BadRow:
    """A row that cannot be used; `kind` groups reasons for the report (e.g. "missing_field")."""

    path: str
    line: int
    reason: str
    kind: str = "invalid_row"

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.reason}"


class RowError(ValueError):
    """One row does not fit its format; `reason` is what the user reads, `kind` what we count."""

    def __init__(self, reason: str, kind: str = "invalid_row") -> None:
        super().__init__(reason)
        self.reason = reason
        self.kind = kind


@dataclass
class LoadResult:
    examples: list[Example]
    bad_rows: list[BadRow]
    format: str
    rows_read: int


def list_bad_rows(bad_rows: Sequence[BadRow], limit: int = MAX_LISTED_ROWS) -> str:
    """The first `limit` bad rows as `  file:line: reason` lines, then `... and N more`."""
    lines = [f"  {row}" for row in bad_rows[:limit]]
    if len(bad_rows) > limit:
        lines.append(f"  ... and {len(bad_rows) - limit} more")
    return "\n".join(lines)


def bad_rows_error(header: str, bad_rows: Sequence[BadRow]) -> DataError:
    """A DataError listing `bad_rows` under `header`, one `file:line: reason` a line."""
    return DataError(f"{header}\n{list_bad_rows(bad_rows)}", bad_rows)


# --- reading files -------------------------------------------------------------------------


def read_records(path: str | Path) -> Iterator[tuple[int, dict | BadRow]]:
    """Yield (1-based line or row number, record dict or BadRow) for every row of a data file."""
    path = Path(path)
    readers = {".jsonl": _read_jsonl, ".ndjson": _read_jsonl, ".json": _read_json}
    readers.update({".csv": _read_csv, ".parquet": _read_parquet})
    reader = readers.get(path.suffix.lower())
    if reader is None:
        kinds = ".jsonl, .json, .csv or .parquet"
        raise DataError(f"{path}: unsupported file type {path.suffix!r} (use {kinds})")
    if path.is_dir():
        raise DataError(f"{path}: is a directory; give a data file ({', '.join(readers)})")
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    return _as_bad_rows(reader(path), str(path))


def _as_bad_rows(rows: Iterator[tuple[int, Any]], path: str) -> Iterator[tuple[int, dict | BadRow]]:
    """Readers yield a RowError for a row they cannot parse; here it gets its file and line."""
    for line, record in rows:
        if isinstance(record, RowError):
            yield line, BadRow(path, line, record.reason, record.kind)
        elif isinstance(record, dict):
            yield line, record
        else:
            reason = f"row is a JSON {_type_name(record)}, expected an object"
            yield line, BadRow(path, line, reason, "not_an_object")


def _read_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    # Binary lines, decoded one by one: a bad byte spoils one row, not the whole file.
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8").lstrip("\ufeff")
            except UnicodeDecodeError as e:
                reason = f"not valid UTF-8 ({e.reason} at byte {e.start})"
                yield line_no, RowError(reason, "invalid_encoding")
                continue
            if not text.strip():
                continue
            try:
                yield line_no, json.loads(text)
            except json.JSONDecodeError as e:
                yield line_no, RowError(f"invalid JSON: {e.msg} (column {e.colno})", "invalid_json")


def _read_json(path: Path) -> Iterator[tuple[int, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 ({e.reason} at byte {e.start})") from e
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # one JSON value per line: a JSONL file named .json
            yield from _read_jsonl(path)
            return
        raise DataError(f"{path}:{e.lineno}: invalid JSON: {e.msg} (column {e.colno})") from e
    if not isinstance(data, list):
        kind = _type_name(data)
        article = "an" if kind[0] in "aeiou" else "a"
        raise DataError(
            f"{path}: expected a JSON array of objects (or JSON Lines), got {article} {kind}"
        )
    yield from enumerate(data, start=1)


def _read_csv(path: Path) -> Iterator[tuple[int, Any]]:
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = [name.strip() for name in next(reader, [])]
            previous = reader.line_num
            for cells in reader:
                # A quoted cell may span lines: report the line where the row starts.
                start, previous = previous + 1, reader.line_num
                if cells:
                    yield start, _csv_record(header, cells)
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 ({e.reason} at byte {e.start})") from e
    except csv.Error as e:
        raise DataError(f"{path}:{reader.line_num}: unreadable CSV: {e}") from e


def _csv_record(header: list[str], cells: list[str]) -> dict | RowError:
    if len(cells) != len(header):
        return RowError(f"row has {len(cells)} fields, the header has {len(header)}", "bad_csv_row")
    record: dict[str, Any] = dict(zip(header, cells, strict=True))
    for column in _JSON_COLUMNS:
        if isinstance(record.get(column), str):
            try:
                record[column] = json.loads(record[column])
            except json.JSONDecodeError as e:
                reason = f"invalid JSON in column '{column}': {e.msg} (column {e.colno})"
                return RowError(reason, "invalid_json")
    return record


def _read_parquet(path: Path) -> Iterator[tuple[int, Any]]:
    import pyarrow.parquet as pq  # lazy: only parquet users pay for the import

    try:
        parquet = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise DataError(f"{path}: unreadable Parquet file: {e}") from e
    row_no = 0
    for batch in parquet.iter_batches(batch_size=1024):
        for record in batch.to_pylist():
            row_no += 1
            yield row_no, record


# --- formats -------------------------------------------------------------------------------


def detect_format(record: dict) -> str:
    """The format one record fits, from its keys (null values count as absent)."""
    keys = {key for key, value in record.items() if value is not None}
    if "messages" in keys:
        return "messages"
    if "conversations" in keys:
        return "sharegpt"
    if "instruction" in keys:
        return "alpaca"
    if "text" in keys:
        return "classification" if "label" in keys else "text"
    raise DataError(
        f"no format fits a row with keys {sorted(record)}; expected alpaca (instruction, output), "
        "messages (messages), sharegpt (conversations), text (text) or classification (text, label)"
    )


def to_example(record: dict, fmt: str, source: str) -> Example:
    """Validate one record against `fmt`; raises RowError(reason) when the row cannot be used."""
    builders = {
        "alpaca": _alpaca,
        "messages": _messages,
        "sharegpt": _sharegpt,
        "text": _text,
        "classification": _classification,
    }
    if fmt not in builders:
        raise ConfigError(f"data.format: {fmt!r} is not one of {', '.join(FORMATS)}")
    return builders[fmt](record, source)


def _type_name(value: Any) -> str:
    return "null" if value is None else _JSON_TYPES.get(type(value), type(value).__name__)


def _required_str(record: dict, key: str, where: str = "") -> str:
    value = record.get(key)
    if value is None:
        raise RowError(f"{where}missing field '{key}'", "missing_field")
    if not isinstance(value, str):
        raise RowError(
            f"{where}field '{key}' must be a string, got {_type_name(value)}", "wrong_type"
        )
    return value


def _optional_str(record: dict, key: str) -> str:
    value = record.get(key)
    if value is not None and not isinstance(value, str):
        raise RowError(f"field '{key}' must be a string, got {_type_name(value)}", "wrong_type")
    return value or ""


def _label(record: dict) -> str | None:
    value = record.get("label")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise RowError(
            f"field 'label' must be a string or integer, got {_type_name(value)}", "wrong_type"
        )
    return str(value)


def _alpaca(record: dict, source: str) -> Example:
    instruction = _required_str(record, "instruction")
    extra_input = _optional_str(record, "input")
    system = _optional_str(record, "system")
    output = _required_str(record, "output")
    if not instruction.strip():
        raise RowError("empty instruction: 'instruction' is blank", "empty_prompt")
    if not output.strip():
        raise RowError("empty response: 'output' is blank", "empty_response")
    user = f"{instruction}\n\n{extra_input}" if extra_input.strip() else instruction
    messages = [{"role": "system", "content": system}] if system.strip() else []
    messages += [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    return Example(messages=messages, label=_label(record), source=source)


def _turn_list(record: dict, key: str) -> list:
    turns = record.get(key)
    if turns is None:
        raise RowError(f"missing field '{key}'", "missing_field")
    if not isinstance(turns, list):
        raise RowError(f"field '{key}' must be an array, got {_type_name(turns)}", "wrong_type")
    return turns


def _content(turn: dict, key: str, where: str) -> str:
    value = turn.get(key)
    if isinstance(value, list):  # OpenAI content parts: keep the text parts
        parts = [p.get("text") for p in value if isinstance(p, dict) and p.get("type") == "text"]
        if len(parts) == len(value) and all(isinstance(p, str) for p in parts):
            return "".join(parts)
        raise RowError(
            f"{where}: field '{key}' has non-text parts; only text is supported", "wrong_type"
        )
    return _required_str(turn, key, where=f"{where}: ")


def _role(turn: dict, key: str, where: str, allowed: dict[str, str]) -> str:
    value = _required_str(turn, key, where=f"{where}: ")
    if value not in allowed:
        raise RowError(f"{where}.{key} {value!r} is not one of {', '.join(allowed)}", "bad_role")
    return allowed[value]


def _messages(record: dict, source: str) -> Example:
    turns = []
    for i, turn in enumerate(_turn_list(record, "messages")):
        where = f"messages[{i}]"
        if not isinstance(turn, dict):
            raise RowError(f"{where} must be an object, got {_type_name(turn)}", "wrong_type")
        role = _role(turn, "role", where, {r: r for r in ROLES})
        turns.append({"role": role, "content": _content(turn, "content", where)})
    _check_conversation(turns, "messages")
    return Example(messages=turns, label=_label(record), source=source)


def _sharegpt(record: dict, source: str) -> Example:
    system = _optional_str(record, "system")
    turns = [{"role": "system", "content": system}] if system.strip() else []
    for i, turn in enumerate(_turn_list(record, "conversations")):
        where = f"conversations[{i}]"
        if not isinstance(turn, dict):
            raise RowError(f"{where} must be an object, got {_type_name(turn)}", "wrong_type")
        role = _role(turn, "from", where, SHAREGPT_ROLES)
        turns.append({"role": role, "content": _content(turn, "value", where)})
    _check_conversation(turns, "conversations", offset=1 if system.strip() else 0)
    return Example(messages=turns, label=_label(record), source=source)


def _check_conversation(turns: list[dict[str, str]], key: str, offset: int = 0) -> None:
    if not any(turn["role"] == "assistant" for turn in turns):
        raise RowError("conversation has no assistant turn", "no_assistant_turn")
    if turns[0]["role"] == "assistant":
        raise RowError(
            "conversation starts with an assistant turn: nothing prompts it", "bad_turn_order"
        )
    for i, turn in enumerate(turns):
        if turn["role"] == "assistant" and not turn["content"].strip():
            raise RowError(
                f"empty response: {key}[{i - offset}] (assistant) is blank", "empty_response"
            )


def _text(record: dict, source: str) -> Example:
    text = _required_str(record, "text")
    if not text.strip():
        raise RowError("empty text: 'text' is blank", "empty_text")
    return Example(messages=[], text=text, source=source)


def _classification(record: dict, source: str) -> Example:
    text = _required_str(record, "text")
    if not text.strip():
        raise RowError("empty text: 'text' is blank", "empty_text")
    label = _label(record)
    if label is None:
        raise RowError("missing field 'label'", "missing_field")
    if not label.strip():
        raise RowError("empty label: 'label' is blank", "empty_response")
    messages = [{"role": "user", "content": text}, {"role": "assistant", "content": label}]
    return Example(messages=messages, label=label, source=source)


# --- loading a file ------------------------------------------------------------------------


def load_examples(path: str | Path, fmt: str = "auto", on_bad_row: str = "fail") -> LoadResult:
    """Read a whole file; with "fail" any bad row raises DataError listing all of them."""
    if fmt != "auto" and fmt not in FORMATS:
        raise ConfigError(f"data.format: {fmt!r} is not one of auto, {', '.join(FORMATS)}")
    if on_bad_row not in ON_BAD_ROW:
        raise ConfigError(f"data.on_bad_row: {on_bad_row!r} is not one of {', '.join(ON_BAD_ROW)}")
    records = list(read_records(path))
    if fmt == "auto":
        fmt = _detect_file_format(records, path)
    examples: list[Example] = []
    bad_rows: list[BadRow] = []
    for line, record in records:
        if isinstance(record, BadRow):
            bad_rows.append(record)
            continue
        try:
            examples.append(to_example(record, fmt, f"{path}:{line}"))
        except RowError as e:
            bad_rows.append(BadRow(str(path), line, e.reason, e.kind))
    if bad_rows and on_bad_row == "fail":
        header = f"{path}: {len(bad_rows)} of {len(records)} rows are bad (set data.on_bad_row: skip to drop them):"
        raise bad_rows_error(header, bad_rows)
    return LoadResult(examples=examples, bad_rows=bad_rows, format=fmt, rows_read=len(records))


def _detect_file_format(records: list[tuple[int, dict | BadRow]], path: str | Path) -> str:
    """The format of the first record that fits one; rows before it are judged against it."""
    first_error: DataError | None = None
    for line, record in records:
        if isinstance(record, BadRow):
            continue
        try:
            return detect_format(record)
        except DataError as e:
            first_error = first_error or DataError(f"{path}:{line}: {e}")
    if first_error is not None:
        raise first_error
    bad_rows = [record for _, record in records if isinstance(record, BadRow)]
    if bad_rows:
        raise bad_rows_error(
            f"{path}: cannot detect the format: no row is a valid record:", bad_rows
        )
    raise DataError(f"{path}: the file has no rows")


# --- writing files -------------------------------------------------------------------------


def example_record(example: Example) -> dict[str, Any]:
    """A JSONL row that loads back as the same example (messages and label, or plain text)."""
    if example.text is not None:
        return {"text": example.text}
    record: dict[str, Any] = {"messages": example.messages}
    if example.label is not None:
        record["label"] = example.label
    return record


def write_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> Path:
    """One JSON object a line, UTF-8, written to a temporary file and renamed into place."""
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    write_text_atomic(path, text)
    return Path(path)


def write_examples_jsonl(path: str | Path, examples: Iterable[Example]) -> Path:
    """Examples as JSONL rows that `load_examples` reads back unchanged."""
    return write_jsonl(path, (example_record(ex) for ex in examples))
