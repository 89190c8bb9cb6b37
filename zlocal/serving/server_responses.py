"""The asyncio side of a generation job: the SSE stream or the whole JSON answer, for chat
completions (``chat.completion``) and text completions (``text_completion``).

A job's responses arrive on its output queue in order; with ``n`` > 1 the choices come one after
another, each ending with a response that carries its ``finish_reason``. Token logprobs, when asked
for, ride on the responses (``GenerationResponse.logprob``) and are formatted here: the chat shape
(``logprobs.content``) or the legacy text shape (``tokens``, ``token_logprobs``, ...).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

from zlocal.inference.logprobs import TokenTexts, chat_entry, legacy_logprobs
from zlocal.inference.tools import ToolCallStream, parse_tool_calls
from zlocal.serving.server_queue import DONE, GenerationQueue, Job, JobError
from zlocal.serving.server_schema import APIError


@dataclass
class Reply:
    """How to answer one request: its id, the model name shown, the API shape and options."""

    cid: str
    model: str
    chat: bool  # chat.completion(.chunk), else text_completion
    n: int = 1
    texts: TokenTexts | None = None  # set when logprobs were asked for
    include_usage: bool = False
    # tools were offered: the reply is text or <tool_call> blocks (zlocal.inference.tools)
    tools: bool = False


class _Choice:
    """One choice being collected: its text and the logprobs not yet sent."""

    def __init__(self, tools: bool = False):
        self.parts: list[str] = []
        self.lps: list = []
        self.offsets: list[int] = []
        self.chars = 0
        self.sent = 0  # logprobs already streamed
        self.calls = ToolCallStream() if tools else None

    def add(self, resp) -> None:
        if resp.logprob is not None:
            self.lps.append(resp.logprob)
            self.offsets.append(self.chars)  # where the token's text starts, as far as decoded
        self.chars += len(resp.text)
        self.parts.append(resp.text)

    def take(self, reply: Reply) -> Any:
        """The logprobs object for the tokens not yet sent (None when not asked for)."""
        start, self.sent = self.sent, len(self.lps)
        return _logprobs(reply, self.lps[start:], self.offsets[start:])


def _logprobs(reply: Reply, lps: list, offsets: list[int]) -> Any:
    if reply.texts is None:
        return None
    if reply.chat:
        return {"content": [chat_entry(reply.texts, lp) for lp in lps]}
    return legacy_logprobs(reply.texts, lps, offsets)


def _sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode("utf-8") + b"\n\n"


def _chunk(
    reply: Reply, created: int, index: int, text: str | None, logprobs, finish: str | None, role=False
):
    """One SSE chunk of choice ``index``; ``text`` None is an empty delta (finish or usage chunks)."""
    if reply.chat:
        delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
        if text is not None and not role:
            delta["content"] = text
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        kind = "chat.completion.chunk"
    else:
        choice = {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish}
        kind = "text_completion"
    return {"id": reply.cid, "object": kind, "created": created, "model": reply.model, "choices": [choice]}


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _final_reason(reason: str | None, called: bool = False) -> str:
    # a reply cut by max_tokens stays "length" even after complete calls (a later one was lost)
    if reason == "length":
        return "length"
    return "tool_calls" if called else "stop"


def _deltas(reply: Reply, created: int, index: int, choice: _Choice, text: str):
    """The chunks one response's text becomes: a content delta, or with tools the content and the
    tool calls completed so far (each call: its id and name, then its arguments)."""
    if choice.calls is None:
        if text:
            yield _chunk(reply, created, index, text, choice.take(reply), None)
        return
    content, calls = choice.calls.feed(text)
    if content:
        yield _chunk(reply, created, index, content, choice.take(reply), None)
    for call in calls:
        head = {"index": call.index, "id": call.call.id, "type": "function"}
        head["function"] = {"name": call.call.name, "arguments": ""}
        yield _tool_chunk(reply, created, index, head, None)
        args = {"index": call.index, "function": {"arguments": call.call.arguments}}
        yield _tool_chunk(reply, created, index, args, choice.take(reply))


def _tool_chunk(reply: Reply, created: int, index: int, call: dict[str, Any], logprobs):
    chunk = _chunk(reply, created, index, None, logprobs, None)
    chunk["choices"][0]["delta"] = {"tool_calls": [call]}
    return chunk


def _cancelled() -> APIError:
    return APIError(
        503, "the generation was cancelled (server shutting down)", type="server_error", code="cancelled"
    )


async def stream_job(queue: GenerationQueue, job: Job, reply: Reply) -> AsyncIterator[bytes]:
    """SSE body. A disconnect cancels the job (the generator is closed at its current await)."""
    created = int(time.time())
    finished = False
    try:
        index, choice, last, completion = 0, _Choice(reply.tools), None, 0
        if reply.chat:
            yield _sse(_chunk(reply, created, 0, None, None, None, role=True))
        while True:
            item = await job.out.get()
            if item is DONE:
                break
            if isinstance(item, JobError):
                yield _sse(
                    APIError(item.status, item.message, type=item.kind, code="generation_error").body()
                )
                yield b"data: [DONE]\n\n"
                finished = True
                return
            if reply.chat and index > 0 and not choice.parts:  # the next choice begins
                yield _sse(_chunk(reply, created, index, None, None, None, role=True))
            last = item
            choice.add(item)
            for chunk in _deltas(reply, created, index, choice, item.text):
                yield _sse(chunk)
            if item.finish_reason is None or item.finish_reason == "cancelled":
                continue
            if choice.sent < len(choice.lps):  # tokens whose text never showed (e.g. cut by a stop)
                yield _sse(_chunk(reply, created, index, "", choice.take(reply), None))
            reason = _final_reason(item.finish_reason, choice.calls is not None and choice.calls.count > 0)
            yield _sse(_chunk(reply, created, index, None, None, reason))
            completion += item.generation_tokens
            index, choice = index + 1, _Choice(reply.tools)
        if last is None or index < reply.n:
            yield _sse(_cancelled().body())
        elif reply.include_usage:
            usage = {**_chunk(reply, created, 0, None, None, None), "choices": []}
            yield _sse({**usage, "usage": _usage(last.prompt_tokens, completion)})
        yield b"data: [DONE]\n\n"
        finished = True
    finally:
        if not finished:
            queue.abandon(job)


async def _watch_disconnect(request: Request, queue: GenerationQueue, job: Job) -> None:
    while True:
        if await request.is_disconnected():
            queue.abandon(job)
            return
        # A short poll: on a small model a whole answer takes well under a second.
        await asyncio.sleep(0.05)


async def _collect(queue: GenerationQueue, job: Job, request: Request):
    """All choices of a job as (choice, last response) pairs; raises the job's error."""
    watcher = asyncio.create_task(_watch_disconnect(request, queue, job))
    done, error, choices, choice = False, None, [], _Choice()  # tool calls are parsed at the end
    try:
        while True:
            item = await job.out.get()
            if item is DONE:
                done = True
                break
            if isinstance(item, JobError):
                error = item
                continue
            choice.add(item)
            if item.finish_reason is not None and item.finish_reason != "cancelled":
                choices.append((choice, item))
                choice = _Choice()
    finally:
        watcher.cancel()
        if not done:
            queue.abandon(job)
    if error is not None:
        raise APIError(error.status, error.message, type=error.kind, code="generation_error")
    return choices


