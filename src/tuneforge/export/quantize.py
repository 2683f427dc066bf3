"""Quantise a GGUF file with llama.cpp's own quantiser (`llama_model_quantize` via llama-cpp-python).

Writing the 16-bit input is gguf_write.py's job; k-quants are never re-implemented here.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from tuneforge.errors import ExportError
from tuneforge.export.gguf_write import FLOAT_TYPES

#: Quant type names users give (--quant) -> llama.cpp's LLAMA_FTYPE_* constant name.
QUANT_TYPES = {
    "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
    "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K",
    "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "q4_k_s": "LLAMA_FTYPE_MOSTLY_Q4_K_S",
    "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
}
DEFAULT_QUANT = "q4_k_m"
GGUF_TYPES = (*FLOAT_TYPES, *QUANT_TYPES)


def parse_quant_list(text: str) -> list[str]:
    """`"q8_0, q4_k_m"` -> ["q8_0", "q4_k_m"]; ExportError naming an unknown type."""
    names = [n.strip().lower() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in GGUF_TYPES]
    if unknown or not names:
        raise ExportError(
            f"--quant: unknown type {', '.join(unknown) or '(none given)'}; "
            f"choose from {', '.join(GGUF_TYPES)}"
        )
    return list(dict.fromkeys(names))


def llama_cpp_module():
    """llama_cpp, or ExportError saying how to install it."""
    try:
        import llama_cpp
    except ImportError:
        raise ExportError(
            "GGUF quantisation and the llama.cpp re-check need llama-cpp-python: "
            "pip install llama-cpp-python (builds llama.cpp from source with cmake, ~7 min)"
        ) from None
    return llama_cpp


@contextlib.contextmanager
def native_output_captured() -> Iterator[list[str]]:
    """Send the C library's stdout/stderr (per-tensor lines) to a file; yields its last lines."""
    lines: list[str] = []
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with tempfile.TemporaryFile(mode="w+b") as sink:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            yield lines
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            sink.seek(0)
            lines.extend(sink.read().decode("utf-8", "replace").splitlines()[-5:])


def quantize_gguf(src: Path, dst: Path, quant: str, threads: int | None = None) -> Path:
    """Write `src` (an f16/bf16/f32 GGUF) quantised to `quant` at `dst`."""
    if quant not in QUANT_TYPES:
        raise ExportError(f"--quant: {quant!r} is not one of {', '.join(QUANT_TYPES)}")
    llama_cpp = llama_cpp_module()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, QUANT_TYPES[quant])
    params.nthread = threads or max(1, len(os.sched_getaffinity(0)))
    with native_output_captured() as tail:
        code = llama_cpp.llama_model_quantize(
            str(src).encode(), str(dst).encode(), llama_cpp.byref(params)
        )
    if code != 0 or not dst.is_file():
        raise ExportError(
            f"llama.cpp could not quantise {src.name} to {quant} (code {code}): {' / '.join(tail)}"
        )
    return dst
