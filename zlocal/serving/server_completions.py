"""The generation routes: POST /v1/chat/completions and POST /v1/completions.

Both go through the same path: admitted into the shared budget before the body is read
(server_queue.admit), parsed and tokenized on the prep thread, queued as one job of ``n`` choices,
answered as JSON or SSE (server_responses). The guard (server_guard) has already checked Host,
Origin, API key and Content-Type; the body size limit applies while reading.

``model`` must be the served model's id or one of its ``--alias`` names (404 ``model_not_found``
otherwise); omitting it means the served model.
"""

from __future__ import annotations

import contextlib
import functools
import uuid
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from zlocal.errors import DependencyError, InvalidArgumentError, TemplateError
from zlocal.inference.grammar import SchemaError
from zlocal.inference.grammar_format import response_grammar
from zlocal.inference.grammar_schema import error_param, schema_error_code, tool_choice_value
from zlocal.serving.server_budget import run_and_trim
from zlocal.serving.server_queue import GenerationQueue, QueueFullError, ShuttingDownError
from zlocal.serving.server_responses import Reply, complete_job, stream_job
from zlocal.serving.server_schema import (
    MAX_BODY_BYTES,
    SEED_MAX,
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    parse_chat_request,
    parse_completion_request,
    plain_messages,
)

# Below this a temperature is greedy in practice, and dividing logits by it would overflow to NaN.
MIN_TEMPERATURE = 1e-5


@contextlib.contextmanager
def queue_errors():
    """The shared budget's refusals as HTTP errors: 429 when full, 503 when shutting down."""
    try:
        yield
    except QueueFullError as exc:
        raise APIError(429, str(exc), type="rate_limit_error", code="queue_full") from exc
    except ShuttingDownError as exc:
        raise APIError(503, str(exc), type="server_error", code="shutting_down") from exc


async def read_body(request: Request) -> bytes:
    """The request body, refused with 413 as soon as it passes MAX_BODY_BYTES."""
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


def check_model(name: str | None, served: tuple[str, ...]) -> None:
    """404 ``model_not_found`` unless ``name`` is omitted, the served id or an alias."""
    if name is not None and name not in served:
        shown = ", ".join(f"'{s}'" for s in served)
        raise APIError(
            404,
            f"model '{name[:200]}' is not served here; this server serves {shown}",
            type="not_found_error",
            param="model",
            code="model_not_found",
        )


