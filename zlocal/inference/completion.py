"""What a finished generation returns (``Completion``) and what a load reports (``LoadInfo``)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from zlocal.inference.tools import ToolCall


@dataclass
class Completion:
    """A finished generation: text plus token ids, counts and timings."""

    text: str
    token_ids: list[int]
    prompt_tokens: int
    completion_tokens: int
    reused_tokens: int
    finish_reason: str
    prompt_tps: float
    generation_tps: float
    time_to_first_token: float
    total_time: float
    # With logprobs=True: one OpenAI chat ``logprobs.content`` entry per generated token
    # ({token, logprob, bytes, top_logprobs}), and the same data in the legacy text-completion
    # shape ({tokens, token_logprobs, top_logprobs, text_offset}). None otherwise.
    logprobs: list[dict[str, Any]] | None = None
    text_logprobs: dict[str, Any] | None = None
    # With response_format: the reply parsed (a dict/list, or an instance of the pydantic model
    # given); None when the reply was cut short (finish_reason "length"). With tools: the calls the
    # model made (finish_reason "tool_calls"; ``text`` is then the raw reply, ``content`` None).
    parsed: Any = None
    tool_calls: list[ToolCall] = field(default_factory=list)
    content: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data: tool calls in OpenAI's shape, a parsed pydantic model dumped."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["tool_calls"] = [c.to_openai() for c in self.tool_calls]
        if hasattr(self.parsed, "model_dump"):
            out["parsed"] = self.parsed.model_dump(mode="json")
        return out


@dataclass
class LoadInfo:
    """What the runtime loaded and how (shown by the CLI, returned to embedders)."""

    model: str
    path: str
    source: str
    device: str
    dtype: str
    max_context: int
    template: str
    load_seconds: float
    extra: dict[str, Any] = field(default_factory=dict)
