"""The ``zlocal`` command line. Each subcommand lives in ``zlocal/commands/<name>.py`` and defines
``register(subparsers)`` and ``run(args) -> int``. This module only dispatches and turns typed
errors into one line on stderr and an exit code.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import pkgutil
import re
import sys
import warnings

from zlocal import __version__
from zlocal.errors import ZlocalError

# Order shown in --help: the pipeline first.
_ORDER = [
    "profile", "plan", "convert", "verify", "eval", "prompt", "generate", "chat", "bench", "serve",
    "list", "pull", "rm", "cache",
]
# Python names in library error messages, as the flags a CLI user typed (see _flag_names).
_FLAG_NAMES = re.compile(
    r"(?<![\w/.-])(max_new_tokens|max_tokens|max_context|top_k|top_p|min_p|repetition_penalty|chat_template)\b"
)


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


class _LogHandler(logging.Handler):
    """stderr gets zlocal's own warnings (one line each); other libraries' records only with ZLOCAL_LOG."""

    def __init__(self, level: str | None):
        super().__init__(logging.DEBUG if level else logging.WARNING)
        self.everything = bool(level)
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))

    @property
    def stream(self):
        # the process's own stderr, also while the CLI redirects library output (load_runtime)
        return sys.__stderr__ or sys.stderr

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.startswith("zlocal") and record.levelno >= logging.WARNING:
            print(record.getMessage().splitlines()[0], file=self.stream)
        elif self.everything:
            print(self.format(record), file=self.stream)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    text = str(message)
    if text.startswith("zlocal"):  # zlocal's own notes (a smaller plan after an out-of-memory) stay visible
        print(text.splitlines()[0], file=sys.stderr)
    else:
        logging.getLogger("py.warnings").warning("%s:%s: %s: %s", filename, lineno, category.__name__, text)


def _route_logging() -> None:
    """Third-party warnings, log records and progress bars go through ``logging``, not stderr.

    Only zlocal's own one-line notes reach stderr; ``ZLOCAL_LOG=info`` (or debug, warning) prints
    every library's records too.
    """
    level = os.environ.get("ZLOCAL_LOG", "").strip().upper() or None
    root = logging.getLogger()
    # one of ours (main() may run more than once in a process), beside any handler already there
    root.handlers[:] = [h for h in root.handlers if not isinstance(h, _LogHandler)] + [_LogHandler(level)]
    root.setLevel(level if level in logging.getLevelNamesMapping() else logging.WARNING)
    warnings.showwarning = _show_warning
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


def _quiet_libraries() -> None:
    """transformers' per-tensor progress bars and its own stderr handler are noise in a chat terminal:
    its records propagate to the root logger (see _route_logging) instead."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.disable_default_handler()
    hf_logging.enable_propagation()
    hf_logging.set_verbosity_warning()
    try:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    except ImportError:  # pragma: no cover - huggingface_hub always comes with transformers
        pass


def _flag_names(message: str) -> str:
    """``max_new_tokens must be > 0`` as the CLI user knows it: ``--max-new-tokens must be > 0``."""
    return _FLAG_NAMES.sub(lambda m: "--" + m.group(1).replace("_", "-"), message)


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
    _route_logging()
    if getattr(module, "LOADS_MODELS", True):  # list/rm/cache/pull stay fast: no transformers import
        _quiet_libraries()
    try:
        return int(module.run(args) or 0)
    except ZlocalError as exc:
        print(f"zlocal: error: {_flag_names(str(exc))}", file=sys.stderr)
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
