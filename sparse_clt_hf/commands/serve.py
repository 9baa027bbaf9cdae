"""``sparse-clt-hf serve``: an OpenAI-compatible server whose completions carry every token's features.

Without ``--model``/``--clt`` it serves the demo model and the demo transcoder (offline; the transcoder
is fitted on first use, as ``demo`` does). Loopback only unless ``--host`` says otherwise. See
docs/serve.md.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

from .. import demo
from ..training_config import parse_layers
from ._options import add_model_options, add_ref_options, load_model, resolve_arg

API_KEY_ENV = "SPARSE_CLT_HF_API_KEY"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="HF model id, folder or .gguf file (default: the demo SmolLM2)")
    parser.add_argument("--clt", default=None,
                        help="transcoder folder or Hub reference (default: the demo transcoder, with the demo model)")
    parser.add_argument("--no-transcoder", action="store_true",
                        help="serve the plain model, no features (a baseline for benchmarks)")
    parser.add_argument("--layers", default=None, help="layers to record, e.g. '6,7' or '6-9' (default: all)")
    add_ref_options(parser)
    parser.add_argument("--top-k", type=int, default=8,
                        help="features recorded per token and layer; the most a request's features.top_k may ask")
    parser.add_argument("--stats", default=None, metavar="PATH",
                        help="per-feature statistics for labels (default: the stats.safetensors next to the transcoder)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (loopback only by default)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on")
    parser.add_argument("--api-key", default=None,
                        help=f"require 'Authorization: Bearer KEY' on every route but /health (default: ${API_KEY_ENV})")
    parser.add_argument("--served-model-name", default=None, help="the model name clients send (default: --model)")
    parser.add_argument("--max-batch", type=int, default=8, help="most rows generated together in one batch")
    parser.add_argument("--max-queue", type=int, default=64, help="most requests waiting; more get 429 at once")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="most tokens one completion may ask for")
    parser.add_argument("--max-body", type=int, default=1 << 20, help="largest request body in bytes (413 above)")
    parser.add_argument("--batch-wait-ms", type=float, default=5.0,
                        help="how long the first request of a batch waits for others to join it")
    parser.add_argument("--shutdown-timeout", type=float, default=30.0,
                        help="seconds in-flight requests may finish at shutdown before they are cancelled")
    parser.add_argument("--log-prompts", action="store_true", help="include prompt text in the per-request log lines")
    parser.add_argument("--bench", action="store_true",
                        help="instead of serving: tokens/s of this server with features vs the same server without "
                             "the transcoder (same batching, side by side on 127.0.0.1), then exit")
    parser.add_argument("--bench-requests", type=int, default=32, help="--bench: concurrent requests per round")
    parser.add_argument("--bench-max-tokens", type=int, default=32, help="--bench: tokens per completion")
    parser.add_argument("--bench-rounds", type=int, default=3, help="--bench: timed rounds per server")
    add_model_options(parser)


def _check(args: argparse.Namespace) -> None:
    for name in ("top_k", "max_batch", "max_queue", "max_new_tokens", "max_body"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in 0..65535, got {args.port}")
    if args.no_transcoder and args.clt:
        raise ValueError("--no-transcoder and --clt are exclusive")
    if args.clt is None and not args.no_transcoder and args.model not in (None, "", "smollm2", demo.SMOLLM2_NAME):
        raise ValueError("--clt is required with --model (the demo transcoder fits the demo model only); "
                         "or pass --no-transcoder to serve the plain model")


def load(args: argparse.Namespace) -> tuple[Any, Any, str, Any, Any, list[int] | None]:
    """``(model, tokenizer, name, transcoder reference or None, stats, layers)`` from the options."""
    from ..formats import describe
    from ..labels import check_stats_path, find_stats

    _check(args)
    layers = parse_layers(args.layers) if args.layers else None
    check_stats_path(args.stats)
    if args.clt is not None:  # a bad reference or layer fails before the model loads
        describe(resolve_arg(args.clt, args), args.format, args.variant, layers=layers)
    model, tokenizer, name = load_model(args, args.model)
    clt, stats = args.clt, None
    if not args.no_transcoder and clt is None:
        def log(*a: Any) -> None:
            print(*a, file=sys.stderr)

        folder, _ = demo.ensure_demo_transcoder(model, tokenizer, log=log)
        if args.stats is None:
            stats = demo.ensure_demo_stats(model, tokenizer, folder, log=log)
        clt = str(folder)
    if clt is not None and stats is None:
        stats = find_stats(clt if Path(str(clt)).is_dir() else None, args.stats)
    return model, tokenizer, args.served_model_name or name, None if args.no_transcoder else clt, stats, layers


def attach_options(args: argparse.Namespace) -> dict[str, Any]:
    """``--format``/``--variant`` and the Hub options, as :func:`~sparse_clt_hf.attach.attach_clt` takes them."""
    return {"format": args.format, "variant": args.variant, "revision": args.revision, "cache_dir": args.cache_dir,
            "local_files_only": args.local_files_only}


def build(args: argparse.Namespace) -> Any:
    """Load the model and transcoder and return the ASGI app (what ``run`` serves)."""
    from ..serve import create_app

    model, tokenizer, name, clt, stats, layers = load(args)
    return create_app(
        model, tokenizer, clt, layers=layers, top_k=args.top_k, attach_options=attach_options(args), model_name=name, stats=stats, max_batch=args.max_batch, max_queue=args.max_queue,
        max_new_tokens=args.max_new_tokens, api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
        max_body=args.max_body, batch_wait=args.batch_wait_ms / 1000, log_prompts=args.log_prompts,
        shutdown_timeout=args.shutdown_timeout,
    )


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn
    except ImportError:
        print("sparse-clt-hf serve needs FastAPI and uvicorn: pip install 'sparse-clt-hf[serve]'", file=sys.stderr)
        return 1
    if args.bench:
        return _bench(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = build(args)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: listening on {args.host}, not loopback: anyone who can reach it can use the model"
              + ("" if app.state.api_key else " (no --api-key set)"), file=sys.stderr)
    # (no access log: the server logs one line per request itself, with its id, tokens and time)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info", access_log=False,
                timeout_graceful_shutdown=int(args.shutdown_timeout) + 1)
    return 0


def _bench(args: argparse.Namespace) -> int:
    import json

    from ..serve.bench import bench_serve

    if args.no_transcoder:
        raise ValueError("--bench compares the server with and without the transcoder: drop --no-transcoder")
    model, tokenizer, name, clt, _, layers = load(args)
    result = bench_serve(model, tokenizer, clt, layers=layers, top_k=args.top_k, attach_options=attach_options(args),
                         requests=args.bench_requests,
                         max_batch=args.max_batch, max_tokens=args.bench_max_tokens, rounds=args.bench_rounds,
                         model_name=name)
    if args.json:
        print(json.dumps(result))
        return 0
    rates = result["tokens_per_s"]
    print(f"server throughput, {result['requests']} concurrent chat requests x {result['max_tokens']} tokens, "
          f"batches of up to {result['max_batch']} (median of {result['rounds']} rounds)")
    print(f"  plain model        {rates['plain']:>9.1f} tokens/s")
    print(f"  with features      {rates['with_features']:>9.1f} tokens/s")
    print(f"  ratio              {result['ratio']:>9.3f}  (per round: {result['ratios']})")
    print(f"  rows per generate call -> calls: {result['batch_sizes']}")
    return 0
