"""Every method on three tiny architectures: Llama, GPT-2 (Conv1D) and Qwen2 (attention biases).

Per run: only the trainable weights change (frozen ones bit-identical), the loss is finite and the
validation loss falls on the toy task, a fresh process reloads identical logits, `tuneforge
generate` prints the model's own greedy continuation, and mergeable adapters merge within 1e-4.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tuneforge.recipes.parts as parts
import tuneforge.recipes.train as recipe
from tuneforge.config import load_config
from tuneforge.data.pipeline import collate, prepare_data
from tuneforge.methods._prompt_runtime import PromptLearningLM

from conftest import build_tiny_gpt2, build_tiny_llama, build_tiny_qwen2
from helpers import write_run_config, write_toy_messages


def build_gpt2(vocab_size: int):
    return build_tiny_gpt2(vocab_size, initializer_range=0.1)


def build_qwen2(vocab_size: int):
    return build_tiny_qwen2(vocab_size, initializer_range=0.1)


def build_llama(vocab_size: int):
    return build_tiny_llama(vocab_size, initializer_range=0.1)


# initializer_range 0.1 (not 0.02): a random model with some structure, so that prompt-learning
# methods, which act only through the frozen weights, visibly move the loss in a few steps.
ARCHS = {"llama": build_llama, "gpt2": build_gpt2, "qwen2": build_qwen2}
LORA = {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0}
# label: (method section, peak lr). Prompt-learning and IA3 need far higher rates than LoRA.
VARIANTS = {
    "full": ({"name": "full"}, 3e-3),
    "freeze": ({"name": "freeze", "trainable_layers": 1}, 1e-2),
    "lora": (LORA, 1e-2),
    "dora": ({**LORA, "dora": True}, 1e-2),
    "rslora": ({**LORA, "rslora": True}, 1e-2),
    "pissa": ({**LORA, "init": "pissa"}, 1e-2),
    "pissa_exact": ({**LORA, "init": "pissa_exact"}, 1e-2),
    "olora": ({**LORA, "init": "olora"}, 1e-2),
    "gaussian": ({**LORA, "init": "gaussian"}, 1e-2),
    "lora_plus": ({**LORA, "lora_plus_ratio": 4.0}, 1e-2),
    "adalora": ({"name": "adalora", "init_r": 6, "target_r": 2, "dropout": 0.0}, 1e-2),
    "prefix": ({"name": "prefix", "num_virtual_tokens": 4}, 0.3),
    "prompt": ({"name": "prompt", "num_virtual_tokens": 4}, 0.1),
    "ptuning": ({"name": "ptuning", "num_virtual_tokens": 4, "encoder_hidden_size": 16}, 0.03),
    "ia3": ({"name": "ia3"}, 0.3),
    "hybrid": ({"name": "hybrid", "r": 4, "alpha": 8, "dropout": 0.0}, 1e-2),
}
MERGEABLE = {"lora", "dora", "rslora", "pissa", "pissa_exact", "olora", "gaussian", "lora_plus"}
MERGEABLE |= {"adalora"}
MERGEABLE |= {"ia3", "hybrid"}
# Reloaded in another shape, so equal up to float rounding: PiSSA/OLoRA are saved as
# B·A - B0·A0 on the original base (rank 2r); AdaLoRA is saved with the pruned ranks cut out.
RESHAPED = {"pissa", "pissa_exact", "olora", "adalora"}
# peft's OLoRA init ignores Conv1D's transposed layout: refused with a clear error (tested below).
RUNS = [(a, v) for a in ARCHS for v in VARIANTS if (a, v) != ("gpt2", "olora")]
STEPS, EVAL_EVERY = 12, 4


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest


def test_every_registered_method_is_in_the_matrix():
    """A new method cannot go untested: the matrix must cover every registered name."""
    from tuneforge.methods import method_names

    covered = {section["name"] for section, _ in VARIANTS.values()}
    assert set(method_names()) <= covered, set(method_names()) - covered


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_tokenizer):
    """One saved model directory per architecture, and the toy data."""
    root = tmp_path_factory.mktemp("methods")
    tok = tiny_tokenizer
    for arch, build in ARCHS.items():
        model = build(len(tok))
        for cfg in (model.config, model.generation_config):
            cfg.eos_token_id, cfg.pad_token_id = tok.eos_token_id, tok.pad_token_id
            cfg.bos_token_id = tok.bos_token_id
        model.save_pretrained(root / arch)
        tok.save_pretrained(root / arch)
    write_toy_messages(root / "train.jsonl", n=64)
    return root


def probe_ids(tokenizer) -> torch.Tensor:
    from tuneforge.data.templates import render_prompt

    messages = [{"role": "user", "content": "grass sky Color of snow?"}]
    return torch.tensor([render_prompt(tokenizer, messages) + [tokenizer.encode("bl")[0]]])


@torch.no_grad()
def fixed_batch_loss(model, batch: dict, weights: dict | None = None) -> float:
    """Loss on a fixed batch, optionally with `weights` swapped in (and the current ones restored)."""
    params = dict(model.named_parameters())
    saved = {n: p.detach().clone() for n, p in params.items()} if weights else {}
    for name, value in (weights or {}).items():
        params[name].copy_(value)
    was = model.training
    loss = float(model.eval()(**batch).loss)
    model.train(was)
    for name, value in saved.items():
        params[name].copy_(value)
    return loss


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    if getattr(model, "active_peft_config", None) is not None:
        if model.active_peft_config.is_prompt_learning:
            model = PromptLearningLM(model)
    was = model.training
    model.eval()
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    model.train(was)
    return out.float()


_RESULTS: dict[tuple[str, str], dict] = {}


def train_run(workdir: Path, tokenizer, arch: str, variant: str, monkeypatch) -> dict:
    """Train one (arch, variant) through the recipe, recording weights after `apply` and logits
    of exactly what was saved. Cached: the reload tests reuse these runs."""
    if (arch, variant) in _RESULTS:
        return _RESULTS[(arch, variant)]
    method_section, lr = VARIANTS[variant]
    out = workdir / "runs" / f"{arch}-{variant}"
    cfg_path = write_run_config(
        workdir / f"{arch}-{variant}.yaml",
        workdir / arch,
        workdir / "train.jsonl",
        out,
        method=method_section,
        train={"max_steps": STEPS, "lr": lr},
        eval={"every_steps": EVAL_EVERY},
        log={"report": False},
    )
    seen: dict = {}
    build = parts.build_method
    rows = prepare_data(workdir / "train.jsonl", None, tokenizer, max_length=64).train
    batch = collate(rows[:16], pad_id=tokenizer.pad_token_id)

    def spy_build(options):
        method = build(options)
        apply, save = method.apply, method.save
        seen["mergeable"] = method.mergeable

        def spy_apply(model):
            model = apply(model)
            seen["before"] = {n: p.detach().clone() for n, p in model.named_parameters()}
            seen["trainable"] = {n for n, p in model.named_parameters() if p.requires_grad}
            return model

        def spy_save(model, path, *state):
            seen["after"] = {n: p.detach().clone() for n, p in model.named_parameters()}
            seen["logits"] = _logits(model, probe_ids(tokenizer))
            seen["fixed_after"] = fixed_batch_loss(model, batch)
            seen["fixed_before"] = fixed_batch_loss(model, batch, seen["before"])
            assert fixed_batch_loss(model, batch) == seen["fixed_after"]  # restored exactly
            if getattr(model, "active_peft_config", None) is not None:
                if model.active_peft_config.is_prompt_learning:  # the wrapper is peft's forward
                    with torch.no_grad():
                        ids = probe_ids(tokenizer)
                        peft_logits = model.eval()(input_ids=ids).logits.float()
                    seen["peft_logits"] = peft_logits[:, -ids.shape[1] :]  # drop virtual ones
            save(model, path, *state)

        method.apply, method.save = spy_apply, spy_save
        return method

    with monkeypatch.context() as m:
        m.setattr(parts, "build_method", spy_build)
        summary = recipe.run_training(load_config(cfg_path), show_progress=False).summary
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    seen["losses"] = [r["loss"] for r in lines if "loss" in r]
    seen["eval"] = [r["eval_loss"] for r in lines if "eval_loss" in r]
    seen["summary"], seen["dir"] = summary, out
    _RESULTS[(arch, variant)] = seen
    return seen


@pytest.mark.parametrize("arch,variant", RUNS, ids=[f"{a}-{v}" for a, v in RUNS])
def test_method_trains_only_its_weights(workdir, tiny_tokenizer, arch, variant, monkeypatch):
    run = train_run(workdir, tiny_tokenizer, arch, variant, monkeypatch)
    before, after, trainable = run["before"], run["after"], run["trainable"]
    assert trainable, "nothing trainable"
    assert set(before) == set(after)
    pruned = {n for n in trainable if ".lora_E." in n and not after[n].any()}  # AdaLoRA rank 0
    unchanged = sorted(n for n in trainable - pruned if torch.equal(before[n], after[n]))
    assert unchanged == [], f"trainable but unchanged: {unchanged[:5]}"
    moved = sorted(n for n in set(before) - trainable if not torch.equal(before[n], after[n]))
    assert moved == [], f"frozen but changed: {moved[:5]}"
    total = sum(t.numel() for t in before.values())
    n_trainable = sum(before[n].numel() for n in trainable)
    assert run["summary"]["trainable_params"] == n_trainable
    assert (n_trainable == total) == (variant == "full")
    assert run["mergeable"] == (variant in MERGEABLE)  # what the method declares
    assert all(math.isfinite(x) for x in run["losses"] + run["eval"])
    assert len(run["eval"]) == STEPS // EVAL_EVERY
    assert run["fixed_after"] < run["fixed_before"] - 0.05, (
        run["fixed_before"],
        run["fixed_after"],
    )
    if "peft_logits" in run:  # evaluation sees the virtual tokens exactly as training did
        assert torch.equal(run["peft_logits"], run["logits"])


RELOAD_WORKER = r"""
import contextlib, io, json, sys, torch
from safetensors.torch import save_file
from tuneforge.cli import main
from tuneforge.loading import load_reference
torch.set_num_threads(1)
jobs = json.loads(open(sys.argv[1]).read())
out, tensors = {}, {}
for key, job in jobs.items():
    loaded = load_reference(job["run"], dtype="fp32")
    model, ids = loaded.model, torch.tensor([job["ids"]])
    with torch.no_grad():
        tensors[key] = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float()
    prompt = torch.tensor([job["prompt"]])
    eos = loaded.tokenizer.eos_token_id
    x = prompt
    with torch.no_grad():  # the model's own greedy continuation, full forward per token
        for _ in range(job["new"]):
            nxt = model(input_ids=x, attention_mask=torch.ones_like(x)).logits[:, -1].argmax(-1)
            x = torch.cat([x, nxt[:, None]], 1)
            if int(nxt) == eos:
                break
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(["generate", "--model", job["run"], "--prompt", job["text"],
                     "--max-new-tokens", str(job["new"]), "--dtype", "fp32"])
    greedy = loaded.tokenizer.decode(x[0, prompt.shape[1]:], skip_special_tokens=True)
    with torch.no_grad():
        gen = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                             max_new_tokens=job["new"], do_sample=False, eos_token_id=eos,
                             pad_token_id=loaded.tokenizer.pad_token_id)
    out[key] = {"code": code, "cli": buf.getvalue().strip(), "greedy": greedy.strip(),
                "greedy_ids": x[0].tolist(), "generate_ids": gen[0].tolist()}
    if job["merge"]:
        with torch.no_grad():
            merged = model.merge_and_unload()
            tensors[key + ":merged"] = merged(input_ids=ids).logits.float()
