"""Size and token budgets for POST /tokenize and /detokenize, and handing memory back afterwards.

These functions run on the queue's single prep thread (``GenerationQueue.prepare``), after the
request was admitted into the same budget as generations, so one big request at a time holds its
intermediate data. They take the raw body and return the finished JSON bytes: nothing large (the
decoded text, the id list) outlives the call, and FastAPI never deep-copies a million-id list to
encode it. Measured with the Mistral tokenizer, tokenizing costs ~70-100 bytes of transient
memory per input character (the Rust tokenizer's alignments and per-token strings); glibc keeps
much of it after ``free`` unless asked with ``malloc_trim``, hence ``release_memory`` after large
requests.
"""

from __future__ import annotations

import json
from typing import Any

from zlocal.errors import ContextOverflowError, ZlocalError
from zlocal.kernels.heap import release_freed_memory
from zlocal.serving.server_schema import (
    TOKEN_BUDGET,
    APIError,
    DetokenizeRequest,
    TokenizeRequest,
    check_content,
    decode_json_object,
    plain_messages,
    validate_model,
)

# /tokenize text is refused before tokenizing above this many characters per budgeted token: English
# averages ~4-4.6 characters a token, so 4 Mi characters is about the whole token budget.
CHARS_PER_TOKEN = 4
# Bodies at least this large are followed by malloc_trim.
LARGE_BYTES = 256 * 1024


def release_memory() -> bool:
    """Give freed heap pages back to the OS after a large body (see zlocal.kernels.heap); False
    where the C library cannot."""
    return release_freed_memory()


def _too_large(what: str, size: int, limit: int, unit: str, code: str) -> APIError:
    return APIError(413, f"{what} is {size} {unit}, more than the limit of {limit} {unit}", code=code)


def _dumps(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _check_model(name: str | None, served: tuple[str, ...] | None) -> None:
    if served is not None:
        from zlocal.serving.server_completions import check_model  # it imports this module

        check_model(name, served)


def tokenize_json(
    runtime, raw: bytes, token_budget: int = TOKEN_BUDGET, served: tuple[str, ...] | None = None
) -> bytes:
    """POST /tokenize: the body in, the JSON answer out; 413 when over the size or token budget.
    ``served``: the model names a request may give (404 for others; None: any)."""
    req = validate_model(TokenizeRequest, decode_json_object(raw))
    _check_model(req.model, served)
    if req.messages is not None:
        check_content(req.messages)
    if (req.prompt is None) == (req.messages is None):
        raise APIError(
            400, "send exactly one of 'prompt' or 'messages'", param="prompt", code="invalid_value"
        )
    chars = len(req.prompt) if req.prompt is not None else sum(len(m.text) for m in req.messages)
    max_chars = CHARS_PER_TOKEN * token_budget
    if chars > max_chars:
        param = "prompt" if req.prompt is not None else "messages"
        err = _too_large("the text to tokenize", chars, max_chars, "characters", "request_too_large")
        err.param = param
        raise err
    try:
        if req.messages is not None:
            # the prompt a chat request with these messages would run (tool turns rendered as chat does)
            ids = runtime.plan_chat(plain_messages(req.messages)).prompt_ids
        else:
            ids = runtime.encode(req.prompt, req.add_special_tokens)
    except ZlocalError as exc:
        code = "context_length_exceeded" if isinstance(exc, ContextOverflowError) else "invalid_value"
        raise APIError(400, str(exc), code=code) from exc
    del req  # the text can go before the answer is built
    if len(ids) > token_budget:
        raise _too_large("the tokenized text", len(ids), token_budget, "tokens", "too_many_tokens")
    return _dumps({"tokens": ids, "count": len(ids), "max_context": runtime.max_context})


def detokenize_json(
    runtime, raw: bytes, token_budget: int = TOKEN_BUDGET, served: tuple[str, ...] | None = None
) -> bytes:
    """POST /detokenize: the body in, the JSON answer out; 413 over the token budget (``served``:
    as for tokenize_json)."""
    data = decode_json_object(raw)
    tokens = data.get("tokens")
    # Before pydantic copies the list: a huge list is refused with its size, not validated item by item.
    if isinstance(tokens, list) and len(tokens) > token_budget:
        err = _too_large("'tokens'", len(tokens), token_budget, "tokens", "too_many_tokens")
        err.param = "tokens"
        raise err
    req = validate_model(DetokenizeRequest, data)
    _check_model(req.model, served)
    del data, tokens
    vocab = len(runtime.tokenizer)
    bad = next((i for i, t in enumerate(req.tokens) if not 0 <= t < vocab), None)
    if bad is not None:
        raise APIError(
            400,
            f"tokens[{bad}] is not a token id (0 <= id < {vocab})",
            param=f"tokens[{bad}]",
            code="invalid_value",
        )
    return _dumps({"text": runtime.tokenizer.decode(req.tokens)})


def run_and_trim(fn, raw: bytes):
    """``fn(raw)``, then memory handed back to the OS when the body was large.

    Runs on the prep thread, so the trim comes after ``fn``'s intermediate data is gone. The
    threshold is low because the transient cost is ~70-100 times the text: 256 KiB costs ~20 MB.
    """
    try:
        return fn(raw)
    finally:
        if len(raw) >= LARGE_BYTES:
            release_memory()
