"""Incremental detokenization and stop-string handling for streaming.

Decoding token by token breaks multi-byte characters (a CJK character or an emoji can span several
byte-fallback tokens) and drops SentencePiece's leading spaces. The decoder re-decodes a short window
and only emits text once it no longer ends in a partial character.
"""

from __future__ import annotations

from collections.abc import Sequence

_REPLACEMENT = "\ufffd"


class IncrementalDecoder:
    """Turn a growing list of token ids into text deltas that are always whole characters."""

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self._prefix = 0  # start of the window that is re-decoded for context
        self._read = 0  # end of what has already been emitted

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(
            list(ids), skip_special_tokens=self.skip_special_tokens, clean_up_tokenization_spaces=False
        )

    def push(self, token_id: int) -> str:
        """Add one token; return the newly completed text (may be empty)."""
        self.ids.append(int(token_id))
        prefix_text = self._decode(self.ids[self._prefix : self._read])
        full_text = self._decode(self.ids[self._prefix :])
        if len(full_text) > len(prefix_text) and not full_text.endswith(_REPLACEMENT):
            delta = full_text[len(prefix_text) :]
            self._prefix, self._read = self._read, len(self.ids)
            return delta
        return ""

    def flush(self) -> str:
        """Return whatever is still held back (an incomplete character becomes U+FFFD)."""
        prefix_text = self._decode(self.ids[self._prefix : self._read])
        full_text = self._decode(self.ids[self._prefix :])
        self._prefix = self._read = len(self.ids)
        return full_text[len(prefix_text) :]


class StopStringFilter:
    """Hold back text that could be the start of a stop string; cut the stream at the first match.

    The stop string itself is never emitted.
    """

    def __init__(self, stop: Sequence[str]):
        self.stop = [s for s in stop if s]
        self._hold = max((len(s) for s in self.stop), default=0)
        self._pending = ""
        self.stopped = False
        self.matched: str | None = None

    def feed(self, text: str) -> str:
        """Add text; return what can safely be emitted now."""
        if self.stopped:
            return ""
        if not self.stop:
            return text
        self._pending += text
        hits = [(self._pending.find(s), s) for s in self.stop]
        hits = [(i, s) for i, s in hits if i >= 0]
        if hits:
            i, s = min(hits)
            out, self._pending = self._pending[:i], ""
            self.stopped, self.matched = True, s
            return out
        # Keep only as much as could still grow into a stop string.
        keep = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self._pending)), 0, -1):
                if self._pending.endswith(s[:k]):
                    keep = max(keep, k)
                    break
        cut = len(self._pending) - keep
        out, self._pending = self._pending[:cut], self._pending[cut:]
        return out

    def flush(self) -> str:
        """Return held-back text at the end of generation (no stop string completed)."""
        out, self._pending = ("" if self.stopped else self._pending), ""
        return out
