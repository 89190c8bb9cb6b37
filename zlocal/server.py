"""An OpenAI-compatible local chat server: ``create_app(runtime, ...)`` builds the FastAPI app.

Routes: POST /v1/chat/completions (JSON or SSE), GET /v1/models, GET /v1/models/{id}, GET /health,
POST /tokenize, POST /detokenize, GET /stats. Requests wait in a bounded FIFO (server_queue) in
front of the single-generation runtime. Every error is an OpenAI error object; none carries a path.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import logging
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import __version__
from .errors import ContextOverflowError, InvalidArgumentError, TemplateError, ZlocalError
from .server_queue import GenerationQueue, QueueFullError, ShuttingDownError, complete_job, stream_job
from .server_schema import (
    MAX_BODY_BYTES,
    APIError,
    ChatCompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    decode_json_object,
    escape_control,
    openapi_components,
    parse_chat_request,
    plain_messages,
    redact,
    validate_model,
)

log = logging.getLogger("zlocal.server")
access_log = logging.getLogger("zlocal.access")

LOOPBACK_NAMES = frozenset({"localhost", "localhost.", "127.0.0.1", "::1"})
# Below this a temperature is greedy in practice, and dividing logits by it would overflow to NaN.
MIN_TEMPERATURE = 1e-5


def is_loopback(host: str) -> bool:
    """True for loopback addresses and ``localhost`` (what the Host allowlist accepts)."""
    host = host.strip().lower().strip("[]")
    if host in LOOPBACK_NAMES or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _host_name(header: str) -> str:
    """The name part of a Host header (drops the port; keeps IPv6 brackets off)."""
    header = header.strip()
    if header.startswith("["):
        return header[1 : header.find("]")] if "]" in header else ""
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class SafeFormatter(logging.Formatter):
    """Log formatter that escapes control characters, so a record is always one honest line."""

    def format(self, record: logging.LogRecord) -> str:
        return escape_control(super().format(record))

    def formatException(self, ei) -> str:
        # A traceback would print source file paths: keep only the exception type and message.
        return f"{ei[0].__name__}: {redact(str(ei[1]))}" if ei and ei[0] else ""


def _error_response(err: APIError, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


def _from_zlocal(exc: ZlocalError) -> APIError:
    code = "context_length_exceeded" if isinstance(exc, ContextOverflowError) else "invalid_value"
    return APIError(400, str(exc), code=code)


class _Guard:
    """Pure-ASGI middleware: Host allowlist on loopback binds, then the API key (not for /health)."""

    def __init__(self, app, *, check_host: bool, api_key: str | None):
        self.app = app
        self.check_host = check_host
        self.api_key = api_key.encode() if api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if self.check_host:
            host = headers.get(b"host", b"").decode("latin-1")
            if not host.strip() or not is_loopback(_host_name(host)):
                err = APIError(
                    403,
                    "forbidden Host header: this server only answers to localhost / 127.0.0.1 "
                    "(protection against DNS rebinding)",
                    type="permission_error",
                    code="forbidden_host",
                )
                access_log.info("%s %s 403 (Host %r)", scope.get("method"), scope.get("path"), host[:100])
                return await _error_response(err)(scope, receive, send)
        if self.api_key is not None and scope.get("path") != "/health" and scope.get("method") != "OPTIONS":
            auth = headers.get(b"authorization", b"")
            scheme, _, token = auth.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.api_key):
                access_log.info("%s %s 401", scope.get("method"), scope.get("path"))
                err = APIError(
                    401,
                    "missing or invalid API key; send 'Authorization: Bearer KEY'",
                    type="authentication_error",
                    code="invalid_api_key",
                )
                return await _error_response(err, {"WWW-Authenticate": "Bearer"})(scope, receive, send)
        status = [0]

        async def send_logged(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        t0 = time.perf_counter()
        try:
            await self.app(scope, receive, send_logged)
        finally:
            access_log.info(
                "%s %s %d %.0fms",
                scope.get("method"),
                scope.get("path"),
                status[0],
                (time.perf_counter() - t0) * 1000,
            )


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
) -> FastAPI:
    """Build the server app around a loaded Runtime.

    ``model_name`` is what /v1/models shows (never a full path). ``default_max_tokens`` applies when
    a request gives no max_tokens (None: as many as the context leaves). The Host allowlist is on
    when ``host`` is a loopback address.
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

    # -- errors: everything becomes an OpenAI error object ------------------------------------------
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return _error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        msg = "no such route; see /docs" if exc.status_code == 404 else str(exc.detail)
        return _error_response(
            APIError(exc.status_code, msg, type=kind, code=None), getattr(exc, "headers", None)
        )

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        return _error_response(APIError(400, "invalid request parameters", code="invalid_value"))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.error("unexpected %s on %s", type(exc).__name__, request.url.path)
        return _error_response(
            APIError(500, f"internal server error ({type(exc).__name__})", type="server_error")
        )

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

    @app.post(
        "/tokenize",
        summary="token ids and count of a prompt or chat",
        openapi_extra=_body_schema("TokenizeRequest"),
    )
    async def tokenize(request: Request):
        req = validate_model(TokenizeRequest, decode_json_object(await _read_body(request)))
        if (req.prompt is None) == (req.messages is None):
            raise APIError(
                400, "send exactly one of 'prompt' or 'messages'", param="prompt", code="invalid_value"
            )
        try:
            if req.messages is not None:
                ids = await asyncio.to_thread(runtime.encode_chat, plain_messages(req.messages))
            else:
                ids = await asyncio.to_thread(runtime.encode, req.prompt, req.add_special_tokens)
        except ZlocalError as exc:
            raise _from_zlocal(exc) from exc
        return {"tokens": ids, "count": len(ids), "max_context": runtime.max_context}

    @app.post("/detokenize", summary="text of token ids", openapi_extra=_body_schema("DetokenizeRequest"))
    async def detokenize(request: Request):
        req = validate_model(DetokenizeRequest, decode_json_object(await _read_body(request)))
        vocab = len(runtime.tokenizer)
        bad = next((i for i, t in enumerate(req.tokens) if not 0 <= t < vocab), None)
        if bad is not None:
            raise APIError(
                400,
                f"tokens[{bad}] is not a token id (0 <= id < {vocab})",
                param=f"tokens[{bad}]",
                code="invalid_value",
            )
        text = await asyncio.to_thread(runtime.tokenizer.decode, req.tokens)
        return {"text": text}

    @app.post(
        "/v1/chat/completions",
        summary="chat completion (JSON, or SSE with stream=true)",
        openapi_extra=_body_schema("ChatCompletionRequest"),
    )
    async def chat_completions(request: Request):
        req = parse_chat_request(await _read_body(request))
        ids, sampling = await asyncio.to_thread(_prepare, runtime, req, default_max_tokens)
        if state["shutting_down"]:
            raise APIError(503, "the server is shutting down", type="server_error", code="shutting_down")
        cid = "chatcmpl-" + uuid.uuid4().hex[:24]
        try:
            job = queue.submit(ids, sampling, tag=cid)
        except QueueFullError as exc:
            raise APIError(429, str(exc), type="rate_limit_error", code="queue_full") from exc
        except ShuttingDownError as exc:
            raise APIError(503, str(exc), type="server_error", code="shutting_down") from exc
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(
                stream_job(queue, job, cid, model_name, include_usage),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        return await complete_job(queue, job, cid, model_name, request)

    def custom_openapi():
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title, version=app.version, description=app.description, routes=app.routes
            )
            schema.setdefault("components", {}).setdefault("schemas", {}).update(openapi_components())
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = custom_openapi

    # Middleware added last runs first: Host/auth guard outermost, then CORS (only when asked for).
    if cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
            allow_credentials=False,
        )
    app.add_middleware(_Guard, check_host=is_loopback(host), api_key=api_key)
    return app


def _body_schema(name: str) -> dict[str, Any]:
    ref = {"$ref": f"#/components/schemas/{name}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}


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
