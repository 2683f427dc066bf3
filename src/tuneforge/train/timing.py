"""Predict a training step's time on the shapes the memory estimate uses: matmul FLOPs at measured
GEMM rates, attention at its kernel's measured rate, memory-bound passes at measured bandwidth.

Nothing is measured here (train/calibrate.py measures the Machine); the counts follow what the
loop, the fast path (packed attention, fused LoRA, fast dropout), the chunked loss and AdamW run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from tuneforge.train.estimate import (
    FP32,
    Architecture,
    Batch,
    MethodSpec,
    Workload,
    fp32_residual,
    head_trains,
    is_packed,
    path_layers,
    positions,
    trainable_parameters,
)

# Per trainable parameter and step, bytes moved: single-tensor AdamW (decay 8, first moment 12,
# second moment 20, sqrt / div / add 24, addcdiv 16), clip_grad_norm_ (norm 4, scale 8, it always
# runs), and the gradient backward writes into fresh pages (zero_grad sets them to None).
ADAMW_BYTES = 80
CLIP_BYTES = 12
GRAD_ALLOC_BYTES = 4
OPTIMIZER_OPS_PER_TENSOR = 20  # AdamW's ~14 ops, clipping's 2, and its Python loop, per tensor
LOSS_PASSES = 6  # fp32 passes over each chunk of logits: logsumexp (2), subtract, exp, gather, ...
ATTENTION_BACKWARD = 2.5  # flash attention's backward recomputes scores: 5 matmuls to forward's 2

# Eager ops per block and micro-batch, counted on the tiny Llama with a dispatch mode
# (tests/test_plan_timing.py checks them): a block on the gradient path (forward + backward)
# and one below it (forward only), each packed example's own attention call in either, the
# weight gradients of a trainable block, and one fused LoRA branch (more with dropout).
BLOCK_OPS = 205
FORWARD_BLOCK_OPS = 75
EXAMPLE_OPS = 9
FORWARD_EXAMPLE_OPS = 5
TRAINABLE_BLOCK_OPS = 14
LORA_OPS = 22
LORA_DROPOUT_OPS = 10
MODEL_OPS = 85  # embedding, rotary tables, final norm, loss set-up, per micro-batch
CHUNK_OPS = 14  # per chunk of the loss


@dataclass(frozen=True)
class Machine:
    """This machine's speeds at the model's shapes (train/calibrate.py measures them); a rate
    left at 0 falls back to `matmul_flops` (FLOP/s) or to `bandwidth` (elements/s)."""

    matmul_flops: float  # FLOP/s of the block's linears, forward (x @ W.T)
    bandwidth: float  # bytes/s of an elementwise pass over arrays larger than the caches
    op_overhead_s: float = 10e-6  # one eager op: dispatch, allocation, autograd bookkeeping
    dgrad_flops: float = 0.0  # input gradients (g @ W)
    wgrad_flops: float = 0.0  # weight gradients (g.T @ x)
    lora_flops: float = 0.0  # the rank-r products of a LoRA branch (skinny, far below the above)
    attention_flops: float = 0.0  # causal attention, forward + backward (FLOPs as counted here)
    attention_forward_flops: float = 0.0  # causal attention, forward only
    masked_attention_flops: float = 0.0  # attention with a padding mask, forward + backward
    masked_attention_forward_flops: float = 0.0
    mask_rate: float = 0.0  # dropout-mask elements drawn per second
    masked_fill_rate: float = 0.0  # elements/s of masked_fill (compute-bound, not bandwidth)
    silu_rate: float = 0.0  # elements/s of SiLU forward (its backward costs two)
    lora_branch_s: float = 0.0  # fixed Python cost of one fused LoRA branch, forward + backward
    loss_rate: float = 0.0  # logits/s of cross-entropy, forward + backward (two exp passes each)

    def rate(self, name: str) -> float:
        """The named rate, or the one it falls back to when it was not measured."""
        value = getattr(self, name)
        if value:
            return value
        return self.matmul_flops if name.endswith("_flops") else self.bandwidth / FP32


@dataclass
class TimePlan:
    """Predicted seconds per optimizer step, by part, and the run's step counts."""

    step_s: float
    steps_per_epoch: int
    total_steps: int
    flops_per_step: float
    items: dict[str, float] = field(default_factory=dict)  # seconds per step by part

    @property
    def epoch_s(self) -> float:
        return self.step_s * self.steps_per_epoch

    @property
    def total_s(self) -> float:
        return self.step_s * self.total_steps


