"""Token log-probabilities for ``logprobs`` / ``top_logprobs`` (Python API and server).

Which distribution: the log-softmax of the logits *after* the repetition penalty and the temperature,
*before* top-k, top-p and min-p filtering. Why: the filters set most of the vocabulary to zero
probability, so after them the alternatives' logprobs would be -inf (useless for ranking or
confidence) and a token's logprob would depend on how many neighbours survived the cut; before the
penalty and temperature they would not describe the distribution the token was drawn from at all.
The chosen token was drawn from the renormalized part of this distribution that the filters kept.
With greedy decoding (temperature 0)
there is no temperature to divide by: the reported distribution is the model's own (log-softmax of
the raw logits, after the repetition penalty when one is set), and the chosen token is its argmax.

With a grammar (``response_format``, tools: zlocal.inference.grammar) the logits are masked first: tokens the
grammar forbids are at -inf before the penalty and the temperature, so the reported distribution is
the one over the allowed tokens (renormalized), and a forbidden alternative shows at FLOOR.

Nothing here runs unless logprobs are asked for (``SamplingParams.logprobs``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

# OpenAI reports -9999.0 for a token with no probability at all; JSON has no -Infinity.
FLOOR = -9999.0
_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token's log-probability and the ``top`` alternatives (id, logprob), best first."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def token_logprob(adjusted: torch.Tensor, token: int, k: int) -> TokenLogprob:
    """Log-probability of ``token`` and the ``k`` most likely tokens under ``adjusted`` logits
    (the output of ``sampling.adjusted_logits``)."""
    logp = torch.log_softmax(adjusted.float(), dim=-1)
    top: tuple[tuple[int, float], ...] = ()
    if k > 0:
        values, ids = torch.topk(logp, min(k, logp.numel()))
        top = tuple(zip(ids.tolist(), values.tolist(), strict=True))
    return TokenLogprob(int(token), float(logp[token]), top)


def _floor(value: float) -> float:
    return value if value > FLOOR else FLOOR  # also maps -inf and NaN to the floor


def _byte_decoder() -> dict[str, int]:
    """The inverse of GPT-2's bytes_to_unicode table (byte-level BPE vocabularies)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars, extra = list(keep), 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(keep, chars, strict=True)}


class TokenTexts:
    """A token id's text and UTF-8 bytes as OpenAI reports them, cached per id.

    ``bytes`` are the bytes the token adds to the output: SentencePiece's ``▁`` is a space and a
    ``<0xHH>`` byte-fallback piece is that single byte; byte-level BPE pieces (GPT-2 style, SmolLM2)
    are mapped back to their bytes. ``token`` is those bytes decoded as UTF-8 (a partial character
    becomes U+FFFD; ``bytes`` keeps it exact).
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
        self._byte_level = type(decoder).__name__ == "ByteLevel"
        self._bytes_of_char = _byte_decoder() if self._byte_level else {}
        self._cache: dict[int, tuple[str, bytes]] = {}

    def __call__(self, token: int) -> tuple[str, bytes]:
        """(text, bytes) of one token id."""
        hit = self._cache.get(token)
        if hit is None:
            raw = self._bytes(token)
            hit = self._cache[token] = (raw.decode("utf-8", errors="replace"), raw)
        return hit

    def _bytes(self, token: int) -> bytes:
        piece = self.tokenizer.convert_ids_to_tokens(int(token))
        if piece is None:
            return b""
        if token in getattr(self.tokenizer, "all_special_ids", ()):
            return piece.encode("utf-8")
        m = _BYTE_PIECE.match(piece)
        if m:
            return bytes([int(m.group(1), 16)])
        if self._byte_level:
            if all(ch in self._bytes_of_char for ch in piece):
                return bytes(self._bytes_of_char[ch] for ch in piece)
            return piece.encode("utf-8")  # an added token stored as plain text
        return piece.replace("\u2581", " ").encode("utf-8")


def _alt(texts: TokenTexts, token: int, logprob: float) -> dict[str, Any]:
    text, raw = texts(token)
    return {"token": text, "logprob": _floor(logprob), "bytes": list(raw)}


def chat_entry(texts: TokenTexts, lp: TokenLogprob) -> dict[str, Any]:
    """One ``choices[i].logprobs.content[j]`` object of a chat completion."""
    return {**_alt(texts, lp.token, lp.logprob), "top_logprobs": [_alt(texts, t, v) for t, v in lp.top]}


def legacy_logprobs(texts: TokenTexts, lps: list[TokenLogprob], offsets: list[int]) -> dict[str, Any]:
    """``choices[i].logprobs`` of a (legacy) text completion: tokens, token_logprobs, top_logprobs
    (one {text: logprob} object per token; of two alternatives with the same text the likelier
    one is kept) and text_offset (where each token's text starts in the completion)."""
    top: list[dict[str, float]] = []
    for lp in lps:
        alts: dict[str, float] = {}
        for t, v in lp.top:
            alts.setdefault(texts(t)[0], _floor(v))
        top.append(alts)
    return {
        "tokens": [texts(lp.token)[0] for lp in lps],
        "token_logprobs": [_floor(lp.logprob) for lp in lps],
        "top_logprobs": top,
        "text_offset": list(offsets),
    }
