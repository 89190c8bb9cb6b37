"""`zlocal prompt MODEL --messages FILE.json | --prompt TEXT`: print the exact prompt the runtime
feeds the model."""

from __future__ import annotations

import json
import sys

from zlocal.commands._common import add_model_args, add_prompt_args, read_messages
from zlocal.errors import InvalidArgumentError


def register(sub) -> None:
    p = sub.add_parser("prompt", help="render messages with the model's chat template (no weights loaded)")
    add_model_args(p)
    add_prompt_args(p, "a user message (after --messages, if given)")
    p.add_argument("--no-generation-prompt", action="store_true", help="do not open an assistant turn")
    p.add_argument("--ids", action="store_true", help="also print the token ids (JSON on stderr)")


def run(args) -> int:
    from zlocal.inference.runtime import load_chat_template

    if args.prompt is None and args.messages is None:
        raise InvalidArgumentError("give --messages FILE.json or --prompt TEXT ('-' reads either from stdin)")
    messages = read_messages(args)
    _, _, _tokenizer, template = load_chat_template(
        args.model, chat_template=args.chat_template, allow_pickle=args.allow_pickle, download=args.download
    )
    text = template.render(messages, add_generation_prompt=not args.no_generation_prompt)
    sys.stdout.write(text)
    sys.stdout.flush()
    if args.ids:
        ids = template.encode(messages, add_generation_prompt=not args.no_generation_prompt)
        print(json.dumps({"token_ids": ids, "count": len(ids), "template": template.origin}), file=sys.stderr)
    return 0
