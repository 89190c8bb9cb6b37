"""The ``zlocal`` command line. Each subcommand lives in ``zlocal/commands/<name>.py`` and defines
``register(subparsers)`` and ``run(args) -> int``. This module only dispatches and turns typed
errors into one line on stderr and an exit code.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys

from zlocal import __version__
from zlocal.errors import ZlocalError

# Order shown in --help: the pipeline first.
_ORDER = ["profile", "plan", "convert", "verify", "eval", "prompt", "generate", "chat", "bench", "serve"]


def _command_modules() -> list[str]:
    from zlocal import commands

    found = {m.name for m in pkgutil.iter_modules(commands.__path__) if not m.name.startswith("_")}
    return [n for n in _ORDER if n in found] + sorted(found - set(_ORDER))


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage dump, exit 2 like argparse
        self.exit(2, f"zlocal: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser with every subcommand registered."""
    parser = _Parser(prog="zlocal", description="Run Zephyr-7B and friends quantized on one machine.")
    parser.add_argument("--version", action="version", version=f"zlocal {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in _command_modules():
        module = importlib.import_module(f"zlocal.commands.{name}")
        module.register(sub)
    return parser


def _quiet_libraries() -> None:
    """transformers' per-tensor progress bars and advisory warnings are noise in a chat terminal."""
    import os

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``zlocal`` console script."""
    # torchao (pulled in by gptqmodel) trips torch deprecation warnings when transformers imports it.
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    module = importlib.import_module(f"zlocal.commands.{args.command}")
    _quiet_libraries()
    try:
        return int(module.run(args) or 0)
    except ZlocalError as exc:
        print(f"zlocal: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("zlocal: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `zlocal plan ... | head`: the reader left; exit quietly like other Unix tools.
        sys.stderr.close()
        return 141


if __name__ == "__main__":
    sys.exit(main())
