"""``zlocal profile``: what this machine has (GPUs, CPU, RAM, disk, usable kernels)."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "profile",
        help="show this machine's GPUs, CPU, memory and usable kernels",
        description="Profile this machine (works without a GPU). --json output can be "
        "given to `zlocal plan --hardware FILE.json` on another machine.",
    )
    p.add_argument("--json", action="store_true", help="print a HardwareReport as JSON")
    p.add_argument(
        "--profile",
        default=None,
        metavar="NAME",
        help="show a simulated machine from profiles/ instead (e.g. rtx-3060-12gb)",
    )
    p.add_argument(
        "--list", action="store_true", help="list the machine and model profiles shipped in profiles/"
    )


def run(args: argparse.Namespace) -> int:
    from zlocal.planning.hardware import describe, hardware_from_profile, list_profiles, profile_machine

    if args.list:
        for name, prof in list_profiles().items():
            print(f"{name:20s} {prof.get('kind', '?'):6s} {prof.get('display', prof.get('repo', ''))}")
        return 0
    report = hardware_from_profile(args.profile) if args.profile else profile_machine()
    print(report.to_json() if args.json else describe(report))
    return 0
