"""The plan recipe: from a run config, predict peak memory and time without loading weights
(config.json numbers, the tokenised data, a cached calibration), and find settings that fit.

The arithmetic is train/estimate.py and the measuring train/calibrate.py; printing is cli/plan.py.
`tuneforge train` calls `check_memory` with the data it already prepared.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

from tuneforge.config import RunConfig
from tuneforge.constants import IGNORE_INDEX
from tuneforge.data.pipeline import PreparedData
from tuneforge.data.templates import apply_template
from tuneforge.errors import ModelError, PlanError
from tuneforge.models import load_tokenizer, model_config, tokenizer_dir
from tuneforge.train.estimate import (
    Architecture,
    MemoryPlan,
    MethodSpec,
    Workload,
    fp32_residual,
    is_packed,
    memory_plan,
    method_spec,
    positions,
)
from tuneforge.train.order import micro_batches_per_epoch, total_steps_for
from tuneforge.train.timing import Machine, TimePlan, time_plan

GB = 1024**3
NO_PACKING = ("gpt2", "gpt_neo", "gptj", "bloom")  # attend across packed examples (fastpath)


@dataclass
class Suggestion:
    """A change (as key=value overrides) and what it would cost."""

    overrides: list[str]
    cost: str  # what the change costs in quality or time
    memory: MemoryPlan
    time: TimePlan


@dataclass
class Plan:
    model: str
    arch: Architecture
    spec: MethodSpec
    work: Workload
    memory: MemoryPlan
    time: TimePlan
    machine: Machine
    budget_bytes: int
    budget_source: str  # "--memory" or "available"
    suggestions: list[Suggestion] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return self.memory.peak_bytes <= self.budget_bytes


def architecture(name: str) -> Architecture:
    """The model's shape from its config (registry, config.json or GGUF metadata)."""
    config = model_config(name)
    try:
        return Architecture.from_config(config)
    except (ValueError, TypeError) as err:
        raise ModelError(
            f"model.name: {name}: not a Llama-shaped decoder the plan can size ({err})"
        ) from None


def plan_tokenizer(cfg: RunConfig):
    """The run's tokenizer (with data.template), read without loading or dequantising weights."""
    tokenizer = load_tokenizer(tokenizer_dir(cfg.model.name), cfg.model.trust_remote_code)
    apply_template(tokenizer, cfg.data.template)
    return tokenizer


def workload(
    cfg: RunConfig, data: PreparedData, arch: Architecture, spec: MethodSpec, heap: str = "glibc"
) -> Workload:
    """The run's micro-batches over one epoch, in the loop's order, as (tokens, labelled) pairs."""
    from tuneforge.train.order import micro_batch_indices

    t = cfg.train
    sizes = [
        (len(ex.input_ids), sum(1 for label in ex.labels[1:] if label != IGNORE_INDEX))
        for ex in data.train
    ]
    if not sizes:
        raise PlanError(f"data.train: {cfg.data.train} has no usable rows to plan with")
    per_epoch = micro_batches_per_epoch(len(sizes), t.batch_size, 1)
    indices = micro_batch_indices(len(sizes), t.batch_size, t.seed, 0, 1)
    batches = [tuple(sizes[i] for i in next(indices)[1]) for _ in range(per_epoch)]
    steps = t.max_steps or total_steps_for(len(sizes), t.batch_size, t.grad_accum, 1, t.epochs)
    packing = (
        cfg.data.packing
        and t.neftune_alpha is None
        and not spec.prompt_learning
        and arch.model_type not in NO_PACKING
    )
    return Workload(
        batches=batches,
        grad_accum=t.grad_accum,
        packing=packing,
        loss_chunk_tokens=t.loss_chunk_tokens,
        gradient_checkpointing=cfg.model.gradient_checkpointing,
        weight_bytes=2 if _dtype(cfg) == "bf16" else 4,
        total_micro_batches=steps * t.grad_accum,
        dataset_tokens=sum(2 * len(ex.input_ids) for ex in [*data.train, *data.validation]),
        heap=heap,
    )


