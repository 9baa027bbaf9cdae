"""Options shared by several sub-commands."""

from __future__ import annotations

import argparse

from ..io.refs import Reference, resolve


def layers_arg(text: str | None) -> list[int] | None:
    """``"0-3,7"`` -> ``[0, 1, 2, 3, 7]``; None or '' -> None (all layers)."""
    if not text:
        return None
    out: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out += list(range(int(lo), int(hi) + 1)) if hi else [int(lo)]
    return out


def add_ref_options(parser: argparse.ArgumentParser) -> None:
    """``--format``, ``--variant`` and the Hub options of a command that reads a transcoder reference."""
    parser.add_argument("--format", default=None, help="format name (default: detected)")
    parser.add_argument(
        "--variant", default=None, help="which transcoder per layer, e.g. a Gemma Scope L0 folder"
    )
    parser.add_argument("--revision", default=None, help="Hub branch, tag or commit")
    parser.add_argument("--cache-dir", default=None, help="Hub cache folder (default: the standard HF cache)")
    parser.add_argument("--local-files-only", action="store_true", help="use the cache only, never download")


def resolve_arg(ref: str, args: argparse.Namespace) -> Reference:
    """The reference ``ref`` with the Hub options of ``args``."""
    return resolve(
        ref, revision=args.revision, cache_dir=args.cache_dir, local_files_only=args.local_files_only
    )


def add_generation_options(parser: argparse.ArgumentParser, prompt_default: str | None) -> None:
    """Prompt and display options of ``demo`` and ``generate``."""
    parser.add_argument("--prompt", default=prompt_default, required=prompt_default is None, help="user prompt")
    parser.add_argument("--max-new-tokens", type=int, default=24, help="most tokens to generate (greedy); the answer may stop earlier at the end of text")
    parser.add_argument("--top-k", type=int, default=8, help="features recorded per token and layer (the strongest)")
    parser.add_argument("--show", type=int, default=4, help="features shown per token (strongest across layers)")
    parser.add_argument("--no-chat-template", dest="chat", action="store_false",
                        help="feed the prompt as plain text instead of through the chat template")
    parser.add_argument("--html", default=None, metavar="PATH",
                        help="also write a self-contained HTML page to explore the features token by token")
    parser.add_argument("--stats", default=None, metavar="PATH",
                        help="per-feature statistics for labels (a stats.safetensors file or a folder holding one, "
                             "e.g. an extraction; default: the stats.safetensors next to the transcoder, if any)")
