"""The run's tokenizer as GGUF metadata: tokens, types, merges, pre-tokenizer, special ids, template.

Byte-level BPE tokenizers (GPT-2, SmolLM2, Qwen2, Llama 3 families) are supported; the weights
and hyper-parameters are gguf_arch.py's business.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuneforge.errors import ExportError
from tuneforge.export.chatformat import end_of_turn_id, special_ids

# Split regexes of the pre-tokenizers llama.cpp knows by name (tokenizer.ggml.pre).
_GPT2_WORDS = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3 = _QWEN2.replace(r"|\p{N}|", r"|\p{N}{1,3}|")
_SPLIT_PRE = {_QWEN2: "qwen2", _LLAMA3: "llama-bpe"}


@dataclass
class VocabMeta:
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    pre: str
    specials: dict[str, int]  # bos / eos / eot / unk / pad -> id
    add_bos: bool
    chat_template: str | None


def _byte_level(node: dict[str, Any] | None) -> bool:
    return bool(node) and node.get("type") == "ByteLevel"


def pre_tokenizer_name(pre: dict[str, Any] | None) -> str:
    """llama.cpp's name for a tokenizer.json pre-tokenizer, or ExportError for one it lacks."""
    steps = (pre or {}).get("pretokenizers", [pre] if pre else [])
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if (
        kinds == ["Digits", "ByteLevel"]
        and steps[0].get("individual_digits")
        and steps[1].get("use_regex", True)
    ):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        name = _SPLIT_PRE.get(steps[0].get("pattern", {}).get("Regex", ""))
        if name:
            return name
    raise ExportError(
        f"tokenizer: the pre-tokenizer {kinds or 'none'} has no llama.cpp equivalent here "
        "(supported: GPT-2 byte-level, SmolLM digits + byte-level, Qwen2 and Llama-3 splits)"
    )


def _merges(model: dict[str, Any]) -> list[str]:
    merges = model.get("merges") or []
    return [m if isinstance(m, str) else " ".join(m) for m in merges]


def _tokens_and_types(data: dict[str, Any], special: set[int], n_vocab: int):
    by_id = {int(i): tok for tok, i in data["model"]["vocab"].items()}
    added = {int(t["id"]): t for t in data.get("added_tokens", [])}
    by_id.update({i: t["content"] for i, t in added.items()})
    if max(by_id) >= n_vocab:
        raise ExportError(
            f"tokenizer: token id {max(by_id)} is beyond the model's {n_vocab} embedding rows"
        )
    tokens, types = [], []
    for i in range(n_vocab):  # rows past the tokenizer are padding the model never sees
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(5)  # UNUSED
        elif i in added:
            tokens.append(by_id[i])
            types.append(3 if i in special or added[i].get("special") else 4)  # CONTROL / USER
        else:
            tokens.append(by_id[i])
            types.append(1)  # NORMAL
    return tokens, types


def _adds_bos(tokenizer: Any) -> bool:
    bos = tokenizer.bos_token_id
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bos is not None and bool(ids) and ids[0] == bos


def read_vocab(tokenizer: Any, tokenizer_dir: Path, n_vocab: int) -> VocabMeta:
    """Everything llama.cpp needs to tokenise, format and stop as the run's tokenizer does."""
    path = tokenizer_dir / "tokenizer.json"
    if not path.is_file():
        raise ExportError(f"{path}: missing; GGUF export needs a fast (tokenizer.json) tokenizer")
    data = json.loads(path.read_text(encoding="utf-8"))
    model = data.get("model", {})
    if model.get("type") != "BPE" or not _byte_level(data.get("decoder")):
        raise ExportError(
            f"{path}: a {model.get('type')} tokenizer without a byte-level decoder; GGUF export "
            "supports byte-level BPE tokenizers (GPT-2, SmolLM2, Qwen2, Llama 3)"
        )
    special = special_ids(tokenizer)
    tokens, types = _tokens_and_types(data, special, n_vocab)
    eot = end_of_turn_id(tokenizer) if getattr(tokenizer, "chat_template", None) else None
    named = {
        "bos": tokenizer.bos_token_id,
        "eos": tokenizer.eos_token_id,
        "eot": eot,
        "unk": tokenizer.unk_token_id,
        "pad": tokenizer.pad_token_id,
    }
    return VocabMeta(
        tokens=tokens,
        token_types=types,
        merges=_merges(model),
        pre=pre_tokenizer_name(data.get("pre_tokenizer")),
        specials={k: int(v) for k, v in named.items() if v is not None},
        add_bos=_adds_bos(tokenizer),
        chat_template=getattr(tokenizer, "chat_template", None),
    )


def add_vocab(writer: Any, vocab: VocabMeta) -> None:
    """Write the vocabulary keys (tokenizer.ggml.*, tokenizer.chat_template) into a GGUFWriter."""
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.token_types)
    writer.add_token_merges(vocab.merges)
    setters = {
        "bos": writer.add_bos_token_id,
        "eos": writer.add_eos_token_id,
        "eot": writer.add_eot_token_id,
        "unk": writer.add_unk_token_id,
        "pad": writer.add_pad_token_id,
    }
    for kind, token_id in vocab.specials.items():
        setters[kind](token_id)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(False)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)
