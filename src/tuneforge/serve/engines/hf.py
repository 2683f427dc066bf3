"""The transformers engine: a run dir (base + adapter), a merged HF dir or a base model, plus any
number of LoRA-family adapters attached to the same base and chosen per request by `model`.

Loading goes through `tuneforge.loading` and each run's own tokenizer (so its chat template);
the running batch and its cache are decode.py's, admission and the worker thread scheduler.py's.
"""

from __future__ import annotations

import itertools
import json
import threading
from collections.abc import Callable, Hashable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tuneforge.errors import ServeError
from tuneforge.loading import Loaded, is_run_dir, load_reference
from tuneforge.models import load_tokenizer, weights_fingerprint
from tuneforge.serve.engines.base import BatcherQueue, Job, TokenizerFront
from tuneforge.serve.engines.decode import RowPlan, RunningBatch
from tuneforge.serve.engines.scheduler import Scheduler
from tuneforge.train.rundir import read_run

PROMPT_LEARNING = {"PREFIX_TUNING", "PROMPT_TUNING", "P_TUNING"}


@dataclass
class Served:
    """One name in /v1/models: which weights answer it and with which tokenizer."""

    name: str
    adapter: str | None  # the peft adapter inside the model; None: the model's own weights
    tokenizer: Any
    stop_ids: frozenset[int]
    source: Path  # the run or model dir it came from (what reload re-reads)
    lock: threading.Lock = field(default_factory=threading.Lock)  # tokenizers are not re-entrant


def default_name(ref: str | Path) -> str:
    """The model name a reference is served under: a directory's or file's name, or the built-in."""
    path = Path(ref)
    return path.resolve().name if path.exists() else str(ref)


def stop_ids(tokenizer: Any, model: torch.nn.Module) -> frozenset[int]:
    """EOS of the run's tokenizer and of the model's generation config: where a turn ends."""
    ids = {tokenizer.eos_token_id}
    gen = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids |= set(gen) if isinstance(gen, list | tuple) else {gen}
    return frozenset(i for i in ids if i is not None)


def context_length(model: torch.nn.Module, tokenizer: Any) -> int:
    config = model.config
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", 2048)
    tok_limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(tok_limit, int) and 0 < tok_limit < limit:
        limit = tok_limit
    return int(limit)


def _pad_id(served: Served) -> int:
    """A filler id for left padding (masked out, so any id will do)."""
    tok = served.tokenizer
    return tok.pad_token_id if tok.pad_token_id is not None else min(served.stop_ids, default=0)


def _is_prompt_learning(model: Any) -> bool:
    return bool(getattr(getattr(model, "active_peft_config", None), "is_prompt_learning", False))


def check_adapter_run(run_dir: Path, label: str) -> tuple[Path, dict]:
    """The adapter dir and manifest of a run that can join a shared base, or a ServeError."""
    if not is_run_dir(run_dir):
        raise ServeError(f"{label}: {run_dir} is not a tuneforge run directory")
    if (run_dir / "model" / "config.json").is_file():
        raise ServeError(
            f"{label}: {run_dir} holds a full model, not an adapter; serve it on its own"
        )
    adapter = run_dir / "adapter"
    if not (adapter / "adapter_model.safetensors").is_file():
        raise ServeError(f"{label}: {adapter} has no adapter_model.safetensors")
    peft_type = json.loads((adapter / "adapter_config.json").read_text()).get("peft_type")
    if peft_type in PROMPT_LEARNING:
        raise ServeError(
            f"{label}: {run_dir} is a prompt-learning adapter ({peft_type}); those cannot share "
            "a base with others: serve it on its own"
        )
    return adapter, read_run(run_dir)[1]


