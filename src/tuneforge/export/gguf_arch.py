"""How each supported architecture maps onto llama.cpp: hyper-parameter keys and tensor layout.

Llama (SmolLM2), Qwen2 and GPT-2. Tensor names come from the `gguf` package's own map; reading
files and writing the GGUF container is gguf_write.py's job.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from tuneforge.errors import ExportError

#: Hugging Face `architectures[0]` -> gguf MODEL_ARCH name.
SUPPORTED = {
    "LlamaForCausalLM": "LLAMA",
    "Qwen2ForCausalLM": "QWEN2",
    "GPT2LMHeadModel": "GPT2",
}


@dataclass(frozen=True)
class Arch:
    hf_name: str
    gguf_name: str  # e.g. "llama": the prefix of its hyper-parameter keys
    config: dict[str, Any]
    add_params: Callable[[Any, dict[str, Any]], None]
    transform: Callable[[str, np.ndarray, dict[str, Any]], np.ndarray]
    tied_output: bool  # the output head is the embedding matrix (no output.weight written)
    #: The reordering of a weight's output rows alone (what a LoRA B matrix needs).
    row_order: Callable[[str, np.ndarray, dict[str, Any]], np.ndarray] = staticmethod(
        lambda name, w, cfg: w
    )

    def tensor_map(self):
        import gguf

        arch = getattr(gguf.MODEL_ARCH, SUPPORTED[self.hf_name])
        return gguf.get_tensor_name_map(arch, self.n_layers)

    @property
    def n_layers(self) -> int:
        return int(self.config.get("num_hidden_layers") or self.config["n_layer"])


def _rope_theta(cfg: dict[str, Any]) -> float:
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or {}
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if kind != "default":
        raise ExportError(
            f"config.json: rope scaling {kind!r} is not supported by GGUF export here; "
            "export a model without rope scaling"
        )
    return float(params.get("rope_theta") or cfg.get("rope_theta") or 10000.0)


def head_dim(cfg: dict[str, Any]) -> int:
    return int(cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"])


def _decoder_params(writer: Any, cfg: dict[str, Any]) -> None:
    """Keys shared by the Llama-shaped decoders (Llama, Qwen2)."""
    writer.add_context_length(int(cfg["max_position_embeddings"]))
    writer.add_embedding_length(int(cfg["hidden_size"]))
    writer.add_block_count(int(cfg["num_hidden_layers"]))
    writer.add_feed_forward_length(int(cfg["intermediate_size"]))
    writer.add_head_count(int(cfg["num_attention_heads"]))
    writer.add_head_count_kv(int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"]))
    writer.add_layer_norm_rms_eps(float(cfg["rms_norm_eps"]))
    writer.add_rope_freq_base(_rope_theta(cfg))
    writer.add_rope_dimension_count(head_dim(cfg))
    writer.add_key_length(head_dim(cfg))
    writer.add_value_length(head_dim(cfg))
    writer.add_vocab_size(int(cfg["vocab_size"]))


def interleave_rotary(w: np.ndarray, n_head: int) -> np.ndarray:
    """Per head, HF keeps the two halves of each rotary pair apart; llama.cpp's llama
    architecture rotates adjacent pairs. Reorder the output rows so both compute the same."""
    rows = w.shape[0]
    halves = w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:])
    return halves.swapaxes(1, 2).reshape(w.shape)


def _llama_transform(name: str, w: np.ndarray, cfg: dict[str, Any]) -> np.ndarray:
    if ".self_attn.q_proj." in name:
        return interleave_rotary(w, int(cfg["num_attention_heads"]))
    if ".self_attn.k_proj." in name:
        heads = cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
        return interleave_rotary(w, int(heads))
    return w


def _same(name: str, w: np.ndarray, cfg: dict[str, Any]) -> np.ndarray:
    return w


def _gpt2_params(writer: Any, cfg: dict[str, Any]) -> None:
    n_embd = int(cfg["n_embd"])
    writer.add_context_length(int(cfg.get("n_ctx") or cfg["n_positions"]))
    writer.add_embedding_length(n_embd)
    writer.add_block_count(int(cfg["n_layer"]))
    writer.add_feed_forward_length(int(cfg.get("n_inner") or 4 * n_embd))
    writer.add_head_count(int(cfg["n_head"]))
    writer.add_layer_norm_eps(float(cfg["layer_norm_epsilon"]))
    writer.add_vocab_size(int(cfg["vocab_size"]))


_CONV1D = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")


def _gpt2_transform(name: str, w: np.ndarray, cfg: dict[str, Any]) -> np.ndarray:
    # GPT-2's Conv1D stores weights as [in, out]; GGUF, like nn.Linear, wants [out, in].
    return np.ascontiguousarray(w.T) if name.endswith(_CONV1D) else w


def _check_gpt2(cfg: dict[str, Any]) -> None:
    odd = [k for k in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn") if cfg.get(k)]
    if odd or cfg.get("activation_function", "gelu_new") not in ("gelu_new", "gelu"):
        raise ExportError(f"config.json: GPT-2 options {odd or 'activation'} have no GGUF form")


def architecture(cfg: dict[str, Any]) -> Arch:
    """The mapping for a config.json, or ExportError naming what is supported."""
    names = cfg.get("architectures") or [cfg.get("model_type", "?")]
    hf_name = names[0]
    if hf_name not in SUPPORTED:
        raise ExportError(
            f"config.json: architecture {hf_name} cannot be written as GGUF here; "
            f"supported: {', '.join(SUPPORTED)}. Use --format merged or nf4 instead"
        )
    tied = bool(cfg.get("tie_word_embeddings", hf_name == "GPT2LMHeadModel"))
    if hf_name == "GPT2LMHeadModel":
        _check_gpt2(cfg)
        return Arch(hf_name, "gpt2", cfg, _gpt2_params, _gpt2_transform, tied_output=False)
    if cfg.get("mlp_bias"):
        raise ExportError("config.json: mlp_bias has no GGUF form for this architecture")
    if hf_name == "Qwen2ForCausalLM":
        if cfg.get("use_sliding_window"):
            raise ExportError("config.json: Qwen2 sliding-window attention is not exported")
        return Arch(hf_name, "qwen2", cfg, _decoder_params, _same, tied)
    return Arch(hf_name, "llama", cfg, _decoder_params, _llama_transform, tied, _llama_transform)
