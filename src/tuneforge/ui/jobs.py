"""The job queue: training and export runs as `python -m tuneforge.cli ...` subprocesses.

State lives in WORKSPACE/.tuneforge-ui/queue.json (atomic writes), so jobs survive a page reload
or a restart of the page's process: a running job is recognised by its pid and the pid's start
time, and its exit code is read from the file `worker.py` leaves. What the job does is the CLI's.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tuneforge.errors import UsageError
from tuneforge.heap import preload_env, tcmalloc_library
from tuneforge.paths import write_json_atomic
from tuneforge.ui.workspace import Workspace

ACTIVE = ("queued", "running")
INTERRUPTED_RCS = {130, 143, -2, -15}  # SIGINT / SIGTERM: the trainer saved a checkpoint
TICK_S = 1.0  # how often running jobs are looked at (a few stat calls; no busy loop)


@dataclass
class Job:
    id: str
    kind: str  # train | export
    run: str  # the run directory, relative to the workspace
    argv: list[str]  # arguments of `python -m tuneforge.cli`
    state: str = "queued"  # queued | running | finished | failed | cancelled | lost
    created: float = field(default_factory=time.time)
    started: float | None = None
    ended: float | None = None
    pid: int | None = None
    pid_start: str | None = None
    rc: int | None = None
    cancel_requested: bool = False

    @property
    def active(self) -> bool:
        return self.state in ACTIVE


def process_start(pid: int) -> str | None:
    """The kernel's start time of `pid` (tells a live job from a reused pid), or None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return None if fields[0] == "Z" else fields[19]  # field 22 of the whole line


class JobQueue:
    """Starts queued jobs, at most `max_running` at once, and follows them to their end."""

    def __init__(self, ws: Workspace, max_running: int = 1) -> None:
        self.ws, self.max_running = ws, max_running
        self.file = ws.state / "queue.json"
        self.logs = ws.state / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._procs: dict[str, subprocess.Popen] = {}
        self._wake: asyncio.Event | None = None
        self._lockfile = _exclusive(ws.state / "lock")
        self.jobs: list[Job] = self._load()

    def _load(self) -> list[Job]:
        if not self.file.is_file():
            return []
        try:
            rows = json.loads(self.file.read_text(encoding="utf-8"))
            return [Job(**row) for row in rows]
        except (ValueError, TypeError) as err:
            raise UsageError(
                f"{self.file}: unreadable queue ({err}); move it away to start afresh"
            ) from None

    def _save(self) -> None:
        write_json_atomic(self.file, [asdict(job) for job in self.jobs])

    def close(self) -> None:
        self._lockfile.close()

    # -- what the pages ask --------------------------------------------------------------
    def latest(self, run: str, kind: str | None = None) -> Job | None:
        for job in reversed(self.jobs):
            if job.run == run and (kind is None or job.kind == kind):
                return job
        return None

    def get(self, job_id: str) -> Job | None:
        return next((job for job in self.jobs if job.id == job_id), None)

    def log_path(self, job: Job) -> Path:
        return self.logs / f"{job.id}.log"

    def log_tail(self, job: Job, nbytes: int = 4000) -> str:
        path = self.log_path(job)
        if not path.is_file():
            return ""
        with path.open("rb") as fh:
            fh.seek(max(0, path.stat().st_size - nbytes))
            return fh.read().decode("utf-8", "replace")

    # -- what the pages change -----------------------------------------------------------
    def submit(self, kind: str, run: str, argv: list[str]) -> Job:
        with self._lock:
            busy = next((j for j in self.jobs if j.run == run and j.active), None)
            if busy is not None:
                raise UsageError(f"{run}: a {busy.kind} job for this run is already {busy.state}")
            job = Job(id=uuid.uuid4().hex[:12], kind=kind, run=run, argv=list(argv))
            self.jobs.append(job)
            self._save()
        self.wake()
        return job

    def cancel(self, job: Job) -> None:
        """A queued job is dropped; a running one gets SIGTERM (the trainer checkpoints, exits)."""
        with self._lock:
            if job.state == "queued":
                job.state, job.ended = "cancelled", time.time()
            elif job.state == "running" and self._alive(job):
                job.cancel_requested = True
                os.kill(job.pid, signal.SIGTERM)
            self._save()
        self.wake()

    # -- the supervisor ------------------------------------------------------------------
    def tick(self) -> None:
        with self._lock:
            changed = False
            for job in self.jobs:
                if job.state == "running":
                    changed |= self._follow(job)
            running = sum(job.state == "running" for job in self.jobs)
            for job in self.jobs:
                if job.state == "queued" and running < self.max_running:
                    self._start(job)
                    running, changed = running + 1, True
            if changed:
                self._save()

    def wake(self) -> None:
        if self._wake is not None:
            self._wake.set()

    async def supervise(self) -> None:
        """Follow jobs until cancelled: a tick each second, or at once when a page wakes it."""
        self._wake = asyncio.Event()
        while True:
            await asyncio.to_thread(self.tick)
            try:
                await asyncio.wait_for(self._wake.wait(), TICK_S)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()

    def _start(self, job: Job) -> None:
        rc_file = self.logs / f"{job.id}.rc.json"
        command = [sys.executable, "-m", "tuneforge.cli", *job.argv]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": _same_tuneforge()}
        env = preload_env(job.argv, env, tcmalloc_library()) or env  # as `tuneforge train` runs
        with self.log_path(job).open("ab") as log:
            log.write(f"$ tuneforge {' '.join(job.argv)}\n".encode())
            log.flush()
            proc = subprocess.Popen(
                [sys.executable, "-m", "tuneforge.ui.worker", str(rc_file), "--", *command],
                cwd=self.ws.root,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # outlives the page; Ctrl-C on the page does not reach it
            )
        self._procs[job.id] = proc
        job.state, job.started, job.pid = "running", time.time(), proc.pid
        job.pid_start = process_start(proc.pid)

    def _alive(self, job: Job) -> bool:
        proc = self._procs.get(job.id)
        if proc is not None and proc.poll() is not None:  # our own child: reap it
            return False
        return job.pid is not None and process_start(job.pid) == job.pid_start

    def _follow(self, job: Job) -> bool:
        if self._alive(job):
            return False
        self._procs.pop(job.id, None)
        rc_file = self.logs / f"{job.id}.rc.json"
        try:
            ended = json.loads(rc_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            job.state, job.ended = "lost", time.time()  # killed hard: no exit code was written
            return True
        job.rc, job.ended = int(ended["rc"]), float(ended["ended"])
        if job.rc == 0:
            job.state = "finished"
        elif job.cancel_requested or job.rc in INTERRUPTED_RCS:
            job.state = "cancelled"
        else:
            job.state = "failed"
        return True


def _same_tuneforge() -> str:
    """PYTHONPATH for a job: the tuneforge this page runs comes first (jobs run in the workspace,
    where a relative PYTHONPATH would point elsewhere)."""
    import tuneforge

    ours = str(Path(tuneforge.__file__).resolve().parent.parent)
    rest = [os.path.abspath(p) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return os.pathsep.join(dict.fromkeys([ours, *rest]))


def _exclusive(path: Path) -> Any:
    """Hold a lock on the workspace so that two pages never drive one queue."""
    fh = path.open("a")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.close()
        raise UsageError(
            f"--workspace {path.parent.parent}: another `tuneforge ui` is serving it"
        ) from None
    return fh
