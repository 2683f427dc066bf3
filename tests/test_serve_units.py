"""The serving pieces without a model: text deltas and stop strings, top-p, keys, records, the token
budget, error locations and the batching queue.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

from tuneforge.errors import UsageError
from tuneforge.serve.apierrors import APIError, field_path
from tuneforge.serve.auth import ApiKeys, bearer_token, hash_key, new_key
from tuneforge.serve.engines.base import Batcher, Failed, Finished, Job, QueueFull, SamplingParams
from tuneforge.serve.engines.sampling import top_p_filter
from tuneforge.serve.engines.textstream import TextStream
from tuneforge.serve.limits import token_budget
from tuneforge.serve.records import JsonlRecordSink, ResponseRecord, new_response_id


def byte_stream(stops=()):
    """Tokens are bytes; decoding replaces incomplete UTF-8 like a real tokenizer does."""
    return TextStream(lambda ids: bytes(ids).decode("utf-8", errors="replace"), stops)


def feed(stream: TextStream, data: bytes) -> list[str]:
    out = []
    for b in data:
        out.append(stream.push(b))
        if stream.stopped:
            break
    out.append(stream.flush())
    return out


def test_deltas_hold_back_half_characters():
    stream = byte_stream()
    deltas = feed(stream, "a€b".encode())  # € is three bytes
    assert deltas == ["a", "", "", "€", "b", ""]
    assert "".join(deltas) == stream.text == "a€b"


def test_a_stop_string_is_never_released_even_split_over_tokens():
    stream = byte_stream(["STOP"])
    deltas = feed(stream, b"abcSTrSTOPxyz")
    assert "".join(deltas) == stream.text == "abcSTr" and stream.stopped
    assert deltas[:4] == ["a", "b", "c", ""]  # "S" might begin STOP: held


def test_the_earliest_of_several_stops_wins_and_held_text_is_flushed():
    stream = byte_stream(["zz", "yx"])
    assert "".join(feed(stream, b"abyxzz")) == "ab"
    unfinished = byte_stream(["STOP"])
    assert "".join(feed(unfinished, b"endST")) == "endST"  # no stop came: all of it


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([0.1, 0.5, 0.3, 0.1])
    assert top_p_filter(probs, 0.7).tolist() == pytest.approx([0.0, 0.5, 0.3, 0.0])
    assert top_p_filter(probs, 0.0).tolist() == pytest.approx([0.0, 0.5, 0.0, 0.0])
    assert top_p_filter(probs, 1.0) is probs


def test_keys_are_held_hashed_and_read_from_a_file(tmp_path):
    key = new_key()
    keys = ApiKeys([key])
    assert (
        keys.check(key)
        and not keys.check(key + "x")
        and not keys.check("")
        and not keys.check(None)
    )
    assert key not in repr(keys) and key not in str(vars(keys))
    f = tmp_path / "keys"
    other = "another-key-of-16+chars"
    f.write_text(f"# ops\n\n{key}\nsha256:{hash_key(other)}\n")
    from_file = ApiKeys.from_file(f)
    assert from_file.check(key) and from_file.check(other) and not from_file.check("sha256:x")
    for bad in ["", "# nothing\n", "short\n", "sha256:abc\n", "has space in the key\n"]:
        f.write_text(bad)
        with pytest.raises(UsageError, match="--api-key-file"):
            ApiKeys.from_file(f)
    assert bearer_token("Bearer abc") == "abc" and bearer_token("bearer  abc ") == "abc"
    assert bearer_token("Basic abc") is None and bearer_token("Bearer") is None


def test_records_round_trip_and_a_torn_last_line_is_skipped(tmp_path):
    rid = new_response_id("/v1/chat/completions")
    assert rid.startswith("chatcmpl-") and new_response_id("/v1/completions").startswith("cmpl-")
    record = ResponseRecord(
        rid, 1.5, "/v1/chat/completions", "m", None, {"model": "m"}, "p", "c", "stop",
        3, 4, 0.5, 0.1, 200, None,
    )  # fmt: skip
    assert ResponseRecord.from_dict(record.to_dict()) == record
    sink = JsonlRecordSink(tmp_path / "serve" / "records.jsonl")
    assert not (tmp_path / "serve").exists()  # nothing written before the first record
    sink.write(record)
    with sink.path.open("a") as fh:
        fh.write('{"id": "torn')
    assert sink.read() == [record]
    with pytest.raises(ValueError, match="missing field"):
        ResponseRecord.from_dict({"id": "x"})


def test_the_token_budget():
    assert token_budget(10, None, "max_tokens", "messages", context=100, cap=50) == 50
    assert token_budget(70, None, "max_tokens", "messages", context=100, cap=50) == 30
    assert token_budget(10, 20, "max_tokens", "messages", context=100, cap=50) == 20
    for prompt, asked, param in [
        (10, 51, "max_tokens"),
        (10, 91, "max_tokens"),
        (100, 1, "messages"),
    ]:
        with pytest.raises(APIError) as err:
            token_budget(
                prompt, asked, "max_tokens", "messages", context=100, cap=200 if asked == 91 else 50
            )
        assert err.value.status_code == 400 and err.value.param == param


def test_error_locations_name_the_field():
    assert field_path(("body", "messages", 0, "content", "str")) == "messages[0].content"
    assert field_path(("body", "stop", "list[constrained-str]", 4)) == "stop[4]"
    assert field_path(("body",)) is None


class Recorder:
    def __init__(self, delay_s: float = 0.0) -> None:
        self.batches: list[list[str]] = []
        self.delay_s = delay_s

    def __call__(self, jobs: list[Job]) -> None:
        self.batches.append([job.model for job in jobs])
        time.sleep(self.delay_s)
        for job in jobs:
            job.finish(Finished("stop", job.model, 1, 1))


def job(model: str, events: list) -> Job:
    return Job(model, [1], SamplingParams(max_tokens=1), events.append)


def test_the_batcher_groups_by_adapter_and_bounds_its_queue():
    run = Recorder(delay_s=0.2)
    batcher = Batcher(run, max_batch=3, max_queue=4, wait_s=0.05)
    events: list = []
    batcher.start()
    batcher.submit(job("a", events))  # runs alone while the rest queue up
    deadline = time.monotonic() + 10
    while not run.batches and time.monotonic() < deadline:  # until it has started
        time.sleep(0.005)
    for model in ["a", "b", "a", "a"]:
        batcher.submit(job(model, events))
    with pytest.raises(QueueFull):
        batcher.submit(job("a", events))
    batcher.shutdown(timeout_s=10)
    assert run.batches == [["a"], ["a", "a", "a"], ["b"]]
    assert sorted(e.text for e in events) == ["a", "a", "a", "a", "b"]


def test_the_batcher_survives_a_failing_batch_and_runs_calls_between_batches():
    def explode(jobs):
        raise RuntimeError("boom")

    batcher = Batcher(explode, max_batch=2, max_queue=2)
    batcher.start()
    events: list = []
    done = threading.Event()
    batcher.submit(Job("a", [1], SamplingParams(1), lambda e: (events.append(e), done.set())))
    assert done.wait(10) and isinstance(events[0], Failed) and "RuntimeError" in events[0].message
    assert batcher.call(lambda: 42) == 42  # the worker is alive
    batcher.shutdown()
    with pytest.raises(QueueFull):
        batcher.submit(job("a", []))
