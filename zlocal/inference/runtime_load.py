"""Building a Runtime's parts without the weights: the validated chat template, generation defaults."""

from __future__ import annotations

import os
from typing import Any

from zlocal.checkpoint.resolve import DEFAULT_MODEL, resolve_model
from zlocal.errors import CheckpointError
from zlocal.inference.loader import load_config
from zlocal.inference.template import build_template


def generation_defaults(model) -> dict[str, Any]:
    """Sampling defaults from the checkpoint's generation_config (greedy when do_sample is False)."""
    gc = getattr(model, "generation_config", None)
    if gc is None:
        return {}
    out: dict[str, Any] = {}
    if getattr(gc, "do_sample", None) is False:
        out["temperature"] = 0.0
    for name in ("temperature", "top_p", "top_k", "repetition_penalty", "min_p"):
        value = getattr(gc, name, None)
        if value is not None and name not in out:
            out[name] = value
    return out


def load_chat_template(
    model: str | os.PathLike = DEFAULT_MODEL,
    *,
    chat_template: str | os.PathLike | None = None,
    allow_pickle: bool = False,
    download: bool = False,
    revision: str | None = None,
):
    """Resolve MODEL and build its validated chat template without loading any weights.

    Returns (resolved, config, tokenizer, template).
    """
    from transformers import AutoTokenizer

    resolved = resolve_model(model, revision=revision, download=download, allow_pickle=allow_pickle)
    config = load_config(resolved)
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolved.path, trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{resolved.name}: cannot load the tokenizer: {exc}") from exc
    eos = getattr(config, "eos_token_id", None)
    eos_ids = list(eos) if isinstance(eos, (list, tuple)) else [eos]
    if tokenizer.eos_token_id is not None:
        eos_ids.append(tokenizer.eos_token_id)
    template = build_template(
        tokenizer, str(model), config, [e for e in eos_ids if e is not None], chat_template
    )
    return resolved, config, tokenizer, template
