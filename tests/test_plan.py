"""The plan's memory arithmetic: parameter counts, what each method trains, the activations
autograd keeps (against saved-tensor hooks on a real tiny model), hand-computed memory cases,
the --memory suggestions, `tuneforge plan`, and the train-time check (time: test_plan_timing)."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from tuneforge.cli import main
from tuneforge.config import build_config
from tuneforge.data.packing import pack_examples
from tuneforge.data.pipeline import TokenizedExample, collate
from tuneforge.errors import PlanError
from tuneforge.methods import build_method
from tuneforge.recipes.parts import count_params, upcast_trainable
from tuneforge.train.estimate import (
    MATH_ATTENTION_MAX,
    Architecture,
    MethodSpec,
    Workload,
    activation_bytes,
    loss_bytes,
    memory_plan,
    method_spec,
    parameter_counts,
    positions,
    trainable_parameters,
)
from tuneforge.train.fastpath import prepare_fast_path
from tuneforge.train.loss import CausalLMLoss

from conftest import TINY_DECODER, build_tiny_llama, build_tiny_qwen2
from helpers import write_run_config, write_toy_messages

pytestmark = pytest.mark.usefixtures("one_thread")

SMOLLM2 = {
    "model_type": "llama",
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "vocab_size": 49152,
    "tie_word_embeddings": True,
}


def _tiny_arch(vocab: int = 300, **overrides) -> Architecture:
    return Architecture.from_config({**TINY_DECODER, "vocab_size": vocab, **overrides})


def test_smollm2_has_the_parameter_count_of_its_model_card():
    # Hand count: embedding 49152*576 = 28,311,552; a block: q, o 576*576 = 331,776 each,
    # k, v 576*192 = 110,592 each, MLP 3*576*1536 = 2,654,208, two norms 1,152 -> 3,540,096;
    # 30 blocks 106,202,880; final norm 576; tied head 0.
    assert parameter_counts(Architecture.from_config(SMOLLM2))["total"] == 134_515_008


@pytest.mark.parametrize("builder", [build_tiny_llama, build_tiny_qwen2])
def test_parameter_counts_match_real_models(builder):
    model = builder(300)
    arch = Architecture.from_config(model.config.to_dict())
    assert parameter_counts(arch)["total"] == sum(p.numel() for p in model.parameters())


METHODS = [
    {"name": "full"},
    {"name": "freeze", "trainable_layers": 1},
    {"name": "lora", "r": 4},
    {"name": "lora", "r": 8, "target_modules": ["q_proj", "v_proj"]},
    {"name": "prefix", "num_virtual_tokens": 4},
    {"name": "prompt", "num_virtual_tokens": 6},
]


def _wrapped(options: dict, model=None):
    model = model if model is not None else build_tiny_llama(300)
    method = build_method(build_config({"method": options}).method)
    method.plan(10)
    model = method.apply(model)
    upcast_trainable(model)
    return model


@pytest.mark.parametrize("options", METHODS, ids=lambda o: f"{o['name']}-{len(o)}")
def test_trainable_parameters_match_the_methods(options):
    model = _wrapped(options)
    arch = _tiny_arch()
    assert trainable_parameters(arch, method_spec(options, arch)) == count_params(model)[0]


def _saved_bytes(model, batch, positions_aligned: bool = True) -> int:
    """Bytes of every distinct non-parameter storage autograd saves in forward (and the loss)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        CausalLMLoss(model, positions_aligned=positions_aligned)(model, batch, 1.0)
    return sum(seen.values())


