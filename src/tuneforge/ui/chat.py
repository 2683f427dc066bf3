"""The page's chat server: one `tuneforge serve TARGET` subprocess on 127.0.0.1, started on demand.

Which targets exist, the fresh API key (known to this process only), start / reuse / stop and the
wait for `/health`. The HTTP proxying to it is pages_chat.py's; serving itself is `tuneforge serve`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from tuneforge.constants import FEEDBACK_STORE_FILE
from tuneforge.errors import UnsafePathError
from tuneforge.paths import write_json_atomic
from tuneforge.serve.auth import HASH_PREFIX, hash_key, new_key
from tuneforge.ui.jobs import _same_tuneforge, process_start
from tuneforge.ui.workspace import Workspace, _inside

SERVE_ARGV = (sys.executable, "-m", "tuneforge.cli", "serve")
HEALTH_TIMEOUT_S = 300.0  # loading a model on a busy 2-core machine can take a minute or more
STOP_GRACE_S = 20.0
STORE_NAME = FEEDBACK_STORE_FILE  # what `tuneforge serve` uses beside the target without --db


class ChatUnavailable(Exception):
    """The chat server could not be started or reached (the page shows the message, 502)."""


def chat_targets(ws: Workspace) -> list[str]:
    """What can be chatted with: finished runs, their merged / NF4 export dirs and GGUF files."""
    out = []
    for rel in ws.run_dirs():
        run = ws.root / rel
        if not (run / "summary.json").is_file():
            continue
        out.append(rel)
        for export in sorted(run.glob("export-*")):
            if not export.is_dir() or not _inside(ws.root, export):
                continue
            if (export / "config.json").is_file():
                out.append(ws.rel(export))
            for gguf in sorted(export.glob("*.gguf")):
                if not gguf.name.endswith("lora-adapter.gguf") and _inside(ws.root, gguf):
                    out.append(ws.rel(gguf))
    return out


def check_target(ws: Workspace, name: str) -> str:
    """`name` when it is one of the workspace's chat targets; UnsafePathError otherwise."""
    path = ws.resolve(name)  # refuses `..`, absolute paths, symlinks out, the page's own state
    rel = ws.rel(path)
    if rel not in chat_targets(ws):
        raise UnsafePathError(f"{name!r}: not a finished run or an export of this workspace")
    return rel


def store_path(ws: Workspace, target: str) -> Path:
    """The target's feedback store, where `tuneforge serve TARGET` keeps it by default."""
    path = ws.root / target
    return (path if path.is_dir() else path.parent) / "serve" / STORE_NAME


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_key_file(path: Path, key: str) -> None:
    """The key's sha256 (never the key itself) in a fresh 0600 file, replaced atomically."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(f"# written by tuneforge ui for its chat server\n{HASH_PREFIX}{hash_key(key)}\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


@dataclass
class Served:
    """The running server: its target, address, key and model name (the key stays here)."""

    target: str
    port: int
    key: str
    proc: subprocess.Popen
    model: str = ""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


class ChatServer:
    """At most one `tuneforge serve` at a time: reused while its target stays the same."""

    def __init__(self, ws: Workspace, serve_argv: tuple[str, ...] | list[str] = SERVE_ARGV):
        self.ws, self.serve_argv = ws, list(serve_argv)
        self.keys_file = ws.state / "serve.keys"
        self.state_file = ws.state / "serve.json"
        self.log_file = ws.state / "logs" / "serve.log"
        self.current: Served | None = None
        self.starting: str | None = None
        self._lock: asyncio.Lock | None = None

    def status(self) -> dict[str, object]:
        """What the page may know: target, model, state; never the key or the port's secret."""
        if self.starting:
            return {"state": "starting", "target": self.starting, "model": ""}
        if self.current is not None and self.current.proc.poll() is None:
            return {"state": "ready", "target": self.current.target, "model": self.current.model}
        return {"state": "stopped", "target": "", "model": ""}

    async def ensure(self, target: str) -> Served:
        """The server for `target`: the running one when it serves it, else a fresh one."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            cur = self.current
            if cur is not None and cur.target == target and cur.proc.poll() is None:
                return cur
            await self.stop()
            self.starting = target
            try:
                self.current = await self._start(target)
            finally:
                self.starting = None
            return self.current

    async def _start(self, target: str) -> Served:
        key, port = new_key(), free_port()
        write_key_file(self.keys_file, key)
        db = f"sqlite:///{store_path(self.ws, target)}"
        store_path(self.ws, target).parent.mkdir(parents=True, exist_ok=True)
        argv = [*self.serve_argv, str(self.ws.root / target), "--host", "127.0.0.1"]
        argv += ["--port", str(port), "--api-key-file", str(self.keys_file), "--db", db]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": _same_tuneforge()}
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with self.log_file.open("wb") as log:
            log.write(f"$ tuneforge serve {target} --port {port}\n".encode())
            log.flush()
            proc = subprocess.Popen(
                argv,
                cwd=self.ws.root,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        served = Served(target, port, key, proc)
        pid = {"pid": proc.pid, "pid_start": process_start(proc.pid), "target": target}
        write_json_atomic(self.state_file, {**pid, "port": port})
        try:
            await self._wait_ready(served)
        except BaseException:
            await _terminate(proc)
            self.keys_file.unlink(missing_ok=True)
            self.state_file.unlink(missing_ok=True)
            raise
        return served

    async def _wait_ready(self, served: Served) -> None:
        deadline = time.monotonic() + HEALTH_TIMEOUT_S
        async with httpx.AsyncClient(timeout=5.0) as client:
            while time.monotonic() < deadline:
                if served.proc.poll() is not None:
                    raise ChatUnavailable(
                        f"tuneforge serve {served.target} exited with {served.proc.returncode}: "
                        f"{self.log_tail(1).strip()}"
                    )
                with contextlib.suppress(httpx.TransportError):
                    if (await client.get(served.url + "/health")).status_code == 200:
                        models = await client.get(served.url + "/v1/models", headers=served.auth)
                        served.model = models.json()["data"][0]["id"]
                        return
                await asyncio.sleep(0.25)
        raise ChatUnavailable(f"tuneforge serve {served.target}: not up after {HEALTH_TIMEOUT_S}s")

    async def stop(self) -> None:
        """SIGTERM (serve lets requests in flight finish), SIGKILL after STOP_GRACE_S."""
        served, self.current = self.current, None
        if served is not None:
            await _terminate(served.proc)
        self.keys_file.unlink(missing_ok=True)
        self.state_file.unlink(missing_ok=True)

    def reap_stale(self) -> None:
        """A server left by a page that was killed hard (pid and start time match): end it."""
        try:
            old = json.loads(self.state_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return
        pid, start = old.get("pid"), old.get("pid_start")
        if isinstance(pid, int) and start is not None and process_start(pid) == start:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        self.state_file.unlink(missing_ok=True)
        self.keys_file.unlink(missing_ok=True)

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_file.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


async def _terminate(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            await asyncio.to_thread(proc.wait, STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            await asyncio.to_thread(proc.wait)
