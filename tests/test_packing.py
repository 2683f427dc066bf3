"""Packing: pad-free rows with examples kept apart give the padded batch's loss and gradients."""

import json
from functools import partial

import pytest
import torch

from tuneforge.cli import main
from tuneforge.config import build_config
from tuneforge.data.packing import input_token_count, length_grouped, pack_examples
from tuneforge.data.pipeline import TokenizedExample, collate, prepare_data
from tuneforge.methods import build_method
from tuneforge.train.attention import segment_lengths, use_packed_sdpa
from tuneforge.train.fastpath import keeps_packed_examples_apart, prepare_fast_path
from tuneforge.train.loss import CausalLMLoss
from tuneforge.train.order import micro_batch_indices

from conftest import build_tiny_gpt2, build_tiny_llama, build_tiny_qwen2
from helpers import CpuAccelerator, random_examples, write_run_config, write_toy_messages


def test_pack_examples_layout():
    exs = random_examples([3, 1, 4])
    exs[1].labels = list(exs[1].input_ids)  # fully labelled: its first label must still go
    packed = pack_examples(exs)
    assert packed["input_ids"].tolist() == [sum((e.input_ids for e in exs), [])]
    assert packed["position_ids"].tolist() == [[0, 1, 2, 0, 0, 1, 2, 3]]
    labels = packed["labels"][0].tolist()
    assert [labels[0], labels[3], labels[4]] == [-100, -100, -100]
    assert labels[1:3] == exs[0].labels[1:] and labels[5:] == exs[2].labels[1:]
    assert "attention_mask" not in packed and input_token_count(packed) == 8
    assert segment_lengths(packed["position_ids"]) == [3, 1, 4]
    padded = collate(exs, pad_id=0)
    assert input_token_count(padded) == 8
    # the packed row carries exactly the padded batch's targets
    assert int((packed["labels"][:, 1:] != -100).sum()) == int(
        (padded["labels"][:, 1:] != -100).sum()
    )


def _lora_model(seed=0):
    from peft import LoraConfig, get_peft_model

    model = build_tiny_llama(300, seed=seed)
    torch.manual_seed(1)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    return model


def _loss_grads(model, batch):
    model.zero_grad(set_to_none=True)
    n = float((batch["labels"][:, 1:] != -100).sum())
    loss = CausalLMLoss(model)(model, batch, n)
    loss.backward()
    return loss.detach(), {
        k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None
    }


@pytest.mark.parametrize("attention", ["tuneforge", "sdpa", "eager"])
def test_packed_equals_padded_loss_and_grads(attention):
    """One pad-free row vs a padded batch: the same loss and gradients, with our kernel and with
    transformers' own (which keeps examples apart through the position ids)."""
    exs = random_examples([9, 23, 4, 17, 2])
    model = _lora_model()
    base = model.get_base_model()
    base.set_attn_implementation("eager" if attention == "eager" else "sdpa")
    if attention == "tuneforge":
        assert use_packed_sdpa(base)
    ref_loss, ref_grads = _loss_grads(model, collate(exs, pad_id=0))
    loss, grads = _loss_grads(model, pack_examples(exs))
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys() and grads
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-6)


def test_packed_examples_do_not_see_each_other():
    """Changing one example leaves the other's logits in the packed row unchanged."""
    model = build_tiny_llama(300, seed=0)
    use_packed_sdpa(model)
    a, b, c = random_examples([6, 7, 5])
    b2 = TokenizedExample([x + 1 for x in b.input_ids], b.labels, b.source)
    with torch.no_grad():
        one = model(**{k: v for k, v in pack_examples([a, b, c]).items() if k != "labels"}).logits
        two = model(**{k: v for k, v in pack_examples([a, b2, c]).items() if k != "labels"}).logits
    torch.testing.assert_close(one[:, :6], two[:, :6])
    torch.testing.assert_close(one[:, 13:], two[:, 13:])
    assert not torch.allclose(one[:, 6:13], two[:, 6:13])


def test_loop_with_packed_batches_matches_padded(tmp_path, tiny_tokenizer):
    """Six optimizer steps with accumulation, packed vs padded: the same loss curve and counts."""
    from tuneforge.methods.param_groups import default_param_groups
    from tuneforge.train.loop import LoopSettings, train_loop
    from tuneforge.train.optim import build_optimizer, build_scheduler

    path = write_toy_messages(tmp_path / "toy.jsonl", n=24)
    examples = prepare_data(path, None, tiny_tokenizer, max_length=64).train
    curves, tokens = [], []
    for collate_fn in (partial(collate, pad_id=tiny_tokenizer.pad_token_id), pack_examples):
        model = _lora_model()
        use_packed_sdpa(model.get_base_model())
        opt = build_optimizer(default_param_groups(model, 3e-2, 0.0), (0.9, 0.999), 1e-8)
        sched = build_scheduler(opt, total_steps=6, warmup_steps=1, schedule="cosine")
        settings = LoopSettings(6, 2, 4, 0, show_progress=False)
        losses = []
        result = train_loop(
            model, opt, sched, examples, collate_fn, CpuAccelerator(), settings,
            on_log=lambda r, losses=losses: losses.append(r["loss"]),
        )  # fmt: skip
        curves.append(losses)
        tokens.append((result.input_tokens, result.train_tokens))
    assert tokens[0] == tokens[1]
    assert curves[1] == pytest.approx(curves[0], rel=1e-5)
    assert curves[0][-1] < curves[0][0]


