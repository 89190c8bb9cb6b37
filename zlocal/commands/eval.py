"""`zlocal eval MODEL --reference SRC [--text FILE] [--json]`: perplexity, KL and top-1 agreement."""

from __future__ import annotations

import json


def register(sub) -> None:
    p = sub.add_parser("eval", help="compare a (quantized) model with its reference: perplexity, KL, top-1")
    p.add_argument("model", help="model to evaluate (directory or cached repo id)")
    p.add_argument("--reference", required=True, help="reference model, usually the unquantized source")
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


def run(args) -> int:
    from zlocal.conversion.quality import evaluate

    report = evaluate(
        args.model,
        args.reference,
        text=args.text,
        max_tokens=args.max_tokens,
        window=args.window,
        quiet=args.json,
        native=args.native,
        stream=False if args.whole_model else None,
    )
    print(json.dumps(report.to_dict()) if args.json else report.table())
    return 0
