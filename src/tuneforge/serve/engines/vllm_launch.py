"""What vLLM is asked to serve (a merged / HF dir, or a base plus plain-LoRA adapter runs), the
command line of the child vLLM server, and the child process itself: started, health-waited, stopped.

No HTTP to clients here, and no generation: the engine that talks to vLLM is vllm.py's.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tuneforge.errors import ServeError

log = logging.getLogger(__name__)
BASE_NAME = "tuneforge-base"  # vLLM's name for the base when every served name is an adapter
LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # the --max-lora-rank values vLLM accepts
VLLM_DTYPES = {"auto": "auto", "bf16": "bfloat16", "fp32": "float32"}
MERGE_HINT = "export it with `tuneforge export RUN_DIR --format merged` and serve the export"
INSTALL_HINT = (
    "--engine vllm: the vllm package is not installed here: pip install 'tuneforge[vllm]' "
    "(on a machine with a CUDA GPU), or pass --upstream URL of a vLLM server already running"
)


@dataclass(frozen=True)
class ServedName:
    """One name in /v1/models: the name vLLM knows it by and the tokenizer its prompts use."""

    name: str
    upstream: str  # the `model` sent to vLLM: the served base, or a LoRA module's name
    tokenizer_dir: Path
    source: Path  # the run or model dir it came from
    adapter_dir: Path | None = None  # a LoRA adapter vLLM attaches (None: the model's own weights)
    rank: int = 0


@dataclass(frozen=True)
class VllmInputs:
    model_dir: Path  # what vLLM loads (`--model`)
    served: tuple[ServedName, ...]  # the main name first
    trust_remote_code: bool = False

    @property
    def base_name(self) -> str:
        """`--served-model-name`: the main name, unless the main name is itself an adapter."""
        main = self.served[0]
        return main.upstream if main.adapter_dir is None else BASE_NAME

    @property
    def loras(self) -> list[ServedName]:
        return [s for s in self.served if s.adapter_dir is not None]


def lora_rank(run_dir: Path, label: str) -> int:
    """The rank of a run's adapter, or a ServeError when vLLM cannot attach it (not plain LoRA)."""
    config = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    kind = config.get("peft_type")
    if config.get("use_dora"):
        kind = "DoRA"
    elif config.get("modules_to_save"):
        kind = "LoRA with fully trained modules (modules_to_save)"
    elif config.get("alora_invocation_tokens"):
        kind = "activated LoRA"
    if kind != "LORA":
        raise ServeError(
            f"{label}: the adapter of {run_dir} is {kind}; vLLM attaches plain LoRA adapters "
            f"only: {MERGE_HINT}"
        )
    ranks = [
        int(config.get("r") or 0),
        *(int(r) for r in (config.get("rank_pattern") or {}).values()),
    ]
    return max(ranks)


def _trust(run_dir: Path) -> bool:
    from tuneforge.train.rundir import read_run

    return bool(read_run(run_dir)[0].get("model", {}).get("trust_remote_code", False))


def vllm_inputs(ref: str, adapters: Sequence[tuple[str, str]], name: str) -> VllmInputs:
    """Check that vLLM can serve `ref` (+ adapters) and say how; a ServeError naming what to do."""
    from tuneforge.loading import is_run_dir, run_base_dir
    from tuneforge.models import resolve_model_dir, weights_fingerprint
    from tuneforge.serve.engines.hf import check_adapter_run
    from tuneforge.serve.engines.llamacpp import find_gguf
    from tuneforge.train.rundir import read_run

    if find_gguf(ref) is not None:
        raise ServeError(
            f"--engine vllm: {ref} is a GGUF file; vLLM serves Hugging Face weights: "
            "export the run with `tuneforge export RUN_DIR --format merged` and serve that directory"
        )
    run = Path(ref)
    trust = is_run_dir(run) and _trust(run)
    if is_run_dir(run) and (run / "model" / "config.json").is_file():  # a full fine-tune
        model_dir, main = run / "model", ServedName(name, name, run / "tokenizer", run)
    elif is_run_dir(run):
        adapter_dir, _ = check_adapter_run(run, f"--engine vllm: {ref}")
        rank = lora_rank(run, f"--engine vllm: {ref}")
        model_dir = run_base_dir(run)
        main = ServedName(name, name, run / "tokenizer", run, adapter_dir, rank)
    else:
        model_dir = resolve_model_dir(ref)
        main = ServedName(name, name, model_dir, Path(ref) if run.exists() else model_dir)
    served = [main]
    fingerprint = None
    for adapter_name, path in adapters:
        label = f"--adapter {adapter_name}={path}"
        adapter_dir, manifest = check_adapter_run(Path(path), label)
        rank = lora_rank(Path(path), label)
        fingerprint = fingerprint or weights_fingerprint(model_dir)
        if manifest["base_model"].get("fingerprint") != fingerprint:
            raise ServeError(
                f"{label}: trained on {manifest['base_model'].get('name')}, whose weights differ "
                f"from the served base {model_dir}; serve it on its own"
            )
        trust = trust or bool(read_run(Path(path))[0].get("model", {}).get("trust_remote_code"))
        tok = Path(path) / "tokenizer"
        served.append(ServedName(adapter_name, adapter_name, tok, Path(path), adapter_dir, rank))
    return VllmInputs(Path(model_dir), tuple(served), trust)