def _dtype(cfg: RunConfig) -> str:
    from tuneforge.models import resolve_dtype

    return "bf16" if str(resolve_dtype(cfg.model.dtype)) == "torch.bfloat16" else "fp32"


def estimate(
    cfg: RunConfig,
    data: PreparedData,
    *,
    budget_bytes: int | None = None,
    calibrate_seconds: float = 1.5,
    with_suggestions: bool = True,
    fresh_calibration: bool = False,
    heap: str | None = None,
) -> Plan:
    """Predict memory and time for `cfg` on its prepared data; suggest changes over budget.
    `heap`: the malloc the training process runs on (default: this process's)."""
    import torch

    from tuneforge.heap import heap_allocator, release_free_heap
    from tuneforge.train.calibrate import available_memory_bytes, calibrate, current_rss_bytes

    arch = architecture(cfg.model.name)
    spec = method_spec(cfg.method.model_dump(), arch)
    work = workload(cfg, data, arch, spec, heap or heap_allocator())
    release_free_heap()  # memory an earlier run in this process freed is not held
    base = current_rss_bytes()
    memory = memory_plan(arch, spec, work, base)
    tokens, example = typical_shapes(spec, work)
    machine = calibrate(
        arch,
        tokens,
        example,
        torch.bfloat16 if work.weight_bytes == 2 else torch.float32,  # autocast's compute dtype
        threads=training_threads(cfg.train.num_threads),
        seconds=calibrate_seconds,
        refresh=fresh_calibration,
        lora=(spec.r, 0.1 if spec.dropout else 0.0) if spec.lora_like else None,
        math_attention=not fp32_residual(spec),
    )
    timing = time_plan(arch, spec, work, machine)
    source = "--memory" if budget_bytes is not None else "available"
    if budget_bytes is None:
        budget_bytes = available_memory_bytes() + base
    result = Plan(cfg.model.name, arch, spec, work, memory, timing, machine, budget_bytes, source)
    if not result.fits and with_suggestions:
        result.suggestions = suggest(result)
    return result


