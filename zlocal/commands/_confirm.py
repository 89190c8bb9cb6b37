"""Asking before deleting: `zlocal rm` and `zlocal cache clear`."""

from __future__ import annotations

import sys

from zlocal.errors import InvalidArgumentError


def confirm(what: str, yes: bool) -> bool:
    """True when ``what`` may be deleted: -y given, or the user answered y on a terminal. Without a
    terminal and without -y, refuse (InvalidArgumentError) rather than delete unasked."""
    if yes:
        print(f"removing {what}", file=sys.stderr)
        return True
    if not sys.stdin.isatty():
        raise InvalidArgumentError(f"not removing {what}: no terminal to confirm on; pass -y to remove it")
    try:
        answer = input(f"remove {what}? [y/N] ")
    except EOFError:
        answer = ""
    if answer.strip().lower() in ("y", "yes"):
        return True
    print("nothing removed", file=sys.stderr)
    return False
