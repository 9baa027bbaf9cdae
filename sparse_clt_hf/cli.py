"""The ``sparse-clt-hf`` command line (console entry point :func:`main`).

Each sub-command is a module of :mod:`sparse_clt_hf.commands` listed in its ``COMMANDS`` table, with
``add_arguments(parser)`` and ``run(args) -> int`` (the exit code). This file only wires them together.
Exit codes: 0 success, 1 a failure the command reports, 2 bad usage.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Sequence

from .commands import COMMANDS
from .errors import SparseCLTError


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, ``(default: 24)``, except where there is nothing to show (no default,
    an on/off flag) or the help text already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default in (None, argparse.SUPPRESS) or action.nargs == 0 or "default" in text:
            return text
        return super()._get_help_string(action) or text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sparse-clt-hf",
        description="Sparse transcoder features for Hugging Face Transformers models.",
        formatter_class=HelpFormatter,
    )
    from ._version import __version__

    parser.add_argument("--version", action="version", version=f"sparse-clt-hf {__version__}")
    subs = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        sub = subs.add_parser(name, help=help_text, description=help_text, formatter_class=HelpFormatter)
        sub.add_argument("--json", action="store_true", help="print machine-readable JSON instead of tables")
        module = importlib.import_module(module_name)
        module.add_arguments(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    module = importlib.import_module(COMMANDS[args.command][0])
    try:
        return int(module.run(args) or 0)
    except (SparseCLTError, FileNotFoundError, ValueError) as exc:
        if getattr(args, "json", False):
            print(json.dumps({"error": str(exc), "type": type(exc).__name__}))
        else:
            print(f"sparse-clt-hf {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
