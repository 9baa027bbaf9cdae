"""``sparse-clt-hf stats DIR``: per-feature frequency, mean/max activation and top contexts of an
extraction, saved as ``DIR/stats.safetensors``; the most frequent features are printed with their labels
(the tokens they fire on most strongly)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ._options import add_model_options, find_tokenizer, load_model


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", help="folder written by `sparse-clt-hf extract`")
    p.add_argument("--top-n", type=int, default=10, help="max-activating contexts kept per feature")
    p.add_argument("--context", type=int, default=8, help="tokens kept either side of each context's position")
    p.add_argument("--show", type=int, default=5, help="most frequent features printed per layer")
    p.add_argument("--model", default=None,
                   help="model whose tokenizer decodes the labels (default: the extraction's model)")

    p.add_argument("--dashboard", action="store_true",
                   help="also compute dashboard statistics (histograms, quantile examples) into DIR/dashboard.safetensors "
                        "for `sparse-clt-hf dashboard DIR`")
    p.add_argument("--bins", type=int, default=32, help="with --dashboard: activation histogram bins per feature")
    p.add_argument("--quantiles", type=int, default=5, help="with --dashboard: quantile groups per feature")
    p.add_argument("--samples", type=int, default=3, help="with --dashboard: examples sampled per quantile group")
    p.add_argument("--exact", default=None, metavar="L/F,...",
                   help="also count these features' exact frequency (e.g. '6/942,7/13') by encoding them densely "
                        "over the extraction's tokens: runs the model again (--model, --clt; default the "
                        "extraction's); saved in DIR/exact_frequency.json and shown by the dashboard")
    p.add_argument("--clt", default=None,
                   help="with --exact: the transcoder (default: the one the extraction names)")
    add_model_options(p)


def _tokenizer(args: argparse.Namespace, folder: Path):
    """The extraction's tokenizer, or None (with a warning) when it cannot be loaded: labels are then token ids."""
    try:
        return find_tokenizer(args.model, [folder])
    except Exception as exc:  # noqa: BLE001 - the statistics are computed and saved either way
        print(f"warning: no tokenizer for the labels ({type(exc).__name__}: {exc}); showing token ids "
              "(pass --model)", file=sys.stderr)
        return None


def run(args: argparse.Namespace) -> int:
    from ..feature_stats import STATS_FILE, feature_stats

    folder = Path(args.dir)
    exact = None
    if args.exact is not None:  # checked before any work
        from ..dashboard.exact import check_features

        exact = [f for f in args.exact.split(",") if f.strip()]
        manifest, _ = check_features(folder, exact)
    dashboard = None
    if getattr(args, "dashboard", False):  # the base statistics come from the same pass
        from ..dashboard.accumulate import dashboard_stats

        dashboard = dashboard_stats(folder, top_n=args.top_n, context=args.context, bins=args.bins,
                                    quantiles=args.quantiles, samples=args.samples)
        stats = dashboard.base
    else:
        stats = feature_stats(folder, top_n=args.top_n, context=args.context)
    tokenizer = _tokenizer(args, folder)
    if args.model is None:  # the extraction's own tokenizer: keep it next to the shards for next time
        from ..labels import keep_tokenizer

        keep_tokenizer(tokenizer, folder, lambda msg: print(msg, file=sys.stderr))

    def label(layer: int, feature: int) -> list[str] | list[int]:
        ids = [int(i) for i in stats.top_tokens(layer, feature, 3)]
        return [tokenizer.decode([i]) for i in ids] if tokenizer is not None else ids

    summary = {"stats": str(folder / STATS_FILE), "n_positions": stats.n_positions, "layers": []}
    for layer in stats.layers:
        freq = stats.frequency(layer)
        top = freq.argsort(descending=True, stable=True)[: args.show].tolist()
        summary["layers"].append({
            "layer": layer,
            "alive": int((stats.count(layer) > 0).sum()),
            "n_features": len(freq),
            "mean_frequency": round(float(freq.mean()), 6),
            "most_frequent": [{"feature": f, "frequency": round(float(freq[f]), 6),
                               "mean": round(float(stats.mean(layer)[f]), 4),
                               "max": round(float(stats.max(layer)[f]), 4),
                               "label": label(layer, f)} for f in top],
        })

    if dashboard is not None:
        from ..dashboard.stats import DASHBOARD_FILE

        summary["dashboard"] = str(folder / DASHBOARD_FILE)
    if exact is not None:
        from dataclasses import asdict

        from ..dashboard.exact import EXACT_FILE, exact_frequency

        model, _, _ = load_model(args, args.model or manifest.get("model"))
        found = exact_frequency(model, args.clt or manifest["transcoder"], folder, exact, progress=not args.json)
        summary["exact"] = [{**asdict(e), "frequency": round(e.frequency, 6),
                             "recorded_frequency": round(e.recorded_frequency, 6)} for e in found]
        summary["exact_file"] = str(folder / EXACT_FILE)
        summary["top_k"] = manifest.get("top_k")

    if args.json:
        print(json.dumps(summary))
        return 0
    print(f"{stats.n_positions} positions; saved {summary['stats']}")
    for entry in summary["layers"]:
        print(f"layer {entry['layer']}: {entry['alive']}/{entry['n_features']} features fired; most frequent "
              "(feature: frequency, mean and max activation, top tokens):")
        for f in entry["most_frequent"]:
            print(f"  L{entry['layer']}/{f['feature']}: {f['frequency']:.4f} (mean {f['mean']:.2f}, "
                  f"max {f['max']:.2f})  {f['label']!r}")
    if summary["layers"]:
        entry = summary["layers"][0]
        if entry["most_frequent"]:
            print(f"Next: `sparse-clt-hf explain {entry['layer']}/{entry['most_frequent'][0]['feature']} --stats "
                  f"{folder}` shows a feature's contexts; `sparse-clt-hf view {folder} --html view.html` the documents.")
    if "dashboard" in summary:
        print(f"dashboard statistics: {summary['dashboard']} (next: sparse-clt-hf dashboard {args.dir} --out SITE)")
    if "exact" in summary:
        print(f"exact frequencies (dense encoding; recorded = top-{summary.get('top_k', 'k')} membership) -> "
              f"{summary['exact_file']}:")
        for e in summary["exact"]:
            print(f"  {e['layer']}/{e['feature']}: {e['frequency']:.4%} ({e['count']} of {e['n_positions']} positions); "
                  f"recorded {e['recorded_frequency']:.4%} ({e['recorded']})")
    return 0
