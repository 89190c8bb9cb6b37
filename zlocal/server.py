"""An OpenAI-compatible local chat server: ``create_app(runtime, ...)`` builds the FastAPI app.

Routes: POST /v1/chat/completions (JSON or SSE), GET /v1/models, GET /v1/models/{id}, GET /health,
POST /tokenize, POST /detokenize, GET /stats. Every request with a body is admitted into one budget
(server_queue) before it is read; generations then wait in its bounded FIFO in front of the
single-generation runtime. server_guard decides which requests reach the routes at all (Host,
Origin, API key, Content-Type). Every error is an OpenAI error object; none carries a path.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import __version__
from .errors import InvalidArgumentError, TemplateError
from .server_budget import TOKEN_BUDGET, detokenize_json, run_and_trim, tokenize_json
from .server_guard import Guard, OriginPolicy, error_response, is_loopback
from .server_queue import GenerationQueue, QueueFullError, ShuttingDownError, complete_job, stream_job
from .server_schema import (
    MAX_BODY_BYTES,
    APIError,
    ChatCompletionRequest,
    escape_control,
    openapi_components,
    parse_chat_request,
    plain_messages,
    redact,
)

__all__ = ["SafeFormatter", "create_app", "is_loopback"]

log = logging.getLogger("zlocal.server")

# Below this a temperature is greedy in practice, and dividing logits by it would overflow to NaN.
MIN_TEMPERATURE = 1e-5


class SafeFormatter(logging.Formatter):
    """Log formatter that escapes control characters, so a record is always one honest line."""

    def format(self, record: logging.LogRecord) -> str:
        return escape_control(super().format(record))

    def formatException(self, ei) -> str:
        # A traceback would print source file paths: keep only the exception type and message.
        return f"{ei[0].__name__}: {redact(str(ei[1]))}" if ei and ei[0] else ""


async def _read_body(request: Request) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise APIError(413, f"the request body is larger than {MAX_BODY_BYTES} bytes", code="body_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise APIError(
                413, f"the request body is larger than {MAX_BODY_BYTES} bytes", code="body_too_large"
            )
        chunks.append(chunk)
    return b"".join(chunks)


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
) -> FastAPI:
    """Build the server app around a loaded Runtime.

    ``model_name`` is what /v1/models shows (never a full path). ``default_max_tokens`` applies when
    a request gives no max_tokens (None: as many as the context leaves). The Host allowlist is on
    when ``host`` is a loopback address. ``token_budget`` caps the tokens of one /tokenize answer
    or /detokenize request (its text may hold 4 characters per token).
    """
    queue = GenerationQueue(runtime, max_queue=max_queue)
    created = int(time.time())
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

    def model_card() -> dict[str, Any]:
        return {
            "id": model_name,
            "object": "model",
            "created": created,
            "owned_by": "zlocal",
            "max_context": runtime.max_context,
        }

    @app.get("/v1/models", summary="the served model")
    async def list_models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}", summary="one model")
    async def get_model(model_id: str):
        if model_id != model_name:
            raise APIError(
                404,
                f"model '{model_id[:200]}' is not served here; this server serves '{model_name}'",
                type="not_found_error",
                param="model",
                code="model_not_found",
            )
        return model_card()

    @app.get("/stats", summary="queue depth and recent jobs")
    async def stats():
        return queue.stats()

    _add_token_routes(app, queue, runtime, token_budget)
    _add_chat_route(app, queue, runtime, default_max_tokens)

    _install_openapi(app)

    # The guard also answers CORS (only for the --cors-origin list and the server's own origin).
    origins = OriginPolicy(cors_origins, host)
    app.add_middleware(Guard, check_host=is_loopback(host), api_key=api_key, origins=origins)
    return app


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


def _add_chat_route(app: FastAPI, queue: GenerationQueue, runtime, default_max_tokens: int | None) -> None:
    """POST /v1/chat/completions: admitted, parsed and tokenized on the prep thread, then queued."""
    model_name = app.state.model_name

    @app.post(
        "/v1/chat/completions",
        summary="chat completion (JSON, or SSE with stream=true)",
        openapi_extra=_body_schema("ChatCompletionRequest"),
    )
    async def chat_completions(request: Request):
        prepare = functools.partial(_prepare_chat, runtime, default_max_tokens)
        cid = "chatcmpl-" + uuid.uuid4().hex[:24]
        with _queue_errors():
            ticket = queue.admit()
            try:
                req, ids, sampling = await queue.prepare(run_and_trim, prepare, await _read_body(request))
                job = queue.submit(ids, sampling, tag=cid, ticket=ticket)
            finally:
                queue.release(ticket)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(
                stream_job(queue, job, cid, model_name, include_usage),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        return await complete_job(queue, job, cid, model_name, request)


@contextlib.contextmanager
def _queue_errors():
    """The shared budget's refusals as HTTP errors: 429 when full, 503 when shutting down."""
    try:
        yield
    except QueueFullError as exc:
        raise APIError(429, str(exc), type="rate_limit_error", code="queue_full") from exc
    except ShuttingDownError as exc:
        raise APIError(503, str(exc), type="server_error", code="shutting_down") from exc


