"""Read a chat template's turn structure (per-role prefix and suffix, end-of-turn token) by probing.

Other formats need it in pieces: Ollama's Go template (modelfile.py), the stop tokens written into
GGUF and generation configs. A template that does not decompose is reported, never guessed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tuneforge.errors import ExportError

_S, _U1, _A1, _U2 = "\x02S\x03", "\x02U1\x03", "\x02A1\x03", "\x02U2\x03"
_CHECKS = (
    [("user", "Hello")],
    [("user", "Hi"), ("assistant", "Hello there!\nHow can I help?")],
    [("user", "a"), ("assistant", "b"), ("user", "c d")],
    [("system", "Be brief."), ("user", "Name a colour.")],
    [("system", "S"), ("user", "u"), ("assistant", "x"), ("user", "y")],
)


@dataclass(frozen=True)
class TurnFormat:
    """A template as `start + (prefix[role] + content + suffix[role]) per message + generation`."""

    start: str
    prefix: dict[str, str]
    suffix: dict[str, str]
    generation: str  # what add_generation_prompt appends: the assistant header
    default_system: str | None  # the system text the template inserts when none is given

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        if self.default_system is not None and messages and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": self.default_system}, *messages]
        body = "".join(
            self.prefix[m["role"]] + m["content"] + self.suffix[m["role"]] for m in messages
        )
        return self.start + body + (self.generation if add_generation_prompt else "")


def _render(tokenizer: Any, pairs: list[tuple[str, str]], gen: bool = False) -> str:
    messages = [{"role": r, "content": c} for r, c in pairs]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)


def _after(text: str, head: str, what: str) -> str:
    if not text.startswith(head):
        raise ValueError(f"the template does not extend the conversation before {what}")
    return text[len(head) :]


def _parts(text: str, marker: str) -> tuple[str, str]:
    head, sep, tail = text.partition(marker)
    if not sep or marker in tail:
        raise ValueError("the template does not copy message contents verbatim")
    return head, tail


def _probe(tokenizer: Any, start: str) -> TurnFormat:
    """The pieces, assuming the template opens with `start` once (nothing, or the bos text)."""
    head_u, suf_user = _parts(_render(tokenizer, [("user", _U1)]), _U1)
    ua = _after(_render(tokenizer, [("user", _U1), ("assistant", _A1)]), head_u + _U1, "a reply")
    mid_ua, suf_asst = _parts(ua, _A1)
    pre_asst = _after(mid_ua, suf_user, "the assistant turn")
    uau = [("user", _U1), ("assistant", _A1), ("user", _U2)]
    mid_au, _ = _parts(_render(tokenizer, uau).split(_A1, 1)[1], _U2)
    pre_user = _after(mid_au, suf_asst, "the second user turn")
    generation = _after(_render(tokenizer, [("user", _U1)], gen=True), head_u + _U1 + suf_user, "")
    if not head_u.endswith(pre_user):
        raise ValueError("the first user turn is introduced differently from later ones")
    rest = _after(head_u[: len(head_u) - len(pre_user)], start, "the first turn")
    head_s, tail_s = _parts(_render(tokenizer, [("system", _S), ("user", _U1)]), _S)
    pre_sys = _after(head_s, start, "the system turn")
    suf_sys = _parts(tail_s, _U1)[0][: -len(pre_user) or None]
    default = None
    if rest:  # the template inserts a system turn when none is given
        default = _after(rest, pre_sys, "the default system text")
        if not default.endswith(suf_sys):
            raise ValueError("the default system turn is closed differently")
        default = default[: len(default) - len(suf_sys)]
    return TurnFormat(
        start=start,
        prefix={"system": pre_sys, "user": pre_user, "assistant": pre_asst},
        suffix={"system": suf_sys, "user": suf_user, "assistant": suf_asst},
        generation=generation,
        default_system=default,
    )


def _reproduces(fmt: TurnFormat, tokenizer: Any) -> bool:
    for pairs in _CHECKS:
        messages = [{"role": r, "content": c} for r, c in pairs]
        for gen in (False, True):
            if fmt.render(messages, gen) != _render(tokenizer, pairs, gen):
                return False
    return True


def turn_format(tokenizer: Any) -> TurnFormat:
    """The template in pieces, checked by re-rendering sample conversations both ways.

    The template may open with nothing or with the bos text once; the first that reproduces
    every sample conversation wins.
    """
    bos = getattr(tokenizer, "bos_token", None) or ""
    problem = "no split reproduces its sample conversations"
    for start in dict.fromkeys(["", bos]):
        try:
            fmt = _probe(tokenizer, start)
        except Exception as err:  # jinja errors (e.g. raise_exception on a role) and our own
            problem = str(err)
            continue
        if _reproduces(fmt, tokenizer):
            return fmt
    raise ExportError(f"the chat template cannot be split into per-role turns: {problem}")


def special_ids(tokenizer: Any) -> set[int]:
    """Every special token id: the named ones and added tokens marked special."""
    ids = set(tokenizer.all_special_ids)
    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    ids.update(i for i, token in decoder.items() if getattr(token, "special", False))
    return ids


def end_of_turn_id(tokenizer: Any) -> int | None:
    """The special token that ends an assistant turn in the template (what training taught the
    model to emit), or None when the turn ends in plain text only."""
    reply = _render(tokenizer, [("user", "Hi"), ("assistant", _A1)])
    tail = reply.split(_A1, 1)[1]
    special = special_ids(tokenizer)
    for token_id in tokenizer(tail, add_special_tokens=False)["input_ids"]:
        if token_id in special:
            return int(token_id)
    return None


def stop_ids(tokenizer: Any) -> list[int]:
    """Token ids that end generation: the template's end-of-turn token, then eos (deduplicated)."""
    ids = [end_of_turn_id(tokenizer), tokenizer.eos_token_id]
    return list(dict.fromkeys(int(i) for i in ids if i is not None))