def head_positions(method: MethodSpec, work: Workload, batch: Batch) -> int:
    """Rows of hidden state the output head multiplies: the labelled positions on the chunked
    loss; every position on prompt learning's generic path (the model's own logits)."""
    if method.prompt_learning:
        return positions(method, work, batch)
    return sum(n for _, n in batch)


def gemm_flops(
    arch: Architecture, method: MethodSpec, work: Workload, batch: Batch
) -> dict[str, float]:
    """Matmul FLOPs of one micro-batch by kind: forward, input gradients, weight gradients.

    Every block runs 2 x positions x its linear weights forward; blocks on the gradient path
    the same again for input gradients, trainable blocks once more for weight gradients;
    checkpointing reruns the forward of the path. The head: logits forward, the hidden state's
    gradient, and the head's own gradient when it trains.
    """
    tokens = positions(method, work, batch)
    block = 2 * tokens * sum(a * b for a, b in arch.linears().values())
    on_path, trainable = path_layers(arch, method)
    head = 2 * head_positions(method, work, batch) * arch.hidden * arch.vocab
    recompute = on_path * block if work.gradient_checkpointing else 0
    return {
        "forward": arch.layers * block + head + recompute,
        "input grads": on_path * block + head,
        "weight grads": trainable * block + (head if head_trains(method, arch) else 0),
    }


def micro_batch_flops(
    arch: Architecture, method: MethodSpec, work: Workload, batch: Batch
) -> float:
    """All matmul FLOPs of one micro-batch: linears and head (gemm_flops), attention, LoRA."""
    path, forward_only = attention_flops(arch, method, work, batch)
    on_path, _ = path_layers(arch, method)
    lora = positions(method, work, batch) * on_path * lora_work(arch, method).flops
    return sum(gemm_flops(arch, method, work, batch).values()) + path + forward_only + lora


