"""``sparse-clt-hf dashboard [DIR] --out SITE``: a static, offline site of feature dashboards (examples
across the activation range, histograms, logit effects) from an extraction's statistics, and optional
Neuronpedia / circuit-tracer exports. Without DIR: the demo transcoder's dashboards."""

from __future__ import annotations

import argparse
import json
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", nargs="?", default=None,
                   help="an extraction folder (its dashboard statistics are computed once if missing) or a folder "
                        "holding stats.safetensors and dashboard.safetensors; default: the demo transcoder")
    p.add_argument("--out", required=True, metavar="SITE", help="folder to write the site into (open SITE/index.html)")
    p.add_argument("--clt", default=None,
                   help="the transcoder of the statistics, loaded with its decoders for logit effects (must be the "
                        "one the statistics were computed with)")
    p.add_argument("--model", default=None,
                   help="model whose unembedding gives logit effects and whose tokenizer decodes tokens (default: "
                        "the model the statistics name)")
    p.add_argument("--tokenizer", default=None, help="tokenizer to decode tokens with (default: see --model)")
    p.add_argument("--direction", choices=("sum", "last"), default="sum",
                   help="CLT decoder row for logit effects: the sum over the layers a feature writes, or the last")
    p.add_argument("--logits", type=int, default=10, help="top and bottom tokens shown per feature")
    p.add_argument("--neuronpedia", default=None, metavar="NP_DIR", help="also write Neuronpedia's import directory")
    p.add_argument("--circuit-tracer", default=None, metavar="CT_DIR",
                   help="also write circuit-tracer's per-feature JSON files (CT_DIR/features/<scan>/<index>.json)")
    p.add_argument("--scan", default=None,
                   help="circuit-tracer scan name (the graph files' metadata.scan; default: the transcoder folder's name)")
    p.add_argument("--bins", type=int, default=32, help="histogram bins, when the statistics are computed here")
    p.add_argument("--quantiles", type=int, default=5, help="quantile groups, when the statistics are computed here")
    p.add_argument("--samples", type=int, default=3, help="examples per quantile group, when computed here")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (demo statistics)")


def run(args: argparse.Namespace) -> int:
    from ..dashboard.build import build_dashboard

    log = (lambda *a: print(*a, file=sys.stderr)) if args.json else print
    options = {"bins": args.bins, "quantiles": args.quantiles, "samples": args.samples}
    if args.dir is None:
        from ..dashboard.demo import demo_dashboard

        summary = demo_dashboard(args.out, neuronpedia=args.neuronpedia, circuit_tracer=args.circuit_tracer,
                                 stats_options=options, progress=not (args.no_progress or args.json), log=log)
    else:
        summary = build_dashboard(args.dir, args.out, clt=args.clt, model=args.model, tokenizer=args.tokenizer,
                                  which=args.direction, logit_k=args.logits, neuronpedia=args.neuronpedia,
                                  circuit_tracer=args.circuit_tracer, scan=args.scan, stats_options=options, log=log)
    if args.json:
        print(json.dumps(summary))
        return 0
    print(f"site: {summary['site']} (open it in a browser; feature pages are feature.html#L<layer>/<feature>)")
    for note in summary["notes"]:
        print(f"note: {note}")
    for key in ("neuronpedia", "circuit_tracer"):
        if key in summary:
            print(f"{key.replace('_', '-')} export: {summary[key]}")
    return 0
