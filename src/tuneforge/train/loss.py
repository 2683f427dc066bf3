"""Causal-LM loss on labelled positions only, in chunks: full-vocabulary logits never exist at once.

The loop owns normalisation across accumulation and processes (it passes the step's token count);
methods whose outputs do not line up with their inputs (prompt learning) take the generic path.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch

from tuneforge.constants import IGNORE_INDEX

DEFAULT_CHUNK_TOKENS = 512


def label_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask, targets): mask[b, t] is True where position t predicts a labelled token t + 1."""
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return mask, labels[:, 1:][mask[:, :-1]]


class _LinearCrossEntropy(torch.autograd.Function):
    """Sum of token cross-entropies of `hidden @ weight.T (+ bias)`, computed chunk by chunk.

    Each chunk's logits live only inside the forward: their gradient is taken right away and the
    gradients for hidden/weight/bias are kept instead (the size of the inputs, not of the logits).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_tokens, compute_dtype):
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        h, w = hidden.to(compute_dtype), weight.to(compute_dtype)
        acc = torch.promote_types(compute_dtype, torch.float32)  # softmax: fp32 or better
        total = torch.zeros((), dtype=acc, device=hidden.device)
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=acc, device=bias.device) if need_b else None
        for start in range(0, h.shape[0], chunk_tokens):
            hc, tc = h[start : start + chunk_tokens], targets[start : start + chunk_tokens]
            logits = (hc @ w.T).to(acc)
            if bias is not None:
                logits += bias.to(acc)
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, tc[:, None]).squeeze(1)).sum()
            if not (need_h or need_w or need_b):
                continue
            probs = logits.sub_(lse[:, None]).exp_()  # d(sum of losses)/d(logits) = p - onehot
            probs[torch.arange(tc.numel(), device=tc.device), tc] -= 1.0
            g = probs.to(compute_dtype)
            if need_h:
                grad_h[start : start + chunk_tokens] = g @ w
            if need_w:
                grad_w += (g.T @ hc).to(acc)
            if need_b:
                grad_b += probs.sum(0)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grads = []
        for saved, dtype in zip(ctx.saved_tensors, ctx.dtypes, strict=True):
            grads.append(None if saved is None else (saved * grad_total).to(dtype))
        return (*grads, None, None, None)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> torch.Tensor:
    """Summed cross-entropy of the logits `hidden @ weight.T + bias` against `targets`.

    `hidden` is (N, H) and holds labelled positions only. Matmuls run in the autocast dtype when
    autocast is on (as `lm_head` would), else in `hidden`'s dtype; softmax and the result are
    fp32 (fp64 for fp64 inputs).
    """
    if chunk_tokens < 1:
        raise ValueError(f"train.loss_chunk_tokens: must be at least 1, got {chunk_tokens}")
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    with torch.autocast(device, enabled=False):
        return _LinearCrossEntropy.apply(hidden, weight, bias, targets, chunk_tokens, dtype)


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside DDP/compile wrappers (accelerate.unwrap_model without accelerate)."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, torch.nn.Module):
            return model
        model = inner


def lm_parts(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Linear] | None:
    """(decoder body, output head) where the fast path computes the same loss, else None."""
    inner = _unwrap(model)
    base = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    get_decoder = getattr(base, "get_decoder", None)
    get_head = getattr(base, "get_output_embeddings", None)
    if get_decoder is None or get_head is None:
        return None
    try:
        decoder, head = get_decoder(), get_head()
    except (AttributeError, NotImplementedError):
        return None
    config = getattr(base, "config", None)
    if any(getattr(config, k, None) for k in ("final_logit_softcapping", "logit_scale")):
        return None  # the head does more than a matmul
    if hasattr(getattr(head, "weight", None), "ds_id"):
        return None  # DeepSpeed ZeRO-3 holds the head's weight only inside its own forward
    # A plain Linear head: an adapted or wrapped head (LoRA on lm_head, modules_to_save) is not.
    plain_head = isinstance(head, torch.nn.Linear) and not list(head.children())
    takes_keep = "logits_to_keep" in inspect.signature(base.forward).parameters
    if not (isinstance(decoder, torch.nn.Module) and plain_head and takes_keep):
        return None
    return decoder, head


class CausalLMLoss:
    """`loss_fn(model, batch, num_items)`: the summed next-token loss of `batch` over `num_items`.

    The fast path runs the model's own forward (so DDP, peft and hooks all apply) with
    `logits_to_keep` selecting no position, takes the decoder's last hidden state through a
    forward hook, and applies the head only at labelled positions, chunk by chunk. Models where
    that would not be the same loss use the model's own `labels=` loss instead.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
        *,
        positions_aligned: bool = True,
    ) -> None:
        """`positions_aligned=False` for methods that add virtual tokens (prefix, prompt,
        P-tuning: `Method.adds_virtual_tokens`): their hidden states do not line up with the
        labels, so the loss comes from the model's own forward."""
        if chunk_tokens < 1:
            raise ValueError(f"train.loss_chunk_tokens: must be at least 1, got {chunk_tokens}")
        self.chunk_tokens = chunk_tokens
        parts = lm_parts(model) if positions_aligned else None
        self.fast = parts is not None
        self.decoder, self.head = parts if parts is not None else (None, None)

    def __call__(
        self, model: torch.nn.Module, batch: Mapping[str, torch.Tensor], num_items: float
    ) -> torch.Tensor:
        if not self.fast:
            count = torch.tensor(float(num_items))
            return model(**batch, num_items_in_batch=count).loss.float()
        labels = batch["labels"]
        mask, targets = label_positions(labels)
        inputs: dict[str, Any] = {k: v for k, v in batch.items() if k != "labels"}
        captured: list[torch.Tensor] = []

        def capture(module, args, output) -> None:
            hidden = getattr(output, "last_hidden_state", None)
            captured.append(hidden if hidden is not None else output[0])

        handle = self.decoder.register_forward_hook(capture)  # per call: no hook outlives it
        try:
            model(**inputs, logits_to_keep=torch.zeros_like(mask), use_cache=False)
        finally:
            handle.remove()
        if len(captured) != 1 or captured[0].shape[:2] != labels.shape:
            raise RuntimeError(
                "loss: the decoder's hidden states do not line up with the labels; "
                "this model needs the generic loss path"
            )
        hidden = captured[0][mask]
        total = linear_cross_entropy(
            hidden, self.head.weight, targets, self.head.bias, chunk_tokens=self.chunk_tokens
        )
        return total / num_items
