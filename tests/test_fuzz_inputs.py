"""Property-based tests (hypothesis): arbitrary data files and configs never raise anything but
tuneforge's own error types (`TuneforgeError` subclasses), which the CLI prints as one line.

Bounded: each property runs a fixed number of examples (EXAMPLES below, also in
docs/reliability.md), without deadlines, derandomized so that a run is reproducible.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tuneforge.config import build_config, load_config, parse_overrides
from tuneforge.constants import DATA_FORMATS
from tuneforge.data.formats import RowError, detect_format, load_examples, to_example
from tuneforge.errors import TuneforgeError

#: Examples per property; the numbers docs/reliability.md quotes.
EXAMPLES = {
    "jsonl_rows": 150,
    "jsonl_bytes": 200,
    "json_file": 150,
    "csv_file": 150,
    "parquet_file": 50,
    "detect_and_build": 200,
    "config_mapping": 150,
    "config_yaml_text": 150,
    "overrides": 200,
}


def bounded(name: str):
    return settings(
        max_examples=EXAMPLES[name],
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )


# --- strategies ------------------------------------------------------------------------------

KEYS = ["messages", "conversations", "instruction", "input", "output", "system", "text",
        "label", "role", "content", "from", "value", "type"]  # fmt: skip
ROLES = ["user", "assistant", "system", "human", "gpt", "tool", ""]
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.sampled_from(ROLES),
)
keys = st.one_of(st.sampled_from(KEYS), st.text(max_size=8))
json_values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(keys, children, max_size=5),
    max_leaves=20,
)
records = st.dictionaries(keys, json_values, max_size=6)
formats = st.sampled_from(["auto", *DATA_FORMATS])
policies = st.sampled_from(["fail", "skip"])


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def only_our_errors(fn, *args, **kwargs):
    """Call `fn`; a non-tuneforge exception fails the property (hypothesis shrinks it)."""
    try:
        return fn(*args, **kwargs)
    except TuneforgeError:
        return None


def _dumps(value) -> str:
    return json.dumps(value, allow_nan=True)  # NaN/Infinity: Python's json reads them back


# --- data readers and format detection -------------------------------------------------------


@bounded("jsonl_rows")
@given(rows=st.lists(st.one_of(records, json_values), max_size=6), fmt=formats, policy=policies)
def test_jsonl_rows_of_any_shape(scratch, rows, fmt, policy):
    path = scratch / "rows.jsonl"
    path.write_text("".join(_dumps(r) + "\n" for r in rows), encoding="utf-8")
    result = only_our_errors(load_examples, path, fmt, policy)
    if result is not None:  # what was accepted is accounted for: read = used + dropped
        assert result.rows_read == len(result.examples) + len(result.bad_rows)


@bounded("jsonl_bytes")
@given(blob=st.binary(max_size=400), fmt=formats, policy=policies)
def test_jsonl_arbitrary_bytes(scratch, blob, fmt, policy):
    path = scratch / "bytes.jsonl"
    path.write_bytes(blob)
    only_our_errors(load_examples, path, fmt, policy)


@bounded("json_file")
@given(value=json_values, text=st.text(max_size=60), raw=st.booleans(), fmt=formats)
def test_json_file_any_value_or_text(scratch, value, text, raw, fmt):
    path = scratch / "data.json"
    path.write_text(text if raw else _dumps(value), encoding="utf-8")
    only_our_errors(load_examples, path, fmt, "skip")


@bounded("csv_file")
@given(
    header=st.lists(keys, max_size=5),
    cells=st.lists(st.lists(st.text(max_size=15), max_size=6), max_size=5),
    raw=st.one_of(st.none(), st.text(max_size=80)),
    fmt=formats,
    policy=policies,
)
def test_csv_any_header_and_cells(scratch, header, cells, raw, fmt, policy):
    path = scratch / "data.csv"
    if raw is None:
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(header)
        writer.writerows(cells)
        raw = buffer.getvalue()
    path.write_text(raw, encoding="utf-8")
    only_our_errors(load_examples, path, fmt, policy)


column_values = st.one_of(
    st.lists(st.one_of(st.none(), st.text(max_size=10)), min_size=3, max_size=3),
    st.lists(st.one_of(st.none(), st.integers(-5, 5)), min_size=3, max_size=3),
    st.lists(st.floats(allow_nan=True), min_size=3, max_size=3),
    st.lists(st.booleans(), min_size=3, max_size=3),
    st.lists(st.lists(st.text(max_size=5), max_size=2), min_size=3, max_size=3),
)


@bounded("parquet_file")
@given(columns=st.dictionaries(st.sampled_from(KEYS), column_values, max_size=4), fmt=formats)
def test_parquet_any_column_types(scratch, columns, fmt):
    path = scratch / "data.parquet"
    table = pa.table(columns) if columns else pa.table({"x": [1]}).drop(["x"])
    pq.write_table(table, path)
    only_our_errors(load_examples, path, fmt, "skip")


@bounded("detect_and_build")
@given(record=records, fmt=st.sampled_from(DATA_FORMATS))
def test_detection_and_row_validation(record, fmt):
    only_our_errors(detect_format, record)
    try:
        example = to_example(record, fmt, "fuzz:1")
    except RowError as err:  # the per-row contract: a reason, counted as a bad row
        assert err.reason and err.kind
        return
    assert example.text is not None or any(m["role"] == "assistant" for m in example.messages)


# --- the config loader and overrides ---------------------------------------------------------

SECTIONS = ["model", "method", "data", "train", "eval", "checkpoint", "output", "log"]
CONFIG_KEYS = ["name", "dtype", "r", "alpha", "lr", "epochs", "max_steps", "batch_size",
               "scheduler", "train", "validation", "format", "max_length", "every_steps",
               "early_stopping", "dir", "metrics", "target_modules", "seed", "keep_last"]  # fmt: skip
config_values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(st.sampled_from(CONFIG_KEYS) | st.text(max_size=6), children, max_size=4)
    ),
    max_leaves=12,
)
config_mappings = st.dictionaries(
    st.sampled_from(SECTIONS) | st.text(max_size=6),
    st.one_of(
        st.dictionaries(
            st.sampled_from(CONFIG_KEYS) | st.text(max_size=6), config_values, max_size=5
        ),
        config_values,
    ),
    max_size=5,
)


@bounded("config_mapping")
@given(raw=config_mappings)
def test_config_any_mapping(raw):
    config = only_our_errors(build_config, raw)
    if config is not None:  # an accepted config round-trips through its own dump
        assert build_config(config.to_dict()).to_dict() == config.to_dict()


@bounded("config_yaml_text")
@given(text=st.one_of(st.text(max_size=120), config_mappings.map(yaml.safe_dump)))
def test_config_any_yaml_text(scratch, text):
    path = scratch / "run.yaml"
    path.write_text(text, encoding="utf-8")
    only_our_errors(load_config, path)


key_paths = st.lists(st.sampled_from(SECTIONS + CONFIG_KEYS) | st.text(max_size=5), min_size=0, max_size=3).map(".".join)  # fmt: skip
override_values = st.one_of(
    st.text(max_size=15),
    scalars.map(lambda v: "" if v is None else str(v)),
    st.sampled_from(["[1", "{a: ", "'", "!!python/object:os.system ls", "&a [*a]", "1e-4", "~"]),
)
overrides = st.one_of(
    st.builds(lambda k, v: f"{k}={v}", key_paths, override_values), st.text(max_size=20)
)


@bounded("overrides")
@given(items=st.lists(overrides, max_size=4))
def test_overrides_any_strings(items):
    only_our_errors(parse_overrides, items)
    config = only_our_errors(load_config, None, items)
    if config is not None:
        for item in items:  # every accepted override is in the resolved config
            path, raw = item.split("=", 1)
            node = config.to_dict()
            for key in path.strip().split("."):
                node = node[key]
            parsed = yaml.safe_load(raw) if raw else None
            if isinstance(parsed, float) and math.isnan(parsed):
                continue
            assert node is not None or parsed is None


def test_the_reliability_doc_states_these_counts():
    doc = Path(__file__).parents[1] / "docs" / "reliability.md"
    block = doc.read_text(encoding="utf-8").split("<!-- fuzz-counts:begin -->")[1]
    block = block.split("<!-- fuzz-counts:end -->")[0]
    documented = {
        line.split("`")[1]: int(line.rstrip(" |").rsplit("|", 1)[1])
        for line in block.splitlines()
        if line.startswith("| `")
    }
    assert documented == EXAMPLES
