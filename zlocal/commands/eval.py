"""`zlocal eval MODEL [--reference SRC] [--text FILE] [--json]`: perplexity, KL and top-1 agreement.

Without ``--reference`` the reference is the source recorded in MODEL's ``zlocal.json`` (written by
``zlocal convert``): its repo id in the Hugging Face cache, else its name (an alias or a folder), and
only when the shard files found there match the recorded sha256 hashes.
"""

from __future__ import annotations

import json
from pathlib import Path

from zlocal.errors import InvalidArgumentError, ModelNotFoundError, ZlocalError

# Hashing a plain (non-HF-cache) shard costs a read of it; past this size its name is trusted.
_HASH_LIMIT = 2 << 30


def register(sub) -> None:
    p = sub.add_parser("eval", help="compare a (quantized) model with its reference: perplexity, KL, top-1")
    p.add_argument("model", help="model to evaluate (directory or cached repo id)")
    p.add_argument(
        "--reference",
        default=None,
        help="reference model, usually the unquantized source (default: the source recorded in "
        "MODEL's zlocal.json, when it is in the HF cache or zlocal's cache)",
    )
    p.add_argument(
        "--text",
        default=None,
        metavar="FILE",
        help="your own text, scored as one more kind beside the built-in prose, dialogue, "
        "technical/legal and code texts",
    )
    p.add_argument("--max-tokens", type=int, default=1024, help="tokens of each text to use (default 1024)")
    p.add_argument("--window", type=int, default=512, help="tokens per forward pass (default 512)")
    p.add_argument(
        "--native",
        action="store_true",
        help="run bitsandbytes models with bitsandbytes' own kernels instead of dequantized weights "
        "(loads each model whole)",
    )
    p.add_argument(
        "--whole-model",
        action="store_true",
        help="load each model whole instead of streaming both one decoder layer at a time "
        "(same numbers, needs the reference's full size in RAM)",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def _shards_match(path: Path, shards: dict[str, str]) -> bool:
    """Every recorded shard is in ``path`` with the recorded sha256: an HF cache blob is named by its
    hash (free to check); a plain file is hashed when under _HASH_LIMIT."""
    from zlocal.checkpoint.manifest import sha256_file

    for name, digest in shards.items():
        f = path / name
        if not f.is_file():
            return False
        real = f.resolve()
        if real != f.absolute() and len(real.name) == 64:  # huggingface_hub blobs/<sha256>
            if real.name != digest:
                return False
        elif f.stat().st_size <= _HASH_LIMIT and sha256_file(f) != digest:
            return False
    return True


def default_reference(model: str) -> str:
    """The source recorded in MODEL's zlocal.json, found locally; ModelNotFoundError otherwise."""
    from zlocal.checkpoint.manifest import MANIFEST_NAME, read_manifest
    from zlocal.checkpoint.resolve import resolve_model

    path = resolve_model(model, config_only=True).path
    if not (path / MANIFEST_NAME).is_file():
        raise ModelNotFoundError(
            f"{model} has no {MANIFEST_NAME} recording its source (not made by `zlocal convert`); "
            "pass --reference SRC"
        )
    source = read_manifest(path).source
    names = [n for n in (source.get("repo_id"), source.get("name")) if n]
    for name in dict.fromkeys(names):
        try:
            found = resolve_model(name, config_only=True)
        except ZlocalError:
            continue
        if _shards_match(found.path, source.get("shards") or {}):
            return str(found.path)
    what = " or ".join(dict.fromkeys(names)) or "an unnamed model"
    raise ModelNotFoundError(
        f"the source recorded in {model}/{MANIFEST_NAME} ({what}) is not in the Hugging Face cache or "
        "zlocal's cache with matching shard hashes; pass --reference SRC (or `zlocal pull` it)"
    )


def run(args) -> int:
    from zlocal.conversion.quality import evaluate

    for flag, value in (("--max-tokens", args.max_tokens), ("--window", args.window)):
        if value < 2:
            raise InvalidArgumentError(f"{flag} must be at least 2, got {value}")
    reference = args.reference or default_reference(args.model)
    report = evaluate(
        args.model,
        reference,
        text=args.text,
        max_tokens=args.max_tokens,
        window=args.window,
        quiet=args.json,
        native=args.native,
        stream=False if args.whole_model else None,
    )
    print(json.dumps(report.to_dict()) if args.json else report.table())
    return 0
