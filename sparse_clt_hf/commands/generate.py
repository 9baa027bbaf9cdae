"""``sparse-clt-hf generate``: any model and transcoder; print the features per token or save them.

Without ``--model`` and ``--clt`` it runs the demo model with the demo transcoder, as ``demo`` does
(fitting the demo transcoder first, a few minutes once, when it is not cached yet)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from ._options import add_generation_options, add_model_options, load_model


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="HF model id, folder or .gguf file (default: SmolLM2)")
    parser.add_argument("--clt", default=None,
                        help="transcoder folder or Hub reference (default, with the default model: the demo "
                             "transcoder as `demo` uses it, fitted once on first use; required with --model)")
    parser.add_argument("--layers", default=None, help="layers to record, e.g. '6,7' or '6-9' (default: all)")
    parser.add_argument("--out", default=None, help="also save the features to this .safetensors file")
    parser.add_argument("--steer", action="append", default=[], type=steer_arg, metavar="L:F=VALUE[:mode]",
                        help="steer feature F of layer L while generating (mode clamp|add|scale, default "
                             "clamp; 0 ablates); repeatable")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bars while fitting the demo transcoder and its statistics")
    parser.add_argument("--compare", action="store_true",
                        help="with --steer: also generate without the steers and show both completions and their "
                             "features (report and --html page)")
    add_generation_options(parser, None)
    add_model_options(parser)


def steer_arg(text: str) -> dict[str, Any]:
    """``"6:123=8"`` / ``"6:123=-2:add"`` -> ``{"layer": 6, "feature": 123, "value": 8.0, "mode": "clamp"}``."""
    where, eq, what = text.partition("=")
    layer, colon, feature = where.partition(":")
    value, _, mode = what.partition(":")
    try:
        if not (eq and colon):
            raise ValueError
        return {"layer": int(layer), "feature": int(feature), "value": float(value), "mode": mode or "clamp"}
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--steer {text!r}: expected LAYER:FEATURE=VALUE[:clamp|add|scale], e.g. 7:123=8"
        ) from None


def run(args: argparse.Namespace) -> int:
    from .. import demo
    from ..labels import find_stats
    from ..models import DEFAULT_MODEL_ALIASES
    from ..training_config import parse_layers
    from .demo import demo_transcoder

    start = time.perf_counter()
    if args.clt is None and args.model not in DEFAULT_MODEL_ALIASES:
        raise ValueError(f"--clt is required with --model {args.model}: the demo transcoder fits only the default "
                         "model (SmolLM2-135M-Instruct)")
    layers = parse_layers(args.layers) if args.layers else None
    desc = demo.preflight(args, args.clt, layers, args.model)  # bad --clt/--layers/--stats fail before the model loads
    if args.compare and not args.steer:
        raise ValueError("--compare compares a steered run with the unsteered one: add --steer LAYER:FEATURE=VALUE")
    model, tokenizer, _ = load_model(args, args.model)
    extra: dict[str, Any] = {}
    clt, note, stats = args.clt, "", None
    if clt is None:
        clt, note, stats, desc, extra = demo_transcoder(args, model, tokenizer)
        if layers is not None:
            desc = demo.preflight(args, str(clt), layers)
    runs = {}
    for name, steer in (("baseline", []), ("steered", args.steer)) if args.compare else (("steered", args.steer),):
        runs[name] = demo.generate_with_features(
            model, tokenizer, str(clt), args.prompt, max_new_tokens=args.max_new_tokens, top_k=args.top_k,
            layers=layers, chat=args.chat, steer=steer,
        )
    seq, prompt_len, feats, gen_s = runs["steered"]
    baseline = (runs["baseline"][0], runs["baseline"][2]) if "baseline" in runs else None
    extra["transcoder"] = str(clt)
    if args.steer:
        extra["steers"] = args.steer
    if args.out:
        feats.save(args.out)
        extra["saved"] = str(args.out)
    if stats is None:
        stats = find_stats(clt if Path(str(clt)).is_dir() else None, args.stats)
    demo.print_report(args, tokenizer, seq, prompt_len, feats, gen_s, time.perf_counter() - start, extra,
                      desc=desc, stats=stats, transcoder_note=note, steers=args.steer, baseline=baseline)
    return 0
