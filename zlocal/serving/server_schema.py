"""Request models, field policy and OpenAI-style errors for ``zlocal serve``.

Bodies are parsed by hand (strict UTF-8, JSON object, then a strict pydantic model) so that every
bad input becomes a 400 with an OpenAI error object instead of FastAPI's default 422 or a 500.
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from zlocal.inference.grammar_schema import (
    MAX_TOOLS,
    MessageToolCall,
    NamedToolChoice,
    ResponseFormat,
    ToolSpec,
)

# OpenAI fields accepted and ignored without effect (clients send them routinely; they change
# nothing a local single-user server could honour). The README lists them.
IGNORED_FIELDS: tuple[str, ...] = (
    "user",
    "metadata",
    "store",
    "service_tier",
    "prompt_cache_key",
    "safety_identifier",
    "reasoning_effort",
    "verbosity",
)

# OpenAI fields that would change the output in ways zlocal cannot honour: accepted only with their
# neutral value (the value shown), otherwise a 400 naming the field. Each request model checks the
# ones it has.
REJECTED_UNLESS_NEUTRAL: dict[str, str] = {
    "frequency_penalty": "0",
    "presence_penalty": "0",
    "logit_bias": "{} or null",
    "functions": "[] or null (use tools)",
    "function_call": '"none" or null (use tool_choice)',
    "modalities": '["text"]',
    "audio": "null",
    "prediction": "null",
    "web_search_options": "null",
    "echo": "false",
    "suffix": "null",
    "best_of": "1",
}
_NEUTRAL_VALUES: dict[str, tuple] = {
    "frequency_penalty": (None, 0),
    "presence_penalty": (None, 0),
    "logit_bias": (None, {}),
    "functions": (None, []),
    "function_call": (None, "none"),
    "modalities": (None, ["text"]),
    "audio": (None,),
    "prediction": (None,),
    "web_search_options": (None,),
    "echo": (None, False),
    "suffix": (None,),
    "best_of": (None, 1),
}

# Choices one request may ask for (``n``); they are generated one after another.
MAX_N = 4
# Alternatives per token: top_logprobs on chat completions, logprobs on text completions (OpenAI's limits).
MAX_TOP_LOGPROBS = 20
MAX_COMPLETION_LOGPROBS = 5

MAX_BODY_BYTES = 8 * 1024 * 1024
# Tokens one /tokenize answer or /detokenize request may hold (1 Mi: more than any local context).
TOKEN_BUDGET = 1 << 20
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # what torch.Generator.manual_seed accepts


class APIError(Exception):
    """An error answered as ``{"error": {message, type, param, code}}`` with an HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = redact(message)
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# Absolute POSIX paths of two or more components, Windows drive paths, and ~/ paths.
_PATH_RE = re.compile(
    r"(?:(?<![\w.:/])~?(?:/[^\s/'\"`<>|:;,()\[\]{}]+){2,}/?)|(?:\b[A-Za-z]:\\[^\s'\"`<>|]+)"
)
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def redact(text: str) -> str:
    """Replace filesystem paths in ``text`` by their last component (``.../name``)."""

    def short(m: re.Match) -> str:
        parts = [p for p in re.split(r"[\\/]", m.group(0)) if p]
        return ".../" + (parts[-1] if parts else "")

    return _PATH_RE.sub(short, str(text))


def escape_control(text: str) -> str:
    """Escape control characters so that one log record stays one line and cannot fake others."""
    return _CONTROL_RE.sub(lambda m: m.group(0).encode("unicode_escape").decode("ascii"), str(text))


# -- request models (also published in the OpenAPI schema) -------------------------------------
class ContentPart(BaseModel):
    """One part of a message's content given as a list. Only ``{"type": "text", "text": ...}`` is
    served; other types (image_url, input_audio, file, ...) are refused by ``check_content``."""

    model_config = ConfigDict(extra="allow", strict=True)

    type: str
    text: str | None = Field(default=None, max_length=MAX_BODY_BYTES)


