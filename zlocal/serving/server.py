"""An OpenAI-compatible local chat server: ``create_app(runtime, ...)`` builds the FastAPI app.

Routes: POST /v1/chat/completions and POST /v1/completions (JSON or SSE; server_completions),
GET /v1/models, GET /v1/models/{id}, GET /health, POST /tokenize, POST /detokenize, GET /stats.
Every request with a body is admitted into one budget (server_queue) before it is read; generations
then wait in its bounded FIFO in front of the single-generation runtime. server_guard decides which
requests reach the routes at all (Host, Origin, API key, Content-Type). Every error is an OpenAI
error object; none carries a path.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from zlocal import __version__
from zlocal.serving.server_budget import TOKEN_BUDGET, detokenize_json, run_and_trim, tokenize_json
from zlocal.serving.server_completions import (
    MIN_TEMPERATURE,
    add_generation_routes,
    body_schema,
    check_model,
    queue_errors,
    read_body,
)
from zlocal.serving.server_guard import Guard, OriginPolicy, error_response, is_loopback
from zlocal.serving.server_pages import add_page_routes
from zlocal.serving.server_queue import GenerationQueue
from zlocal.serving.server_schema import APIError, escape_control, openapi_components, redact

__all__ = ["MIN_TEMPERATURE", "SafeFormatter", "create_app", "is_loopback"]

log = logging.getLogger("zlocal.serving.server")


class SafeFormatter(logging.Formatter):
    """Log formatter that escapes control characters, so a record is always one honest line."""

    def format(self, record: logging.LogRecord) -> str:
        return escape_control(super().format(record))

    def formatException(self, ei) -> str:
        # A traceback would print source file paths: keep only the exception type and message.
        return f"{ei[0].__name__}: {redact(str(ei[1]))}" if ei and ei[0] else ""


def create_app(
    runtime,
    *,
    model_name: str,
    api_key: str | None = None,
    max_queue: int = 16,
    cors_origins: list[str] | None = None,
    host: str = "127.0.0.1",
    default_max_tokens: int | None = None,
    token_budget: int = TOKEN_BUDGET,
    aliases: list[str] | None = None,
) -> FastAPI:
    """Build the server app around a loaded Runtime.

    ``model_name`` is what /v1/models shows (never a full path). ``default_max_tokens`` applies when
    a request gives no max_tokens (None: as many as the context leaves). The Host allowlist is on
    when ``host`` is a loopback address. ``token_budget`` caps the tokens of one /tokenize answer
    or /detokenize request (its text may hold 4 characters per token). ``aliases`` are other names
    requests may give as ``model`` (``--alias``); any other name is a 404 ``model_not_found``.
    """
    served = tuple(dict.fromkeys([model_name, *(aliases or [])]))
    queue = GenerationQueue(runtime, max_queue=max_queue)
    state = {"shutting_down": False}

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        begin_shutdown()
        queue.join(timeout=5)

    app = FastAPI(
        title="zlocal",
        version=__version__,
        lifespan=lifespan,
        description="OpenAI-compatible local chat server for one quantized model.",
        # server_pages serves /docs with local Swagger UI assets (FastAPI's own page uses a CDN).
        docs_url=None,
        redoc_url=None,
    )
    app.state.queue = queue
    app.state.model_name = model_name

    def begin_shutdown() -> None:
        """Refuse new work and end in-flight generations (called on SIGTERM/SIGINT)."""
        if not state["shutting_down"]:
            state["shutting_down"] = True
            queue.close()

    app.state.begin_shutdown = begin_shutdown
    _add_error_handlers(app)

    # -- routes ---------------------------------------------------------------------------------------
    @app.get("/health", summary="liveness (never needs the API key)")
    async def health():
        return {"status": "shutting_down" if state["shutting_down"] else "ok"}

    _add_model_routes(app, runtime, served)

    @app.get("/stats", summary="queue depth and recent jobs (and the model's load state with --keep-alive)")
    async def stats():
        out = queue.stats()
        if hasattr(type(runtime), "residency"):  # a KeepAliveRuntime (server_keepalive)
            out["model"] = runtime.residency()
        return out

    _add_token_routes(app, queue, runtime, token_budget, served)
    add_generation_routes(app, queue, runtime, default_max_tokens, served)
    add_page_routes(app)

    _install_openapi(app, served)

    # The guard also answers CORS (only for the --cors-origin list and the server's own origin).
    origins = OriginPolicy(cors_origins, host)
    app.add_middleware(Guard, check_host=is_loopback(host), api_key=api_key, origins=origins)
    return app


def _add_model_routes(app: FastAPI, runtime, served: tuple[str, ...]) -> None:
    """GET /v1/models (the served id, then the aliases) and GET /v1/models/{id}."""
    created = int(time.time())

    def model_card(name: str) -> dict[str, Any]:
        return {
            "id": name,
            "object": "model",
            "created": created,
            "owned_by": "zlocal",
            "max_context": runtime.max_context,
        }

    @app.get("/v1/models", summary="the served model and its aliases")
    async def list_models():
        return {"object": "list", "data": [model_card(name) for name in served]}

    @app.get("/v1/models/{model_id:path}", summary="one model")
    async def get_model(model_id: str):
        check_model(model_id, served)
        return model_card(model_id)


def _add_error_handlers(app: FastAPI) -> None:
    """Everything becomes an OpenAI error object, never FastAPI's default shapes or a traceback."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        msg = "no such route; see /docs" if exc.status_code == 404 else str(exc.detail)
        return error_response(
            APIError(exc.status_code, msg, type=kind, code=None), getattr(exc, "headers", None)
        )

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        return error_response(APIError(400, "invalid request parameters", code="invalid_value"))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.error("unexpected %s on %s", type(exc).__name__, request.url.path)
        return error_response(
            APIError(500, f"internal server error ({type(exc).__name__})", type="server_error")
        )


def _add_token_routes(
    app: FastAPI, queue: GenerationQueue, runtime, token_budget: int, served: tuple[str, ...]
) -> None:
    """POST /tokenize and /detokenize: admitted like generations, body read only once admitted,
    the work done on the prep thread, the answer already encoded (no copy of the id list)."""

    async def budgeted(request: Request, work) -> Response:
        work = functools.partial(work, runtime, token_budget=token_budget, served=served)
        with queue_errors():
            ticket = queue.admit()
            try:
                body = await queue.prepare(run_and_trim, work, await read_body(request))
            finally:
                queue.release(ticket)
        return Response(body, media_type="application/json")

    @app.post(
        "/tokenize",
        summary="token ids and count of a prompt or chat",
        openapi_extra=body_schema("TokenizeRequest"),
    )
    async def tokenize(request: Request):
        return await budgeted(request, tokenize_json)

    @app.post("/detokenize", summary="text of token ids", openapi_extra=body_schema("DetokenizeRequest"))
    async def detokenize(request: Request):
        return await budgeted(request, detokenize_json)


def _install_openapi(app: FastAPI, served: tuple[str, ...]) -> None:
    """Publish the hand-parsed request bodies' models in /openapi.json; ``model`` lists the names
    this server answers to (so clients and the fuzz tests see the valid values)."""

    def custom_openapi():
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title, version=app.version, description=app.description, routes=app.routes
            )
            components = openapi_components()
            for model in components.values():
                prop = model.get("properties", {}).get("model")
                if prop is not None:
                    prop.pop("anyOf", None)
                    prop["anyOf"] = [{"type": "string", "enum": list(served)}, {"type": "null"}]
            schema.setdefault("components", {}).setdefault("schemas", {}).update(components)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = custom_openapi