def attention_flops(
    arch: Architecture, method: MethodSpec, work: Workload, batch: Batch
) -> tuple[float, float]:
    """(FLOPs of blocks on the gradient path, forward + backward; of the others, forward).

    Forward is 4 x (query, key) pairs x q_dim (scores and values). Packed rows attend example
    by example, causally: n (n + 1) / 2 pairs each. Padded rows run the masked kernel over
    every pair of the padded length, plus prefix tuning's virtual keys.
    """
    if is_packed(method, work):
        pairs = sum(n * (n + 1) // 2 for n, _ in batch)
    else:
        length = positions(method, work, batch) // len(batch)
        prefix = method.virtual_tokens if method.name == "prefix" else 0
        pairs = len(batch) * length * (length + prefix)
    forward = 4 * pairs * arch.q_dim
    on_path, _ = path_layers(arch, method)
    passes = 2 if work.gradient_checkpointing else 1
    path = on_path * forward * (passes + ATTENTION_BACKWARD)
    return path, (arch.layers - on_path) * forward


def block_elements(arch: Architecture, packed: bool) -> tuple[int, int]:
    """(forward, backward) fp32 elements read plus written per position by one block's
    memory-bound ops: two RMSNorms (7 h forward, 18 h backward), residual adds, RoPE on q and k,
    attention layouts (packed: the transposed output and the examples' concatenation; padded:
    keys and values repeated to every head), SwiGLU's product, and backward's sums of gradients
    (SiLU itself is priced at its own rate)."""
    h, i, q, kv = arch.hidden, arch.intermediate, arch.q_dim, arch.kv_dim
    layout = 4 * q if packed else 4 * q + 2 * kv
    forward = 14 * h + 6 * h + 10 * (q + kv) + layout + 3 * i
    backward = 36 * h + 6 * h + 9 * h + 10 * (q + kv) + layout + 6 * i
    return forward, backward


@dataclass(frozen=True)
class LoraWork:
    """Per position and block, what the fused LoRA branches (train/fused_lora.py) do beyond the
    base linears: rank-r matmul FLOPs, elementwise fp32 elements (scaling, the branch added to
    the base output, its input gradient added to the base one), dropout-mask elements drawn,
    and masked_fill elements (the input masked forward and again for A's gradient, the input
    gradient masked)."""

    flops: int = 0
    elements: int = 0
    drawn: int = 0
    filled: int = 0


#: Linears that read the same input tensor in a Llama block.
SHARED_INPUT = {"k_proj": "q_proj", "v_proj": "q_proj", "up_proj": "gate_proj"}


def lora_work(arch: Architecture, method: MethodSpec) -> LoraWork:
    """The LoRA branches' work per position and block (none for other methods)."""
    if not method.lora_like:
        return LoraWork()
    flops = elements = 0
    for target in method.targets:
        n_in, n_out = arch.linears()[target]
        flops += 6 * method.r * (n_in + n_out)  # x A, h B; grads of A, B, h and x
        elements += 3 * n_in + 7 * n_out
    # The fused layers draw one mask per distinct input: q/k/v share one, gate/up another
    # (train/fused_lora.py share_masks).
    inputs = {SHARED_INPUT.get(t, t): arch.linears()[t][0] for t in method.targets}
    drawn = sum(inputs.values()) if method.dropout else 0
    return LoraWork(flops, elements, drawn, 3 * drawn)


def micro_batch_seconds(
    arch: Architecture, method: MethodSpec, work: Workload, batch: Batch, m: Machine
) -> dict[str, float]:
    """Seconds of one micro-batch's forward and backward, by part."""
    flops = gemm_flops(arch, method, work, batch)
    on_path_attention, forward_attention = attention_flops(arch, method, work, batch)
    masked = "" if is_packed(method, work) else "masked_"
    tokens = positions(method, work, batch)
    on_path, trainable = path_layers(arch, method)
    forward, backward = block_elements(arch, is_packed(method, work))
    reruns = on_path if work.gradient_checkpointing else 0
    elements = (arch.layers + reruns) * forward + on_path * backward + trainable * 8 * arch.hidden
    lora = lora_work(arch, method)
    pass_bytes = FP32 if fp32_residual(method) else work.weight_bytes
    silu = (arch.layers + reruns + 2 * on_path) * arch.intermediate
    logits = head_positions(method, work, batch) * arch.vocab
    chunks = math.ceil(sum(n for _, n in batch) / max(work.loss_chunk_tokens, 1))
    branches = on_path * len(method.targets) if method.lora_like else 0
    branch_ops = LORA_OPS + (LORA_DROPOUT_OPS if method.dropout else 0)
    ops = op_count(arch, method, work, batch) - branches * branch_ops + chunks * CHUNK_OPS
    ops += reruns * FORWARD_BLOCK_OPS
    return {
        "matmuls": flops["forward"] / m.rate("matmul_flops")
        + flops["input grads"] / m.rate("dgrad_flops")
        + flops["weight grads"] / m.rate("wgrad_flops"),
        "LoRA matmuls": tokens * on_path * lora.flops / m.rate("lora_flops"),
        "attention": on_path_attention / m.rate(f"{masked}attention_flops")
        + forward_attention / m.rate(f"{masked}attention_forward_flops"),
        # bf16 runs keep activations in bf16 between ops, unless a trained embedding makes the
        # residual stream fp32 (estimate.fp32_residual).
        "memory-bound passes": tokens
        * (elements + on_path * lora.elements)
        * pass_bytes
        / m.bandwidth
        + tokens * silu / m.rate("silu_rate"),
        "dropout masks": tokens * on_path * lora.drawn / m.rate("mask_rate")
        + tokens * on_path * lora.filled / m.rate("masked_fill_rate"),
        "loss logits": logits / m.loss_rate
        if m.loss_rate
        else logits * LOSS_PASSES * FP32 / m.bandwidth,
        "op overhead": ops * m.op_overhead_s
        + branches * (m.lora_branch_s or branch_ops * m.op_overhead_s),
    }


def op_count(arch: Architecture, method: MethodSpec, work: Workload, batch: Batch) -> int:
    """Eager ops one micro-batch dispatches (forward and backward)."""
    examples = len(batch) if is_packed(method, work) else 0
    on_path, trainable = path_layers(arch, method)
    path_block = BLOCK_OPS + EXAMPLE_OPS * examples
    if method.lora_like:
        branch = LORA_OPS + (LORA_DROPOUT_OPS if method.dropout else 0)
        path_block += len(method.targets) * branch
    below = (arch.layers - on_path) * (FORWARD_BLOCK_OPS + FORWARD_EXAMPLE_OPS * examples)
    return on_path * path_block + trainable * TRAINABLE_BLOCK_OPS + below + MODEL_OPS


def trainable_tensors(arch: Architecture, method: MethodSpec) -> int:
    """Parameter tensors the optimizer walks one by one (foreach is off)."""
    per_block = len(arch.linears()) + 2 + (3 if arch.attention_bias else 0)
    if method.name == "full":
        return arch.layers * per_block + 2 + (0 if arch.tied else 1)
    if method.name == "freeze":
        head = (1 if arch.tied else 2) if method.head_trainable else 0
        return method.trainable_layers * per_block + head
    if method.lora_like:
        return arch.layers * 2 * len(method.targets)
    if method.prompt_learning:
        return 1 + (4 if method.projection_hidden else 0)
    return arch.layers * len(method.targets)  # IA3: one vector per adapted linear


def optimizer_seconds(arch: Architecture, method: MethodSpec, work: Workload, m: Machine) -> float:
    """Clipping, AdamW and the fresh gradients of one step; with accumulation, each further
    micro-batch also adds its gradients to the kept ones (a read-add-write pass)."""
    params = trainable_parameters(arch, method)
    moved = params * (ADAMW_BYTES + CLIP_BYTES + GRAD_ALLOC_BYTES)
    moved += (work.grad_accum - 1) * params * 3 * FP32
    ops = trainable_tensors(arch, method) * OPTIMIZER_OPS_PER_TENSOR
    return moved / m.bandwidth + ops * m.op_overhead_s


def time_plan(arch: Architecture, method: MethodSpec, work: Workload, machine: Machine) -> TimePlan:
    """Seconds per optimizer step (the epoch's average micro-batch x grad_accum, then the
    optimizer), per epoch and for the run, with the step's seconds by part."""
    n = len(work.batches)
    items: dict[str, float] = {}
    flops = 0.0
    for batch in work.batches:
        for name, seconds in micro_batch_seconds(arch, method, work, batch, machine).items():
            items[name] = items.get(name, 0.0) + seconds * work.grad_accum / n
        flops += micro_batch_flops(arch, method, work, batch) * work.grad_accum / n
    items["optimizer + clipping"] = optimizer_seconds(arch, method, work, machine)
    per_epoch = max(1, math.ceil(n / work.grad_accum))
    total_micro = work.total_micro_batches or n
    total_steps = max(1, math.ceil(total_micro / work.grad_accum))
    return TimePlan(sum(items.values()), per_epoch, total_steps, flops, items)
