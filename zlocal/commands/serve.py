"""`zlocal serve MODEL`: the OpenAI-compatible local chat server (FastAPI + uvicorn)."""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
from pathlib import Path

from zlocal.commands._common import add_model_args
from zlocal.errors import DependencyError, InvalidArgumentError

log = logging.getLogger("zlocal.serving.server")


def register(sub) -> None:
    p = sub.add_parser("serve", help="serve the model over an OpenAI-compatible HTTP API")
    add_model_args(p)
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind (default 127.0.0.1: this machine only; others get a warning)",
    )
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000; 0 picks a free one)")
    p.add_argument(
        "--api-key",
        default=os.environ.get("ZLOCAL_API_KEY"),
        help="require 'Authorization: Bearer KEY' on every route but /health (or set ZLOCAL_API_KEY)",
    )
    p.add_argument(
        "--max-queue",
        type=int,
        default=16,
        help="requests allowed to wait (for the model, or to be read and tokenized); more get HTTP 429 "
        "(default 16)",
    )
    p.add_argument(
        "--cors-origin",
        action="extend",
        nargs="+",
        default=[],
        metavar="ORIGIN",
        help="allow browser pages from these exact origins, e.g. http://localhost:3000 (CORS, Chrome "
        "private-network preflights included; off by default: other origins get 403 on POST)",
    )
    p.add_argument(
        "--default-max-tokens",
        type=int,
        default=None,
        help="max_tokens when a request gives none (default: what the context leaves)",
    )
    p.add_argument(
        "--alias",
        action="append",
        default=[],
        metavar="NAME",
        help="another model name requests may use (repeatable), e.g. gpt-4o-mini for a client that "
        "hard-codes one; /v1/models lists it. Other names get 404 model_not_found",
    )
    p.add_argument(
        "--keep-alive",
        type=float,
        default=None,
        metavar="SECONDS",
        help="unload the model after SECONDS without requests and load it again on the next one "
        "(that request waits for the load; default: keep it loaded)",
    )
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def display_name(model: str) -> str:
    """The model id shown to clients: what the user typed, or a directory's basename (never a path)."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path.resolve().name or "model"
    return model


def _bind(host: str, port: int) -> socket.socket:
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(128)
    except OSError as exc:
        raise InvalidArgumentError(
            f"cannot listen on {host}:{port}: {exc.strerror or exc}; pick another --port or --host"
        ) from exc
    sock.set_inheritable(True)
    return sock


def _setup_logging(level: str) -> None:
    from zlocal.serving.server import SafeFormatter

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(SafeFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True


def run(args) -> int:
    try:
        import uvicorn

        from zlocal.serving.server import create_app, is_loopback
    except ImportError as exc:
        raise DependencyError("zlocal serve needs FastAPI and uvicorn: pip install 'zlocal[serve]'") from exc
    from zlocal.commands._common import load_runtime

    if not 0 <= args.port <= 65535:
        raise InvalidArgumentError(f"--port must be in 0..65535, got {args.port}")
    if args.max_queue < 0:
        raise InvalidArgumentError(f"--max-queue must be >= 0, got {args.max_queue}")
    if args.default_max_tokens is not None and args.default_max_tokens <= 0:
        raise InvalidArgumentError(f"--default-max-tokens must be > 0, got {args.default_max_tokens}")
    if any(o.strip() in ("*", "null", "") for o in args.cors_origin):
        raise InvalidArgumentError("--cors-origin takes exact origins such as http://localhost:3000, not '*'")
    from zlocal.serving.server_guard import split_origin

    bad = next((o for o in args.cors_origin if split_origin(o) is None), None)
    if bad is not None:
        raise InvalidArgumentError(
            f"--cors-origin {bad[:100]!r} is not an origin; write scheme://host[:port], "
            "e.g. http://localhost:3000"
        )
    bad_alias = next((a for a in args.alias if not a.strip() or len(a) > 256), None)
    if bad_alias is not None:
        raise InvalidArgumentError(
            f"--alias {bad_alias[:100]!r}: give a non-empty name of at most 256 characters"
        )
    if args.keep_alive is not None and not args.keep_alive > 0:  # also refuses nan
        raise InvalidArgumentError(f"--keep-alive must be > 0 seconds, got {args.keep_alive}")
    if args.api_key is not None and not args.api_key.strip():
        raise InvalidArgumentError("--api-key is empty")
    _setup_logging(args.log_level)
    sock = _bind(args.host, args.port)
    runtime = load_runtime(args)
    if args.keep_alive is not None:
        from zlocal.serving.server_keepalive import KeepAliveRuntime

        runtime = KeepAliveRuntime(lambda: load_runtime(args), args.keep_alive, runtime=runtime)
    name = display_name(args.model)
    app = create_app(
        runtime,
        model_name=name,
        api_key=args.api_key,
        max_queue=args.max_queue,
        cors_origins=args.cors_origin,
        host=args.host,
        default_max_tokens=args.default_max_tokens,
        aliases=args.alias,
    )
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    if not is_loopback(args.host):
        log.warning(
            "bound to %s: other machines can reach this server%s",
            args.host,
            "" if args.api_key else "; protect it with --api-key",
        )
    print(
        f"zlocal serve: {name} on http://{shown}:{port}/v1 "
        f"(context {runtime.max_context}, queue {args.max_queue}, auth {'on' if args.api_key else 'off'}"
        + (f", aliases {', '.join(args.alias)}" if args.alias else "")
        + (f", keep-alive {args.keep_alive:g} s)" if args.keep_alive is not None else ")"),
        file=sys.stderr,
        flush=True,
    )

    config = uvicorn.Config(
        app,
        log_config=None,
        access_log=False,
        lifespan="on",
        proxy_headers=False,
        server_header=False,
        timeout_graceful_shutdown=10,
        log_level=args.log_level,
    )
    server = _make_server(config, app)
    server.run(sockets=[sock])
    log.info("stopped")
    return 0


def _make_server(config, app):
    """uvicorn.Server whose SIGTERM/SIGINT first ends in-flight generations, then exits with 0."""
    import asyncio

    import uvicorn

    class Server(uvicorn.Server):
        loop: asyncio.AbstractEventLoop | None = None

        def handle_exit(self, sig, frame):
            if self.loop is not None:
                # Signal handlers run between bytecodes of the loop thread: hand the work to the
                # loop instead of taking the queue's lock here.
                self.loop.call_soon_threadsafe(app.state.begin_shutdown)
            log.info("received %s, shutting down", signal.Signals(sig).name)
            super().handle_exit(sig, frame)
            # We shut down on purpose: do not re-raise the signal once serving ends (exit code 0).
            self._captured_signals.clear()

        async def startup(self, sockets=None):
            self.loop = asyncio.get_running_loop()
            await super().startup(sockets=sockets)

    return Server(config)
