"""Print the markdown table of zlocal's plans for Zephyr-7B on every machine profile (for the README).

Usage: python scripts/plan_table.py [--model zephyr-7b-beta] [--ctx 4096] [--prefer quality|speed]
"""

from __future__ import annotations

import argparse

from zlocal.planning.hardware import hardware_from_profile, list_profiles
from zlocal.planning.memory import GIB, ModelShape
from zlocal.planning.plan import make_plan


def table(model: str, ctx: int, prefer: str) -> str:
    """Markdown table, one row per GPU/CPU profile."""
    shape = ModelShape.from_config(list_profiles("model")[model]["shape"])
    machines = {**list_profiles("gpu"), **list_profiles("cpu")}
    order = sorted(
        machines,
        key=lambda n: (machines[n]["kind"] != "cpu", machines[n].get("gpu", {}).get("vram_gb", 0), n),
    )
    rows = [
        "| Machine | Weights | GPU layers | CPU layers | Context | VRAM (GiB) | RAM (GiB) "
        "| Predicted decode tok/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in order:
        p = make_plan(hardware_from_profile(name), shape, model=model, ctx=ctx, prefer=prefer)
        fmt = " + ".join(f for f in (p.gpu_format, p.cpu_format) if f) if p.fits else "does not fit"
        rows.append(
            f"| {machines[name]['display']} | {fmt} | {p.gpu_layers} | {p.cpu_layers} | {p.max_context} | "
            f"{p.estimated_vram_bytes / GIB:.1f} | {p.estimated_ram_bytes / GIB:.1f} "
            f"| {p.predicted_decode_tok_s:.1f} |"
        )
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="zephyr-7b-beta")
    ap.add_argument("--ctx", type=int, default=4096)
    ap.add_argument("--prefer", choices=["quality", "speed"], default="quality")
    args = ap.parse_args()
    print(table(args.model, args.ctx, args.prefer))


if __name__ == "__main__":
    main()
