"""Run an app under uvicorn on one host:port with a graceful SIGTERM: stop accepting, let the
requests in flight finish (bounded by `grace_s`), stop the engines, return 0.

Building the app is app.py's; reading the command line is cli/serve.py's.
"""

from __future__ import annotations

import signal

import uvicorn
from fastapi import FastAPI

from tuneforge.errors import ServeError

HANDLED = (signal.SIGTERM, signal.SIGINT)


def run_server(
    app: FastAPI,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    grace_s: float = 30.0,
    log_level: str = "info",
) -> int:
    """Serve until SIGTERM / SIGINT; 0 after a clean shutdown."""
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        lifespan="on",
        log_level=log_level,
        timeout_graceful_shutdown=int(max(1, grace_s)),
        server_header=False,
    )
    server = uvicorn.Server(config)
    # uvicorn re-raises the signal it shut down for once it is done; with these handlers in
    # place that second delivery is a no-op, so a SIGTERM ends in a clean exit 0.
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in HANDLED}
    try:
        server.run()
    except SystemExit as e:  # uvicorn exits 1 when it cannot bind
        raise ServeError(
            f"--host/--port: cannot listen on {host}:{port} (in use, or not an address here)"
        ) from e
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if not server.started:
        raise ServeError(f"--host/--port: the server did not start on {host}:{port}")
    return 0
