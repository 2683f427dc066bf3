"""`tuneforge train --nproc N`: start N local processes through torch's elastic launcher (what
`torchrun --standalone` runs) and say in one line which rank failed and how.

Multi-node jobs start torchrun (or accelerate launch) on every node themselves: docs/scaling.md.
When one rank dies the launcher stops the others (SIGTERM, then SIGKILL after a grace period).
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import sys
import uuid

from tuneforge.errors import UsageError

#: Seconds between the launcher's checks on its workers (a dead rank is noticed this fast).
MONITOR_INTERVAL_S = 0.5


def check_port_free(port: int, host: str = "127.0.0.1") -> None:
    """UsageError when `port` cannot be bound on `host` (another job holds it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError as err:
            why = "is in use" if err.errno == errno.EADDRINUSE else f"cannot be used ({err})"
            raise UsageError(
                f"--port {port}: the port {why} on {host}; pick another or leave --port out "
                "(a free one is chosen)"
            ) from None


def exit_code_of(exitcode: int) -> int:
    """A worker's exit code as a shell reports it: 128 + signal for a killed one."""
    return 128 - exitcode if exitcode < 0 else exitcode


def describe_failure(rank: int, exitcode: int, pid: int | None) -> str:
    """`rank 1 (pid 123) was killed by SIGKILL` / `rank 0 (pid 9) exited with code 2`."""
    who = f"rank {rank}" + (f" (pid {pid})" if pid else "")
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        return f"{who} was killed by {name}"
    return f"{who} exited with code {exitcode}"


def launch_local(cli_args: list[str], nproc: int, port: int | None = None) -> int:
    """Run `python -m tuneforge.cli CLI_ARGS` on `nproc` processes of this machine; the exit code
    of the first rank that failed (128 + signal when killed), 0 when every rank finished."""
    if nproc < 1:
        raise UsageError(f"--nproc {nproc}: must be at least 1")
    if "WORLD_SIZE" in os.environ:
        raise UsageError("--nproc: this process already runs under a launcher (WORLD_SIZE is set)")
    if port is not None:
        check_port_free(port)
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=str(uuid.uuid4()),
        rdzv_backend="c10d",
        rdzv_endpoint=f"127.0.0.1:{port or 0}",
        rdzv_configs={"is_host": True},
        max_restarts=0,
        monitor_interval=MONITOR_INTERVAL_S,
        start_method="spawn",
        local_addr="127.0.0.1",
    )
    try:
        elastic_launch(config, sys.executable)("-u", "-m", "tuneforge.cli", *cli_args)
    except ChildFailedError as err:
        rank, failure = err.get_first_failure()
        code = exit_code_of(failure.exitcode)
        print(
            f"error: {describe_failure(rank, failure.exitcode, failure.pid)}; the other ranks "
            f"were stopped (exit {code})",
            file=sys.stderr,
        )
        return code
    except SignalException as err:  # Ctrl-C / SIGTERM to the launcher: the workers got it too
        return 128 + int(err.sigval)
    return 0
