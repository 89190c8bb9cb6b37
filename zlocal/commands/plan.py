"""``zlocal plan MODEL``: how zlocal will run MODEL on this (or a simulated) machine, and why."""

from __future__ import annotations

import argparse
import sys


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "plan",
        help="show how a model will be loaded here: format, bits, GPU/CPU layers, memory, speed",
        description="Plan loading MODEL without loading it: quantization format and bits, layers on the "
        "GPU and CPU, KV cache and context, VRAM/RAM estimates and predicted decode speed.",
    )
    p.add_argument("model", help="alias (zephyr-7b-beta, zephyr-7b-alpha), checkpoint dir or cached repo id")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--profile", default=None, metavar="NAME", help="simulate a machine from profiles/")
    src.add_argument(
        "--hardware", default=None, metavar="FILE.json", help="a report from `zlocal profile --json`"
    )
    p.add_argument(
        "--ctx", type=int, default=None, help="wanted context in tokens (default: min(model, 4096))"
    )
    p.add_argument(
        "--max-vram", type=float, default=None, metavar="GB", help="use at most this much VRAM (GiB)"
    )
    p.add_argument(
        "--prefer",
        choices=["quality", "speed"],
        default="quality",
        help="quality (default): best quality that fits with headroom at reading speed; speed: fastest",
    )
    p.add_argument("--dtype", default=None, help="force the compute dtype (bfloat16, float16, float32)")
    p.add_argument("--json", action="store_true", help="print the LoadPlan as JSON")
    p.add_argument(
        "--output",
        "-o",
        default=None,
        metavar="FILE.json",
        help="also save the plan (for `zlocal chat --plan FILE.json` / zlocal.load(plan=...))",
    )


def model_shape(model: str):
    """(ModelShape, display name, source quantization) from a model profile or the checkpoint config."""
    from zlocal.checkpoint.resolve import resolve_model
    from zlocal.inference.loader import load_config, source_quantization
    from zlocal.planning.hardware import list_profiles
    from zlocal.planning.memory import ModelShape

    for name, prof in list_profiles("model").items():
        if model.lower() in (name, str(prof.get("repo", "")).lower()):
            return ModelShape.from_config(prof["shape"]), name, None
    resolved = resolve_model(model, config_only=True)  # planning reads config.json, no weights
    config = load_config(resolved)
    return ModelShape.from_config(config), resolved.name, source_quantization(config)


def run(args: argparse.Namespace) -> int:
    from zlocal.errors import InvalidArgumentError, PlanError
    from zlocal.planning.hardware import HardwareReport, hardware_from_profile, profile_machine
    from zlocal.planning.loadplan import save_plan
    from zlocal.planning.memory import GIB
    from zlocal.planning.plan import make_plan

    if args.max_vram is not None and args.max_vram <= 0:
        raise InvalidArgumentError(f"--max-vram must be > 0 GB, got {args.max_vram}")
    if args.ctx is not None and args.ctx <= 0:
        raise InvalidArgumentError(f"--ctx must be > 0, got {args.ctx}")
    if args.profile:
        hw = hardware_from_profile(args.profile)
    elif args.hardware:
        hw = HardwareReport.from_json_file(args.hardware)
    else:
        hw = profile_machine()
    shape, name, source_quant = model_shape(args.model)
    plan = make_plan(
        hw,
        shape,
        model=name,
        ctx=args.ctx,
        prefer=args.prefer,
        dtype=args.dtype,
        max_vram_bytes=int(args.max_vram * GIB) if args.max_vram else None,
        source_quant=source_quant,
    )
    if args.output:
        save_plan(plan, args.output)
    print(plan.to_json() if args.json else plan.summary())
    if not plan.fits:
        print(f"zlocal: {name} does not fit this machine (see reasons)", file=sys.stderr)
        return PlanError.exit_code
    return 0
