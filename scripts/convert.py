"""Convert a checkpoint: same arguments and code path as `zlocal convert`.

python scripts/convert.py zephyr-7b-beta ./zephyr-nf4 --method nf4
"""

from __future__ import annotations

import argparse
import sys

from zlocal.commands.convert import add_convert_args, run
from zlocal.errors import ZlocalError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Quantize a checkpoint (zlocal convert).")
    add_convert_args(p)
    args = p.parse_args(argv)
    try:
        return run(args)
    except ZlocalError as exc:
        print(f"zlocal: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("zlocal: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