class TransformersEngine(TokenizerFront, BatcherQueue):
    """Serves one loaded model and its adapters with continuous batching (scheduler.py): waiting
    requests join the running batch between decode steps, finished ones leave it at once."""

    kind = "transformers"

    def __init__(
        self,
        loaded: Loaded,
        name: str,
        source: Path,
        *,
        device: str = "cpu",
        dtype: str = "auto",
        max_batch: int = 8,
        max_queue: int = 64,
        max_batch_tokens: int = 0,
        wait_s: float = 0.005,
    ) -> None:
        self.model, self.device, self.dtype = loaded.model, torch.device(device), dtype
        self._base_dir, self._kind = loaded.base_dir, loaded.kind
        self._base_fingerprint: str | None = None
        adapter = "default" if loaded.kind == "adapter" else None
        self._served = {name: self._served_entry(name, adapter, loaded.tokenizer, source)}
        self.context_length = context_length(self.model, loaded.tokenizer)
        self._versions = itertools.count(1)
        self.batch = RunningBatch(
            self._forward,
            self._plan,
            self._lane,
            pad_id=_pad_id(self._served[name]),
            device=self.device,
            prefill_alone=_is_prompt_learning(self.model),
        )
        self.batcher = Scheduler(
            self.batch,
            max_batch=max_batch,
            max_queue=max_queue,
            max_batch_tokens=max_batch_tokens,
            wait_s=wait_s,
        )

    @classmethod
    def open(
        cls,
        ref: str | Path,
        *,
        name: str | None = None,
        adapters: Sequence[tuple[str, Path]] = (),
        dtype: str = "auto",
        device: str = "cpu",
        **batching: Any,
    ) -> TransformersEngine:
        """Load `ref` (run dir, HF dir or built-in name) and attach each (name, run dir) adapter."""
        loaded = load_reference(ref, dtype=dtype, device=device)
        source = Path(ref) if Path(ref).exists() else loaded.base_dir
        engine = cls(
            loaded, name or default_name(ref), source, device=device, dtype=dtype, **batching
        )
        if is_run_dir(ref) and loaded.kind == "adapter":
            engine._base_fingerprint = read_run(ref)[1]["base_model"].get("fingerprint")
        for adapter_name, run_dir in adapters:
            if adapter_name in engine._served:
                raise ServeError(f"--adapter {adapter_name}: the name is already served")
            engine._served[adapter_name] = engine._attach(adapter_name, Path(run_dir), adapter_name)
        return engine

    # ---- what app.py asks --------------------------------------------------------------------

    @property
    def on_batch(self) -> Callable[[int], None] | None:
        return self.batcher.on_batch

    @on_batch.setter
    def on_batch(self, fn: Callable[[int], None] | None) -> None:
        self.batcher.on_batch = fn

    def model_names(self) -> list[str]:
        return list(self._served)

    def adapter_of(self, model: str) -> str | None:
        """The run dir of the adapter that answers `model` (None: the model's own weights)."""
        served = self._served[model]
        return str(served.source) if served.adapter is not None else None

    def vocab_size(self, model: str) -> int:
        return self.model.get_input_embeddings().num_embeddings

    def reload(self, ref: str | Path, name: str | None = None) -> str:
        """Swap in new weights without stopping: an adapter run is attached beside the old one and
        replaces it between two batches; a full model is loaded here, then swapped the same way.
        `ref` is a served name (re-read from its source) or a run / model dir; returns the name."""
        if str(ref) in self._served:
            target, path = name or str(ref), self._served[str(ref)].source
        else:
            path, target = Path(ref), name or default_name(ref)
        if not path.exists():
            raise ServeError(f"reload: {path} does not exist")
        if is_run_dir(path) and (path / "adapter" / "adapter_config.json").is_file():
            internal = f"{target}#{next(self._versions)}"
            self.batcher.call(lambda: self._swap_adapter(target, path, internal))
        elif len(self._served) == 1:
            loaded = load_reference(path, dtype=self.dtype, device=str(self.device))
            entry = self._served_entry(
                target, "default" if loaded.kind == "adapter" else None, loaded.tokenizer, path
            )
            self.batcher.call(lambda: self._swap_model(loaded, entry))
        else:
            raise ServeError(
                f"reload: {path} is not an adapter run, and adapters share this base: restart "
                "the server to change the base model"
            )
        return target

    # ---- inside the worker thread ------------------------------------------------------------

    def _lane(self, job: Job) -> Hashable:
        """Rows of one lane share a forward pass: LoRA adapters (and the base) mix in one batch
        through peft's per-row `adapter_names`; other methods run one adapter per batch."""
        adapter = self._served[job.model].adapter if job.model in self._served else None
        return "mixed" if self._mixable(adapter) else ("alone", adapter)

    def _mixable(self, adapter: str | None) -> bool:
        from peft import PeftModel

        if not isinstance(self.model, PeftModel) or _is_prompt_learning(self.model):
            return False
        if adapter is None:  # the base: peft's "__base__" row, for LoRA models only
            return self.model.peft_type == "LORA"
        config = self.model.peft_config.get(adapter)
        return (
            getattr(config, "peft_type", None) == "LORA"
            and not getattr(config, "use_dora", False)
            and not getattr(config, "alora_invocation_tokens", None)
        )

    def _plan(self, job: Job) -> RowPlan:
        served = self._served[job.model]

        def decode(ids: list[int]) -> str:
            with served.lock:
                return served.tokenizer.decode(ids, skip_special_tokens=True)

        return RowPlan(served.adapter, served.stop_ids, decode)

    def _forward(self, ids, mask, positions, cache, adapters: list, prefill: bool) -> Any:
        """One forward pass of the running batch with each row's own weights."""
        kwargs: dict[str, Any] = {"input_ids": ids, "attention_mask": mask, "use_cache": True}
        if cache is not None:
            kwargs["cache"] = cache
        if _is_prompt_learning(self.model):  # peft adds the virtual tokens at prefill only
            if prefill:
                return self.model(**kwargs)
            return self.model.get_base_model()(position_ids=positions, **kwargs)
        kwargs["position_ids"] = positions
        if prefill:
            kwargs["logits_to_keep"] = 1
        if len(set(adapters)) > 1:  # a mixed lane: peft routes each row through its adapter
            names = [a if a is not None else "__base__" for a in adapters]
            return self.model(adapter_names=names, **kwargs)
        with self._adapter_ctx(adapters[0]):
            return self.model(**kwargs)

    def _adapter_ctx(self, adapter: str | None):
        from peft import PeftModel

        if not isinstance(self.model, PeftModel):
            return nullcontext()
        if adapter is None:
            return self.model.disable_adapter()
        if self.model.active_adapter != adapter:
            self.model.set_adapter(adapter)
        return nullcontext()

    def _swap_adapter(self, target: str, path: Path, internal: str) -> None:
        old = self._served.get(target)
        self._served[target] = self._attach(target, path, internal)
        if old is not None and old.adapter is not None:
            self.model.set_adapter(internal)  # never delete the active adapter (peft warns)
            self.model.delete_adapter(old.adapter)

    def _swap_model(self, loaded: Loaded, entry: Served) -> None:
        self.model, self._base_dir, self._kind = loaded.model, loaded.base_dir, loaded.kind
        self._base_fingerprint = None
        self._served = {entry.name: entry}
        self.batch.pad_id = _pad_id(entry)
        self.batch.prefill_alone = _is_prompt_learning(self.model)

    # ---- loading -----------------------------------------------------------------------------

    def _served_entry(self, name: str, adapter: str | None, tokenizer: Any, source: Path) -> Served:
        return Served(name, adapter, tokenizer, stop_ids(tokenizer, self.model), Path(source))

    def _attach(self, name: str, run_dir: Path, internal: str) -> Served:
        """Load an adapter run onto the shared base under the peft name `internal`."""
        from peft import PeftModel

        label = f"--adapter {name}={run_dir}"
        if _is_prompt_learning(self.model) or self._kind == "model":
            raise ServeError(
                f"{label}: the main model is a prompt-learning or full fine-tuning run; it "
                "serves alone (adapters attach to a base model or to another adapter run)"
            )
        adapter_dir, manifest = check_adapter_run(run_dir, label)
        if self._base_fingerprint is None:
            self._base_fingerprint = weights_fingerprint(self._base_dir)
        if manifest["base_model"].get("fingerprint") != self._base_fingerprint:
            raise ServeError(
                f"{label}: trained on {manifest['base_model'].get('name')}, whose weights differ "
                f"from the served base {self._base_dir}; serve it on its own"
            )
        if isinstance(self.model, PeftModel):
            self.model.load_adapter(str(adapter_dir), adapter_name=internal, is_trainable=False)
        else:
            self.model = PeftModel.from_pretrained(
                self.model, str(adapter_dir), adapter_name=internal, is_trainable=False
            )
        self.model.to(self.device).eval()
        trust = bool(read_run(run_dir)[0].get("model", {}).get("trust_remote_code", False))
        return self._served_entry(
            name, internal, load_tokenizer(run_dir / "tokenizer", trust), run_dir
        )