def test_length_grouped_order():
    lengths = [5, 50, 3, 40, 8, 60, 1, 30, 20, 10]
    order = list(range(10))[::-1]
    grouped = length_grouped(order, lengths, group_size=4)
    assert sorted(grouped) == list(range(10))
    groups = [grouped[i : i + 4] for i in range(0, 10, 4)]
    for g in groups:
        assert [lengths[i] for i in g] == sorted((lengths[i] for i in g), reverse=True)
    assert lengths[grouped[0]] == max(lengths)  # the longest comes first: OOM shows at step 1
    assert length_grouped(order, lengths, 4) == grouped


def test_group_by_length_cuts_padding():
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(5, 200, (512,), generator=gen).tolist()

    def padded_tokens(use_lengths):
        source = micro_batch_indices(512, 8, seed=0, rank=0, world_size=1, lengths=use_lengths)
        batches = [next(source)[1] for _ in range(64)]
        assert sorted(i for b in batches for i in b) == list(range(512))  # still one epoch
        return sum(len(b) * max(lengths[i] for i in b) for b in batches)

    assert padded_tokens(lengths) < 0.7 * padded_tokens(None)


@pytest.mark.parametrize("build", [build_tiny_gpt2, build_tiny_qwen2], ids=["gpt2", "qwen2"])
def test_packed_equals_padded_on_other_architectures(build):
    model = build(300).eval()  # GPT-2 has dropout
    model.set_attn_implementation("sdpa")
    assert use_packed_sdpa(model)
    exs = random_examples([9, 23, 4, 17, 2])
    loss_fn = CausalLMLoss(model)
    padded, packed = collate(exs, pad_id=0), pack_examples(exs)
    torch.testing.assert_close(loss_fn(model, packed, 1.0), loss_fn(model, padded, 1.0))


def test_packing_probe_catches_attention_across_examples():
    """An attention kernel that ignores where examples start fails the probe: packing turns off."""
    import torch.nn.functional as F
    from transformers import AttentionInterface

    def leaky(module, q, k, v, mask, **kwargs):
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return out.transpose(1, 2).contiguous(), None

    AttentionInterface.register("leaky_test", leaky)
    model = build_tiny_llama(300)
    assert keeps_packed_examples_apart(model)
    model.set_attn_implementation("leaky_test")
    assert not keeps_packed_examples_apart(model)
    fast = prepare_fast_path(model, autocast=False, packing=True, compile=False, num_threads=None)
    assert not fast.packing and "attends across" in fast.notes[0]


@pytest.mark.parametrize("method", ["freeze", "hybrid"])
def test_bf16_runs_with_upcast_layers_keep_packing(method):
    """Freeze and hybrid train some layers in fp32 beside frozen bf16 ones: the probe must run
    them under autocast as training does (it raised a dtype error and turned packing off)."""
    from tuneforge.recipes.parts import upcast_trainable

    options = {"name": method}
    if method == "hybrid":
        options |= {"full_layers": [1], "r": 4}
    built = build_method(build_config({"method": options}).method)
    built.plan(10)
    model = built.apply(build_tiny_llama(300).to(torch.bfloat16))
    upcast_trainable(model)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16, torch.float32}
    assert keeps_packed_examples_apart(model)
    fast = prepare_fast_path(model, autocast=True, packing=True, compile=False, num_threads=None)
    assert fast.packing and not fast.notes


def test_prompt_learning_turns_packing_off():
    from peft import PromptTuningConfig, get_peft_model

    model = get_peft_model(
        build_tiny_llama(300), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2)
    )
    fast = prepare_fast_path(
        model,
        autocast=False,
        packing=True,
        compile=False,
        num_threads=None,
        positions_aligned=not build_method(
            build_config({"method": "prompt"}).method
        ).adds_virtual_tokens,
    )
    assert not fast.packing and "data.packing" in fast.notes[0]
    lora = _lora_model()
    assert prepare_fast_path(
        lora, autocast=False, packing=True, compile=False, num_threads=None
    ).packing


def test_recipe_packed_run_matches_padded_run(tmp_path, tiny_model_dir):
    data = write_toy_messages(tmp_path / "train.jsonl", n=48)
    summaries = []
    for packing in (False, True):
        out = tmp_path / f"run-{packing}"
        cfg = write_run_config(
            tmp_path / f"{packing}.yaml", tiny_model_dir, data, out,
            data={"train": str(data), "validation": 0.125, "max_length": 64, "packing": packing},
        )  # fmt: skip
        assert main(["train", str(cfg), "--quiet"]) == 0
        summaries.append(json.loads((out / "summary.json").read_text()))
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["fast_path"]["packing"] is packing
    padded, packed = summaries
    assert packed["train_tokens"] == padded["train_tokens"]
    assert packed["final_train_loss"] == pytest.approx(padded["final_train_loss"], rel=1e-4)
    assert packed["eval"]["eval_loss"] == pytest.approx(padded["eval"]["eval_loss"], rel=1e-4)