async def complete_job(queue: GenerationQueue, job: Job, reply: Reply, request: Request) -> JSONResponse:
    """Collect a whole answer; a client that hangs up still cancels its generation."""
    choices = await _collect(queue, job, request)
    if len(choices) < reply.n:
        raise _cancelled()
    out = []
    for index, (choice, last) in enumerate(choices):
        text = "".join(choice.parts)
        entry: dict[str, Any] = {"index": index}
        calls = []
        if reply.chat:
            content, calls = parse_tool_calls(text) if reply.tools else (text, [])
            entry["message"] = {"role": "assistant", "content": content}
            if calls:
                entry["message"]["tool_calls"] = [c.to_openai() for c in calls]
        else:
            entry["text"] = text
        entry["logprobs"] = _logprobs(reply, choice.lps, choice.offsets)
        entry["finish_reason"] = _final_reason(last.finish_reason, bool(calls))
        out.append(entry)
    last = choices[-1][1]
    body = {
        "id": reply.cid,
        "object": "chat.completion" if reply.chat else "text_completion",
        "created": int(time.time()),
        "model": reply.model,
        "choices": out,
        "usage": _usage(last.prompt_tokens, sum(r.generation_tokens for _, r in choices)),
        "timings": {
            "prompt_tps": round(last.prompt_tps, 2),
            "generation_tps": round(last.generation_tps, 2),
            "time_to_first_token": round(last.time_to_first_token, 4),
            "reused_tokens": last.reused_tokens,
        },
    }
    return JSONResponse(body)
