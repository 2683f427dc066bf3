"""Speed settings for a run, each chosen by measurement (docs/performance.md): threads, the
attention kernel, adapter input casts under autocast, CPU dropout, the fused LoRA branch, and
optional torch.compile.

Every switch checks a capability, not a method name, and leaves the model's numerics as they
were (within bf16 rounding); the loss path itself is train/loss.py, packing is data/packing.py.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, field

import torch

from tuneforge.heap import heap_allocator
from tuneforge.train.attention import use_packed_sdpa
from tuneforge.train.dropout import use_fast_dropout
from tuneforge.train.fused_lora import use_fused_lora

log = logging.getLogger("tuneforge")


def auto_num_threads() -> int:
    """The cores this process may use, shared among the processes of this machine (torchrun)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, cores // max(1, local))


def set_threads(num_threads: int | None) -> int:
    """torch's intra-op threads: `num_threads`, else OMP_NUM_THREADS when set, else one per core.

    More threads than cores makes OpenMP barriers wait on descheduled threads: several times
    slower, not a little. Returns the count in use.
    """
    if num_threads is None and os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    n = num_threads or auto_num_threads()
    if n != torch.get_num_threads():
        torch.set_num_threads(n)
    return n


def skip_adapter_input_casts(model: torch.nn.Module) -> int:
    """Under autocast, stop peft layers from casting their bf16 input up to the fp32 adapter dtype.

    Autocast runs the adapter matmuls in bf16 anyway, so the cast (and its backward) is pure
    copying: one activation-sized copy per adapted layer per pass. Returns how many layers.
    """
    count = 0
    for module in model.modules():
        if hasattr(module, "cast_input_dtype_enabled") and hasattr(module, "_cast_input_dtype"):
            module.cast_input_dtype_enabled = False
            count += 1
    return count


def keeps_packed_examples_apart(model: torch.nn.Module) -> bool:
    """Probe: do two short sequences packed in one row (position ids restarting) get the logits
    they get alone? True for the transformers models whose attention honours packed position
    ids (Llama, Qwen2, Mistral, ...), False for those that would attend across examples (GPT-2)."""
    param = next(model.parameters())
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    half = dtypes & {torch.bfloat16, torch.float16}
    # Mixed dtypes (trained layers upcast beside frozen bf16 ones: freeze, hybrid) run only
    # under autocast, as training runs them; without it every linear would refuse its input.
    cast = (
        torch.autocast(param.device.type, dtype=next(iter(half)))
        if half and len(dtypes) > 1
        else contextlib.nullcontext()
    )
    vocab = model.get_input_embeddings().num_embeddings
    gen = torch.Generator().manual_seed(0)
    parts = [torch.randint(0, vocab, (1, n), generator=gen).to(param.device) for n in (5, 7)]
    positions = [torch.arange(p.shape[1], device=param.device)[None] for p in parts]
    was_training = model.training
    model.eval()  # no dropout, no NEFTune noise
    try:
        with torch.no_grad(), cast:
            alone = [
                model(input_ids=ids, position_ids=pos, use_cache=False).logits.float()
                for ids, pos in zip(parts, positions, strict=True)
            ]
            packed = model(
                input_ids=torch.cat(parts, 1), position_ids=torch.cat(positions, 1), use_cache=False
            ).logits.float()
    except (TypeError, ValueError, RuntimeError):  # no position_ids, or no such input layout
        return False
    finally:
        model.train(was_training)
    together = torch.cat(alone, dim=1)
    rel = 3e-2 if half else 1e-4
    return bool((packed - together).abs().max() <= rel * together.abs().max() + 1e-6)


def use_liger_kernel(model: torch.nn.Module, device: torch.device) -> None:
    """liger-kernel's fused Triton kernels (RMSNorm, SwiGLU, RoPE) in the base model, CUDA only.

    Its fused linear cross-entropy is left off: train/loss.py already never builds the logits.
    """
    from tuneforge.errors import ConfigError

    if device.type != "cuda":
        raise ConfigError("train.liger_kernel: the kernels are Triton (CUDA) kernels; no GPU here")
    try:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
    except ImportError:
        raise ConfigError(
            "train.liger_kernel: needs the liger-kernel package: pip install 'tuneforge[gpu]'"
        ) from None
    _apply_liger_kernel_to_instance(
        model=model,
        rope=True,
        rms_norm=True,
        swiglu=True,
        cross_entropy=False,
        fused_linear_cross_entropy=False,
    )


def compile_layers(model: torch.nn.Module) -> int:
    """torch.compile each decoder block (shapes dynamic); the whole model where there are none."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    if isinstance(layers, torch.nn.ModuleList) and len(layers):
        for layer in layers:
            layer.compile(dynamic=True)
        return len(layers)
    model.compile(dynamic=True)
    return 1


@dataclass
class FastPath:
    """What `prepare_fast_path` switched on, for the manifest and the log."""

    threads: int
    packing: bool
    attention: str | None
    adapter_casts_skipped: int
    fast_dropouts: int
    fused_lora_layers: int
    compiled_blocks: int
    allocator: str = "glibc"
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "notes"} | {"notes": self.notes}


def prepare_fast_path(
    model: torch.nn.Module,
    *,
    autocast: bool,
    packing: bool,
    compile: bool,
    num_threads: int | None,
    positions_aligned: bool = True,
) -> FastPath:
    """Apply the speed settings to a model after the method wrapped it, before accelerate does."""
    notes = []
    threads = set_threads(num_threads)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    attention = "tuneforge_sdpa" if use_packed_sdpa(base) else None
    if packing and not positions_aligned:
        packing = False
        notes.append(
            "data.packing: off for this method (it adds virtual tokens, so packed examples "
            "would not line up); batches are padded instead"
        )
    if packing and not keeps_packed_examples_apart(model):
        packing = False
        notes.append(
            "data.packing: off, this architecture attends across packed examples; batches "
            "are padded instead"
        )
    casts = skip_adapter_input_casts(model) if autocast else 0
    on_cpu = next(model.parameters()).device.type == "cpu"  # CUDA's dropout is fused already
    dropouts = use_fast_dropout(model) if on_cpu else 0
    fused = use_fused_lora(model) if on_cpu else 0
    blocks = compile_layers(model) if compile else 0
    for note in notes:
        log.warning(note)
    allocator = heap_allocator()
    return FastPath(threads, packing, attention, casts, dropouts, fused, blocks, allocator, notes)