def _add_token_routes(app: FastAPI, queue: GenerationQueue, runtime, token_budget: int) -> None:
    """POST /tokenize and /detokenize: admitted like generations, body read only once admitted,
    the work done on the prep thread, the answer already encoded (no copy of the id list)."""

    async def budgeted(request: Request, work) -> Response:
        work = functools.partial(work, runtime, token_budget=token_budget)
        with _queue_errors():
            ticket = queue.admit()
            try:
                body = await queue.prepare(run_and_trim, work, await _read_body(request))
            finally:
                queue.release(ticket)
        return Response(body, media_type="application/json")

    @app.post(
        "/tokenize",
        summary="token ids and count of a prompt or chat",
        openapi_extra=_body_schema("TokenizeRequest"),
    )
    async def tokenize(request: Request):
        return await budgeted(request, tokenize_json)

    @app.post("/detokenize", summary="text of token ids", openapi_extra=_body_schema("DetokenizeRequest"))
    async def detokenize(request: Request):
        return await budgeted(request, detokenize_json)


def _install_openapi(app: FastAPI) -> None:
    """Publish the hand-parsed request bodies' models in /openapi.json."""

    def custom_openapi():
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title, version=app.version, description=app.description, routes=app.routes
            )
            schema.setdefault("components", {}).setdefault("schemas", {}).update(openapi_components())
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = custom_openapi


def _body_schema(name: str) -> dict[str, Any]:
    ref = {"$ref": f"#/components/schemas/{name}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}


def _prepare_chat(runtime, default_max_tokens: int | None, raw: bytes):
    """Parse a chat body and tokenize it (on the prep thread): (request, prompt ids, sampling)."""
    req = parse_chat_request(raw)
    return (req, *_prepare(runtime, req, default_max_tokens))


def _prepare(runtime, req: ChatCompletionRequest, default_max_tokens: int | None):
    """Tokenize the chat and build sampling kwargs; 400 when it cannot fit the context."""
    try:
        ids = runtime.encode_chat(plain_messages(req.messages))
    except (TemplateError, InvalidArgumentError) as exc:
        raise APIError(400, str(exc), param="messages", code="invalid_value") from exc
    ctx = runtime.max_context
    room = ctx - len(ids)
    if room <= 0:
        raise APIError(
            400,
            f"the prompt is {len(ids)} tokens, the context holds {ctx}; shorten the messages",
            param="messages",
            code="context_length_exceeded",
        )
    asked = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    if asked is not None and len(ids) + asked > ctx:
        field = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        raise APIError(
            400,
            f"the prompt ({len(ids)} tokens) + {field} ({asked}) exceeds the context of {ctx} "
            "tokens; lower it or shorten the messages",
            param=field,
            code="context_length_exceeded",
        )
    max_new = asked if asked is not None else min(room, default_max_tokens or room)
    sampling: dict[str, Any] = {"max_new_tokens": max_new}
    for name in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed"):
        value = getattr(req, name)
        if value is not None:
            sampling[name] = value
    if sampling.get("temperature", 1.0) < MIN_TEMPERATURE:
        sampling["temperature"] = 0.0
    if req.stop is not None:
        sampling["stop"] = [req.stop] if isinstance(req.stop, str) else list(req.stop)
    try:
        from .runtime import sampling_params

        sampling_params(runtime.sampling_defaults, **sampling)
    except InvalidArgumentError as exc:
        raise APIError(400, str(exc), param=str(exc).split(" ", 1)[0], code="invalid_value") from exc
    return ids, sampling
