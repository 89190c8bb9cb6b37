"""`zlocal generate MODEL --prompt TEXT [--json]`: one completion, streamed or as JSON.

``--messages FILE.json`` renders a whole conversation through the chat template (``--prompt``, if
given, is the next user message); with ``--raw`` there is no template, so ``--messages`` is refused.
Ctrl-C stops the generation within a token: the text so far is printed (with ``--json``, the JSON
result with ``finish_reason: "cancelled"``) and the exit code is 130.
"""

from __future__ import annotations

import json
import signal
import sys
from contextlib import contextmanager

from zlocal.commands._common import (
    add_model_args,
    add_prompt_args,
    add_sampling_args,
    check_sampling,
    load_runtime,
    print_stats,
    read_messages,
    read_prompt,
    sampling_kwargs,
)
from zlocal.errors import InvalidArgumentError

INTERRUPTED = 130


def register(sub) -> None:
    p = sub.add_parser("generate", help="generate one completion for a prompt")
    add_model_args(p)
    add_sampling_args(p)
    add_prompt_args(p, "the user message (or raw text with --raw)")
    p.add_argument("--raw", action="store_true", help="complete the text as is, without the chat template")
    p.add_argument("--json", action="store_true", help="print text, token ids, counts and timings as JSON")


def _check_inputs(args) -> None:
    if args.prompt is None and args.messages is None:
        raise InvalidArgumentError("give --prompt TEXT (or '-' for stdin) or --messages FILE.json")
    if args.raw and (args.messages is not None or args.system is not None):
        raise InvalidArgumentError(
            "--raw completes plain text without the chat template; --messages and --system need it"
        )


@contextmanager
def _cancel_on_sigint(rt):
    """While generating, Ctrl-C asks the runtime to stop (finish_reason "cancelled") instead of
    raising KeyboardInterrupt, so the result so far is still printed. Yields the list of signals seen."""
    hit = []

    def handler(signum, frame):
        if hit:  # a second Ctrl-C (a long prefill does not look at the first): stop now
            raise KeyboardInterrupt
        hit.append(signum)
        rt.cancel()

    old = signal.signal(signal.SIGINT, handler)
    try:
        yield hit
    finally:
        signal.signal(signal.SIGINT, old)


def run(args) -> int:
    check_sampling(args)
    _check_inputs(args)
    messages = None if args.raw else read_messages(args)
    prompt = read_prompt(args) if args.raw else None
    rt = load_runtime(args)
    sampling = sampling_kwargs(args)
    ids = rt.encode(prompt) if args.raw else rt.encode_chat(messages)
    if args.json:
        with _cancel_on_sigint(rt) as hit:
            c = rt.generate(ids, **sampling)
        out = c.to_dict()
        out.update(
            model=rt.info.model,
            device=rt.info.device,
            dtype=rt.info.dtype,
            load_seconds=round(rt.info.load_seconds, 3),
            prompt_token_ids=ids,
        )
        print(json.dumps(out, ensure_ascii=False), flush=True)
        return INTERRUPTED if hit else 0
    last = None
    with _cancel_on_sigint(rt) as hit:
        for r in rt.stream_tokens(ids, **sampling):
            sys.stdout.write(r.text)
            sys.stdout.flush()
            last = r
    sys.stdout.write("\n")
    if last is not None:
        print_stats(last)
    return INTERRUPTED if hit else 0