class ChatMessage(BaseModel):
    """One chat turn. ``developer`` is accepted as a synonym of ``system``; ``name`` is ignored.
    ``content`` is a string or a list of text parts (joined in order with no separator); it may be
    null only in an assistant turn with ``tool_calls``. A ``tool`` turn answers ``tool_call_id``."""

    model_config = ConfigDict(extra="forbid", strict=True)

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = Field(default=None, max_length=MAX_BODY_BYTES)
    name: str | None = None
    tool_calls: list[MessageToolCall] | None = Field(default=None, max_length=MAX_TOOLS)
    tool_call_id: str | None = Field(default=None, max_length=256)

    @property
    def text(self) -> str:
        """The content as one string."""
        if isinstance(self.content, str) or self.content is None:
            return self.content or ""
        return "".join(part.text or "" for part in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    include_usage: bool = False


class _SamplingRequest(BaseModel):
    """The sampling fields chat and text completions share (each endpoint adds its own)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    temperature: float | None = Field(default=None, ge=0, le=2, allow_inf_nan=False)
    top_p: float | None = Field(default=None, gt=0, le=1, allow_inf_nan=False)
    top_k: int | None = Field(default=None, ge=0, description="zlocal extension (0 = off)")
    min_p: float | None = Field(default=None, ge=0, lt=1, allow_inf_nan=False, description="zlocal extension")
    repetition_penalty: float | None = Field(
        default=None, gt=0, le=10, allow_inf_nan=False, description="zlocal extension (1 = off)"
    )
    seed: int | None = Field(default=None, ge=SEED_MIN, le=SEED_MAX)
    stop: str | list[str] | None = Field(default=None, description="up to 16 strings")
    n: int | None = Field(default=None, ge=1, le=MAX_N, description="choices, generated one after another")
    # Neutral-only fields (see REJECTED_UNLESS_NEUTRAL).
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None


class ChatCompletionRequest(_SamplingRequest):
    """POST /v1/chat/completions. Fields not listed here, in IGNORED_FIELDS or in
    REJECTED_UNLESS_NEUTRAL are answered with a 400 naming the field."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = Field(
        default=None, description="the served model's id or an alias (omitted: the model)"
    )
    messages: list[ChatMessage] = Field(min_length=1, max_length=4096)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS, description="needs logprobs")
    response_format: ResponseFormat | None = None
    tools: list[ToolSpec] | None = Field(default=None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    # Neutral-only fields (see REJECTED_UNLESS_NEUTRAL).
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    modalities: list[str] | None = None
    audio: dict[str, Any] | None = None
    prediction: dict[str, Any] | None = None
    web_search_options: dict[str, Any] | None = None


class CompletionRequest(_SamplingRequest):
    """POST /v1/completions: a raw prompt (text, or token ids), no chat template."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = Field(
        default=None, description="the served model's id or an alias (omitted: the model)"
    )
    prompt: str | list[int] = Field(max_length=MAX_BODY_BYTES, description="text (BOS added) or token ids")
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    logprobs: int | None = Field(
        default=None, ge=0, le=MAX_COMPLETION_LOGPROBS, description="alternatives per token (null: off)"
    )
    response_format: ResponseFormat | None = None
    # Neutral-only fields (see REJECTED_UNLESS_NEUTRAL).
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = None


class TokenizeRequest(BaseModel):
    """POST /tokenize: exactly one of ``prompt`` (plain text) or ``messages`` (chat template applied)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None
    prompt: str | None = Field(default=None, max_length=MAX_BODY_BYTES)
    messages: list[ChatMessage] | None = Field(default=None, min_length=1, max_length=4096)
    add_special_tokens: bool = Field(default=True, description="only for prompt: prepend BOS like the model")


class DetokenizeRequest(BaseModel):
    """POST /detokenize: token ids back to text."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None
    tokens: list[int] = Field(max_length=TOKEN_BUDGET)


REQUEST_MODELS = (ChatCompletionRequest, CompletionRequest, TokenizeRequest, DetokenizeRequest)


# -- parsing ---------------------------------------------------------------------------------------
def decode_json_object(raw: bytes) -> dict[str, Any]:
    """Strict UTF-8 + JSON + top-level object, else APIError 400."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise APIError(
            400, f"the request body is not valid UTF-8 (byte {exc.start})", code="invalid_utf8"
        ) from exc
    if not text.strip():
        raise APIError(400, "the request body is empty; send a JSON object", code="invalid_json")
    try:
        data = json.loads(text, parse_constant=_reject_constant)
    except RecursionError as exc:
        raise APIError(400, "the request body is nested too deeply", code="invalid_json") from exc
    except ValueError as exc:
        raise APIError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from exc
    if not isinstance(data, dict):
        raise APIError(
            400, f"the request body must be a JSON object, got {type(data).__name__}", code="invalid_json"
        )
    return data


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


_BRANCHES = frozenset({"str", "int", "float", "bool", "function-after", "tagged-union"})


def _is_branch(part) -> bool:
    """A union branch name pydantic inserts into an error location (``str``, ``list[int]``, ...)."""
    # model-class branches (``NamedToolChoice``) too: request fields are all snake_case
    return isinstance(part, str) and (part in _BRANCHES or "[" in part or part[:1].isupper())