@pytest.mark.parametrize(
    "options",
    [
        {"name": "full"},
        {"name": "freeze", "trainable_layers": 1},
        {"name": "lora", "r": 8, "dropout": 0.0},
        {"name": "lora", "r": 8, "dropout": 0.1},
        {"name": "lora", "r": 4, "target_modules": ["q_proj", "v_proj"], "dropout": 0.0},
        {"name": "prefix", "num_virtual_tokens": 4},
    ],
    ids=lambda o: "-".join(str(v) for v in o.values()),
)
@pytest.mark.parametrize(
    "dtype, math_max",
    [(torch.float32, 512), (torch.bfloat16, 512), (torch.bfloat16, 32)],
    ids=["fp32", "bf16", "bf16-long"],
)
def test_activation_arithmetic_matches_what_autograd_saves(options, dtype, math_max, monkeypatch):
    """The per-op accounting of _block_bytes and _attention_bytes against saved-tensor hooks on
    a real model, in fp32 and in a bf16 run (bf16 weights, trained ones upcast, autocast; short
    examples through the math attention kernel, switched on here whatever the CPU; with its
    limit at 32 tokens, two of the three examples go to SDPA upcast to fp32 instead)."""
    import tuneforge.train.estimate as estimate
    import tuneforge.train.math_attention as math_attention

    monkeypatch.setattr(math_attention, "_native_bf16", lambda: True)
    monkeypatch.setattr(math_attention, "MAX_LENGTH", math_max)
    monkeypatch.setattr(estimate, "MATH_ATTENTION_MAX", math_max)
    half = dtype == torch.bfloat16
    gen = torch.Generator().manual_seed(0)
    model = _wrapped(options, build_tiny_llama(300, num_hidden_layers=3).to(dtype))
    fast = prepare_fast_path(model, autocast=half, packing=True, compile=False, num_threads=1)
    lengths = [40, 24, 33]
    examples = [
        TokenizedExample(
            torch.randint(3, 300, (n,), generator=gen).tolist(),
            [-100] * (n // 2) + torch.randint(3, 300, (n - n // 2,), generator=gen).tolist(),
            "t:1",
        )
        for n in lengths
    ]
    batch = pack_examples(examples) if fast.packing else collate(examples, pad_id=0)
    arch = _tiny_arch(num_hidden_layers=3)
    spec = method_spec(options, arch)
    work = Workload(batches=[], packing=fast.packing, weight_bytes=2 if half else 4)
    sizes = tuple(
        (n, sum(1 for x in ex.labels[1:] if x != -100))
        for n, ex in zip(lengths, examples, strict=True)
    )
    predicted = activation_bytes(arch, spec, work, sizes)
    labelled = sum(n for _, n in sizes)
    # The chunked loss: its chunk of logits is a transient inside the forward, never saved.
    # Prompt learning's own loss: the full logits are a transient, their log-softmax is saved.
    transient = min(512, labelled) * arch.vocab * 4
    if spec.prompt_learning:
        transient = positions(spec, work, sizes) * arch.vocab * 4
    predicted += loss_bytes(arch, spec, work, sizes) - transient
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=half):
        measured = _saved_bytes(model.train(), batch, positions_aligned=not spec.prompt_learning)
    assert predicted == pytest.approx(measured, rel=0.03)


def test_the_estimate_knows_the_math_attention_limit():
    from tuneforge.train.math_attention import MAX_LENGTH

    assert MATH_ATTENTION_MAX == MAX_LENGTH


