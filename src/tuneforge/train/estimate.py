"""Predict a training run's peak memory from the model's config.json numbers and the data's
token lengths: pure arithmetic on what the loop, loss, fast path and packing really keep.

Time is train/timing.py (on these same shapes); nothing is measured here: the base memory comes
from train/calibrate.py, and reading the config and data is recipes/plan.py's job.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

FP32 = 4
ADAM_STATES = 2  # AdamW keeps exp_avg and exp_avg_sq, fp32, per trainable parameter
ALLOCATOR_SLACK = 0.10  # of the run's own bytes besides activations (docs/plan.md)
#: Of the activations: freed transients the heap cannot reuse (docs/plan.md). tcmalloc reuses
#: them far better: 0.02-0.13 fitted on five bf16 rows here, against glibc's 0.27-0.38.
HEAP_HOLES = {"glibc": 0.35, "tcmalloc": 0.10}
MATH_ATTENTION_MAX = 512  # train/math_attention.py's MAX_LENGTH (this module stays torch-free)
PY_INT_BYTES = 44  # a tokenised id in a Python list: the int object plus the list's pointer
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Architecture:
    """The numbers of a decoder-only (Llama-shaped) config.json the estimate needs."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    attention_bias: bool = False
    model_type: str = "llama"

    @classmethod
    def from_config(cls, config: dict) -> Architecture:
        missing = [
            k
            for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size")
            if k not in config
        ]
        if missing:
            raise ValueError(f"config.json lacks {', '.join(missing)}")
        heads = int(config.get("num_attention_heads", 1))
        return cls(
            hidden=int(config["hidden_size"]),
            intermediate=int(config["intermediate_size"]),
            layers=int(config["num_hidden_layers"]),
            heads=heads,
            kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or config["hidden_size"] // heads),
            vocab=int(config["vocab_size"]),
            tied=bool(config.get("tie_word_embeddings", False)),
            attention_bias=bool(config.get("attention_bias", config.get("model_type") == "qwen2")),
            model_type=str(config.get("model_type", "llama")),
        )

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each linear layer of one block."""
        h, i = self.hidden, self.intermediate
        return {
            "q_proj": (h, self.q_dim),
            "k_proj": (h, self.kv_dim),
            "v_proj": (h, self.kv_dim),
            "o_proj": (self.q_dim, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }


def parameter_counts(arch: Architecture) -> dict[str, int]:
    """Parameters by part: embedding, one block, all blocks, final norm, untied head, total."""
    block = sum(a * b for a, b in arch.linears().values()) + 2 * arch.hidden
    if arch.attention_bias:
        block += arch.q_dim + 2 * arch.kv_dim
    embedding = arch.vocab * arch.hidden
    head = 0 if arch.tied else embedding
    blocks = block * arch.layers
    total = embedding + blocks + arch.hidden + head
    return {
        "embedding": embedding,
        "block": block,
        "blocks": blocks,
        "final_norm": arch.hidden,
        "head": head,
        "total": total,
    }


@dataclass(frozen=True)
class MethodSpec:
    """What a method trains, in numbers: plain arguments from the method section."""

    name: str
    r: int = 0  # LoRA rank (LoRA family)
    targets: tuple[str, ...] = LINEARS  # adapted linears (LoRA family, IA3)
    dropout: bool = False  # LoRA dropout on: a 1-byte mask per adapted input element
    trainable_layers: int = 0  # freeze: how many of the last blocks train
    head_trainable: bool = False  # freeze: trainable_modules reach the embedding / head
    virtual_tokens: int = 0  # prefix / prompt / P-tuning
    projection_hidden: int = 0  # prefix projection MLP width (0: none)

    @property
    def prompt_learning(self) -> bool:
        return self.name in ("prefix", "prompt", "ptuning")

    @property
    def lora_like(self) -> bool:
        return self.name in ("lora", "adalora", "hybrid")


def method_spec(options: dict, arch: Architecture) -> MethodSpec:
    """A MethodSpec from a method section's values (unknown methods estimate as LoRA)."""
    name = options.get("name", "lora")
    targets = options.get("target_modules") or "all-linear"  # None: the method's default set
    if isinstance(targets, str):
        targets = LINEARS if targets == "all-linear" else (targets,)
    chosen = tuple(t for t in LINEARS if any(re.search(p, t) for p in targets)) or LINEARS
    layers = options.get("layers")
    trainable_layers = len(layers) if layers else int(options.get("trainable_layers", 2))
    head = any(
        re.search(p, n) for p in options.get("trainable_modules", []) for n in ("lm_head", "embed")
    )
    projection = options.get("projection", False) or name == "ptuning"
    return MethodSpec(
        name=name,
        r=int(options.get("r", options.get("init_r", 8)) or 0),
        targets=chosen,
        dropout=float(options.get("dropout", 0.0) or 0.0) > 0,
        trainable_layers=min(trainable_layers, arch.layers),
        head_trainable=head,
        virtual_tokens=int(options.get("num_virtual_tokens", 0) or 0),
        projection_hidden=(options.get("encoder_hidden_size") or arch.hidden) if projection else 0,
    )


