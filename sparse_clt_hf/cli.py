"""The ``sparse-clt-hf`` command line.

Each sub-command lives in the module of its concern, which provides ``add_<name>_arguments(parser)``
and ``run_<name>(args) -> int`` (the exit code). This file only wires them together.
Exit codes: 0 success, 1 a failure the command reports, 2 bad usage.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Sequence

from .errors import SparseCLTError

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("sparse_clt_hf.demo", "generate with SmolLM2 and a demo transcoder, print features per token"),
    "generate": ("sparse_clt_hf.demo", "generate with any model and transcoder, print or save the features"),
    "inspect": ("sparse_clt_hf.hub", "describe a transcoder (format, layers, width, site) without loading weights"),
    "convert": ("sparse_clt_hf.hub", "convert any supported format into the native (circuit-tracer) layout"),
    "push": ("sparse_clt_hf.hub", "upload a native transcoder folder to the Hub with a model card"),
    "train": ("sparse_clt_hf.training", "fit a CLT or PLT on a model's own activations"),
    "bench": ("sparse_clt_hf.bench", "measure capture overhead, memory and encode speed"),
}
# modules with add_parser(subparsers) and run(args) (the parser sets `run` as a default)
COMMAND_MODULES = ("sparse_clt_hf.commands.extract", "sparse_clt_hf.commands.stats")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sparse-clt-hf",
        description="Sparse transcoder features for Hugging Face Transformers models.",
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"sparse-clt-hf {__version__}")
    subs = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        sub = subs.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("--json", action="store_true", help="print machine-readable JSON instead of tables")
        module = importlib.import_module(module_name)
        getattr(module, f"add_{name}_arguments")(sub)
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).add_parser(subs)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    run = getattr(args, "run", None) or getattr(importlib.import_module(COMMANDS[args.command][0]), f"run_{args.command}")
    try:
        return int(run(args) or 0)
    except (SparseCLTError, FileNotFoundError, ValueError) as exc:
        if getattr(args, "json", False):
            print(json.dumps({"error": str(exc), "type": type(exc).__name__}))
        else:
            print(f"sparse-clt-hf {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