def typical_shapes(spec: MethodSpec, work: Workload) -> tuple[int, int]:
    """(positions of the mean micro-batch, tokens of its mean attention call: an example when
    packed, a padded row otherwise): the shapes the calibration measures at."""
    n = len(work.batches)
    tokens = sum(positions(spec, work, b) for b in work.batches) // n
    if is_packed(spec, work):
        return tokens, int(sum(work.tokens(b) / len(b) for b in work.batches) / n)
    return tokens, sum(positions(spec, work, b) // len(b) for b in work.batches) // n


def training_threads(num_threads: int | None) -> int:
    """The torch threads `tuneforge train` will use (train/fastpath.py: set_threads)."""
    import os

    import torch

    from tuneforge.train.fastpath import auto_num_threads

    if num_threads is None and os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    return num_threads or auto_num_threads()


def _candidates(plan: Plan) -> list[tuple[list[str], str, Callable]]:
    """Changes in order of quality cost: none first (memory for time), then method, length."""
    work, spec = plan.work, plan.spec
    out: list[tuple[list[str], str, Callable]] = []
    if not work.gradient_checkpointing:
        out.append(
            (
                ["model.gradient_checkpointing=true"],
                "no quality cost; about a third slower",
                lambda s, w: (s, replace(w, gradient_checkpointing=True)),
            )
        )
    batch = max(len(b) for b in work.batches)
    k = 2
    while batch // k >= 1:
        size, accum = batch // k, work.grad_accum * k
        out.append(
            (
                [f"train.batch_size={size}", f"train.grad_accum={accum}"],
                "no quality cost (same effective batch); slower per example",
                lambda s, w, n=size, a=accum: (s, _rebatch(w, n, a)),
            )
        )
        k *= 2
    if spec.name in ("full", "freeze"):
        lora = replace(spec, name="lora", r=16, dropout=True, trainable_layers=0)
        out.append(
            (["method.name=lora"], "some quality cost: a rank-16 update", lambda s, w: (lora, w))
        )
    if work.weight_bytes == 4:
        out.append(
            (
                ["model.dtype=bf16"],
                "tiny quality cost (bf16 base weights); very slow on a CPU without bf16",
                lambda s, w: (s, replace(w, weight_bytes=2)),
            )
        )
    longest = max(n for b in work.batches for n, _ in b)
    for length in (1024, 512, 256, 128):
        if length < longest:
            cut = sum(n > length for b in work.batches for n, _ in b)
            share = cut / sum(len(b) for b in work.batches)
            out.append(
                (
                    [f"data.max_length={length}"],
                    f"quality cost: truncates {share:.0%} of the rows",
                    lambda s, w, m=length: (s, _truncate(w, m)),
                )
            )
    return out


def _rebatch(work: Workload, size: int, accum: int) -> Workload:
    flat = [ex for b in work.batches for ex in b]
    batches = [tuple(flat[i : i + size]) for i in range(0, len(flat), size)]
    return replace(work, batches=batches, grad_accum=accum)


def _truncate(work: Workload, max_length: int) -> Workload:
    def cut(n: int, labelled: int) -> tuple[int, int]:
        return min(n, max_length), max(0, labelled - max(0, n - max_length))

    return replace(work, batches=[tuple(cut(*ex) for ex in b) for b in work.batches])


def suggest(plan: Plan) -> list[Suggestion]:
    """Single changes that fit, least quality cost first; else the first cumulative set that
    does (a later change of the same key replacing an earlier one). Raises PlanError when even
    every change together does not fit."""
    base = plan.memory.items.get("base process", 0)
    found = []
    candidates = _candidates(plan)
    for overrides, cost, change in candidates:
        spec, work = change(plan.spec, plan.work)
        memory = memory_plan(plan.arch, spec, work, base)
        if memory.peak_bytes <= plan.budget_bytes:
            timing = time_plan(plan.arch, spec, work, plan.machine)
            found.append(Suggestion(overrides, cost, memory, timing))
    if found:
        return found
    chosen: dict[str, tuple[list[str], str, Callable]] = {}
    memory = plan.memory
    for candidate in candidates:
        chosen[candidate[0][0].split("=")[0]] = candidate
        spec, work = plan.spec, plan.work
        for _, _, change in chosen.values():
            spec, work = change(spec, work)
        memory = memory_plan(plan.arch, spec, work, base)
        if memory.peak_bytes <= plan.budget_bytes:
            overrides = [o for c in chosen.values() for o in c[0]]
            costs = "; ".join(c[1].split(";")[0] for c in chosen.values())
            timing = time_plan(plan.arch, spec, work, plan.machine)
            return [Suggestion(overrides, costs, memory, timing)]
    raise PlanError(
        f"plan: no setting fits in {plan.budget_bytes / GB:.2f} GB ({plan.budget_source}): with "
        f"every change the peak is still {memory.peak_bytes / GB:.2f} GB (largest: "
        f"{memory.biggest}, {memory.items[memory.biggest] / GB:.2f} GB); use a smaller model"
    )


def check_memory(cfg: RunConfig, data: PreparedData, *, force: bool = False) -> Plan | None:
    """The train recipe's check: the plan, or PlanError when the predicted peak exceeds the
    memory available now (naming the biggest item and the first change that fits)."""
    try:
        # Measured afresh (a second): the run's predicted step time is then checked against
        # the machine as it is now, and the cache keeps the newest measurement.
        plan = estimate(
            cfg, data, calibrate_seconds=1.0, with_suggestions=not force, fresh_calibration=True
        )
    except ModelError:
        return None  # not a shape the plan can size: train without a prediction
    except PlanError as err:
        raise PlanError(f"{err}; --force trains anyway") from None
    if plan.fits or force:
        return plan
    biggest = plan.memory.biggest
    first = plan.suggestions[0]
    raise PlanError(
        f"plan: predicted peak {plan.memory.peak_bytes / GB:.2f} GB exceeds the "
        f"{plan.budget_bytes / GB:.2f} GB available; largest item: {biggest} "
        f"({plan.memory.items[biggest] / GB:.2f} GB); fix: {' '.join(first.overrides)} "
        f"({first.cost}); `tuneforge plan CONFIG` shows all, --force trains anyway"
    )