def trainable_parameters(arch: Architecture, method: MethodSpec) -> int:
    """How many parameters the method trains."""
    counts = parameter_counts(arch)
    linears = arch.linears()
    if method.name == "full":
        return counts["total"]
    if method.name == "freeze":
        extra = counts["embedding"] + counts["head"] if method.head_trainable else 0
        return method.trainable_layers * counts["block"] + extra
    if method.name == "ia3":
        per = sum(linears[t][1] if t != "down_proj" else linears[t][0] for t in method.targets)
        return per * arch.layers
    if method.prompt_learning:
        width = arch.layers * 2 * arch.kv_dim if method.name == "prefix" else arch.hidden
        table = method.virtual_tokens * width  # prefix: a key and a value per block (GQA width)
        mlp = 0
        if method.projection_hidden:
            out = width
            mlp = arch.hidden * method.projection_hidden + method.projection_hidden
            mlp += method.projection_hidden * out + out
        return table + mlp
    per_block = sum(method.r * (linears[t][0] + linears[t][1]) for t in method.targets)
    return per_block * arch.layers


#: A micro-batch as the estimate sees it: (input tokens, labelled tokens) per example.
Batch = Sequence[tuple[int, int]]


@dataclass(frozen=True)
class Workload:
    """How the run feeds the model: micro-batches of the real data, and the loop's settings."""

    batches: Sequence[Batch]  # the micro-batches of one epoch, in the loop's order
    grad_accum: int = 1
    packing: bool = True
    loss_chunk_tokens: int = 512
    gradient_checkpointing: bool = False
    weight_bytes: int = FP32  # the load dtype: 4 fp32, 2 bf16
    total_micro_batches: int = 0  # of the whole run (0: one epoch)
    dataset_tokens: int = 0  # input + label ids held in memory by the tokenised data
    heap: str = "glibc"  # the malloc training runs on (tuneforge/heap.py)

    def tokens(self, batch: Batch) -> int:
        """Positions the model runs: packed, the examples' sum; padded, rows x the longest."""
        if self.packing:
            return sum(n for n, _ in batch)
        return len(batch) * max(n for n, _ in batch)


def _block_saved(
    arch: Architecture, method: MethodSpec, trainable: bool, packed: bool = True
) -> tuple[int, int]:
    """(fp32 elements, mask bytes) autograd keeps per token in one block on the gradient path.

    Counted from what each op saves (tests/test_plan.py checks it against saved-tensor hooks):
    RMSNorm keeps its input and rsqrt, plus its output when its weight trains; a linear keeps
    its input when its weight trains or a LoRA branch reads it; RoPE keeps nothing per token;
    SDPA keeps q, k, v, its output and the log-sum-exp, with k and v repeated to every query
    head when a padding mask sends it off the packed kernel; SwiGLU keeps gate, up and silu.
    """
    h, i, q = arch.hidden, arch.intermediate, arch.q_dim
    kv = arch.kv_dim if packed else q
    if trainable:  # every weight trains: every linear input and both norm outputs are kept
        return 2 * (3 * h + 1) + 3 * q + 2 * kv + arch.heads + 4 * i, 0
    adapted = set(method.targets) if method.lora_like else set()
    elements = 2 * (h + 1) + 2 * q + 2 * kv + arch.heads + 3 * i
    # One dropped input (and one mask) per distinct layer input: q/k/v and gate/up share theirs.
    inputs = h if adapted & {"q_proj", "k_proj", "v_proj"} else 0
    inputs += q if "o_proj" in adapted else 0
    inputs += h if adapted & {"gate_proj", "up_proj"} else 0
    inputs += i if "down_proj" in adapted else 0
    elements += inputs + method.r * len(adapted)
    return elements, inputs if method.dropout else 0


