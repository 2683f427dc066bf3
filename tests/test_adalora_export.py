"""An AdaLoRA adapter whose budget pruned a whole module still exports without zero-sized tensors
(peft warns about those as unsharded FSDP/ZeRO leftovers, and loaders reject them) and reloads to
exactly the model it was saved from."""

import warnings

import torch
from safetensors.torch import load_file

from tuneforge.config.sections import method_options
from tuneforge.methods import build_method

from conftest import build_tiny_llama


def test_pruned_module_exports_one_zero_slot_and_reloads_exactly(tmp_path, tiny_tokenizer):
    method = build_method(method_options({"name": "adalora", "init_r": 4, "target_r": 2}))
    method.plan(20)
    model = method.apply(build_tiny_llama(len(tiny_tokenizer)))
    torch.manual_seed(1)
    pattern, pruned = {}, None
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_E." not in name:
                continue
            param.copy_(torch.randn_like(param))  # a trained-looking update everywhere
            keep = [True, False, True, False]
            if pruned is None:  # the budget took every rank of this module
                pruned, keep = name, [False] * 4
            param.masked_fill_(~torch.tensor(keep)[:, None], 0.0)
            pattern[name.removeprefix("base_model.model.")] = keep  # as peft keys it
    model.peft_config["default"].rank_pattern = pattern
    ids = torch.tensor([tiny_tokenizer.encode("Color of fox? red")])
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # peft's "zero-sized lora tensor" warning fails the test
        method.save(model, str(tmp_path / "adapter"))
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert all(t.numel() > 0 for t in saved.values())
    module = pruned.split(".lora_E.")[0].removeprefix("base_model.model.")
    e = next(t for k, t in saved.items() if module in k and "lora_E" in k)
    assert e.shape[0] == 1 and torch.count_nonzero(e) == 0  # one slot, contributing nothing
    others = [t for k, t in saved.items() if "lora_E" in k and module not in k]
    assert others and all(t.shape[0] == 2 for t in others)  # the kept ranks, as pruned
    reloaded = method.load(build_tiny_llama(len(tiny_tokenizer)), str(tmp_path / "adapter"))
    with torch.no_grad():
        got = reloaded(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