def add_generation_routes(
    app: FastAPI, queue: GenerationQueue, runtime, default_max_tokens: int | None, served: tuple[str, ...]
) -> None:
    """Register /v1/chat/completions and /v1/completions (``served[0]`` is the model id shown)."""
    texts = functools.partial(getattr, runtime, "token_texts")  # built on first logprobs request

    async def generate(request: Request, prepare: Callable, chat: bool):
        cid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        with queue_errors():
            ticket = queue.admit()
            try:
                raw = await read_body(request)
                req, ids, sampling, tools = await queue.prepare(run_and_trim, prepare, raw)
                n = req.n or 1
                job = queue.submit(ids, sampling, tag=cid, ticket=ticket, runs=n)
            finally:
                queue.release(ticket)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        reply = Reply(
            cid, served[0], chat, n, texts() if sampling.get("logprobs") else None, include_usage, tools
        )
        if req.stream:
            return StreamingResponse(
                stream_job(queue, job, reply),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        return await complete_job(queue, job, reply, request)

    @app.post(
        "/v1/chat/completions",
        summary="chat completion (JSON, or SSE with stream=true)",
        openapi_extra=body_schema("ChatCompletionRequest"),
    )
    async def chat_completions(request: Request):
        prepare = functools.partial(prepare_chat, runtime, default_max_tokens, served)
        return await generate(request, prepare, chat=True)

    @app.post(
        "/v1/completions",
        summary="text completion of a raw prompt, no chat template (JSON, or SSE with stream=true)",
        openapi_extra=body_schema("CompletionRequest"),
    )
    async def completions(request: Request):
        prepare = functools.partial(prepare_completion, runtime, default_max_tokens, served)
        return await generate(request, prepare, chat=False)


def body_schema(name: str) -> dict[str, Any]:
    """openapi_extra for a route whose body is parsed by hand: the request model's schema."""
    ref = {"$ref": f"#/components/schemas/{name}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}


def prepare_chat(runtime, default_max_tokens: int | None, served: tuple[str, ...], raw: bytes):
    """Parse a chat body and tokenize it (on the prep thread): (request, prompt ids, sampling)."""
    req = parse_chat_request(raw)
    check_model(req.model, served)
    with structured_errors("messages"):
        plan = runtime.plan_chat(
            plain_messages(req.messages),
            response_format=req.response_format.as_dict() if req.response_format else None,
            tools=[t.model_dump() for t in req.tools] if req.tools else None,
            tool_choice=tool_choice_value(req.tool_choice),
            parallel_tool_calls=req.parallel_tool_calls,
        )
    ids = plan.prompt_ids
    sampling = build_sampling(runtime, req, ids, default_max_tokens, "messages")
    if plan.grammar is not None:
        sampling["grammar"] = plan.grammar
    if req.logprobs:
        sampling["logprobs"] = True
        sampling["top_logprobs"] = req.top_logprobs or 0
    return req, ids, sampling, plan.tools is not None and plan.tools.mode != "none"


@contextlib.contextmanager
def structured_errors(default_param: str):
    """Template, tool and schema errors as a 400 naming the field (the keyword for a schema
    feature the grammar engine cannot enforce)."""
    try:
        yield
    except (TemplateError, InvalidArgumentError) as exc:
        param = error_param(exc, default_param) if isinstance(exc, InvalidArgumentError) else default_param
        if isinstance(exc, SchemaError) and param == default_param:
            param = "response_format.json_schema.schema"
        raise APIError(400, str(exc), param=param, code=schema_error_code(exc)) from exc
    except DependencyError as exc:  # the grammar engine cannot serve this model (or is missing)
        raise APIError(501, str(exc), param=default_param, code="not_implemented") from exc


def prepare_completion(runtime, default_max_tokens: int | None, served: tuple[str, ...], raw: bytes):
    """Parse a /v1/completions body and tokenize its prompt (text with BOS, or ids as given)."""
    req = parse_completion_request(raw)
    check_model(req.model, served)
    if isinstance(req.prompt, str):
        ids = runtime.encode(req.prompt)
    else:
        ids = list(req.prompt)
        vocab = len(runtime.tokenizer)
        bad = next((i for i, t in enumerate(ids) if not 0 <= t < vocab), None)
        if bad is not None:
            raise APIError(
                400,
                f"prompt[{bad}] is not a token id (0 <= id < {vocab})",
                param=f"prompt[{bad}]",
                code="invalid_value",
            )
    if not ids:
        raise APIError(400, "prompt: the prompt is empty", param="prompt", code="invalid_value")
    sampling = build_sampling(runtime, req, ids, default_max_tokens, "prompt")
    if req.response_format is not None:
        with structured_errors("response_format"):
            grammar, _ = response_grammar(lambda: runtime.grammars, req.response_format.as_dict())
        if grammar is not None:
            sampling["grammar"] = grammar
    if req.logprobs is not None:
        sampling["logprobs"] = True
        sampling["top_logprobs"] = req.logprobs
    return req, ids, sampling, False


def build_sampling(
    runtime, req: ChatCompletionRequest | CompletionRequest, ids: list[int], default_max_tokens, prompt_param
) -> dict[str, Any]:
    """Check the prompt fits the context and build the sampling kwargs; 400 naming the field."""
    ctx = runtime.max_context
    room = ctx - len(ids)
    if room <= 0:
        raise APIError(
            400,
            f"the prompt is {len(ids)} tokens, the context holds {ctx}; shorten the {prompt_param}",
            param=prompt_param,
            code="context_length_exceeded",
        )
    asked = getattr(req, "max_completion_tokens", None)
    field = "max_completion_tokens" if asked is not None else "max_tokens"
    asked = asked if asked is not None else req.max_tokens
    if asked is not None and len(ids) + asked > ctx:
        raise APIError(
            400,
            f"the prompt ({len(ids)} tokens) + {field} ({asked}) exceeds the context of {ctx} "
            f"tokens; lower it or shorten the {prompt_param}",
            param=field,
            code="context_length_exceeded",
        )
    if req.seed is not None and req.n and req.seed + req.n - 1 > SEED_MAX:
        raise APIError(
            400, f"seed: choice i uses seed + i, so seed + n - 1 must be <= {SEED_MAX}", param="seed"
        )
    sampling: dict[str, Any] = {
        "max_new_tokens": asked if asked is not None else min(room, default_max_tokens or room)
    }
    for name in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed"):
        value = getattr(req, name)
        if value is not None:
            sampling[name] = value
    if sampling.get("temperature", 1.0) < MIN_TEMPERATURE:
        sampling["temperature"] = 0.0
    if req.stop is not None:
        sampling["stop"] = [req.stop] if isinstance(req.stop, str) else list(req.stop)
    try:
        from zlocal.inference.runtime import sampling_params

        sampling_params(runtime.sampling_defaults, **sampling)
    except InvalidArgumentError as exc:
        raise APIError(400, str(exc), param=str(exc).split(" ", 1)[0], code="invalid_value") from exc
    return sampling
