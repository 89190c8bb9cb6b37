"""Arguments shared by the commands that load a model and generate."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import shutil
import sys

from zlocal.checkpoint.resolve import DEFAULT_MODEL
from zlocal.errors import InvalidArgumentError


def add_model_args(p: argparse.ArgumentParser, model_optional: bool = True) -> None:
    """MODEL plus the loading flags (dtype, device, context, template, pickle opt-in, download)."""
    if model_optional:
        p.add_argument(
            "model",
            nargs="?",
            default=DEFAULT_MODEL,
            help=f"checkpoint dir, HF repo id in the local cache, or alias (default: {DEFAULT_MODEL})",
        )
    else:
        p.add_argument("model", help="checkpoint dir, HF repo id in the local cache, or alias")
    p.add_argument("--dtype", default=None, help="auto, bfloat16, float16 or float32 (default: auto)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: what the plan picks)")
    p.add_argument("--plan", default="auto", help="'auto', or a plan JSON written by `zlocal plan --json`")
    p.add_argument("--max-context", type=int, default=None, help="KV cache size in tokens")
    p.add_argument("--chat-template", default=None, metavar="FILE", help="Jinja file overriding the template")
    p.add_argument(
        "--allow-pickle",
        action="store_true",
        help="allow pickle .bin weights (loaded with weights_only=True)",
    )
    p.add_argument("--download", action="store_true", help="download a repo id missing from the HF cache")
    p.add_argument(
        "--quiet", "-q", action="store_true", help="no loading line or progress bar on the terminal"
    )


def add_prompt_args(p: argparse.ArgumentParser, what: str = "the user message") -> None:
    """--prompt TEXT ('-' reads stdin), --messages FILE.json ('-' reads stdin) and --system."""
    p.add_argument("--prompt", "-p", default=None, metavar="TEXT", help=f"{what}; '-' reads it from stdin")
    p.add_argument(
        "--messages",
        default=None,
        metavar="FILE.json",
        help="chat messages so far: a JSON list of {role, content} ('-' reads it from stdin); "
        "--prompt, if given, is appended as the next user message",
    )
    p.add_argument("--system", default=None, help="system prompt (put before the messages)")


def read_prompt(args: argparse.Namespace) -> str | None:
    """The --prompt text; '-' reads all of stdin (one trailing newline dropped)."""
    if args.prompt != "-":
        return args.prompt
    if args.messages == "-":
        raise InvalidArgumentError("--prompt - and --messages - both read stdin; give one of them a file")
    return sys.stdin.read().removesuffix("\n")


def read_messages(args: argparse.Namespace) -> list[dict[str, str]]:
    """--system, the --messages file (or stdin) and --prompt as one validated list of chat messages."""
    from zlocal.inference.template import load_messages_file, validate_messages

    messages: list[dict[str, str]] = []
    if args.messages == "-":
        try:
            data = json.loads(sys.stdin.read())
        except json.JSONDecodeError as exc:
            raise InvalidArgumentError(f"--messages -: stdin is not valid JSON: {exc}") from exc
        messages = validate_messages(
            data["messages"] if isinstance(data, dict) and "messages" in data else data
        )
    elif args.messages is not None:
        messages = load_messages_file(args.messages)
    prompt = read_prompt(args)
    if args.system is not None:
        if any(m.get("role") == "system" for m in messages):
            raise InvalidArgumentError("--system and a system message in --messages: give one of them")
        messages = [{"role": "system", "content": args.system}, *messages]
    if prompt is not None:
        messages.append({"role": "user", "content": prompt})
    return validate_messages(messages) if messages else []


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    """Sampling flags; unset flags keep the model's generation defaults."""
    g = p.add_argument_group("sampling")
    g.add_argument("--temperature", "--temp", type=float, default=None, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--min-p", type=float, default=None)
    g.add_argument("--repetition-penalty", type=float, default=None)
    g.add_argument(
        "--max-new-tokens",
        "--max-tokens",
        type=int,
        default=None,
        dest="max_new_tokens",
        help="most tokens to generate (default 256)",
    )
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")


def sampling_kwargs(args: argparse.Namespace) -> dict:
    """The sampling flags the user set, as keyword arguments for the Runtime."""
    names = ["temperature", "top_k", "top_p", "min_p", "repetition_penalty", "max_new_tokens", "seed", "stop"]
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}


