"""The plan's time arithmetic: hand-computed FLOPs, attention pairs and step parts for a toy
model, the eager-op counts against a dispatch mode on a real tiny model, and the cached
calibration. (Whether predicted time meets measured time is bench/plan_table.py's job.)"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tuneforge.config import build_config
from tuneforge.data.packing import pack_examples
from tuneforge.data.pipeline import TokenizedExample
from tuneforge.methods import build_method
from tuneforge.recipes.parts import upcast_trainable
from tuneforge.train import calibrate as calibration
from tuneforge.train.estimate import Architecture, MethodSpec, Workload, method_spec
from tuneforge.train.fastpath import prepare_fast_path
from tuneforge.train.loss import CausalLMLoss
from tuneforge.train.timing import (
    Machine,
    attention_flops,
    gemm_flops,
    micro_batch_flops,
    op_count,
    time_plan,
)

from conftest import TINY_DECODER, build_tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")

TOY = Architecture(
    hidden=8, intermediate=16, layers=2, heads=2, kv_heads=1, head_dim=4, vocab=10, tied=False
)
BATCH = ((6, 2), (4, 1))  # two examples: (positions, labelled positions)


def test_gemm_flops_hand_computed():
    # A block's linear weights: q 64 + k 32 + v 32 + o 64 + MLP 3*128 = 576, so 2*576*10 =
    # 11,520 FLOPs over the 10 packed positions; the head 2 * 3 labelled * 8 * 10 = 480.
    work = Workload(batches=[BATCH])
    full = gemm_flops(TOY, MethodSpec("full"), work, BATCH)
    assert full == {"forward": 23_520, "input grads": 23_520, "weight grads": 23_520}
    lora = gemm_flops(TOY, MethodSpec("lora", r=2), work, BATCH)
    assert lora == {"forward": 23_520, "input grads": 23_520, "weight grads": 0}
    freeze = gemm_flops(TOY, MethodSpec("freeze", trainable_layers=1), work, BATCH)
    assert freeze == {"forward": 23_520, "input grads": 12_000, "weight grads": 11_520}
    checkpointed = Workload(batches=[BATCH], gradient_checkpointing=True)
    assert gemm_flops(TOY, MethodSpec("full"), checkpointed, BATCH)["forward"] == 46_560


def test_attention_flops_hand_computed():
    work = Workload(batches=[BATCH])
    # Packed: each example attends causally to itself, 6*7/2 + 4*5/2 = 31 pairs; forward
    # 4 * 31 * q_dim 8 = 992 FLOPs a block, backward 2.5 times that.
    assert attention_flops(TOY, MethodSpec("full"), work, BATCH) == (2 * 992 * 3.5, 0)
    # Freeze with one trainable block: the block below runs forward only.
    freeze = MethodSpec("freeze", trainable_layers=1)
    assert attention_flops(TOY, freeze, work, BATCH) == (992 * 3.5, 992)
    # Prefix tuning pads (2 rows of 6) and every query sees 6 + 3 virtual keys, unmasked
    # pairs included: 2 * 6 * 9 = 108 pairs, 4 * 108 * 8 = 3,456 FLOPs forward a block.
    prefix = MethodSpec("prefix", virtual_tokens=3)
    assert attention_flops(TOY, prefix, work, BATCH) == (2 * 3_456 * 3.5, 0)
    assert micro_batch_flops(TOY, MethodSpec("full"), work, BATCH) == 3 * 23_520 + 6_944


MACHINE = Machine(
    matmul_flops=1e6,
    dgrad_flops=2e6,
    wgrad_flops=4e6,
    lora_flops=2e5,
    bandwidth=1e8,
    attention_flops=5e5,
    attention_forward_flops=1e6,
    mask_rate=1e7,
    masked_fill_rate=2e7,
    silu_rate=1e7,
    op_overhead_s=1e-6,
    lora_branch_s=5e-5,
    loss_rate=3e6,
)


def test_step_time_hand_computed():
    """LoRA r=2 with dropout, one packed micro-batch: every part of the step by hand."""
    spec = MethodSpec("lora", r=2, dropout=True)
    plan = time_plan(TOY, spec, Workload(batches=[BATCH]), MACHINE)
    # The LoRA branches: inputs of the 7 linears sum to 64, outputs to 64; per position and
    # block 6 * r * 128 = 1,536 rank-r FLOPs, 3*64 + 7*64 = 640 elementwise elements, 40 mask
    # elements drawn (one mask per distinct input: q/k/v share one, gate/up one: 8 + o 8 + 8 +
    # down 16) and 3 * 40 masked-filled. Memory-bound elements per position: a block's
    # forward 20h + 10(q + kv) + 4q + 3i = 160+120+32+48 = 360, backward 51h + 10(q + kv) + 4q
    # + 6i = 408+120+32+96 = 656; two blocks and their branches: 2 * (360 + 656 + 640) =
    # 3,312; SiLU 16 forward and 2 x 16 backward a block: 96. 10 positions.
    # Eager ops: 2 blocks x (205 + 2 examples x 9) + 85, one loss chunk 14; 14 branches at
    # their measured cost. Optimizer: 512 LoRA parameters x 96 bytes, 28 tensors x 20 ops.
    expected = {
        "matmuls": 23_520 / 1e6 + 23_520 / 2e6,
        "LoRA matmuls": 10 * 2 * 1_536 / 2e5,
        "attention": 6_944 / 5e5,
        "memory-bound passes": 3_312 * 10 * 4 / 1e8 + 96 * 10 / 1e7,
        "dropout masks": 10 * 2 * 40 / 1e7 + 10 * 2 * 120 / 2e7,
        "loss logits": 3 * 10 / 3e6,  # 3 labelled positions x vocab 10 at the loss rate
        "op overhead": (2 * (205 + 18) + 85 + 14) * 1e-6 + 14 * 5e-5,
        "optimizer + clipping": 512 * 96 / 1e8 + 28 * 20 * 1e-6,
    }
    assert plan.items == pytest.approx(expected, rel=1e-12)
    assert plan.step_s == pytest.approx(sum(expected.values()), rel=1e-12)
    # A calibration without the loss rate counts six fp32 passes at the bandwidth instead.
    unmeasured = time_plan(TOY, spec, Workload(batches=[BATCH]), replace(MACHINE, loss_rate=0.0))
    assert unmeasured.items["loss logits"] == pytest.approx(3 * 10 * 6 * 4 / 1e8, rel=1e-12)
    # Accumulating two micro-batches doubles every part but the optimizer's, which adds a
    # pass over the kept gradients.
    two = time_plan(TOY, spec, Workload(batches=[BATCH, BATCH], grad_accum=2), MACHINE)
    assert two.items["matmuls"] == pytest.approx(2 * expected["matmuls"])
    optimizer = expected["optimizer + clipping"] + 512 * 12 / 1e8
    assert two.items["optimizer + clipping"] == pytest.approx(optimizer)
    assert (two.steps_per_epoch, two.total_steps) == (1, 1)


class _CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def _dispatched_ops(options: dict, layers: int, lengths: list[int]) -> int:
    """Aten ops of one fused-path forward and backward on a tiny Llama with `layers` blocks."""
    torch.manual_seed(0)
    model = build_tiny_llama(300, num_hidden_layers=layers)
    method = build_method(build_config({"method": options}).method)
    method.plan(10)
    model = method.apply(model)
    upcast_trainable(model)
    prepare_fast_path(model, autocast=False, packing=True, compile=False, num_threads=1)
    examples = [
        TokenizedExample(list(range(3, 3 + n)), list(range(3, 3 + n)), "t:1") for n in lengths
    ]
    batch = pack_examples(examples)
    loss_fn = CausalLMLoss(model.train())
    with _CountOps() as counter:
        loss_fn(model, batch, 1.0).backward()
    return counter.count


@pytest.mark.parametrize(
    "options",
    [
        {"name": "full"},
        {"name": "lora", "r": 4, "dropout": 0.0},
        {"name": "lora", "r": 4, "dropout": 0.1},
        {"name": "freeze", "trainable_layers": 1},
    ],
    ids=["full", "lora", "lora-dropout", "freeze"],
)
def test_op_counts_match_dispatched_ops(options):
    """A block's eager ops, and each packed example's, as a dispatch mode counts them."""
    arch = Architecture.from_config({**TINY_DECODER, "vocab_size": 300, "num_hidden_layers": 3})
    spec = method_spec(options, arch)
    two, three = (_dispatched_ops(options, n, [9, 7]) for n in (2, 3))
    per_block = three - two
    work = Workload(batches=[])
    batch = ((9, 8), (7, 6))
    predicted = op_count(arch, spec, work, batch) - op_count(
        replace(arch, layers=2), spec, work, batch
    )
    assert predicted == pytest.approx(per_block, rel=0.2)
    # One more packed example of the same 16 positions: its own attention call in each block.
    per_example = (_dispatched_ops(options, 3, [6, 5, 5]) - three) / 3
    added = op_count(arch, spec, work, ((6, 5), (5, 4), (5, 4))) - op_count(arch, spec, work, batch)
    assert per_example == pytest.approx(added / 3, abs=2)
    assert op_count(arch, spec, work, batch) == pytest.approx(three, rel=0.2)


def test_calibration_is_measured_once_and_cached(monkeypatch, tmp_path):
    monkeypatch.setenv("TUNEFORGE_CACHE", str(tmp_path))
    arch = Architecture.from_config({**TINY_DECODER, "vocab_size": 300})
    first = calibration.calibrate(arch, 100, 20, threads=1, seconds=0.05, lora=(4, 0.1))
    for name in ("matmul_flops", "dgrad_flops", "wgrad_flops", "lora_flops", "attention_flops"):
        assert getattr(first, name) > 1e6  # FLOP/s, measured (not the fallback)
    for name in ("mask_rate", "masked_fill_rate", "silu_rate"):
        assert getattr(first, name) > 1e5  # elements/s
    assert first.bandwidth > 1e8 and 0 < first.op_overhead_s < 1e-3
    assert 0 < first.lora_branch_s < 1e-2
    assert first.loss_rate > 1e5  # logits/s
    assert (tmp_path / calibration.CALIBRATION_FILE).is_file()

    def refuse(*args, **kwargs):
        raise AssertionError("measured again although cached")

    monkeypatch.setattr(calibration, "measure", refuse)
    same_bucket = calibration.calibrate(arch, 120, 24, threads=1, seconds=0.05, lora=(4, 0.1))
    assert same_bucket == first
    with pytest.raises(AssertionError, match="measured again"):
        calibration.calibrate(arch, 100, 20, threads=1, refresh=True, lora=(4, 0.1))
    with pytest.raises(AssertionError, match="measured again"):
        calibration.calibrate(arch, 3000, 20, threads=1)  # another shape
    # An entry an older version wrote, without a rate this version measures, is measured again.
    path = tmp_path / calibration.CALIBRATION_FILE
    cached = json.loads(path.read_text())
    for entry in cached.values():
        del entry["loss_rate"]
    path.write_text(json.dumps(cached))
    with pytest.raises(AssertionError, match="measured again"):
        calibration.calibrate(arch, 100, 20, threads=1, seconds=0.05, lora=(4, 0.1))


def test_calibration_leaves_the_random_stream_alone():
    """`train` plans (and may calibrate) before it trains: the calibration's masks and
    activations must not shift the run's dropout and data order (a cache miss once made a
    one-process run differ from the same run under DDP, which hit the cache)."""
    arch = Architecture(
        hidden=8, intermediate=16, layers=2, heads=2, kv_heads=1, head_dim=4, vocab=10, tied=False
    )
    torch.manual_seed(7)
    calibration.measure(
        arch, tokens=64, example=32, dtype=torch.float32, seconds=0.05, lora=(2, 0.1)
    )
    after = torch.rand(4)
    torch.manual_seed(7)
    assert torch.equal(after, torch.rand(4))
