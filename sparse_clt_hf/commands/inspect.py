"""``sparse-clt-hf inspect``: describe a transcoder (format, layers, width, site) without loading weights."""

from __future__ import annotations

import argparse
import json

from ._options import add_ref_options, layers_arg, resolve_arg


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("ref", help="folder, org/repo[/sub][@rev], hf:// URI or registry name")
    parser.add_argument("--layers", default=None, help="describe only these layers, e.g. 0-3,7 (default: all)")
    add_ref_options(parser)


def human_bytes(n: float | None) -> str:
    """``1536`` -> ``"1.5 KB"``; None -> ``"?"``."""
    if n is None:
        return "?"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def run(args: argparse.Namespace) -> int:
    from ..formats import describe

    desc = describe(
        resolve_arg(args.ref, args), format=args.format, variant=args.variant, layers=layers_arg(args.layers)
    )
    if args.json:
        print(json.dumps(desc.to_dict(), indent=2))
        return 0
    widths = sorted(set(desc.n_features))
    rows = [
        ("name", desc.name),
        ("format", f"{desc.format} ({desc.kind.upper()})"),
        ("model", desc.model_name or "?"),
        ("layers", f"{len(desc.layers)}: {desc.layers[0]}..{desc.layers[-1]}"),
        ("width", ", ".join(map(str, widths)) + " features per layer"),
        ("d_model", desc.d_model),
        ("site", desc.input_site + ("" if desc.input_transform == "none" else f" ({desc.input_transform})")),
        ("activation", desc.activation + (f" (k={desc.k})" if desc.k else "")),
        ("dtype", desc.dtype or "?"),
        ("encoders", human_bytes(desc.encoder_bytes)),
        ("decoders", human_bytes(desc.decoder_bytes) if desc.has_decoders else "none"),
        ("size on disk", human_bytes(desc.total_bytes)),
    ]
    for key, value in rows:
        print(f"{key:>13}  {value}")
    for note in desc.notes:
        print(f"{'note':>13}  {note}")
    return 0