def _block_bytes(
    arch: Architecture, method: MethodSpec, trainable: bool, packed: bool, half: bool
) -> tuple[int, int]:
    """(bytes, mask bytes) autograd keeps per token in one block, attention aside
    (_attention_bytes): _block_saved's elements at 4 bytes, or in a bf16 run (autocast) at the
    dtype each is kept in (tests/test_plan.py checks both against saved-tensor hooks). bf16:
    RMSNorm still keeps an fp32 copy of its input and its rsqrt; everything else is bf16, and a
    trained block keeps autocast's own bf16 copy of each linear's input, and its norms' outputs
    (fp32 where the embedding trains: its fp32 output makes the whole residual stream fp32)."""
    elements, masks = _block_saved(arch, method, trainable, packed)
    h, i, q = arch.hidden, arch.intermediate, arch.q_dim
    attention = 2 * q + 2 * (arch.kv_dim if packed else q) + arch.heads
    if not half:
        return (elements - attention) * FP32, masks
    norms = 2 * (h + 1)
    if trainable:
        bf16 = 5 * h + q + 4 * i  # q/k/v, o, gate/up and down inputs; SwiGLU's three
        if fp32_residual(method):
            return (norms + 2 * h) * FP32 + bf16 * 2, 0
        return norms * FP32 + (bf16 + 2 * h) * 2, 0
    return norms * FP32 + (elements - norms - attention) * 2, masks


def fp32_residual(method: MethodSpec) -> bool:
    """Whether a bf16 run's residual stream is fp32: the embedding trains (upcast to fp32)."""
    return method.name == "full" or (method.name == "freeze" and method.head_trainable)


def _attention_bytes(
    arch: Architecture, method: MethodSpec, work: Workload, batch: Batch, grad: bool
) -> int:
    """What one block's attention keeps for the micro-batch, by the kernel that runs it
    (train/attention.py): q, k and v (repeated to every head when padded), the output and the
    fp32 log-sum-exp, plus a padded batch's mask (_mask_path_extra).

    fp32 runs keep them in fp32. In a bf16 run: where the residual stream is fp32, autocast runs
    SDPA in bf16; where it is bf16 and the query needs a gradient (`grad`), a packed example of
    up to 512 tokens goes to the math kernel (a bf16 q and its heads x L x L probabilities, no
    output; views of k and v, which keep the whole row's bf16 k and v), anything else to SDPA upcast to fp32 (its backward is faster so); a query that
    needs no gradient (the first block of prefix tuning, or of a LoRA that leaves q_proj alone)
    stays in bf16."""
    packed = is_packed(method, work)
    q, kv = arch.q_dim, arch.kv_dim if packed else arch.q_dim
    lse = arch.heads * FP32
    extra = 0 if packed else _mask_path_extra(arch, method, work, batch)
    half = work.weight_bytes == 2
    size = FP32 if not half or (grad and not fp32_residual(method)) else 2
    if not half or fp32_residual(method) or not grad or not packed:
        tokens = positions(method, work, batch)
        return tokens * ((2 * q + 2 * kv) * size + lse) + extra * size // FP32
    short = [n for n, _ in batch if n <= MATH_ATTENTION_MAX]
    long = sum(n for n, _ in batch if n > MATH_ATTENTION_MAX)
    # The math kernel keeps views of the packed row's k and v: their whole bf16 storage stays.
    total = positions(method, work, batch) * 2 * kv * 2 if short else 0
    total += sum(n * q * 2 + arch.heads * n * n * 2 for n in short)
    return total + long * ((2 * q + 2 * kv) * FP32 + lse)


def first_query_needs_grad(method: MethodSpec) -> bool:
    """Whether the first block on the gradient path computes a query autograd must track:
    its input does (prompt tuning's virtual tokens), or q_proj trains or carries an adapter."""
    if method.name in ("full", "freeze", "prompt", "ptuning"):
        return True
    return method.lora_like and "q_proj" in method.targets


def path_layers(arch: Architecture, method: MethodSpec) -> tuple[int, int]:
    """(blocks on the gradient path, of which fully trainable): backward runs through the
    first, and computes weight gradients in the second."""
    if method.name == "full":
        return arch.layers, arch.layers
    if method.name == "freeze":
        layers = arch.layers if method.head_trainable else method.trainable_layers
        return layers, method.trainable_layers
    return arch.layers, 0


