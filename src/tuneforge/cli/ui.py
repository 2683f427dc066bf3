"""`tuneforge ui`: serve the web page for one workspace on 127.0.0.1 with a fresh access token.

Argument checks and printing only; the page is `tuneforge.ui.app`.
"""

from __future__ import annotations

import argparse
import socket
import sys

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "ui", help="the web page: configs, data check, runs with live curves, compare, export"
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument(
        "--workspace",
        default=".",
        help="the directory the page may read and write: data, configs, runs (default: .)",
    )
    p.add_argument(
        "--max-running", type=int, default=1, help="jobs that run at once (default 1: a queue)"
    )
    p.set_defaults(func=cmd_ui)


def _check_port(host: str, port: int) -> None:
    from tuneforge.errors import UsageError

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as err:
            raise UsageError(
                f"--host {host} --port {port}: cannot listen there ({err.strerror})"
            ) from None


def cmd_ui(args: argparse.Namespace) -> int:
    from tuneforge.errors import UsageError

    if args.max_running < 1:
        raise UsageError(f"--max-running {args.max_running}: must be at least 1")
    if not 1 <= args.port <= 65535:
        raise UsageError(f"--port {args.port}: must be between 1 and 65535")
    import uvicorn

    from tuneforge.ui.app import create_app
    from tuneforge.ui.security import new_token

    _check_port(args.host, args.port)  # before the workspace gets its state folder and lock
    token = new_token()
    app = create_app(args.workspace, token, max_running=args.max_running)  # checks the workspace
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"tuneforge ui: workspace {app.state.ws.root}", flush=True)
    print(f"open http://{host}:{args.port}/?token={token}", flush=True)
    if args.host not in LOOPBACK:
        print(
            f"warning: listening on {args.host}, not only this machine; the token is the only lock",
            file=sys.stderr,
        )
    try:
        uvicorn.run(
            app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=2
        )
    finally:
        app.state.queue.close()
    return 0
