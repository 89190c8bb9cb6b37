"""`zlocal bench MODEL [--plan ...] [--prompt-tokens N] [--max-new-tokens N] [--json]`: speed and memory."""

from __future__ import annotations

import json
import sys

from zlocal.commands._common import add_model_args


def register(sub) -> None:
    p = sub.add_parser(
        "bench",
        help="measure load time, prefill/decode speed, time to first token, memory and multi-turn reuse",
    )
    add_model_args(p)
    p.set_defaults(plan="auto")
    for action in p._actions:
        if action.dest == "plan":
            action.help = ("'auto', a plan JSON written by `zlocal plan --json`, or int8 / int4 / dense: "
                           "every layer on the CPU in that format")
    p.add_argument("--prompt-tokens", type=int, default=512, help="prompt length for prefill (default 512)")
    p.add_argument("--max-new-tokens", "--new-tokens", type=int, default=64, dest="new_tokens",
                   help="tokens to decode per run (default 64)")
    p.add_argument("--repeats", type=int, default=3, help="measured runs; medians are reported (default 3)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--turns", type=int, default=5, help="turns of the multi-turn TTFT test (default 5)")
    p.add_argument("--conversation-tokens", type=int, default=2048,
                   help="approximate length of that conversation (default 2048)")
    p.add_argument("--no-multiturn", action="store_true", help="skip the multi-turn measurement")
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def _check(args) -> None:
    from zlocal.errors import InvalidArgumentError

    for name in ("prompt_tokens", "repeats", "turns", "conversation_tokens"):
        if getattr(args, name) < 1:
            raise InvalidArgumentError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.new_tokens < 2:
        raise InvalidArgumentError(
            f"--max-new-tokens/--new-tokens must be >= 2 to time decode, got {args.new_tokens}"
        )
    if args.threads is not None and args.threads < 1:
        raise InvalidArgumentError(f"--threads must be >= 1, got {args.threads}")


def run(args) -> int:
    import torch

    from zlocal.commands._common import load_runtime
    from zlocal.inference.bench import CPU_FORMATS, cpu_plan, model_context, run_bench

    _check(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.max_context is None:
        # room for the prompt + decode and for the conversation, without allocating the model maximum
        want = max(args.prompt_tokens + args.new_tokens,
                   0 if args.no_multiturn else args.conversation_tokens + 512)
        args.max_context = min(want, model_context(args.model))
    if args.plan in CPU_FORMATS or args.plan == "dense":
        args.plan = cpu_plan(args.model, args.plan, dtype=args.dtype, max_context=args.max_context)
    rt = load_runtime(args)
    report = run_bench(
        rt,
        prompt_tokens=args.prompt_tokens,
        new_tokens=args.new_tokens,
        repeats=args.repeats,
        multiturn=not args.no_multiturn,
        multiturn_tokens=args.conversation_tokens,
        turns=args.turns,
    )
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
        return 0
    _print(report, sys.stdout)
    return 0


def _print(r, out) -> None:
    plan = r.plan or {}
    fmt = plan.get("cpu_format") or plan.get("gpu_format") or r.dtype
    lines = [
        f"model        {r.model}  ({r.device}, {r.dtype}, weights {fmt})",
        f"load         {r.load_seconds:.2f} s",
        f"prefill      {r.prefill_tok_s:.1f} tok/s  ({r.prompt_tokens} tokens)",
        f"decode       {r.decode_tok_s:.2f} tok/s  ({r.new_tokens} tokens, median of {r.repeats})",
        f"decode path  {r.decode_path}",
        f"first token  {r.time_to_first_token_s * 1000:.0f} ms",
        f"peak RSS     {r.peak_rss_bytes / 2**20:.0f} MiB"
        + (f", peak VRAM {r.peak_vram_bytes / 2**20:.0f} MiB" if r.peak_vram_bytes is not None else ""),
    ]
    m = r.multiturn
    if m is not None:
        lines.append(
            f"turn {m.turns} TTFT  {m.ttft_reuse_s * 1000:.0f} ms with prefix reuse "
            f"({m.prefilled_tokens_reuse} tokens prefilled) vs {m.ttft_full_s * 1000:.0f} ms re-prefilling "
            f"all {m.prefilled_tokens_full}: {m.speedup:.1f}x"
        )
    lines.append(f"threads      {r.torch_threads}, load average {r.loadavg_before[0]} -> "
                 f"{r.loadavg_after[0]}")
    print("\n".join(lines), file=out)
