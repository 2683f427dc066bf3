"""Shared fixtures: a tiny byte-level tokenizer with a ChatML template and tiny random models.

Everything here is built in-process; no test downloads weights or data.
"""

from __future__ import annotations

import os

import pytest
import torch

import tuneforge.methods  # noqa: F401  (registers every method with the config, as the CLI does)

# pgcluster: the throwaway PostgreSQL cluster (pg_cluster, db_url); feedback_helpers: parent_run
pytest_plugins = ["pgcluster", "feedback_helpers"]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "positive negative neutral review book good bad great terrible",
    "这本书很好，我很喜欢。质量太差了，很失望。",
    "Translate to French: hello world. Bonjour le monde.",
    "What is two plus two? Two plus two is four.",
] * 20


def build_tiny_tokenizer():
    """A 300-token byte-level BPE tokenizer with ChatML specials (pad = eos = <|im_end|>)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHATML
    return fast


def build_tiny_base_tokenizer():
    """A base model's tokenizer: the same byte-level BPE, one special (<|endoftext|> = eos = pad),
    no chat template, so ChatML's <|im_start|> / <|im_end|> are plain text pieces in it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )


#: Hidden sizes shared by the tiny decoder builders below.
TINY_DECODER = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    tie_word_embeddings=False,
)


def build_tiny_llama(vocab_size: int, seed: int = 0, **overrides):
    """A 2-layer Llama with hidden size 32: fast enough for many training steps in a test."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size, **{**TINY_DECODER, **overrides}))
    return model.to(torch.float32)


def build_tiny_qwen2(vocab_size: int, **overrides):
    """A tiny Qwen2: Llama-shaped, with biases on the attention projections."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=vocab_size, **{**TINY_DECODER, **overrides}))


def build_tiny_gpt2(vocab_size: int, **overrides):
    """A tiny GPT-2: Conv1D layers, learned positions, dropout on by default."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = dict(n_embd=32, n_layer=2, n_head=4, n_positions=256) | overrides
    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab_size, **cfg))


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny-model tests: several threads on a shared 2-core CPU
    make OpenMP barriers wait on descheduled threads (tens of times slower). OMP_NUM_THREADS
    is set too, so that the recipe keeps it (train/fastpath.set_threads)."""
    threads, env = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
    yield
    torch.set_num_threads(threads)
    if env is None:
        os.environ.pop("OMP_NUM_THREADS", None)
    else:
        os.environ["OMP_NUM_THREADS"] = env


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer):
    """A saved tiny Llama + tokenizer as a plain HF directory (what `model.name: DIR` loads)."""
    path = tmp_path_factory.mktemp("tiny-llama")
    model = build_tiny_llama(len(tiny_tokenizer))
    model.config.eos_token_id = tiny_tokenizer.eos_token_id
    model.config.pad_token_id = tiny_tokenizer.pad_token_id
    model.generation_config.eos_token_id = tiny_tokenizer.eos_token_id
    model.generation_config.pad_token_id = tiny_tokenizer.pad_token_id
    model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path