def test_memory_plan_hand_computed():
    """A toy model and run, every item computed by hand."""
    arch = Architecture(
        hidden=8, intermediate=16, layers=2, heads=2, kv_heads=1, head_dim=4, vocab=10, tied=False
    )
    # Parameters: block = q 64 + k 32 + v 32 + o 64 + MLP 3*128 + norms 16 = 592; two blocks
    # 1184; embedding 80, head 80, final norm 8 -> 1352.
    assert parameter_counts(arch)["total"] == 1352
    lora = MethodSpec("lora", r=2)
    # LoRA r=2 over 7 linears: q 2*(8+8) + k 2*(8+4) + v 24 + o 32 + gate, up 2*(8+16) each
    # + down 48 = 32+24+24+32+48+48+48 = 256 per block, 512 in all.
    assert trainable_parameters(arch, lora) == 512
    work = Workload(batches=[((6, 2), (4, 1))], grad_accum=1, packing=True, loss_chunk_tokens=512)
    # Activations per token and block (frozen weights, all linears adapted): norms 2*(8+1),
    # attention 2q + 2kv + heads = 16 + 8 + 2, q/k/v input 8, o input 8, gate/up input 8,
    # SwiGLU 3*16 + down input 16, LoRA 7*2 -> 18+26+8+8+8+48+16+14 = 146 fp32 elements; two
    # blocks plus the final norm (8 + 1): 301 elements = 1204 bytes a token, 10 tokens 12,040;
    # plus the fused layers' scaled copies of A and B: 2 blocks * r 2 * (in + out summed:
    # 16+12+12+16+24+24+24 = 128) = 512 elements; less the first block's input norm, whose
    # input (the frozen embedding's output) needs no gradient: (8 + 1) * 4 * 10 tokens = 360.
    assert activation_bytes(arch, lora, work, work.batches[0]) == 12_040 + 2_048 - 360
    # With dropout, a 1-byte mask per distinct adapted input (q/k/v and gate/up share theirs):
    # 8 + o 8 + 8 + down 16 = 40 bytes a token and block, 10 tokens x 2 blocks: 800.
    dropped = MethodSpec("lora", r=2, dropout=True)
    assert activation_bytes(arch, dropped, work, work.batches[0]) == 12_040 + 2_048 - 360 + 800
    # Loss: 3 labelled hidden rows kept (3*8*4 = 96) + one chunk of logits 3*10*4 = 120.
    assert loss_bytes(arch, lora, work, work.batches[0]) == 216
    plan = memory_plan(arch, lora, work, base_bytes=1000)
    frozen = 1352 - 512
    assert plan.items["weights"] == frozen * 4 + 512 * 4
    assert plan.items["optimizer state"] == 2 * 512 * 4
    assert plan.items["gradients"] == 512 * 4  # one block's worth (592) caps at all of them
    assert plan.items["backward working set"] == 10 * (3 * 16 + 4 * 8) * 4
    others = ("base process", "allocator slack", "activations")
    own = sum(v for k, v in plan.items.items() if k not in others)
    assert plan.items["allocator slack"] == int(0.10 * own + 0.35 * (12_040 + 2_048 - 360))
    assert plan.peak_bytes == sum(plan.items.values()) and plan.when == "training"


TOY = Architecture(
    hidden=8, intermediate=16, layers=2, heads=2, kv_heads=1, head_dim=4, vocab=10, tied=False
)


def test_memory_plan_freeze_padded_hand_computed():
    """Freeze (last block trains) on padded rows: every item by hand."""
    spec = MethodSpec("freeze", trainable_layers=1)
    batch = ((6, 2), (4, 1))
    work = Workload(batches=[batch], packing=False, dataset_tokens=20)
    assert trainable_parameters(TOY, spec) == 592  # one block
    # Activations: 12 padded positions (2 rows x 6); the trainable block keeps per position
    # norms 2*(3*8+1) = 50, attention 3q + 2q (keys and values repeated to q's width when
    # padded) + heads = 24+16+2, SwiGLU and down input 4*16 = 64 -> 156 elements; the frozen
    # block below is off the gradient path; the final norm 8+1. (156+9)*4*12 = 7,920, plus the
    # padding mask of each row 6*6 fp32 for the one block on the path: 2*36*4 = 288; less that
    # block's input norm, fed by frozen blocks: (8 + 1) * 4 * 12 = 432.
    assert activation_bytes(TOY, spec, work, batch) == 7_920 + 288 - 432
    plan = memory_plan(TOY, spec, work, base_bytes=0)
    expected = {
        "base process": 0,
        "tokenised data": 20 * 44,
        "weights": 1352 * 4,  # trainable master copies and frozen weights: fp32 alike
        "optimizer state": 2 * 592 * 4,
        "gradients": 592 * 4,  # capped at one block's, which here is all of them
        "activations": 7_776,
        "loss": 3 * 8 * 4 + 3 * 10 * 4,  # kept hidden rows + one chunk of logits
        "backward working set": 12 * (3 * 16 + 4 * 8) * 4,
    }
    # Slack: 10 % of the run's other bytes (17,448) and 35 % of the activations (glibc's heap
    # holes); tcmalloc reuses most of those: 10 %.
    expected["allocator slack"] = int(0.10 * 17_448 + 0.35 * 7_776)
    assert plan.items == expected and plan.peak_bytes == 25_224 + 4_466 and plan.when == "training"
    tcmalloc = memory_plan(TOY, spec, replace(work, heap="tcmalloc"), base_bytes=0)
    assert tcmalloc.items["allocator slack"] == int(0.10 * 17_448 + 0.10 * 7_776)


