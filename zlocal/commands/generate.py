"""`zlocal generate MODEL --prompt TEXT [--json]`: one completion, streamed or as JSON."""

from __future__ import annotations

import json
import sys

from zlocal.commands._common import (
    add_model_args,
    add_sampling_args,
    check_sampling,
    load_runtime,
    print_stats,
    sampling_kwargs,
)


def register(sub) -> None:
    p = sub.add_parser("generate", help="generate one completion for a prompt")
    add_model_args(p)
    add_sampling_args(p)
    p.add_argument("--prompt", "-p", required=True, help="the user message (or raw text with --raw)")
    p.add_argument("--system", default=None, help="system prompt (chat mode)")
    p.add_argument("--raw", action="store_true", help="complete the text as is, without the chat template")
    p.add_argument("--json", action="store_true", help="print text, token ids, counts and timings as JSON")


def run(args) -> int:
    check_sampling(args)
    rt = load_runtime(args)
    sampling = sampling_kwargs(args)
    if args.raw:
        ids = rt.encode(args.prompt)
    else:
        msgs = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": args.prompt}
        ]
        ids = rt.encode_chat(msgs)
    if args.json:
        c = rt.generate(ids, **sampling)
        out = c.to_dict()
        out.update(
            model=rt.info.model,
            device=rt.info.device,
            dtype=rt.info.dtype,
            load_seconds=round(rt.info.load_seconds, 3),
            prompt_token_ids=ids,
        )
        print(json.dumps(out, ensure_ascii=False))
        return 0
    last = None
    for r in rt.stream_tokens(ids, **sampling):
        sys.stdout.write(r.text)
        sys.stdout.flush()
        last = r
    sys.stdout.write("\n")
    print_stats(last)
    return 0
