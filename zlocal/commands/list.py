"""`zlocal list [--json]`: the models on this machine (Hugging Face cache and zlocal's cache), their
format, bits, size on disk and prepared forms. Reads config.json files only: no torch import."""

from __future__ import annotations

import json

LOADS_MODELS = False  # cli: no transformers set-up needed


def register(sub) -> None:
    p = sub.add_parser("list", help="list the models in the HF cache and zlocal's cache")
    p.add_argument("--json", action="store_true", help="print a JSON list")


def _prepared_text(prepared: list[dict]) -> str:
    from zlocal.commands._models import human_size

    return (
        ", ".join(f"{p['format']} {p['key'][:12]} ({human_size(p['size_bytes'])})" for p in prepared) or "-"
    )


def run(args) -> int:
    from zlocal.commands._models import ModelEntry, all_models, human_size

    models, orphans = all_models()
    rows = models + [
        ModelEntry(
            e.model or "?",
            "prepared",
            e.path,
            e.format,
            e.bits,
            e.size_bytes,
            [{"key": e.key, "format": e.format, "bits": e.bits, "size_bytes": e.size_bytes, "path": e.path}],
        )
        for e in orphans
    ]
    if args.json:
        print(json.dumps([m.to_dict() for m in rows], indent=2))
        return 0
    if not rows:
        print("no models yet: `zlocal pull REPO` downloads one; `zlocal chat` converts the embedded model")
        return 0
    table = [("NAME", "FORMAT", "BITS", "SIZE", "WHERE", "PREPARED")] + [
        (m.name, m.format, str(m.bits or "?"), human_size(m.size_bytes), m.where, _prepared_text(m.prepared))
        for m in rows
    ]
    widths = [max(len(r[i]) for r in table) for i in range(5)]
    for r in table:
        print("  ".join(c.ljust(w) for c, w in zip(r[:5], widths, strict=True)) + "  " + r[5])
    return 0