def test_memory_plan_peaks_while_loading_a_bf16_checkpoint():
    """A big vocabulary and a tiny adapter: converting bf16 weights to fp32 is the peak."""
    arch = replace(TOY, vocab=1000)
    spec = MethodSpec("lora", r=1, targets=("q_proj",))
    work = Workload(batches=[((2, 1),)])
    # Parameters: 2 blocks 1,184 + embedding 8,000 + head 8,000 + final norm 8 = 17,192.
    # Training: weights 68,768 + AdamW 2*32*4 + gradients 128 + activations 1,752 (2 positions
    # x (2*101 + 9) elements x 4, the fused branch's copies of A 2*8*4) + loss 32 + 4,000 +
    # working set 640, plus slack (10 % of the rest, 35 % of activations): 83,571. Loading:
    # weights + the bf16 copy 34,384.
    plan = memory_plan(arch, spec, work, base_bytes=0)
    assert plan.when == "loading" and plan.peak_bytes == 68_768 + 34_384
    assert plan.items == {
        "base process": 0,
        "tokenised data": 0,
        "weights": 68_768,
        "bf16 copy while loading": 34_384,
    }
    bf16 = memory_plan(arch, spec, replace(work, weight_bytes=2), base_bytes=0)
    assert bf16.when == "training"  # a bf16 run keeps the stored dtype: no conversion copy


def test_checkpointing_keeps_block_inputs_and_one_block():
    full = MethodSpec("full")
    batch = ((6, 2), (4, 1))
    # Without: per position 2 blocks x 148 elements (packed: keys and values at kv width)
    # + the final norm's 3*8+1 -> (296 + 25) * 4 * 10 positions = 12,840. With: each block's
    # input (2 x 8) and one block recomputed (148) -> (16 + 148) * 4 * 10 = 6,560.
    assert activation_bytes(TOY, full, Workload(batches=[]), batch) == 12_840
    checkpointed = Workload(batches=[], gradient_checkpointing=True)
    assert activation_bytes(TOY, full, checkpointed, batch) == 6_560


def test_accumulation_keeps_gradients_beside_activations():
    arch = Architecture.from_config(SMOLLM2)
    full = method_spec({"name": "full"}, arch)
    batches = [((256, 100),) * 4]
    one = memory_plan(arch, full, Workload(batches=batches, grad_accum=1))
    two = memory_plan(arch, full, Workload(batches=batches, grad_accum=2))
    assert two.items["gradients"] == 134_515_008 * 4
    assert one.items["gradients"] < two.items["gradients"]
    assert one.items["optimizer state"] == 2 * 134_515_008 * 4


def _run_config(tmp_path, model_dir, **sections):
    data = write_toy_messages(tmp_path / "train.jsonl", n=32)
    return write_run_config(
        tmp_path / "run.yaml",
        model_dir,
        data,
        tmp_path / "run",
        data={"validation": None, "max_length": 64},
        train={"max_steps": 3, "batch_size": 4},
        eval={"every_steps": None},
        log={"report": False},
        **sections,
    )


@pytest.fixture
def tiny_run_config(tmp_path, tiny_model_dir):
    return _run_config(tmp_path, tiny_model_dir)


