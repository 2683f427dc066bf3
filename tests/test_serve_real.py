"""The real embedded model (SmolLM2-135M-Instruct) behind the server: its GGUF through the llama.cpp
engine and its HF form through the transformers engine, each checked against its own library.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from serve_helpers import LiveServer, openai_client
from tuneforge.loading import generate, load_reference
from tuneforge.models import BUILTIN_MODELS
from tuneforge.serve.app import create_app
from tuneforge.serve.engines import open_engine
from tuneforge.serve.records import NullRecordSink

pytestmark = pytest.mark.slow
NAME = "smollm2-135m-instruct"
QUESTION = "What is the capital of France?"


def embedded_gguf() -> Path:
    package, path = BUILTIN_MODELS[NAME].files[0]  # (package, file inside it)
    spec = importlib.util.find_spec(package)
    return Path(spec.submodule_search_locations[0]) / path


def ask(client, model: str, **kw):
    return client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": QUESTION}],
        temperature=0,
        max_tokens=16,
        **kw,
    )


def test_the_gguf_through_llama_cpp_answers_as_llama_cpp_does(one_thread):
    engine = open_engine(str(embedded_gguf()), threads=1)
    assert engine.kind == "llama.cpp" and engine.context_length == 4096
    prompt, ids = engine.render_chat(engine.name, [{"role": "user", "content": QUESTION}])
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")
    with LiveServer(create_app(engine, keys=None, sink=NullRecordSink())) as live:
        client = openai_client(live)
        answer = ask(client, engine.name)
        streamed = "".join(
            c.choices[0].delta.content or "" for c in ask(client, engine.name, stream=True)
        )
        # llama-cpp-python's own completion on the same tokens, on the same loaded model
        expected = engine.llm.create_completion(prompt=ids, max_tokens=16, temperature=0.0)
    text = answer.choices[0].message.content
    assert text == expected["choices"][0]["text"] == streamed
    assert text.strip()
    assert answer.usage.prompt_tokens == len(ids) == expected["usage"]["prompt_tokens"]


def test_the_hf_model_through_transformers_answers_as_tuneforge_generate(one_thread):
    engine = open_engine(NAME, dtype="fp32", max_batch=2)
    with LiveServer(create_app(engine, keys=None, sink=NullRecordSink())) as live:
        answer = ask(openai_client(live), NAME)
    loaded = load_reference(NAME, dtype="fp32")
    assert answer.choices[0].message.content == generate(loaded, QUESTION, max_new_tokens=16)
    assert "Paris" in answer.choices[0].message.content
