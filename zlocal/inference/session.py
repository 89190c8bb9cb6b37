"""``ChatSession``: a multi-turn chat over one Runtime that reuses the KV cache between turns."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from zlocal.errors import ContextOverflowError, InvalidArgumentError
from zlocal.inference.engine import GenerationResponse
from zlocal.inference.grammar_format import response_grammar
from zlocal.inference.template import validate_messages

if TYPE_CHECKING:
    from zlocal.inference.runtime import Runtime


class ChatSession:
    """Multi-turn chat state. Only the new turn is prefilled; the KV cache holds the rest.

    Truncation policy when history + max_new_tokens exceed the context: ``truncate="oldest"`` drops
    the oldest user/assistant exchanges (the system message is kept) until the prompt fits;
    ``truncate="error"`` raises ContextOverflowError instead.

    History: a turn (the user message, then the reply, and any truncation it needs) enters
    ``messages`` only when its stream starts generating, so a stream created and never consumed
    leaves the history as it was. A reply cut short (closed stream, ``cancel``) is kept as far as it
    got; a turn that ends before its first token (cancelled before it started, BusyError, an error)
    is rolled back.
    """

    def __init__(self, runtime: Runtime, system: str | None = None, truncate: str = "oldest"):
        if truncate not in ("oldest", "error"):
            raise InvalidArgumentError("truncate must be 'oldest' or 'error'")
        self.runtime = runtime
        self.truncate = truncate
        self.system = system
        self.messages: list[dict[str, str]] = []
        self.dropped_turns = 0

    def reset(self) -> None:
        """Forget the conversation (the system prompt stays)."""
        self.messages = []

    def set_system(self, text: str | None) -> None:
        """Replace the system prompt; the conversation restarts."""
        self.system = text or None
        self.reset()

    def _prompt(self, history: list[dict[str, str]], max_new_tokens: int) -> tuple[list[int], list, int]:
        """Prompt ids for ``history`` (ending with the new user turn), the history truncation left
        and how many exchanges it dropped; ``history`` itself is not changed."""
        dropped = 0
        while True:
            msgs = ([{"role": "system", "content": self.system}] if self.system else []) + history
            ids = self.runtime.encode_chat(msgs)
            if len(ids) + max_new_tokens <= self.runtime.max_context or self.truncate == "error":
                return ids, history, dropped
            # Drop the oldest exchange (user + assistant); never the turn being asked.
            if len(history) <= 1:
                raise ContextOverflowError(
                    f"this message alone ({len(ids)} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                    f"context of {self.runtime.max_context} tokens"
                )
            cut = 2 if len(history) > 2 and history[1]["role"] == "assistant" else 1
            history = history[cut:]
            dropped += 1

    def stream(
        self,
        user_text: str,
        response_format: Any = None,
        *,
        cancel: threading.Event | None = None,
        wait: bool = True,
        timeout: float | None = None,
        **sampling,
    ) -> Iterator[GenerationResponse]:
        """Send a user message; stream the reply; the turn enters the history once it starts.

        ``response_format`` (as in ``Runtime.chat_completion``) constrains this turn's reply.
        ``cancel`` (a threading.Event), ``wait`` and ``timeout`` work as in ``Runtime.stream_tokens``.
        """
        from zlocal.inference.runtime import sampling_params

        validate_messages([{"role": "user", "content": user_text}])
        params = sampling_params(self.runtime.sampling_defaults, **sampling)
        grammar, _ = response_grammar(lambda: self.runtime.grammars, response_format)
        if grammar is not None:
            sampling["grammar"] = grammar
        turn = {"role": "user", "content": user_text}
        # Planned now, so a turn that cannot fit fails here rather than on the first next().
        planned = (list(self.messages), self._prompt([*self.messages, turn], params.max_new_tokens))
        controls = {"cancel": cancel, "wait": wait, "timeout": timeout}
        return self._run(turn, params.max_new_tokens, planned, {**sampling, **controls})

    def _run(self, turn, max_new_tokens, planned, sampling):
        before, dropped_before = self.messages, self.dropped_turns
        # Plan again only if the history changed between stream() and the first next().
        same = planned[0] == before
        ids, kept, dropped = planned[1] if same else self._prompt([*before, turn], max_new_tokens)
        self.messages, self.dropped_turns = kept, dropped_before + dropped
        parts, last, failed = [], None, True
        try:
            for r in self.runtime.stream_tokens(ids, **sampling):
                parts.append(r.text)
                last = r
                yield r
            failed = False
        finally:
            unstarted = last is None or last.generation_tokens == 0
            if unstarted and (last is None or failed or last.finish_reason == "cancelled"):
                self.messages, self.dropped_turns = before, dropped_before  # never started: roll back
            else:
                self.messages.append({"role": "assistant", "content": "".join(parts)})

    def send(self, user_text: str, **sampling) -> str:
        """Send a user message and return the full reply."""
        return "".join(r.text for r in self.stream(user_text, **sampling))
