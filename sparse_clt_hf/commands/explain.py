"""``sparse-clt-hf explain LAYER/FEATURE``: what a feature responds to — its top tokens, how often and how
strongly it fires, and its max-activating contexts with the max-activating token marked ``⟦like this⟧``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("feature", help="LAYER/FEATURE as the demo prints it, e.g. 6/942 or L6/942")
    parser.add_argument("--clt", default=None,
                        help="transcoder folder whose stats.safetensors to read (default: the demo transcoder; its "
                             "statistics are computed once if missing)")
    parser.add_argument("--stats", default=None, metavar="PATH",
                        help="a stats.safetensors file, or a folder holding one (e.g. an extraction after "
                             "`sparse-clt-hf stats DIR`), instead of the transcoder's")
    parser.add_argument("--model", default=None,
                        help="model whose tokenizer decodes the contexts (default: the tokenizer saved next to the "
                             "statistics, else the model they name, else SmolLM2)")
    parser.add_argument("--contexts", type=int, default=10, help="max-activating contexts shown (at most those stored)")


def _demo_stats(progress: bool, log) -> tuple[Any, Path]:
    """The demo transcoder's statistics, computed once (this loads the model) when missing."""
    from .. import demo
    from ..feature_stats import FeatureStats
    from ..labels import stats_path

    folder = demo.demo_transcoder_dir()
    if not (folder / "config.yaml").is_file():
        raise FileNotFoundError(
            f"the demo transcoder is not fitted yet ({folder}): run `sparse-clt-hf demo` once, or pass --clt/--stats"
        )
    if stats_path(folder).is_file():
        return FeatureStats.load(stats_path(folder)), folder
    model, tokenizer, _ = demo.load_model(None)
    return demo.ensure_demo_stats(model, tokenizer, folder, progress=progress, log=log), folder


def _tokenizer(args: argparse.Namespace, folders: list[Path]):
    """``--model``'s tokenizer, else one saved next to the statistics, else the model they name."""
    from ..labels import TOKENIZER_DIR
    from ..models import load_tokenizer

    if args.model is not None:
        return load_tokenizer(args.model)
    for folder in folders:
        if (folder / TOKENIZER_DIR).is_dir():
            return load_tokenizer(str(folder / TOKENIZER_DIR))
    for folder in folders:
        for name, key in (("manifest.json", "model"), ("config.yaml", "model_name")):
            path = folder / name
            if path.is_file():
                from ..errors import SparseCLTError
                from ..io.structured import load_json, load_yaml

                read = load_json if name.endswith(".json") else load_yaml
                data = read(path.read_bytes(), str(path), error=SparseCLTError)
                model = data.get(key) if isinstance(data, dict) else None
                if isinstance(model, str) and model:
                    return load_tokenizer(model)
    return load_tokenizer(None)


def run(args: argparse.Namespace) -> int:
    from ..feature_stats import FeatureStats
    from ..labels import check_stats_path, feature_summary, marked_context, parse_feature, stats_path
    from ..view import feature_label

    layer, feature = parse_feature(args.feature)
    log = (lambda *a: print(*a, file=sys.stderr)) if args.json else print
    if args.stats is not None:
        check_stats_path(args.stats)
        stats = FeatureStats.load(args.stats)
        where = Path(args.stats)
        folders = [where if where.is_dir() else where.parent]
    elif args.clt is not None:
        folder = Path(args.clt)
        if not stats_path(folder).is_file():
            raise FileNotFoundError(
                f"no feature statistics next to {folder} ({stats_path(folder).name}): pass --stats PATH "
                "(`sparse-clt-hf extract --clt ... --out DIR` then `sparse-clt-hf stats DIR` makes DIR/stats.safetensors)"
            )
        stats, where, folders = FeatureStats.load(stats_path(folder)), stats_path(folder), [folder]
    else:
        stats, folder = _demo_stats(progress=not args.json, log=log)
        where, folders = stats_path(folder), [folder]
    if layer not in stats.layers:
        raise ValueError(f"layer {layer} has no statistics in {where}; layers: {stats.layers}")
    width = stats.n_features[stats.layers.index(layer)]
    if not 0 <= feature < width:
        raise ValueError(f"feature {feature} out of range: layer {layer} has {width} features (0..{width - 1})")
    tokenizer = _tokenizer(args, folders)
    summary = feature_summary(stats, layer, feature)
    contexts = stats.top_contexts(layer, feature)[: max(0, args.contexts)]
    label = [tokenizer.decode([t]) for t in stats.top_tokens(layer, feature, 3)]
    report = {**summary, "stats": str(where), "label": label,
              "contexts": [{"activation": round(c.activation, 4), "text": marked_context(tokenizer, c, stats.context),
                            "token": tokenizer.decode([c.token_ids[c.index]]) if c.token_ids else "",
                            "document": c.document, "position": c.position} for c in contexts]}
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"L{layer}/{feature}  {feature_label(stats, tokenizer, layer, feature)}")
    if summary["count"] == 0:
        print(f"never among the recorded features of the {stats.n_positions} tokens in {where}: no contexts")
        return 0
    print(f"fires on {summary['count']} of {stats.n_positions} tokens ({summary['frequency']:.2%}) in {where}; "
          f"activation mean {summary['mean']:.2f}, max {summary['max']:.2f}")
    print("max-activating contexts (activation, share of the max, text with the max-activating token in ⟦ ⟧):")
    for c in report["contexts"]:
        share = c["activation"] / summary["max"] if summary["max"] > 0 else 0.0
        print(f"  {c['activation']:>7.2f} {share:>5.0%}  {c['text']}")
    return 0
