"""`tuneforge serve`: an OpenAI-compatible HTTP server for a run dir, an export or a .gguf file.

Argument checks (before any model loads) and wiring only; the app, engines and server live in
`tuneforge.serve`, the feedback store (when installed) in `tuneforge.feedback`.
"""

from __future__ import annotations

import argparse
import importlib.util
import ipaddress
import logging
import re
import shlex
from pathlib import Path

from tuneforge.constants import FEEDBACK_STORE_FILE
from tuneforge.errors import UsageError

log = logging.getLogger("tuneforge")
ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a run or an export over an OpenAI-compatible HTTP API",
        description="OpenAI-compatible API (chat/completions, completions, models) with batching, "
        "API keys, limits, Prometheus metrics and request records. Binds 127.0.0.1 by default.",
    )
    p.add_argument("model", metavar="RUN_DIR|EXPORT_DIR|FILE.gguf", help="what to serve")
    p.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="NAME=RUN_DIR",
        help="another adapter run on the same base, served as model NAME (repeatable)",
    )
    p.add_argument("--name", help="the model name clients send (default: the dir or file name)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key-file", help="accepted keys, one per line (or sha256:<hex>)")
    p.add_argument("--max-batch", type=int, default=8, help="requests generated together")
    p.add_argument(
        "--max-batch-tokens",
        type=int,
        default=0,
        help="prompt + max_tokens reserved by one batch, summed over its rows (0: no limit)",
    )
    p.add_argument("--max-queue", type=int, default=64, help="waiting requests before 429")
    p.add_argument("--max-tokens-cap", type=int, default=2048, help="largest max_tokens allowed")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per request (then 503)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="larger bodies get 413")
    p.add_argument(
        "--engine",
        choices=("auto", "transformers", "llama.cpp", "vllm"),
        default="auto",
        help="auto: llama.cpp for .gguf, transformers otherwise; vllm: starts vLLM's OpenAI server "
        "on a merged export or HF dir (or a base + LoRA runs) and fronts it (pip install "
        "'tuneforge[vllm]', CUDA GPU), or fronts --upstream",
    )
    p.add_argument(
        "--upstream",
        metavar="URL",
        help="with --engine vllm: an OpenAI-compatible server already running (vLLM, or a load "
        "balancer before several) that gets the token ids; no vLLM is started here",
    )
    p.add_argument(
        "--upstream-key-file", metavar="FILE", help="the key --upstream wants (its first line)"
    )
    p.add_argument(
        "--vllm-args",
        default="",
        metavar="'ARGS'",
        help="more arguments for the vLLM started here, as one string: "
        "--vllm-args='--tensor-parallel-size 2 --gpu-memory-utilization 0.8'",
    )
    p.add_argument(
        "--vllm-start-timeout",
        type=float,
        default=600.0,
        metavar="SECONDS",
        help="how long the vLLM started here may take to answer /health (default: 600)",
    )
    p.add_argument("--dtype", choices=("auto", "bf16", "fp32"), default="auto")
    p.add_argument("--device", default="auto", help="auto (cuda when present), cpu or cuda[:N]")
    p.add_argument("--threads", type=int, help="CPU threads for llama.cpp / torch")
    p.add_argument("--records", help="JSONL file for request records (default: REF/serve/)")
    p.add_argument("--db", help="feedback database URL (needs the feedback package)")
    p.set_defaults(func=cmd_serve)


def _check_numbers(args: argparse.Namespace) -> None:
    checks = [
        ("--port", args.port, 1, 65535),
        ("--max-batch", args.max_batch, 1, 256),
        ("--max-batch-tokens", args.max_batch_tokens, 0, 1 << 24),
        ("--max-queue", args.max_queue, 1, 100_000),
        ("--max-tokens-cap", args.max_tokens_cap, 1, 1 << 20),
        ("--max-body-bytes", args.max_body_bytes, 1024, 1 << 30),
    ]
    if args.threads is not None:
        checks.append(("--threads", args.threads, 1, 1024))
    for flag, value, low, high in checks:
        if not low <= value <= high:
            raise UsageError(f"{flag}: {value} is not between {low} and {high}")
    if not args.timeout > 0:
        raise UsageError(f"--timeout: {args.timeout} must be a positive number of seconds")
    if not args.vllm_start_timeout > 0:
        raise UsageError(
            f"--vllm-start-timeout: {args.vllm_start_timeout} must be a positive number of seconds"
        )


def _check_vllm_flags(args: argparse.Namespace) -> tuple[str | None, list[str]]:
    """(the --upstream key, the --vllm-args list); UsageError for flags that do not fit together."""
    if args.engine != "vllm":
        for flag, value in (
            ("--upstream", args.upstream),
            ("--upstream-key-file", args.upstream_key_file),
            ("--vllm-args", args.vllm_args),
        ):
            if value:
                raise UsageError(f"{flag}: only with --engine vllm")
        return None, []
    if args.max_batch_tokens:
        raise UsageError(
            "--max-batch-tokens: vLLM schedules its own batches; pass "
            "--vllm-args='--max-num-batched-tokens N' instead"
        )
    if args.upstream_key_file and not args.upstream:
        raise UsageError(
            "--upstream-key-file: only with --upstream (a vLLM started here gets its own key)"
        )
    try:
        extra = shlex.split(args.vllm_args)
    except ValueError as e:
        raise UsageError(f"--vllm-args: {e}") from None
    if extra and args.upstream:
        raise UsageError(
            "--vllm-args: no vLLM is started with --upstream; give them to the upstream"
        )
    if args.upstream:
        from tuneforge.serve.engines.vllm_upstream import upstream_url

        upstream_url(args.upstream)
    key = _read_upstream_key(Path(args.upstream_key_file)) if args.upstream_key_file else None
    return key, extra


