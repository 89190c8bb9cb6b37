"""`zlocal chat MODEL`: an interactive streaming chat REPL, or one-shot with --prompt.

``--messages FILE.json`` starts from a conversation: when it ends with a user message (or with
``--prompt``), the reply is printed and chat exits; otherwise the REPL continues it.
"""

from __future__ import annotations

import sys

from zlocal.commands._common import (
    add_model_args,
    add_prompt_args,
    add_sampling_args,
    check_sampling,
    load_runtime,
    print_stats,
    read_messages,
    sampling_kwargs,
)

HELP = "commands: /reset (forget the conversation), /system TEXT (set the system prompt), /exit"


def register(sub) -> None:
    p = sub.add_parser("chat", help="chat with a model (REPL, or one-shot with --prompt)")
    add_model_args(p)
    add_sampling_args(p)
    add_prompt_args(p, "one message; print the reply and exit")
    p.add_argument("--stats", action="store_true", help="print token counts and speed after each reply")


def _stream(session, text: str, sampling: dict, stats: bool) -> None:
    last = None
    stream = session.stream(text, **sampling)
    try:
        for r in stream:
            sys.stdout.write(r.text)
            sys.stdout.flush()
            last = r
    except KeyboardInterrupt:
        stream.close()
        sys.stdout.write("\n[interrupted]")
    sys.stdout.write("\n")
    sys.stdout.flush()
    if stats and last is not None:
        print_stats(last)


def _start(args) -> tuple[str | None, list[dict], str | None]:
    """(system prompt, history, the user message to answer now or None for the REPL)."""
    messages = read_messages(args)
    system = None
    if messages and messages[0]["role"] == "system":
        system = messages.pop(0)["content"]
    ask = messages.pop()["content"] if messages and messages[-1]["role"] == "user" else None
    return system, messages, ask


def run(args) -> int:
    check_sampling(args)
    system, history, ask = _start(args)
    rt = load_runtime(args)
    session = rt.session(system=system)
    session.messages = history
    sampling = sampling_kwargs(args)
    if ask is not None:
        _stream(session, ask, sampling, args.stats)
        return 0
    _repl(rt, session, sampling, args.stats)
    return 0


def _repl(rt, session, sampling: dict, stats: bool) -> None:
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"zlocal chat: {rt.info.model} on {rt.info.device} ({rt.info.dtype}). {HELP}", file=sys.stderr)
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            break
        except KeyboardInterrupt:
            print(file=sys.stderr)
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            session.reset()
            print("[conversation reset]", file=sys.stderr)
        elif text.startswith("/system"):
            session.set_system(text[len("/system") :].strip())
            print(
                f"[system prompt {'set' if session.system else 'cleared'}; conversation reset]",
                file=sys.stderr,
            )
        elif text.startswith("/help"):
            print(HELP, file=sys.stderr)
        elif text.startswith("/"):
            print(f"unknown command {text.split()[0]}; {HELP}", file=sys.stderr)
        else:
            _stream(session, line, sampling, stats)
