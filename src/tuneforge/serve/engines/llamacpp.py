"""The llama.cpp engine: a .gguf export (the 4-bit deployment) through llama-cpp-python, with the
chat template the file carries (the run's own, written by the export) and its end-of-generation
tokens. One sequence at a time, as llama-cpp-python's own server does.

Queueing is base.py's Batcher (batches of one); text and stop strings are textstream.py's.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tuneforge.errors import ServeError
from tuneforge.serve.engines.base import Batcher, BatcherQueue, Finished, Job, check_token_ids
from tuneforge.serve.engines.textstream import TextStream

log = logging.getLogger(__name__)
DEFAULT_CONTEXT = 4096  # tokens; a GGUF may declare far more than a CPU server wants to allocate


def find_gguf(ref: str | Path) -> Path | None:
    """The .gguf file `ref` names: the file itself, or the one model file in an export directory."""
    path = Path(ref)
    if path.suffix == ".gguf":
        return path
    if not path.is_dir() or (path / "config.json").is_file():
        return None
    files = sorted(p for p in path.glob("*.gguf") if not p.name.endswith("lora-adapter.gguf"))
    if len(files) > 1:
        names = ", ".join(p.name for p in files)
        raise ServeError(f"{path} holds several GGUF files ({names}): pass the one to serve")
    return files[0] if files else None


def render_template(template: str, messages: list[dict], bos: str, eos: str) -> str:
    """Render a GGUF's chat template in a sandbox, as transformers' apply_chat_template does."""
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise ValueError(message)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template).render(
            messages=messages, add_generation_prompt=True, bos_token=bos, eos_token=eos
        )
    except (TemplateError, ValueError, TypeError) as e:
        from tuneforge.errors import TemplateError as TuneforgeTemplateError

        raise TuneforgeTemplateError(f"the GGUF's chat template failed: {e}") from e


class LlamaCppEngine(BatcherQueue):
    """Serves one GGUF file under one model name."""

    kind = "llama.cpp"

    def __init__(self, llm: Any, name: str, source: Path, *, max_queue: int = 64) -> None:
        self._install(llm, name, source)
        self.batcher = Batcher(
            self._run_batch, max_batch=1, max_queue=max_queue, group_key=lambda job: 0
        )

    @classmethod
    def open(
        cls,
        path: str | Path,
        *,
        name: str | None = None,
        n_ctx: int | None = None,
        n_threads: int | None = None,
        n_gpu_layers: int = 0,
        max_queue: int = 64,
        **_ignored: Any,
    ) -> LlamaCppEngine:
        path = Path(path)
        llm = load_gguf(path, n_ctx=n_ctx, n_threads=n_threads, n_gpu_layers=n_gpu_layers)
        return cls(llm, name or path.stem, path, max_queue=max_queue)

    def _install(self, llm: Any, name: str, source: Path) -> None:
        import llama_cpp

        self.llm, self.name, self.source = llm, name, source
        self.context_length = int(llm.n_ctx())
        self._vocab = llama_cpp.llama_model_get_vocab(llm.model)
        meta = llm.metadata
        self._template = meta.get("tokenizer.chat_template")
        self._bos = _token_text(llm, llm.token_bos())
        self._eos = _token_text(llm, llm.token_eos())

    # ---- what app.py asks --------------------------------------------------------------------

    @property
    def on_batch(self) -> Callable[[int], None] | None:
        return self.batcher.on_batch

    @on_batch.setter
    def on_batch(self, fn: Callable[[int], None] | None) -> None:
        self.batcher.on_batch = fn

    def model_names(self) -> list[str]:
        return [self.name]

    def adapter_of(self, model: str) -> str | None:
        return None

    def render_chat(self, model: str, messages: list[dict]) -> tuple[str, list[int]]:
        if not self._template:
            from tuneforge.errors import TemplateError

            raise TemplateError(f"{self.source.name} carries no chat template: use /v1/completions")
        text = render_template(self._template, messages, self._bos, self._eos)
        return text, self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)

    def encode_text(self, model: str, text: str) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)

    def decode_ids(self, model: str, ids: list[int]) -> str:
        check_token_ids(ids, self.llm.n_vocab())
        return self.llm.detokenize(ids, special=True).decode("utf-8", errors="replace")

    def reload(self, ref: str | Path, name: str | None = None) -> str:
        """Load another GGUF here, then swap it in between two requests."""
        path = self.source if str(ref) == self.name else Path(ref)
        gguf = find_gguf(path)
        if gguf is None or not gguf.is_file():
            raise ServeError(f"reload: {path} is not a GGUF file or an export dir holding one")
        llm = load_gguf(gguf, n_ctx=self.context_length, n_threads=self.llm.n_threads)
        target = name or (self.name if str(ref) == self.name else gguf.stem)
        self.batcher.call(lambda: self._install(llm, target, gguf))
        return target

    # ---- inside the worker thread ------------------------------------------------------------

    def _run_batch(self, jobs: list[Job]) -> None:
        for job in jobs:
            self._generate(job)

    def _generate(self, job: Job) -> None:
        import llama_cpp

        p, llm = job.params, self.llm
        stream = TextStream(
            lambda ids: llm.detokenize(ids).decode("utf-8", errors="replace"), p.stop
        )
        if p.seed is not None:
            llm.set_seed(p.seed % (2**32))
        else:
            llm.set_seed(int.from_bytes(os.urandom(4), "little"))
        produced, reason = 0, None
        tokens = llm.generate(
            job.prompt_ids,
            top_k=0,
            top_p=p.top_p,
            min_p=0.0,
            temp=p.temperature,
            repeat_penalty=1.0,
        )
        try:
            for token in tokens:
                if job.cancelled.is_set():
                    return
                produced += 1
                if llama_cpp.llama_vocab_is_eog(self._vocab, token):
                    reason = "stop"
                    break
                job.delta(stream.push(token))
                if stream.stopped:
                    reason = "stop"
                    break
                if produced >= p.max_tokens:
                    reason = "length"
                    break
        finally:
            tokens.close()
        if reason is None:  # the context filled up
            reason = "length"
        job.delta(stream.flush())
        job.finish(Finished(reason, stream.text, len(job.prompt_ids), produced))


def _token_text(llm: Any, token: int) -> str:
    if token is None or token < 0:
        return ""
    return llm.detokenize([token], special=True).decode("utf-8", errors="replace")


def load_gguf(path: Path, *, n_ctx: int | None, n_threads: int | None, n_gpu_layers: int = 0):
    try:
        import llama_cpp
    except ImportError as e:
        raise ServeError(
            "serving a .gguf needs llama-cpp-python: pip install llama-cpp-python "
            "(it builds llama.cpp, about 7 minutes on 2 cores)"
        ) from e
    if not path.is_file():
        raise ServeError(f"{path}: no such GGUF file")
    with path.open("rb") as fh:
        if fh.read(4) != b"GGUF":
            raise ServeError(f"{path}: not a GGUF file (bad magic bytes)")
    if n_ctx is None:  # the file's own length, capped: a CPU server need not allocate 128k
        n_ctx = min(_declared_context(path), DEFAULT_CONTEXT)
    try:
        return llama_cpp.Llama(
            str(path), n_ctx=n_ctx, n_threads=n_threads, n_gpu_layers=n_gpu_layers, verbose=False
        )
    except (ValueError, RuntimeError) as e:
        raise ServeError(f"{path}: llama.cpp cannot load it ({e})") from e


def _declared_context(path: Path) -> int:
    """`<arch>.context_length` from the file's metadata (gguf's reader maps it, loads nothing)."""
    try:
        from gguf import GGUFReader

        fields = GGUFReader(str(path)).fields
        arch_field = fields["general.architecture"]
        arch = bytes(arch_field.parts[arch_field.data[0]]).decode()
        ctx_field = fields[f"{arch}.context_length"]
        return int(ctx_field.parts[ctx_field.data[0]][0])
    except (ImportError, KeyError, ValueError, IndexError, OSError):
        return DEFAULT_CONTEXT