def _show_progress(args: argparse.Namespace) -> bool:
    return sys.stderr.isatty() and not getattr(args, "quiet", False) and not getattr(args, "json", False)


class LoadProgress:
    """A tqdm bar on stderr per load stage, drawn from ``zlocal.progress.Progress`` events."""

    def __init__(self, model: str, plan) -> None:
        plan_name = plan if isinstance(plan, str) else "given"
        self.stream = sys.stderr  # the terminal, also while library output is redirected
        print(f"loading {model} (plan {plan_name})", file=self.stream, flush=True)
        self.bar = None
        self.stage = None

    def __call__(self, event) -> None:
        from tqdm import tqdm

        if event.stage == "ready":
            self.close()
            return
        if event.stage != self.stage or self.bar is None:
            self.close()
            self.stage = event.stage
            is_bytes = event.unit == "bytes"
            size = shutil.get_terminal_size((80, 24))
            self.bar = tqdm(
                total=event.total or None,
                desc=event.stage,
                unit="B" if is_bytes else f" {event.unit}",
                unit_scale=is_bytes,
                unit_divisor=1024,
                file=self.stream,
                leave=False,
                ncols=min(100, size.columns),
                nrows=size.lines,  # a pty that reports 0x0 would otherwise hide the bar
            )
        if event.message:
            self.bar.set_postfix_str(event.message, refresh=False)
        self.bar.update(max(0, event.done - self.bar.n))
        if event.total and event.done >= event.total:
            self.bar.refresh()  # the last step shows even inside tqdm's minimum redraw interval

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class _LibraryOutput(io.TextIOBase):
    """Stands in for stdout/stderr while a model loads: libraries that print (gptqmodel's banner on
    stdout, tqdm bars that bypass their library's switch) go to ``logging``; zlocal's own lines
    ("zlocal: ...") still reach the real stderr."""

    def __init__(self, stderr) -> None:
        self.stderr = stderr
        self.pending = ""

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    def write(self, text: str) -> int:
        lines = (self.pending + text).replace("\r", "\n").split("\n")
        self.pending = lines.pop()
        for line in lines:
            if line.startswith("zlocal"):
                print(line, file=self.stderr)
            elif line.strip():
                logging.getLogger("libraries.output").info(line.rstrip())
        return len(text)


@contextlib.contextmanager
def library_output_to_logging():
    """Within it, Python-level writes to stdout and stderr go through _LibraryOutput."""
    sink = _LibraryOutput(sys.stderr)
    with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        yield
    sink.write("\n")


def _accepts_progress(fn) -> bool:
    import inspect

    return "progress" in inspect.signature(fn).parameters


def load_runtime(args: argparse.Namespace):
    """zlocal.load with the CLI's loading flags, a progress bar on a terminal (not with --quiet or
    --json), and the per-model sampling defaults of ``zlocal.checkpoint.embedded``."""
    from zlocal.checkpoint.embedded import sampling_defaults_for
    from zlocal.inference.runtime import load

    kwargs = {}
    bar = LoadProgress(args.model, args.plan) if _show_progress(args) else None
    if bar is not None and _accepts_progress(load):
        kwargs["progress"] = bar
    try:
        with library_output_to_logging():
            rt = load(
                args.model,
                plan=args.plan,
                dtype=args.dtype,
                device=args.device,
                max_context=args.max_context,
                chat_template=args.chat_template,
                allow_pickle=args.allow_pickle,
                download=args.download,
                **kwargs,
            )
    finally:
        if bar is not None:
            bar.close()
    rt.sampling_defaults = {
        **rt.sampling_defaults,
        **sampling_defaults_for(rt.info.model, rt.info.path, rt.info.source),
    }
    return rt


def check_sampling(args: argparse.Namespace) -> None:
    """Validate sampling flags before the (slow) model load, so typos fail fast."""
    from zlocal.inference.runtime import sampling_params

    sampling_params(None, **sampling_kwargs(args))


def print_stats(resp, out=sys.stderr) -> None:
    """One line of counts and speeds after a generation."""
    print(
        f"[{resp.prompt_tokens} prompt tokens ({resp.reused_tokens} reused), "
        f"{resp.generation_tokens} generated, "
        f"prefill {resp.prompt_tps:.1f} tok/s, decode {resp.generation_tps:.1f} tok/s, "
        f"finish: {resp.finish_reason}]",
        file=out,
    )
