"""A loaded prompt-learning adapter (prefix, prompt, P-tuning) behaving as a plain causal LM.

peft's own generate() for these methods loses or misplaces the virtual tokens with this
transformers version (peft #2131 and relatives): greedy output differs from the model's own
forward. This wrapper injects the virtual tokens once, at prefill, exactly as peft's training
forward does, hides them from the logits, continues from the KV cache, and generates with a
small decode loop. Training keeps using peft's forward; this is for evaluation and serving.
"""

from __future__ import annotations

from typing import Any

import torch

from tuneforge.constants import IGNORE_INDEX


def _cache_of(out: Any) -> Any:
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


class PromptLearningLM(torch.nn.Module):
    """Wraps a peft prompt-learning model: logits align with input_ids, caches continue, generate works.

    Positions of real tokens start after the virtual ones (as in training), so explicit
    `position_ids` from the caller are shifted by the number of virtual tokens.
    """

    def __init__(self, peft_model: torch.nn.Module) -> None:
        super().__init__()
        from peft import PeftType

        self.peft_model = peft_model
        config = peft_model.active_peft_config
        self.num_virtual_tokens = int(config.num_virtual_tokens)
        self.is_prefix = config.peft_type == PeftType.PREFIX_TUNING

    def __getattr__(self, name: str) -> Any:
        """Anything else (config, generation_config, device, peft_config...) is the adapter's."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            inner = self.__dict__.get("_modules", {}).get("peft_model")
            if inner is None:
                raise
            return getattr(inner, name)

    @property
    def lm(self) -> torch.nn.Module:
        return self.peft_model.get_base_model()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: Any = None,
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        past_key_values: Any = None,
        **kwargs: Any,
    ) -> Any:
        cache = cache if cache is not None else past_key_values
        batch, n_virtual = input_ids.shape[0], self.num_virtual_tokens
        if attention_mask is not None:
            ones = attention_mask.new_ones(batch, n_virtual)
            attention_mask = torch.cat([ones, attention_mask], dim=1)
        if position_ids is not None:
            position_ids = position_ids + n_virtual
        common = dict(attention_mask=attention_mask, use_cache=use_cache, **kwargs)
        if (
            cache is not None and cache.get_seq_length() > 0
        ):  # continuing: virtual tokens are cached
            return self.lm(
                input_ids=input_ids, position_ids=position_ids, cache=cache, labels=labels, **common
            )
        if self.is_prefix:
            prefix = self.peft_model.get_prompt(batch, max_cache_len=input_ids.shape[1] + n_virtual)
            return self.lm(
                input_ids=input_ids,
                position_ids=position_ids,
                cache=prefix,
                labels=labels,
                **common,
            )
        embeds = self.peft_model.word_embeddings(input_ids)
        prompts = self.peft_model.get_prompt(batch_size=batch).to(embeds.dtype)
        if position_ids is not None:
            virtual = torch.arange(n_virtual, device=position_ids.device).expand(batch, -1)
            position_ids = torch.cat([virtual, position_ids], dim=1)
        if labels is not None:
            labels = torch.cat([labels.new_full((batch, n_virtual), IGNORE_INDEX), labels], dim=1)
        out = self.lm(
            inputs_embeds=torch.cat([prompts, embeds], dim=1),
            position_ids=position_ids,
            labels=labels,
            **common,
        )
        out.logits = out.logits[:, n_virtual:]
        return out

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        generation_config: Any = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """Greedy (or temperature / top-p) decoding with the KV cache; returns prompt + new tokens.

        Takes a GenerationConfig and/or the keywords in GENERATE_KEYS; anything else (beam
        search, logits processors, streamers) is refused rather than silently ignored.
        """
        stop = kwargs.pop("stopping_criteria", None)  # e.g. an end-of-turn marker as text
        o = _generate_settings(self.lm.generation_config, generation_config, kwargs)
        eos = o["eos_token_id"]
        eos = torch.tensor([eos] if isinstance(eos, int) else list(eos or []), dtype=torch.long)
        pad = o["pad_token_id"] if o["pad_token_id"] is not None else int(eos[0]) if len(eos) else 0
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding keeps training positions
        out = self(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True)
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        new: list[torch.Tensor] = []
        for _ in range(o["max_new_tokens"]):
            logits = out.logits[:, -1].float()
            token = _pick(logits, o["do_sample"], o["temperature"], o["top_p"])
            token = torch.where(done, torch.full_like(token, pad), token)
            new.append(token)
            done |= torch.isin(token, eos.to(token.device))
            if stop is not None:
                so_far = torch.cat([input_ids, torch.stack(new, dim=1)], dim=1)
                done |= torch.as_tensor(stop(so_far, logits), dtype=torch.bool, device=done.device)
            if bool(done.all()):
                break
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            out = self(
                input_ids=token[:, None],
                attention_mask=mask,
                position_ids=mask.sum(-1, keepdim=True) - 1,
                cache=_cache_of(out),
                use_cache=True,
            )
        if not new:
            return input_ids
        return torch.cat([input_ids, torch.stack(new, dim=1)], dim=1)


GENERATE_KEYS = (
    "max_new_tokens",
    "do_sample",
    "temperature",
    "top_p",
    "eos_token_id",
    "pad_token_id",
    "num_beams",
    "use_cache",
)


def _generate_settings(defaults: Any, config: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The decoding settings: the model's generation config < `config` < keyword arguments."""
    unknown = sorted(set(kwargs) - set(GENERATE_KEYS))
    if unknown:
        raise TypeError(f"prompt-learning generate() does not support {', '.join(unknown)}")
    out: dict[str, Any] = {"max_new_tokens": 20, "do_sample": False, "temperature": 1.0}
    out.update(top_p=1.0, eos_token_id=None, pad_token_id=None, num_beams=1)
    for source in (defaults, config):
        for key in GENERATE_KEYS:
            value = getattr(source, key, None) if source is not None else None
            if value is not None:
                out[key] = value
    out.update({k: v for k, v in kwargs.items() if v is not None})
    if out["num_beams"] != 1:
        raise TypeError("prompt-learning generate() decodes greedily or by sampling: num_beams=1")
    return out


def _pick(logits: torch.Tensor, do_sample: bool, temperature: float, top_p: float) -> torch.Tensor:
    if not do_sample:
        return logits.argmax(-1)
    probs = torch.softmax(logits / max(temperature, 1e-5), dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        keep = sorted_probs.cumsum(-1) - sorted_probs < top_p
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs * keep)
    return torch.multinomial(probs, 1).squeeze(-1)