def _read_upstream_key(path: Path) -> str:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(
            f"--upstream-key-file: cannot read {path}: {e.__class__.__name__}"
        ) from None
    keys = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not keys:
        raise UsageError(f"--upstream-key-file: {path} holds no key")
    return keys[0]


def _parse_adapters(specs: list[str]) -> list[tuple[str, str]]:
    from tuneforge.serve.engines.hf import check_adapter_run

    out: list[tuple[str, str]] = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not path:
            raise UsageError(f"--adapter {spec!r}: expected NAME=RUN_DIR")
        if not ADAPTER_NAME.match(name):
            raise UsageError(
                f"--adapter {spec!r}: NAME must be 1-64 of A-Z a-z 0-9 . _ : - (starting alphanumeric)"
            )
        if name in (n for n, _ in out):
            raise UsageError(f"--adapter {name}: the name is given twice")
        check_adapter_run(Path(path), f"--adapter {name}={path}")
        out.append((name, path))
    return out


def _check_model(ref: str) -> None:
    from tuneforge.models import BUILTIN_MODELS

    if Path(ref).exists() or ref in BUILTIN_MODELS:
        return
    known = ", ".join(BUILTIN_MODELS)
    raise UsageError(f"{ref}: no such run dir, export dir or .gguf file (built-in names: {known})")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _records_dir(ref: str) -> Path:
    from tuneforge.models import cache_root

    path = Path(ref)
    if path.is_dir():
        return path / "serve"
    if path.is_file():
        return path.parent / "serve"
    return cache_root() / "serve" / ref


def _sink_and_routers(args: argparse.Namespace, keys, records_dir: Path):
    """Where records go, and the extra routes to mount.

    ---- feedback plug-in point (issue 13) ------------------------------------------------------
    With `tuneforge.feedback` installed, served requests go into its store (`--db URL`, default
    an SQLite file beside the records) and its routes (/v1/feedback, /dashboard) are mounted
    behind the same keys. Without it, records go to an append-only JSONL it can import later.
    """
    from tuneforge.serve.records import JsonlRecordSink

    if importlib.util.find_spec("tuneforge.feedback") is None:
        if args.db:
            raise UsageError("--db: the feedback package is not installed in this tuneforge")
        records = Path(args.records) if args.records else records_dir / "records.jsonl"
        return JsonlRecordSink(records), []
    from tuneforge.feedback import FeedbackStore, feedback_router

    url = args.db or f"sqlite:///{records_dir / FEEDBACK_STORE_FILE}"
    store = FeedbackStore(url)
    return store, [feedback_router(store, keys)]


def _device(name: str) -> str:
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def cmd_serve(args: argparse.Namespace) -> int:
    from tuneforge.serve.auth import ApiKeys

    _check_numbers(args)
    _check_model(args.model)
    adapters = _parse_adapters(args.adapter)
    upstream_key, vllm_args = _check_vllm_flags(args)
    keys = ApiKeys.from_file(args.api_key_file) if args.api_key_file else None
    if not _is_loopback(args.host) and keys is None:
        log.warning(
            "warning: %s is reachable from the network and no --api-key-file is set", args.host
        )

    from tuneforge.serve.app import create_app
    from tuneforge.serve.engines import open_engine
    from tuneforge.serve.limits import Limits
    from tuneforge.serve.server import run_server

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    engine = open_engine(
        args.model,
        engine=args.engine,
        adapters=adapters,
        name=args.name,
        dtype=args.dtype,
        device=_device(args.device),
        max_batch=args.max_batch,
        max_batch_tokens=args.max_batch_tokens,
        max_queue=args.max_queue,
        threads=args.threads,
        upstream=args.upstream,
        upstream_key=upstream_key,
        vllm_args=vllm_args,
        vllm_start_timeout_s=args.vllm_start_timeout,
    )
    try:  # an engine may hold a child process (vLLM): never leave it behind on a failure here
        sink, routers = _sink_and_routers(args, keys, _records_dir(args.model))
        limits = Limits(
            max_body_bytes=args.max_body_bytes,
            max_tokens_cap=args.max_tokens_cap,
            request_timeout_s=args.timeout,
        )
        app = create_app(engine, keys=keys, sink=sink, routers=routers, limits=limits)
        names = ", ".join(engine.model_names())
        log.info(
            "serving %s (%s engine) on http://%s:%d/v1", names, engine.kind, args.host, args.port
        )
        return run_server(app, host=args.host, port=args.port, grace_s=limits.shutdown_grace_s)
    except BaseException:
        engine.shutdown(1.0)
        raise
