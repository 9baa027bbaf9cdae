"""``sparse-clt-hf convert``: any supported format into the native (circuit-tracer) layout."""

from __future__ import annotations

import argparse
import json

from ._options import add_ref_options, layers_arg, resolve_arg


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="folder, org/repo[/sub][@rev], hf:// URI or registry name")
    parser.add_argument("dst", help="output folder (native circuit-tracer layout)")
    parser.add_argument("--layers", default=None, help="layers to keep, e.g. 0-3,7 (default: all)")
    parser.add_argument("--encoders-only", action="store_true", help="skip decoders (much smaller output)")
    add_ref_options(parser)


def run(args: argparse.Namespace) -> int:
    from ..transcoder import CrossLayerTranscoder

    tc = CrossLayerTranscoder.from_pretrained(
        resolve_arg(args.src, args),
        layers=layers_arg(args.layers),
        format=args.format,
        variant=args.variant,
        decoders=not args.encoders_only,
    )
    out = tc.save_pretrained(args.dst)
    if args.json:
        print(json.dumps({"dst": str(out), "layers": tc.layers, "format": tc.config.source_format}))
    else:
        print(f"wrote {len(tc.layers)} layers ({tc.config.source_format} -> native) to {out}")
    return 0