save_file(tensors, sys.argv[2] + ".safetensors")
open(sys.argv[2] + ".json", "w").write(json.dumps(out))
"""


@pytest.fixture(scope="module")
def reloaded(workdir, tiny_tokenizer):
    """All runs reloaded by ONE fresh process: logits, CLI generation, merged logits."""
    from safetensors.torch import load_file

    from tuneforge.data.templates import render_prompt

    mp = pytest.MonkeyPatch()
    try:
        for arch, variant in RUNS:
            train_run(workdir, tiny_tokenizer, arch, variant, mp)
    finally:
        mp.undo()
    text = "Color of sky?"
    prompt = render_prompt(tiny_tokenizer, [{"role": "user", "content": text}])
    jobs = {
        f"{a}-{v}": {
            "run": str(_RESULTS[(a, v)]["dir"]),
            "ids": probe_ids(tiny_tokenizer)[0].tolist(),
            "prompt": prompt,
            "text": text,
            "new": 12,
            "merge": v in MERGEABLE,
        }
        for a, v in RUNS
    }
    (workdir / "jobs.json").write_text(json.dumps(jobs))
    res = subprocess.run(
        [sys.executable, "-c", RELOAD_WORKER, str(workdir / "jobs.json"), str(workdir / "out")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    texts = json.loads((workdir / "out.json").read_text())
    return texts, load_file(str(workdir / "out.safetensors"))


@pytest.mark.parametrize("arch,variant", RUNS, ids=[f"{a}-{v}" for a, v in RUNS])
def test_reload_generate_merge_in_a_new_process(reloaded, arch, variant):
    texts, tensors = reloaded
    key = f"{arch}-{variant}"
    ours = _RESULTS[(arch, variant)]["logits"]
    if variant in RESHAPED:
        torch.testing.assert_close(tensors[key], ours, rtol=0, atol=1e-5)
    else:
        assert torch.equal(tensors[key], ours)
    gen = texts[key]
    assert gen["code"] == 0
    assert gen["generate_ids"] == gen["greedy_ids"]  # generate() is the model's own greedy path
    assert gen["cli"] == gen["greedy"]
    if variant in MERGEABLE:
        torch.testing.assert_close(tensors[key + ":merged"], tensors[key], rtol=0, atol=1e-4)
    else:
        assert key + ":merged" not in tensors


def test_olora_on_conv1d_is_refused_by_name(workdir, tiny_tokenizer, monkeypatch):
    from tuneforge.errors import ConfigError

    with pytest.raises(ConfigError, match="method.init: olora"):
        train_run(workdir, tiny_tokenizer, "gpt2", "olora", monkeypatch)
