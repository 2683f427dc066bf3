"""One benchmark run in its own process: tuneforge's recipe, or HF Trainer + peft, on one workload.

`python bench/workers.py SIDE SPEC.json RESULT.json`. bench/run.py starts these side by side and
aggregates them; peak memory is this process's own (getrusage), so every run is measured alone.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def peak_memory_mb(device: str) -> float:
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run_tuneforge(spec: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """The product as a user runs it: `tuneforge train` with this workload, defaults otherwise."""
    import tuneforge.recipes.train as recipe
    from tuneforge.config import build_config

    cpu: list[float] = []
    loop = recipe.train_loop

    def timed_loop(*args, **kwargs):  # CPU seconds of the training loop alone
        start = time.process_time()
        try:
            return loop(*args, **kwargs)
        finally:
            cpu.append(time.process_time() - start)

    recipe.train_loop = timed_loop

    method: dict[str, Any] = {"name": spec["method"]}
    if spec["method"] == "lora":
        method.update(spec["lora"], target_modules="all-linear")
    raw = {
        "model": {"name": spec["model"], "dtype": spec["dtype"]},
        "method": method,
        "data": {
            "train": spec["train_file"],
            "validation": None,
            "max_length": spec["max_length"],
            "truncation": "drop",
        },
        "train": {
            "max_steps": spec["steps"],
            "batch_size": spec["batch_size"],
            "lr": spec["lr"],
            "scheduler": "cosine",
            "seed": spec["seed"],
            "num_threads": spec.get("threads"),
        },
        "eval": {"every_steps": None},
        "checkpoint": {"every_steps": None, "at_epoch_end": False},
        "log": {"report": False},
        "output": {"dir": str(out_dir / "run"), "overwrite": True},
    }
    cfg = build_config(raw, spec.get("overrides", []))
    summary = recipe.run_training(cfg, show_progress=False).summary
    lines = (out_dir / "run" / "metrics.jsonl").read_text().splitlines()
    losses = [r["loss"] for r in map(json.loads, lines) if "loss" in r and "eval_loss" not in r]
    manifest = json.loads((out_dir / "run" / "manifest.json").read_text())
    return {
        "runtime_s": summary["train_runtime_s"],
        "cpu_s": cpu[0],
        "tokens": summary["train_tokens"],
        "losses": losses,
        "settings": {"dtype": manifest["dtype"], "fast_path": manifest.get("fast_path")},
    }


def _hf_examples(spec: dict[str, Any], tokenizer) -> list[dict[str, list[int]]]:
    """tuneforge's tokenised rows (same template, same tokens), in tuneforge's step order."""
    from tuneforge.data.pipeline import prepare_data
    from tuneforge.train.order import epoch_order

    data = prepare_data(
        spec["train_file"], None, tokenizer, max_length=spec["max_length"], truncation="drop"
    )
    order = epoch_order(len(data.train), spec["seed"], 0)
    rows = [data.train[i] for i in order]
    return [
        {"input_ids": r.input_ids, "attention_mask": [1] * len(r.input_ids), "labels": r.labels}
        for r in rows
    ]


def run_hf(spec: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """transformers.Trainer + peft.get_peft_model with a padding collator, as the tutorials teach."""
    import torch
    from transformers import (
        AutoModelForCausalLM,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from tuneforge.models import load_tokenizer, resolve_dtype, resolve_model_dir

    model_dir = resolve_model_dir(spec["model"])
    tokenizer = load_tokenizer(model_dir)
    examples = _hf_examples(spec, tokenizer)
    # The dtype rule tuneforge's side follows (`auto`: bf16 only where the CPU computes it
    # natively), so that a machine without bf16 compares fp32 with fp32. Under bf16, LoRA keeps
    # the checkpoint's own dtype (bf16), frozen; full FT needs fp32 weights under bf16 autocast.
    bf16 = resolve_dtype(spec["dtype"], spec["device"]) == torch.bfloat16
    dtype = "auto" if bf16 and spec["method"] != "full" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype)
    if spec["method"] == "lora":
        from peft import LoraConfig, get_peft_model

        lora = spec["lora"]
        config = LoraConfig(
            r=lora["r"],
            lora_alpha=lora["alpha"],
            lora_dropout=lora["dropout"],
            target_modules="all-linear",
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, config)

    marks: dict[str, float] = {}

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            marks["start"], marks["cpu_start"] = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kwargs):
            marks["end"], marks["cpu_end"] = time.perf_counter(), time.process_time()

    args = TrainingArguments(
        output_dir=str(out_dir / "hf"),
        per_device_train_batch_size=spec["batch_size"],
        learning_rate=spec["lr"],
        lr_scheduler_type="cosine",
        max_steps=spec["steps"],
        bf16=bf16,
        use_cpu=spec["device"] == "cpu",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        seed=spec["seed"],
        train_sampling_strategy="sequential",  # the rows come in tuneforge's order already
        dataloader_num_workers=0,
        remove_unused_columns=False,
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=examples,
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100),
        processing_class=tokenizer,
        callbacks=[Clock()],
    )
    trainer.train()
    steps = spec["steps"]
    used = examples[: steps * spec["batch_size"]]
    return {
        "runtime_s": marks["end"] - marks["start"],
        "cpu_s": marks["cpu_end"] - marks["cpu_start"],
        "tokens": sum(len(r["input_ids"]) for r in used),
        "losses": [r["loss"] for r in trainer.state.log_history if "loss" in r][:steps],
        "settings": {"dtype": str(next(model.parameters()).dtype).removeprefix("torch.")},
    }


def main(argv: list[str]) -> int:
    side, spec_path, result_path = argv
    spec = json.loads(Path(spec_path).read_text())
    import torch

    from tuneforge.heap import heap_allocator

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix=f"bench-{side}-") as tmp:
        runner = run_tuneforge if side == "tuneforge" else run_hf
        result = runner(spec, Path(tmp))
    result.update(
        side=side,
        tokens_per_s=result["tokens"] / result["runtime_s"],
        tokens_per_cpu_s=result["tokens"] / result["cpu_s"],
        peak_memory_mb=peak_memory_mb(spec["device"]),
        threads=torch.get_num_threads(),
        allocator=heap_allocator(),
        load_avg=[load_before, os.getloadavg()[0]],
    )
    Path(result_path).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
