"""Write an Ollama Modelfile beside a GGUF file: FROM, TEMPLATE (Go), SYSTEM, stop tokens, parameters.

The chat template arrives already split into turns (chatformat.py); running Ollama is left to the
user (`ollama create NAME -f Modelfile`).
"""

from __future__ import annotations

from collections.abc import Mapping

from tuneforge.export.chatformat import TurnFormat

ROLES = ("system", "user", "assistant")
#: generation_config.json field -> Ollama PARAMETER name.
_PARAMETERS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "repetition_penalty": "repeat_penalty",
}


def _go_literal(text: str) -> str:
    """Template text as Go's text/template prints it: only `{{` would start an action."""
    return text.replace("{{", '{{ "{{" }}')


def go_template(fmt: TurnFormat, drop_start: bool = False) -> str:
    """The turn format as an Ollama TEMPLATE over `.Messages`.

    `drop_start`: leave out the template's opening text when it is the bos token that the
    runtime adds itself (Ollama tokenises with the GGUF's add_bos_token).
    """
    branches = "".join(
        f'{{{{ {"if" if i == 0 else "else if"} eq .Role "{role}" }}}}'
        f"{_go_literal(fmt.prefix[role])}{{{{ .Content }}}}{_go_literal(fmt.suffix[role])}"
        for i, role in enumerate(ROLES)
    )
    start = "" if drop_start else _go_literal(fmt.start)
    return (
        f"{start}{{{{ range .Messages }}}}{branches}{{{{ end }}}}{{{{ end }}}}"
        f"{_go_literal(fmt.generation)}"
    )


def _quote(text: str) -> str:
    """A Modelfile string: triple quotes hold newlines; the text must not contain them itself."""
    if '"""' in text:
        raise ValueError('text with """ cannot be written into a Modelfile')
    return f'"""{text}"""'


def render_modelfile(
    gguf_name: str,
    fmt: TurnFormat | None,
    stop_tokens: list[str],
    *,
    generation: Mapping[str, object] | None = None,
    num_ctx: int | None = None,
    drop_start: bool = False,
    adapter_name: str | None = None,
) -> str:
    """Modelfile text. Without a turn format the GGUF's own chat template is left to Ollama."""
    lines = [f"FROM ./{gguf_name}"]
    if adapter_name:
        lines.append(f"ADAPTER ./{adapter_name}")
    if fmt is not None:
        lines.append(f"TEMPLATE {_quote(go_template(fmt, drop_start))}")
        if fmt.default_system is not None:
            lines.append(f"SYSTEM {_quote(fmt.default_system)}")
    for token in stop_tokens:
        lines.append(f"PARAMETER stop {_quote(token)}")
    for key, name in _PARAMETERS.items():
        value = (generation or {}).get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            lines.append(f"PARAMETER {name} {value}")
    if num_ctx:
        lines.append(f"PARAMETER num_ctx {num_ctx}")
    return "\n".join(lines) + "\n"