def test_plan_command_prints_the_breakdown(tiny_run_config, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("TUNEFORGE_CACHE", str(tmp_path / "cache"))
    assert main(["plan", str(tiny_run_config)]) == 0
    out = capsys.readouterr().out
    for item in ("weights", "activations", "optimizer state", "per step", "per epoch", "fits"):
        assert item in out
    assert (tmp_path / "cache" / "calibration.json").is_file()  # cached for the next plan


def test_plan_suggests_changes_in_order_of_quality_cost(tiny_model_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("TUNEFORGE_CACHE", str(tmp_path / "cache"))
    import tuneforge.train.calibrate as calibrate
    from tuneforge.config import load_config
    from tuneforge.recipes.parts import prepare_run_data
    from tuneforge.recipes.plan import estimate, plan_tokenizer

    monkeypatch.setattr(calibrate, "current_rss_bytes", lambda: 0)  # the run's own bytes only
    cfg = load_config(str(_run_config(tmp_path, tiny_model_dir, method={"name": "full"})))
    data = prepare_run_data(cfg, plan_tokenizer(cfg))
    plan = estimate(cfg, data)
    # A budget just below the plan's peak: memory-for-time changes come before the method.
    tight = estimate(cfg, data, budget_bytes=plan.memory.peak_bytes - 1)
    assert not tight.fits and tight.suggestions
    assert tight.suggestions[0].overrides == ["model.gradient_checkpointing=true"]
    assert all(s.memory.peak_bytes < plan.memory.peak_bytes for s in tight.suggestions)
    keys = [s.overrides[0].split("=")[0] for s in tight.suggestions]
    order = ["model.gradient_checkpointing", "train.batch_size", "method.name", "model.dtype"]
    assert keys == sorted(keys, key=lambda k: order.index(k) if k in order else len(order))
    with pytest.raises(PlanError, match="no setting fits"):
        estimate(cfg, data, budget_bytes=1024)


def test_train_refuses_a_run_over_memory_and_force_overrides(
    tiny_run_config, capsys, monkeypatch, tmp_path
):
    monkeypatch.setenv("TUNEFORGE_CACHE", str(tmp_path / "cache"))
    import tuneforge.train.calibrate as calibrate
    from tuneforge.config import load_config
    from tuneforge.recipes.parts import prepare_run_data
    from tuneforge.recipes.plan import estimate, plan_tokenizer

    monkeypatch.setattr(calibrate, "current_rss_bytes", lambda: 0)
    cfg = load_config(str(tiny_run_config))
    peak = estimate(cfg, prepare_run_data(cfg, plan_tokenizer(cfg))).memory.peak_bytes
    monkeypatch.setattr(calibrate, "available_memory_bytes", lambda device="cpu": peak - 1)
    assert main(["train", str(tiny_run_config), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "exceeds the" in err and "largest item: " in err and "--force" in err
    assert "fix: model.gradient_checkpointing=true" in err and "Traceback" not in err
    assert not (tmp_path / "run" / "summary.json").exists()
    monkeypatch.setattr(calibrate, "available_memory_bytes", lambda device="cpu": 0)
    assert main(["train", str(tiny_run_config), "--quiet"]) == 2
    assert "no setting fits" in capsys.readouterr().err
    assert main(["train", str(tiny_run_config), "--quiet", "--force"]) == 0
    plan = json.loads((tmp_path / "run" / "summary.json").read_text())["plan"]
    assert plan["predicted_peak_mb"] > 0 and plan["measured_peak_mb"] > 0
    assert plan["predicted_step_s"] > 0 and plan["measured_step_s"] > 0
    assert plan["peak_ratio"] > 10  # the base process was left out of this prediction on purpose


def test_a_run_in_a_long_lived_process_measures_its_own_peak(tiny_run_config, tmp_path):
    """The plan predicts from the memory the process holds when the run starts; the measured
    peak must start there too, not at the process's lifetime peak (CI's suite, the web page)."""
    from tuneforge.heap import peak_rss_bytes
    from tuneforge.train.calibrate import current_rss_bytes

    spike = b"\x01" * (1500 << 20)  # touched pages: 1.5 GB more at this process's peak
    del spike
    lifetime_mb, before_mb = peak_rss_bytes() / 2**20, current_rss_bytes() / 2**20
    assert lifetime_mb > before_mb + 1400
    assert main(["train", str(tiny_run_config), "--quiet", "--force"]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert before_mb * 0.9 <= summary["peak_memory_mb"] < lifetime_mb - 1000
    assert summary["plan"]["measured_peak_mb"] == summary["peak_memory_mb"]
