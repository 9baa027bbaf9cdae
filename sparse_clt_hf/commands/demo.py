"""``sparse-clt-hf demo``: SmolLM2 + the demo transcoder (trained on first use), features per token."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from .. import demo  # light: torch loads when a function of it runs
from ._options import add_generation_options, add_model_options, load_model


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_generation_options(parser, demo.DEMO_PROMPT)
    parser.add_argument("--clt", default=None,
                        help=f"transcoder to use instead of the cached demo one (default: ${demo.DEMO_ENV} or the cache)")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bars while fitting the demo transcoder and its statistics")
    parser.add_argument("--dashboard", default=None, metavar="SITE",
                        help="instead of generating, build the demo transcoder's feature dashboards into SITE "
                             "(same as `sparse-clt-hf dashboard --out SITE`)")
    parser.add_argument("--attribute", nargs="?", const=".", default=None, metavar="DIR",
                        help="then explain the first generated token with an attribution graph: write DIR/graph.json "
                             "and DIR/graph.html (DIR: the current folder when left out; see `sparse-clt-hf attribute`)")
    add_model_options(parser)


def demo_transcoder(args: argparse.Namespace, model: Any, tokenizer: Any) -> tuple[Path, str, Any, Any, dict[str, Any]]:
    """The demo transcoder for ``model``, fitted (and its statistics computed) on first use:
    ``(folder, note for the report, statistics or None, Description, report extras)``."""
    from ..formats import describe
    from ..training_config import format_metrics

    log = (lambda *a: print(*a, file=sys.stderr)) if args.json else print
    progress = not (getattr(args, "no_progress", False) or args.json)
    extra: dict[str, Any] = {"demo_transcoder": True}
    clt, metrics = demo.ensure_demo_transcoder(model, tokenizer, progress=progress, log=log)
    if metrics is not None:
        log(format_metrics(metrics))
        extra["trained"] = {k: metrics[k] for k in ("fvu", "l0", "dead", "tokens", "train_seconds")}
        note = "the demo transcoder, fitted just now"
    else:
        note = "the cached demo transcoder, fitted on first use; delete the folder to refit"
    stats = None
    if args.stats is None:
        stats = demo.ensure_demo_stats(model, tokenizer, clt, progress=progress, log=log)
    return clt, note, stats, describe(str(clt)), extra


#: the attribution after the demo: the most influential features only, so that it takes seconds on a CPU
DEMO_ATTRIBUTION: dict[str, Any] = dict(max_feature_nodes=256)


def run(args: argparse.Namespace) -> int:
    from ..labels import find_stats

    start = time.perf_counter()
    log = (lambda *a: print(*a, file=sys.stderr)) if args.json else print
    if getattr(args, "dashboard", None) is not None:
        from ..dashboard.demo import demo_dashboard

        summary = demo_dashboard(args.dashboard, progress=not (args.no_progress or args.json), log=log)
        print(json.dumps(summary) if args.json else f"site: {summary['site']}")
        return 0
    desc = demo.preflight(args, args.clt)  # a bad --clt/--stats/--html fails before the model loads
    if args.attribute is not None and not Path(args.attribute).is_dir():
        raise FileNotFoundError(f"--attribute {args.attribute}: no such folder (graph.json and graph.html go there)")
    model, tokenizer, _ = load_model(args, None)
    extra: dict[str, Any] = {}
    clt, note, stats = args.clt, "", None
    if clt is None:
        clt, note, stats, desc, extra = demo_transcoder(args, model, tokenizer)
    if stats is None:
        stats = find_stats(clt if Path(str(clt)).is_dir() else None, args.stats)
    extra["transcoder"] = str(clt)
    seq, prompt_len, feats, gen_s = demo.generate_with_features(
        model, tokenizer, str(clt), args.prompt, max_new_tokens=args.max_new_tokens, top_k=args.top_k, chat=args.chat
    )
    demo.print_report(args, tokenizer, seq, prompt_len, feats, gen_s, time.perf_counter() - start, extra,
                      desc=desc, stats=stats, transcoder_note=note)
    if args.attribute is not None:
        attribute_first_token(args, model, tokenizer, str(clt), seq, prompt_len, stats)
    return 0


def attribute_first_token(args: argparse.Namespace, model: Any, tokenizer: Any, clt: str, seq: Any, prompt_len: int,
                          stats: Any) -> dict[str, Any]:
    """Why the model generated its first token: the attribution graph of the prompt (as generate saw it, chat
    template included) with that token as the target, written to ``--attribute``'s folder."""
    from .attribute import attribute_and_report, format_report

    out = sys.stderr if args.json else sys.stdout
    if seq.shape[0] <= prompt_len:
        raise ValueError("--attribute: nothing was generated, so there is no token to explain")
    token = tokenizer.decode([int(seq[prompt_len])])
    folder = Path(args.attribute)
    print(f"\nAttribution: why the first generated token {token!r}?", file=out)
    report = attribute_and_report(
        model, tokenizer, clt, seq[:prompt_len], stats=stats, targets=[int(seq[prompt_len])],
        out=str(folder / "graph.json"), html=str(folder / "graph.html"), title=f"Why {token!r}? {args.prompt}",
        progress=not (args.no_progress or args.json), **DEMO_ATTRIBUTION,
    )
    print(format_report(report), file=out)
    return report