def child_command(
    inputs: VllmInputs,
    *,
    port: int,
    max_num_seqs: int,
    dtype: str = "auto",
    extra_args: Sequence[str] = (),
    python: str = sys.executable,
) -> list[str]:
    """The command line of vLLM's OpenAI server for `inputs`, on 127.0.0.1:`port`."""
    cmd = [python, "-m", "vllm.entrypoints.openai.api_server"]
    cmd += ["--model", str(inputs.model_dir), "--tokenizer", str(inputs.served[0].tokenizer_dir)]
    cmd += ["--served-model-name", inputs.base_name, "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--dtype", VLLM_DTYPES[dtype], "--max-num-seqs", str(max_num_seqs)]
    loras = inputs.loras
    if loras:
        rank = max(s.rank for s in loras)
        slot = next((r for r in LORA_RANKS if r >= rank), None)
        if slot is None:
            raise ServeError(
                f"--engine vllm: LoRA rank {rank} is above vLLM's largest ({LORA_RANKS[-1]})"
            )
        cmd += ["--enable-lora", "--max-loras", str(len(loras)), "--max-lora-rank", str(slot)]
        cmd += ["--lora-modules", *(f"{s.upstream}={s.adapter_dir}" for s in loras)]
    if inputs.trust_remote_code:
        cmd.append("--trust-remote-code")
    return cmd + list(extra_args)


def require_vllm() -> None:
    if importlib.util.find_spec("vllm") is None:
        raise ServeError(INSTALL_HINT)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


#: Runs first in the child, then becomes vLLM (exec): Linux sends it SIGTERM when tuneforge dies,
#: even by SIGKILL, and it exits at once if tuneforge is already gone. A shell-free stand-in for
#: preexec_fn, which is unsafe once threads run. argv: tuneforge's pid, then vLLM's command.
_PARENT_DEATH = (
    "import ctypes, os, signal, sys\n"
    "ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    sys.exit(1)\n"
    "os.execvp(sys.argv[2], sys.argv[2:])\n"
)


def dies_with_parent(command: list[str]) -> list[str]:
    """`command` wrapped so that its process ends when this one does (Linux; elsewhere as is).

    The signal follows the thread that starts the child: start it from one that lives as long
    as the server (the command's main thread)."""
    if not sys.platform.startswith("linux"):
        return list(command)
    return [sys.executable, "-c", _PARENT_DEATH, str(os.getpid()), *command]


class VllmChild:
    """vLLM's OpenAI server as a child process in its own process group; its output is kept (the
    last lines, for error messages) and passed to the log at debug level. It gets SIGTERM when
    tuneforge dies, however it dies (`dies_with_parent`)."""

    TAIL_LINES = 25

    def __init__(self, command: list[str], env: dict[str, str]) -> None:
        self.command = command
        self.tail: deque[str] = deque(maxlen=self.TAIL_LINES)
        self.proc = subprocess.Popen(
            dies_with_parent(command),
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            start_new_session=True,  # its own process group: stop() reaches its workers too
        )
        self._reader = threading.Thread(target=self._read, name="tuneforge-vllm-log", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            line = line.rstrip()
            self.tail.append(line)
            log.debug("vllm: %s", line)

    def last_lines(self) -> str:
        if self.proc.poll() is not None:  # it has ended: let the reader catch its last words
            self._reader.join(timeout=2.0)
        return "\n".join(f"  {line}" for line in self.tail) or "  (it printed nothing)"

    def wait_healthy(self, url: str, timeout_s: float) -> None:
        """Return once GET url/health answers 200; a ServeError (child stopped) otherwise."""
        import httpx

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            code = self.proc.poll()
            if code is not None:
                raise ServeError(
                    f"--engine vllm: vLLM exited with code {code} before it was ready; its last "
                    f"lines:\n{self.last_lines()}"
                )
            try:
                if httpx.get(url + "/health", timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise ServeError(
            f"--engine vllm: vLLM did not answer {url}/health within {timeout_s:g} s (a larger "
            f"model may need a longer --vllm-start-timeout); its last lines:\n{self.last_lines()}"
        )

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM to its process group, then SIGKILL after `timeout_s`."""
        if self.proc.poll() is not None:
            return
        for sig, wait_s in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.proc.wait(timeout=wait_s)
                return
            except subprocess.TimeoutExpired:
                log.warning("vLLM did not stop within %g s of %s", wait_s, sig.name)


def start_child(
    command: list[str], url: str, api_key: str, *, device: str, timeout_s: float
) -> VllmChild:
    """Start vLLM (its key in VLLM_API_KEY, not on the command line) and wait until it is ready."""
    env = {**os.environ, "VLLM_API_KEY": api_key}
    if device.startswith("cuda:"):
        env["CUDA_VISIBLE_DEVICES"] = device.split(":", 1)[1]
    log.info("starting vLLM: %s", " ".join(command))
    child = VllmChild(command, env)
    try:
        child.wait_healthy(url, timeout_s)
    except BaseException:
        child.stop()
        raise
    return child