def _mask_path_extra(arch: Architecture, method: MethodSpec, work: Workload, batch: Batch) -> int:
    """Per block, bytes a padded batch adds: the fp32 T x (T + P) attention mask of each row,
    and for prefix tuning the virtual keys and values joined to every row's cache."""
    width = max(n for n, _ in batch)
    virtual = method.virtual_tokens if method.prompt_learning else 0
    if method.name != "prefix":
        width += virtual
    per_row = width * (width + (virtual if method.name == "prefix" else 0))
    if method.name == "prefix":
        per_row += 3 * virtual * arch.q_dim
    return len(batch) * per_row * FP32  # in fp32; _attention_bytes sizes it by its kernel


def is_packed(method: MethodSpec, work: Workload) -> bool:
    """Whether the micro-batch runs as one packed row (else padded rows with a mask)."""
    return work.packing and not method.prompt_learning


def positions(method: MethodSpec, work: Workload, batch: Batch) -> int:
    """Positions the decoder runs: packed, the examples' sum; padded, rows x the longest;
    prompt tuning's and P-tuning's virtual tokens are rows of the input too."""
    packed = is_packed(method, work)
    tokens = work.tokens(batch) if packed else len(batch) * max(n for n, _ in batch)
    if method.name in ("prompt", "ptuning"):
        tokens += method.virtual_tokens * len(batch)
    return tokens


def activation_bytes(arch: Architecture, method: MethodSpec, work: Workload, batch: Batch) -> int:
    """Bytes autograd keeps through one micro-batch's forward (the decoder blocks)."""
    packed = is_packed(method, work)
    tokens = positions(method, work, batch)
    on_path, trainable = path_layers(arch, method)
    half = work.weight_bytes == 2
    full_bytes, _ = _block_bytes(arch, method, True, packed, half)
    frozen_bytes, masks = _block_bytes(arch, method, False, packed, half)
    attention = _attention_bytes(arch, method, work, batch, grad=True)
    if work.gradient_checkpointing:  # each block keeps its input; one block is recomputed
        one = max(full_bytes, frozen_bytes + masks)
        return tokens * (on_path * arch.hidden * work.weight_bytes + one) + attention
    frozen = on_path - trainable
    per_token = trainable * full_bytes + frozen * (frozen_bytes + masks)
    norm = ((3 if method.name == "full" else 1) * arch.hidden + 1) * FP32  # the final norm
    copies = _lora_weight_copies(arch, method, work) if method.lora_like and frozen else 0
    if half:  # autocast keeps a bf16 copy of each trained linear's fp32 weight
        linears = sum(a * b for a, b in arch.linears().values())
        copies += trainable * linears * 2
    if not on_path:
        return tokens * norm + copies
    # The first block's query may need no gradient, which changes its kernel.
    first = _attention_bytes(arch, method, work, batch, first_query_needs_grad(method))
    attention = (on_path - 1) * attention + first
    if not fp32_residual(method) and method.name not in ("prompt", "ptuning"):
        # The first block on the path gets its input from frozen layers, which need no
        # gradient: its input norm keeps neither an fp32 copy of the input nor its rsqrt.
        attention -= tokens * (arch.hidden + 1) * FP32
    return tokens * (per_token + norm) + copies + attention


def _lora_weight_copies(arch: Architecture, method: MethodSpec, work: Workload) -> int:
    """The fused LoRA layer keeps scaled copies of A and B per call (train/fused_lora.py), in
    the compute dtype."""
    linears = arch.linears()
    per_layer = sum(method.r * sum(linears[t]) for t in method.targets)
    return arch.layers * per_layer * work.weight_bytes


def head_trains(method: MethodSpec, arch: Architecture) -> bool:
    """Whether the output head (or the tied embedding) is among the trained weights."""
    return method.name == "full" or (method.name == "freeze" and method.head_trainable)


def loss_bytes(arch: Architecture, method: MethodSpec, work: Workload, batch: Batch) -> int:
    """The chunked loss (train/loss.py): the gradient for the labelled hidden states it keeps,
    the head's fp32 gradient when the head trains, and one chunk of fp32 logits at a time.

    Prompt learning takes the model's own loss (train/loss.py's generic path): full-vocabulary
    fp32 logits over every position, alive through the loss's forward, and their log-softmax,
    which cross-entropy saves for the backward."""
    if method.prompt_learning:
        return 2 * positions(method, work, batch) * arch.vocab * FP32
    labelled = sum(n for _, n in batch)
    kept = labelled * arch.hidden * work.weight_bytes  # bf16 runs keep bf16 hidden states
    if head_trains(method, arch):
        kept += arch.vocab * arch.hidden * FP32
        kept += arch.vocab * arch.hidden * 2 if work.weight_bytes == 2 else 0  # autocast's copy
    chunk = min(work.loss_chunk_tokens, max(labelled, 1)) * arch.vocab * FP32
    return kept + chunk


