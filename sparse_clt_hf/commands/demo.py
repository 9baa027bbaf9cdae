"""``sparse-clt-hf demo``: SmolLM2 + the demo transcoder (trained on first use), features per token."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from .. import demo
from ..training import format_metrics
from ._options import add_generation_options


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_generation_options(parser, demo.DEMO_PROMPT)
    parser.add_argument("--clt", default=None,
                        help=f"transcoder to use instead of the cached demo one (default: ${demo.DEMO_ENV} or the cache)")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bars while fitting the demo transcoder and its statistics")
    parser.add_argument("--dashboard", default=None, metavar="SITE",
                        help="instead of generating, build the demo transcoder's feature dashboards into SITE "
                             "(same as `sparse-clt-hf dashboard --out SITE`)")


def run(args: argparse.Namespace) -> int:
    from ..formats import describe
    from ..labels import find_stats

    start = time.perf_counter()
    log = (lambda *a: print(*a, file=sys.stderr)) if args.json else print
    if getattr(args, "dashboard", None) is not None:
        from ..dashboard.demo import demo_dashboard

        summary = demo_dashboard(args.dashboard, progress=not (args.no_progress or args.json), log=log)
        print(json.dumps(summary) if args.json else f"site: {summary['site']}")
        return 0
    desc = demo.preflight(args, args.clt)  # a bad --clt/--stats/--html fails before the model loads
    model, tokenizer, _ = demo.load_model(None)
    extra: dict[str, Any] = {}
    clt, note, stats = args.clt, "", None
    if clt is None:
        progress = not (args.no_progress or args.json)
        clt, metrics = demo.ensure_demo_transcoder(model, tokenizer, progress=progress, log=log)
        if metrics is not None:
            log(format_metrics(metrics))
            extra["trained"] = {k: metrics[k] for k in ("fvu", "l0", "dead", "tokens", "train_seconds")}
            note = "the demo transcoder, fitted just now"
        else:
            note = "the cached demo transcoder, fitted on first use; delete the folder to refit"
        if args.stats is None:
            stats = demo.ensure_demo_stats(model, tokenizer, clt, progress=progress, log=log)
        desc = describe(str(clt))
        extra["demo_transcoder"] = True
    if stats is None:
        stats = find_stats(clt if Path(str(clt)).is_dir() else None, args.stats)
    extra["transcoder"] = str(clt)
    seq, prompt_len, feats, gen_s = demo.generate_with_features(
        model, tokenizer, str(clt), args.prompt, max_new_tokens=args.max_new_tokens, top_k=args.top_k, chat=args.chat
    )
    demo.print_report(args, tokenizer, seq, prompt_len, feats, gen_s, time.perf_counter() - start, extra,
                      desc=desc, stats=stats, transcoder_note=note)
    return 0