def _param(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _is_branch(part):
            continue
        else:
            out += ("." if out else "") + str(part)
    return out


def _first_error(errors: list[dict[str, Any]]) -> dict[str, Any]:
    """The first error; when it is one branch of a union, the branch error that got furthest into
    the input (a list of content parts with a bad part names the part, not "a valid string")."""
    first = errors[0]
    loc = tuple(first.get("loc", ()))
    cut = next((i for i, part in enumerate(loc) if _is_branch(part)), None)
    if cut is None:
        return first
    same = [e for e in errors if tuple(e.get("loc", ()))[:cut] == loc[:cut]]
    return max(same, key=lambda e: len(e.get("loc", ())))


def validate_model(model: type[BaseModel], data: dict[str, Any]) -> BaseModel:
    """Validate ``data`` against a request model; the first problem becomes a 400 naming the field."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        err = _first_error(exc.errors(include_url=False, include_input=False))
        param = _param(tuple(err.get("loc", ()))) or None
        kind = err.get("type", "")
        if kind == "extra_forbidden":
            ignored = ", ".join(IGNORED_FIELDS)
            msg = f"unsupported field '{param}'; remove it (fields ignored by zlocal: {ignored})"
            raise APIError(400, msg, param=param, code="unsupported_field") from exc
        msg = f"{param}: {err.get('msg', 'invalid value')}" if param else err.get("msg", "invalid request")
        raise APIError(400, msg, param=param, code="invalid_value") from exc


def check_neutral(req: BaseModel) -> None:
    """400 for an unsupported OpenAI feature asked with a non-neutral value."""
    for name, neutral in _NEUTRAL_VALUES.items():
        if name in type(req).model_fields and getattr(req, name) not in neutral:
            _unsupported(name)


def _unsupported(name: str) -> None:
    raise APIError(
        400,
        f"'{name}' is not supported by zlocal; omit it or set it to {REJECTED_UNLESS_NEUTRAL[name]}",
        param=name,
        code="unsupported_field",
    )


def check_content(messages: list[ChatMessage]) -> None:
    """400 naming the first content part that is not text (or text without its ``text``)."""
    for i, m in enumerate(messages):
        _check_turn(i, m)
        if isinstance(m.content, str) or m.content is None:
            continue
        for j, part in enumerate(m.content):
            where = f"messages[{i}].content[{j}]"
            if part.type != "text":
                raise APIError(
                    400,
                    f"{where}.type: content parts of type '{part.type[:40]}' are not supported; "
                    'zlocal serves text models, send {"type": "text", "text": ...} parts',
                    param=f"{where}.type",
                    code="unsupported_content",
                )
            if part.text is None or part.model_extra:
                extra = next(iter(part.model_extra or {}), None)
                field = "text" if part.text is None else extra
                raise APIError(
                    400,
                    f"{where}.{field}: a text part has exactly 'type' and 'text'",
                    param=f"{where}.{field}",
                    code="invalid_value",
                )


def _check_turn(i: int, m: ChatMessage) -> None:
    """content is required except in an assistant turn with tool calls; tool turns name their call."""
    where = f"messages[{i}]"
    if m.content is None and not (m.role == "assistant" and m.tool_calls):
        raise APIError(400, f"{where}.content: required", param=f"{where}.content", code="invalid_value")
    if m.tool_calls and m.role != "assistant":
        raise APIError(
            400, f"{where}.tool_calls: only assistant turns carry tool calls", param=f"{where}.tool_calls"
        )
    if (m.role == "tool") != (m.tool_call_id is not None):
        msg = "a tool turn needs tool_call_id" if m.role == "tool" else "only tool turns have a tool_call_id"
        raise APIError(
            400, f"{where}.tool_call_id: {msg}", param=f"{where}.tool_call_id", code="invalid_value"
        )


def _check_stops(stop: str | list[str] | None) -> None:
    stops = [stop] if isinstance(stop, str) else (stop or [])
    if len(stops) > 16 or any(len(s) > 1024 for s in stops):
        raise APIError(
            400, "stop: at most 16 strings of at most 1024 characters", param="stop", code="invalid_value"
        )


def parse_chat_request(raw: bytes) -> ChatCompletionRequest:
    """Decode, drop the ignored fields, validate, and check unsupported features."""
    data = decode_json_object(raw)
    for name in IGNORED_FIELDS:
        data.pop(name, None)
    req = validate_model(ChatCompletionRequest, data)
    check_neutral(req)
    check_content(req.messages)
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError(400, 'top_logprobs needs "logprobs": true', param="top_logprobs", code="invalid_value")
    _check_stops(req.stop)
    return req


def parse_completion_request(raw: bytes) -> CompletionRequest:
    """The same for /v1/completions."""
    data = decode_json_object(raw)
    for name in IGNORED_FIELDS:
        data.pop(name, None)
    req = validate_model(CompletionRequest, data)
    check_neutral(req)
    _check_stops(req.stop)
    return req


def plain_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Role/content dicts for the chat template (``developer`` becomes ``system``), with
    ``tool_calls`` / ``tool_call_id`` where a turn has them."""
    out: list[dict[str, Any]] = []
    for m in messages:
        msg: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": m.text}
        if m.tool_calls:
            msg["tool_calls"] = [c.model_dump() for c in m.tool_calls]
        if m.tool_call_id is not None:
            msg["tool_call_id"] = m.tool_call_id
        out.append(msg)
    return out


def openapi_components() -> dict[str, Any]:
    """JSON schemas of the request models, with nested definitions hoisted for OpenAPI."""
    out: dict[str, Any] = {}
    for model in REQUEST_MODELS:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        out.update(schema.pop("$defs", {}))
        out[model.__name__] = schema
    return out