def _working_bytes(arch: Architecture, tokens: int) -> int:
    """Backward's transient gradients for one block (MLP and hidden-state sized)."""
    return tokens * (3 * arch.intermediate + 4 * arch.hidden) * FP32


@dataclass
class MemoryPlan:
    """Predicted peak memory, its parts (bytes) and which one is the largest."""

    items: dict[str, int]
    peak_bytes: int
    when: str  # "training" or "loading"
    peak_batch: Batch = field(default_factory=tuple)

    @property
    def biggest(self) -> str:
        return max(self.items, key=self.items.__getitem__)


def allocator_slack(items: dict[str, int], heap: str = "glibc") -> int:
    """Resident bytes beyond the live set, from the other items of a training peak.

    A forward's transients (RoPE's, RMSNorm's, the masked copies) are freed between tensors that
    stay saved, and glibc's heap keeps those holes for allocations of other sizes; rows change
    length every step, so the next step's tensors fit them badly. Traced on the embedded model
    (LoRA, 4 x 256): the first forward grows RSS by 1.4x its activations, later ones by 1.7x
    even with the heap trimmed between steps; loading leaves ~0.1 GB behind. The share of the
    activations is fitted, not derived: 0.6 fitted four 4 x 256 rows on an AMD EPYC, and
    over-predicted the long rows of the 27-row table on an Intel Xeon by up to 24 %; 0.3 fits
    those best (0.91-1.11), and 0.35 keeps the AMD rows within 10 % too (docs/plan.md). Five
    bf16 rows on the AMD EPYC fit 0.27-0.38 under glibc and 0.02-0.13 under tcmalloc, which
    `tuneforge train` runs on where installed (heap.py): tcmalloc's own share is 0.10.
    """
    acts = items["activations"]
    own = sum(v for k, v in items.items() if k not in ("base process", "activations"))
    return int(ALLOCATOR_SLACK * own + HEAP_HOLES.get(heap, HEAP_HOLES["glibc"]) * acts)


def memory_plan(
    arch: Architecture, method: MethodSpec, work: Workload, base_bytes: int = 0
) -> MemoryPlan:
    """Peak resident memory of a training run: the larger of loading and the worst step.

    A step holds the weights (trainable ones as fp32 master copies), AdamW's two fp32 states,
    and, through forward and backward, the activations of its largest micro-batch plus the
    loss's part. Gradients live from backward to zero_grad: with accumulation they add to the
    next micro-batch's activations; without, backward frees activations block by block as it
    fills gradients, so only their excess over the activations (plus one block's) adds.
    """
    counts = parameter_counts(arch)
    trainable = trainable_parameters(arch, method)
    frozen = counts["total"] - (0 if method.prompt_learning else trainable)
    weights = frozen * work.weight_bytes + trainable * FP32
    grads = trainable * FP32

    def step_bytes(batch: Batch) -> int:
        return activation_bytes(arch, method, work, batch) + loss_bytes(arch, method, work, batch)

    worst = max(work.batches, key=step_bytes)
    acts = activation_bytes(arch, method, work, worst)
    loss = loss_bytes(arch, method, work, worst)
    working = _working_bytes(arch, work.tokens(worst))
    if work.grad_accum > 1:
        grads_added = grads
    else:
        grads_added = max(0, grads - acts - loss) + min(grads, counts["block"] * FP32)
    items = {
        "base process": base_bytes,
        "tokenised data": work.dataset_tokens * PY_INT_BYTES,
        "weights": weights,
        "optimizer state": ADAM_STATES * trainable * FP32,
        "gradients": grads_added,
        "activations": acts,
        "loss": loss,
        "backward working set": working,
    }
    items["allocator slack"] = allocator_slack(items, work.heap)
    training = sum(items.values())
    # Loading a checkpoint stored in bf16 into fp32 holds the stored copy while converting.
    stored = counts["total"] * 2 if work.weight_bytes == FP32 else 0
    loading = base_bytes + items["tokenised data"] + weights + stored
    if loading > training:
        keep = ("base process", "tokenised data", "weights")
        items = {k: v for k, v in items.items() if k in keep} | {"bf16 copy while loading": stored}
        return MemoryPlan(items, loading, "loading", tuple(worst))
    return MemoryPlan(items, training, "training", tuple(worst))


def with_changes(work: Workload, **changes) -> Workload:
    """A copy of the workload with some settings changed (for the --memory suggestions)."""
    return replace(work, **changes)
