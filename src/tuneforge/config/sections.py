"""The typed sections of a run config: every key with its default, type and one-line doc.

Validation of values lives here; reading YAML, overrides and error wording live in `loader.py`.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializeAsAny,
    field_validator,
    model_validator,
)

from tuneforge.config.base import MethodSection, Section, method_options
from tuneforge.config.messages import not_one_of
from tuneforge.config.scarce import AugmentSection, MetaSection
from tuneforge.constants import (
    DATA_FORMATS,
    EVAL_METRICS,
    GENERATION_METRICS,
    LABEL_METRICS,
    LR_DIRECTIONS,
    SCHEDULES,
)


def eval_metric_keys(metrics: list[str]) -> list[str]:
    """The eval_* keys an evaluation logs for these eval.metrics (loss is always computed)."""
    keys = ["eval_loss", "eval_perplexity"]
    for name in metrics:
        if name in LABEL_METRICS:
            keys += ["eval_accuracy", "eval_macro_f1"]
        elif name == "rouge":
            keys += ["eval_rouge1", "eval_rouge2", "eval_rougeL"]
        elif name in GENERATION_METRICS:
            keys.append(f"eval_{name}")
    return list(dict.fromkeys(keys))


class ModelSection(Section):
    name: str = Field(
        "smollm2-135m-instruct",
        description="A built-in name, a local HF directory, or a .gguf file.",
    )
    dtype: Literal["auto", "bf16", "fp32"] = Field(
        "auto",
        description="auto: bf16 where the CPU/GPU supports it, else fp32. Never fp16 on CPU.",
    )
    trust_remote_code: bool = Field(
        False,
        description="Run model code shipped with a local checkpoint. Off unless you trust it.",
    )
    accept_license: bool = Field(
        False,
        description="Accept the licence of a built-in model whose terms go beyond an OSI "
        "licence (`tuneforge models` lists them); needed once, then remembered.",
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in backward to save memory."
    )
    attn_implementation: Literal["sdpa", "eager"] = Field("sdpa", description="Attention kernel.")
    dropout: float | None = Field(
        None,
        ge=0.0,
        lt=1.0,
        description="Override every dropout rate of the architecture (attention, hidden, "
        "embedding) where it has one; null keeps the checkpoint's own.",
    )
    quantize: Literal["nf4"] | None = Field(
        None,
        description="nf4: load the frozen base in 4-bit NormalFloat (bitsandbytes) and train an "
        "adapter on it (QLoRA); null: no quantisation.",
    )


class DataSection(Section):
    train: str = Field(
        "data/train.jsonl", description="Training file: .jsonl, .json, .csv or .parquet."
    )
    validation: float | str | None = Field(
        0.1, description="A ratio of train in (0, 1), a file path, or null for none."
    )
    format: Literal[("auto", *DATA_FORMATS)] = Field(
        "auto", description="Row format; auto detects it from the first valid row."
    )
    template: str | None = Field(
        None,
        description="Chat template: null uses the tokenizer's own, or a built-in name (chatml, llama3, alpaca).",
    )
    train_on: Literal["assistant", "all"] = Field(
        "assistant", description="Which tokens carry loss."
    )
    max_length: int = Field(512, gt=0, description="Maximum tokens per example.")
    truncation: Literal["truncate", "drop", "error"] = Field(
        "truncate", description="What to do with over-length examples."
    )
    on_bad_row: Literal["fail", "skip"] = Field(
        "fail",
        description="fail: stop before training and list bad rows; skip: drop and count them.",
    )
    packing: bool = Field(
        True,
        description="Pack each micro-batch's examples into one pad-free row, kept apart in "
        "attention (same loss as padding); off by itself for prompt-learning methods.",
    )
    group_by_length: bool = Field(
        False,
        description="Without packing: sort runs of 64 micro-batches by example length, so "
        "that each batch pads little.",
    )
    augment: AugmentSection | None = Field(
        None,
        description="EDA augmentation of the training split only (after the validation split): "
        "{ops, n, alpha, seed, lang, targets}; null: off.",
    )

    @field_validator("validation")
    @classmethod
    def _ratio_in_range(cls, v: float | str | None) -> float | str | None:
        if isinstance(v, float) and not 0.0 < v < 1.0:
            raise ValueError(f"a ratio must be in (0, 1), got {v}")
        return v


class EarlyStoppingSection(Section):
    patience: int = Field(3, ge=1, description="Evaluations without improvement before stopping.")
    metric: str = Field("eval_loss", description="Metric to watch.")
    mode: Literal["min", "max"] = Field("min", description="Whether smaller or larger is better.")
    min_delta: float = Field(
        0.0, ge=0.0, description="Smallest change that counts as an improvement."
    )


class LrGroupSection(Section):
    pattern: str = Field(
        description="Regular expression searched in parameter names, e.g. 'embed' or 'layers\\.0\\.'."
    )
    lr: float = Field(gt=0, description="Peak learning rate of the matching parameters.")
    weight_decay: float | None = Field(
        None, ge=0.0, description="Weight decay of the group; null: train.weight_decay."
    )

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, v: str) -> str:
        import re

        try:
            re.compile(v)
        except re.error as err:
            raise ValueError(f"not a valid regular expression: {err}") from None
        return v


class TrainSection(Section):
    epochs: float = Field(
        1, gt=0, description="Passes over the training set (ignored when max_steps is set)."
    )
    max_steps: int | None = Field(
        None, gt=0, description="Optimizer steps; overrides epochs when set."
    )
    batch_size: int = Field(8, gt=0, description="Examples per micro-batch per process.")
    grad_accum: int = Field(1, gt=0, description="Micro-batches per optimizer step.")
    lr: float = Field(2.0e-4, gt=0, description="Peak learning rate.")
    scheduler: Literal[SCHEDULES] = Field(
        "cosine", description="Learning-rate schedule after warmup."
    )
    min_lr_ratio: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="Final rate of cosine_with_min_lr and polynomial, as a fraction of the peak.",
    )
    poly_power: float = Field(1.0, gt=0, description="Exponent of the polynomial schedule.")
    layer_lr_decay: float = Field(
        1.0,
        gt=0,
        le=1.0,
        description="Layer-wise rates: block i trains at lr * decay^(distance from the end "
        "chosen by layer_lr_direction); 1.0 disables.",
    )
    layer_lr_direction: Literal[LR_DIRECTIONS] = Field(
        "shallow_smaller",
        description="shallow_smaller: layers near the input get the smaller rates (LLRD, "
        "ULMFiT); deep_smaller: layers near the output do.",
    )
    lr_groups: list[LrGroupSection] = Field(
        default_factory=list,
        description="Per-pattern rates [{pattern, lr, weight_decay}]; the first match wins over "
        "every other rate rule.",
    )
    embedding_lr: float | None = Field(
        None, gt=0, description="Rate of the input embeddings; null: the layer-wise rate."
    )
    head_lr: float | None = Field(
        None, gt=0, description="Rate of the output head (lm_head); null: the layer-wise rate."
    )
    l1: float = Field(
        0.0,
        ge=0.0,
        description="L1 penalty: l1 * sum|w| over trainable weights (norms and biases excluded).",
    )
    neftune_alpha: float | None = Field(
        None,
        gt=0,
        description="NEFTune: uniform noise of scale alpha/sqrt(len*dim) on input embeddings "
        "while training (5 is typical); null: off.",
    )
    warmup_steps: int = Field(
        0, ge=0, description="Linear warmup steps (wins over warmup_ratio when > 0)."
    )
    warmup_ratio: float = Field(
        0.0, ge=0.0, lt=1.0, description="Warmup as a fraction of total steps."
    )
    weight_decay: float = Field(
        0.0, ge=0.0, description="AdamW decoupled weight decay (norms and biases excluded)."
    )
    adam_betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    adam_eps: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    max_grad_norm: float | None = Field(
        1.0, description="Clip gradients to this global norm; null disables."
    )
    seed: int = Field(0, description="Seed for weights init, data order and dropout.")
    log_every_steps: int = Field(1, gt=0, description="Write a metrics.jsonl line every N steps.")
    on_nonfinite: Literal["halt", "skip"] = Field(
        "halt",
        description="Non-finite loss or gradient: halt (exit 3 naming the step and rows) or skip "
        "the step's update; always logged.",
    )
    max_bad_steps: int = Field(
        3, ge=1, description="With on_nonfinite: skip, halt after this many bad steps in a row."
    )
    trace_rows: bool = Field(
        False,
        description="Log every step with its rows (file:line) in metrics.jsonl, to audit data order.",
    )
    loss_chunk_tokens: int = Field(
        512,
        gt=0,
        description="Labelled positions per chunk of output logits in the loss (memory vs. "
        "matmul size); logits of unlabelled positions are never computed.",
    )
    compile: bool = Field(
        False, description="torch.compile each decoder block (slow to start; measure first)."
    )
    strategy: Literal["auto", "single", "ddp", "fsdp2", "deepspeed"] = Field(
        "auto",
        description="How processes share the work: single, ddp (replicas), fsdp2 (weights, "
        "gradients and optimizer state sharded per decoder block) or deepspeed (ZeRO, CUDA only); "
        "auto: ddp under a launcher, else single. Start several with --nproc N.",
    )
    zero_stage: Literal[2, 3] = Field(
        2,
        description="DeepSpeed ZeRO stage with train.strategy: deepspeed (3 also shards weights).",
    )
    dist_timeout_s: int = Field(
        600,
        gt=0,
        description="Seconds a collective waits for a missing rank before the job fails.",
    )
    liger_kernel: bool = Field(
        False,
        description="CUDA only: swap in liger-kernel's fused RMSNorm, SwiGLU and RoPE kernels "
        "where the architecture has them (pip install liger-kernel).",
    )
    num_threads: int | None = Field(
        None,
        gt=0,
        description="CPU threads for torch; null: OMP_NUM_THREADS if set, else the cores "
        "available divided among this machine's processes.",
    )


class EvalSection(Section):
    every_steps: int | None = Field(
        50,
        gt=0,
        description="Evaluate every N optimizer steps (and at the end); null: only at the end.",
    )
    metrics: list[str] = Field(
        default_factory=lambda: ["loss"],
        description="Validation metrics, logged as eval_NAME: loss, perplexity, accuracy, macro_f1 "
        "(the label named in the generated answer with eval.generate, else the most likely "
        "label); with eval.generate also bleu, chrf, rouge, exact_match.",
    )
    batch_size: int | None = Field(
        None, gt=0, description="Eval micro-batch; defaults to train.batch_size."
    )
    early_stopping: EarlyStoppingSection | None = Field(
        None, description="{patience, metric, mode, min_delta} or null."
    )
    generate: bool = Field(
        False,
        description="Greedy-generate answers for the validation set and score them (batched).",
    )
    max_new_tokens: int = Field(64, gt=0, description="Longest generated answer, in tokens.")
    generate_max_examples: int | None = Field(
        None,
        gt=0,
        description="Generation and label metrics on the first N validation rows only (loss "
        "uses all); null: all.",
    )
    num_samples: int = Field(
        4, ge=0, description="Generations kept per evaluation in samples.jsonl and the report."
    )
    lang: Literal["auto", "zh", "en"] = Field(
        "auto", description="Language of the references (BLEU tokenizer, ROUGE library)."
    )
    zh_rouge: Literal["word", "char"] = Field(
        "word", description="Chinese ROUGE units: jieba words or characters."
    )
    overfit_patience: int = Field(
        3,
        ge=1,
        description="Warn when eval loss rose this many evaluations in a row while train loss fell.",
    )

    @field_validator("metrics")
    @classmethod
    def _known_metrics(cls, v: list[str]) -> list[str]:
        for name in v:
            if name not in EVAL_METRICS:
                raise ValueError(not_one_of(name, EVAL_METRICS))
        return list(dict.fromkeys(v))


class LogSection(Section):
    tensorboard: bool = Field(
        False,
        description="Also log metrics to OUTPUT_DIR/tensorboard (needs the tensorboard package).",
    )
    report: bool = Field(
        True, description="Write report.html and plots/*.png at the end of a run with evaluation."
    )


class CheckpointSection(Section):
    every_steps: int | None = Field(
        100,
        gt=0,
        description="Save resumable state every N steps; null: only at epoch ends (at_epoch_end).",
    )
    keep_last: int = Field(
        2, ge=1, description="How many step checkpoints to keep (the best is always kept)."
    )
    at_epoch_end: bool = Field(
        True, description="Also save resumable state after the step that finishes each epoch."
    )


class OutputSection(Section):
    dir: str = Field("runs/quickstart", description="Run directory.")
    overwrite: bool = Field(False, description="Allow writing into a non-empty run directory.")


class RunConfig(BaseModel):
    """The whole run. `method` is the registered method's own options model."""

    model_config = ConfigDict(extra="forbid")
    model: ModelSection = Field(default_factory=ModelSection)
    method: SerializeAsAny[MethodSection] = Field(
        default_factory=lambda: method_options({"name": "lora"})
    )
    data: DataSection = Field(default_factory=DataSection)
    train: TrainSection = Field(default_factory=TrainSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    checkpoint: CheckpointSection = Field(default_factory=CheckpointSection)
    output: OutputSection = Field(default_factory=OutputSection)
    log: LogSection = Field(default_factory=LogSection)
    meta: MetaSection | None = Field(
        None, description="Few-shot meta-learning (tuneforge meta-train); null for other runs."
    )

    @model_validator(mode="after")
    def _cross_checks(self) -> RunConfig:
        es = self.eval.early_stopping
        if es is not None and self.data.validation is None:
            raise ValueError(
                "eval.early_stopping needs a validation set, but data.validation is null"
            )
        needs_text = [m for m in self.eval.metrics if m in GENERATION_METRICS]
        if needs_text and not self.eval.generate:
            raise ValueError(
                f"eval.metrics: {', '.join(needs_text)} score generated text; "
                "set eval.generate: true"
            )
        if self.eval.generate and self.data.validation is None:
            raise ValueError("eval.generate needs a validation set, but data.validation is null")
        if self.model.quantize and self.train.strategy in ("fsdp2", "deepspeed"):
            raise ValueError(
                f"model.quantize: nf4 runs with train.strategy single or ddp, not "
                f"{self.train.strategy} (a 4-bit base cannot be sharded)"
            )
        if es is not None and es.metric not in eval_metric_keys(self.eval.metrics):
            allowed = ", ".join(eval_metric_keys(self.eval.metrics))
            raise ValueError(
                f"eval.early_stopping.metric: {es.metric!r} is not logged with these "
                f"eval.metrics; one of {allowed}"
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def digest(self) -> str:
        """A short hash of the resolved config, recorded in the manifest and checkpoints."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]
