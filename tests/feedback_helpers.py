"""Shared pieces of the feedback tests: response records, a small app (router + store), and the
parent run the retrain tests start from (fixtures; conftest.py loads this module as a plugin).

The app is what `tuneforge serve --db` mounts, without the model: the durability test runs it
as a subprocess (`python tests/feedback_helpers.py URL PORT`) and SIGKILLs it.
"""

from __future__ import annotations

import shutil
import sys
import time
import uuid
from pathlib import Path

import pytest

from tuneforge.serve.records import ResponseRecord

KEY = "test-key-0123456789abcdef"


def make_record(
    prompt: str = "Color of sky?",
    completion: str = "blue",
    *,
    model: str = "tiny",
    adapter: str | None = "default",
    status: int = 200,
    created: float | None = None,
    latency_s: float = 0.05,
    rid: str | None = None,
) -> ResponseRecord:
    messages = [{"role": "user", "content": prompt}]
    return ResponseRecord(
        id=rid or f"chatcmpl-{uuid.uuid4().hex}",
        created=time.time() if created is None else created,
        route="/v1/chat/completions",
        model=model,
        adapter=adapter,
        request={"model": model, "messages": messages},
        prompt=f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n",
        completion=completion,
        finish_reason="stop",
        prompt_tokens=len(prompt),
        completion_tokens=len(completion),
        latency_s=latency_s,
        ttft_s=latency_s / 2,
        status=status,
        error=None if status == 200 else "boom",
    )


def feedback_app(store, keys=None, **router_options):
    """A FastAPI app with only the feedback router, rendering APIError as OpenAI error JSON."""
    from fastapi import FastAPI

    from tuneforge.feedback.routes import feedback_router
    from tuneforge.serve.apierrors import APIError, api_error_response

    app = FastAPI()
    app.add_exception_handler(APIError, lambda request, err: api_error_response(err))
    app.include_router(feedback_router(store, keys, **router_options))
    return app


@pytest.fixture(scope="session")
def parent_run(tmp_path_factory, tiny_model_dir) -> Path:
    """A finished 30-step LoRA run of the tiny model on 64 toy rows, trained once per session on
    one thread; the retrain tests only read it (they take `parent_copy`)."""
    import torch

    from tuneforge.config import load_config
    from tuneforge.recipes.train import run_training

    from helpers import write_run_config, write_toy_messages

    root = tmp_path_factory.mktemp("feedback-run")
    data = write_toy_messages(root / "train.jsonl", n=64)
    cfg = write_run_config(root / "run.yaml", tiny_model_dir, data, root / "run",
                           train={"max_steps": 30})  # fmt: skip
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as patch:  # as the `one_thread` fixture does
        patch.setenv("OMP_NUM_THREADS", "1")
        torch.set_num_threads(1)
        try:
            run_training(load_config(cfg), show_progress=False)
        finally:
            torch.set_num_threads(threads)
    return root / "run"


@pytest.fixture
def parent_copy(parent_run, tmp_path) -> Path:
    """A private copy of `parent_run` that a test may retrain, promote or break."""
    return Path(shutil.copytree(parent_run, tmp_path / "run"))


def main(url: str, port: int) -> None:
    """Serve the feedback app on 127.0.0.1:PORT with one seeded response `chatcmpl-seed`."""
    import uvicorn

    from tuneforge.feedback.store import FeedbackStore
    from tuneforge.serve.auth import ApiKeys

    store = FeedbackStore(url)
    store.write(make_record(rid="chatcmpl-seed"))
    app = feedback_app(store, ApiKeys([KEY]))
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
