"""Arguments shared by the commands that load a model and generate."""

from __future__ import annotations

import argparse
import sys

from zlocal.checkpoint.resolve import DEFAULT_MODEL


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


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    """Sampling flags; unset flags keep the model's generation defaults."""
    g = p.add_argument_group("sampling")
    g.add_argument("--temperature", "--temp", type=float, default=None, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--min-p", type=float, default=None)
    g.add_argument("--repetition-penalty", type=float, default=None)
    g.add_argument("--max-new-tokens", "--max-tokens", type=int, default=None, dest="max_new_tokens")
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")


def sampling_kwargs(args: argparse.Namespace) -> dict:
    """The sampling flags the user set, as keyword arguments for the Runtime."""
    names = ["temperature", "top_k", "top_p", "min_p", "repetition_penalty", "max_new_tokens", "seed", "stop"]
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}


def load_runtime(args: argparse.Namespace):
    """zlocal.load with the CLI's loading flags."""
    from zlocal.inference.runtime import load

    return load(
        args.model,
        plan=args.plan,
        dtype=args.dtype,
        device=args.device,
        max_context=args.max_context,
        chat_template=args.chat_template,
        allow_pickle=args.allow_pickle,
        download=args.download,
    )


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
