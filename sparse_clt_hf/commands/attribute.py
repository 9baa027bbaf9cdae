"""``sparse-clt-hf attribute``: why the model predicts its next token, as an attribution graph.

Loads a model and a transcoder (default: SmolLM2 and the demo transcoder, as ``demo`` does), builds the graph of
the prompt's next-token logits (:func:`sparse_clt_hf.attribute`), prunes it (circuit-tracer's influence
thresholds) and prints the targets, the most influential features (labelled when statistics exist) and the
replacement / completeness scores; ``--out`` writes the graph JSON that circuit-tracer's frontend and Neuronpedia
read, ``--html`` a self-contained page to explore it (:mod:`sparse_clt_hf.graph_view`), ``--save`` the whole
graph (safetensors).

The prompt is attributed as raw text by default (a special token first, as circuit-tracer does): the question is
which features make the model continue *this* text. ``--chat-template`` wraps it as a user turn first.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .. import demo
from ._options import add_model_options, load_model

DEFAULT_PROMPT = "def square(x):\n    return x *"  # Python, like the demo transcoder's corpus


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="HF model id, folder or .gguf file (default: SmolLM2)")
    parser.add_argument("--clt", default=None, help="transcoder folder or Hub reference (default with the default "
                        f"model: the demo transcoder, fitted on first use; ${demo.DEMO_ENV} overrides its folder)")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help="text whose next token to explain (default: %(default)r)")
    parser.add_argument("--chat-template", dest="chat", action="store_true",
                        help="wrap the prompt in the chat template as a user turn (default: raw text)")
    parser.add_argument("--target", action="append", default=[], metavar="TOKEN",
                        help="a token whose logit to explain, e.g. ' Paris' (one token; repeatable; default: the "
                             "most likely next tokens)")
    parser.add_argument("--versus", default=None, metavar="TOKEN",
                        help="with one --target: explain logit(target) - logit(TOKEN), why the model prefers the "
                             "target to this token (a custom target direction, as circuit-tracer's CustomTarget)")
    parser.add_argument("--max-n-logits", type=int, default=10, help="most logits explained by default (%(default)s)")
    parser.add_argument("--desired-logit-prob", type=float, default=0.95,
                        help="explain the likeliest tokens until their probability reaches this (%(default)s)")
    parser.add_argument("--max-feature-nodes", type=int, default=None,
                        help="attribute at most this many features, the most influential (default: all active)")
    parser.add_argument("--batch-size", type=int, default=None, help="attributed nodes per backward pass")
    parser.add_argument("--node-threshold", type=float, default=0.8,
                        help="pruning: keep the nodes holding this share of the influence (%(default)s)")
    parser.add_argument("--edge-threshold", type=float, default=0.98,
                        help="pruning: keep the edges holding this share of the influence (%(default)s)")
    parser.add_argument("--out", default=None, metavar="PATH",
                        help="write the pruned graph JSON (circuit-tracer / Neuronpedia format) here")
    parser.add_argument("--html", default=None, metavar="PATH", help="write a self-contained page of the pruned graph")
    parser.add_argument("--dashboard", default=None, metavar="SITE",
                        help="with --html: link each feature to its page of this sparse-clt-hf dashboard site "
                             "(a folder, rewritten relative to the page, or a URL)")
    parser.add_argument("--save", default=None, metavar="PATH", help="save the whole graph (.safetensors, no pickle)")
    parser.add_argument("--slug", default=None, help="the graph's name in its JSON (default: from the prompt)")
    parser.add_argument("--stats", default=None, metavar="PATH",
                        help="per-feature statistics for labels (a stats.safetensors file or a folder holding one; "
                             "default: the stats.safetensors next to the transcoder, if any)")
    parser.add_argument("--show", type=int, default=10, help="features listed in the summary (%(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_model_options(parser)


def dashboard_for_page(site: str | None, page: str | None) -> str | None:
    """``--dashboard`` as the page links to it: a folder that exists relative to the current directory (what a
    shell user types) becomes relative to the page's folder; a URL, an absolute path, or a path that does not
    exist here (taken as relative to the page) stays as given."""
    if site is None or page is None or "://" in site or Path(site).is_absolute() or not Path(site).is_dir():
        return site
    return Path(os.path.relpath(Path(site).resolve(), Path(page).resolve().parent)).as_posix()


def check_args(args: argparse.Namespace) -> None:
    """Bad numbers and missing folders fail before the model loads."""
    if not 0.0 <= args.node_threshold <= 1.0 or not 0.0 <= args.edge_threshold <= 1.0:
        raise ValueError(f"--node-threshold {args.node_threshold} / --edge-threshold {args.edge_threshold}: "
                         "expected shares between 0 and 1")
    for name in ("max_feature_nodes", "batch_size", "max_n_logits"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} {value}: expected a positive integer")
    if not 0.0 < args.desired_logit_prob <= 1.0:
        raise ValueError(f"--desired-logit-prob {args.desired_logit_prob}: expected a probability in (0, 1]")
    if not args.prompt:
        raise ValueError("--prompt is empty: attribution needs text to explain the next token of")
    if args.versus is not None and len(args.target) != 1:
        raise ValueError(f"--versus {args.versus!r} needs exactly one --target (got {len(args.target)}): "
                         "the graph explains logit(target) - logit(versus)")
    if args.model is not None and args.clt is None:
        raise ValueError("--clt is required with --model (the demo transcoder fits the default model only)")
    if args.dashboard is not None:
        from ..graph_view import dashboard_site

        if not args.html:
            raise ValueError(f"--dashboard {args.dashboard}: the links go into the page; add --html PATH")
        dashboard_site(args.dashboard)  # a javascript: or data: URL is refused
    if args.out and not args.out.endswith(".json"):
        raise ValueError(f"--out {args.out}: the graph JSON's file name should end in .json")
    for option in ("save",):
        value = getattr(args, option, None)
        if value and not Path(value).resolve().parent.is_dir():
            raise FileNotFoundError(f"--{option} {value}: the folder {Path(value).resolve().parent} does not exist")


def load(args: argparse.Namespace, log) -> tuple[Any, Any, str, Any, str]:
    """(model, tokenizer, transcoder reference, statistics or None, a note about the transcoder)."""
    from ..labels import find_stats

    model, tokenizer, _ = load_model(args, args.model)
    clt, note, stats = args.clt, "", None
    if clt is None:
        progress = not (args.no_progress or args.json)
        folder, metrics = demo.ensure_demo_transcoder(model, tokenizer, progress=progress, log=log)
        clt = str(folder)
        note = "the demo transcoder, fitted just now" if metrics is not None else "the cached demo transcoder"
        if args.stats is None:
            stats = demo.ensure_demo_stats(model, tokenizer, folder, progress=progress, log=log)
    if stats is None:
        stats = find_stats(clt if Path(str(clt)).is_dir() else None, args.stats)
    return model, tokenizer, clt, stats, note


def write_graph_json(graph: Any, path: Path, *, slug: str, scan: str, node_threshold: float, edge_threshold: float,
                     labels: dict[tuple[int, int], str]) -> dict[str, Any]:
    """Write the pruned ``graph``'s JSON to ``path`` and return it as a dict."""
    graph.to_json(path, slug=slug, scan=scan, node_threshold=node_threshold, edge_threshold=edge_threshold,
                  labels=labels)
    from ..io.structured import load_json_object

    return load_json_object(Path(path).read_bytes(), str(path), limit=2**31)


def slug_of(prompt: str) -> str:
    """``"def square(x): return x *"`` -> ``"def-square-x-return-x"`` (at most 40 characters)."""
    words = "".join(c.lower() if c.isalnum() else " " for c in prompt).split()
    return "-".join(words)[:40].strip("-") or "graph"


def attribute_and_report(model: Any, tokenizer: Any, clt: Any, prompt: Any, *, stats: Any = None,
                         targets: list[Any] | None = None, out: str | None = None, html: str | None = None,
                         save: str | None = None, slug: str | None = None, title: str | None = None,
                         dashboard: str | None = None,
                         node_threshold: float = 0.8, edge_threshold: float = 0.98, show: int = 10,
                         progress: bool = True, **attribute_kwargs: Any) -> dict[str, Any]:
    """Attribute ``prompt`` (text, or token ids used as given), prune, write the files asked for, and return the
    report :func:`format_report` prints (JSON-ready). ``dashboard``: a dashboard site the page links features to."""
    import sparse_clt_hf

    from ..graph_view import feature_details_from_stats, graph_html, labels_from_details, top_features

    start = time.perf_counter()
    graph = sparse_clt_hf.attribute(model, clt, prompt, tokenizer=tokenizer, targets=targets or None,
                                    progress=progress, **attribute_kwargs)
    seconds = time.perf_counter() - start
    pruned = graph.prune(node_threshold, edge_threshold)
    n = int(graph.features.shape[0])
    kept = graph.features.cpu()[pruned.node_mask[:n].cpu()][:, [0, 2]].tolist()  # (layer, feature) kept
    details = feature_details_from_stats(kept, stats, tokenizer) if stats is not None else None
    labels = labels_from_details(details or {})
    text = prompt if isinstance(prompt, str) else "".join(graph.token_strings or [])
    files: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        json_path = Path(out) if out else Path(tmp) / "graph.json"
        graph_json = write_graph_json(pruned, json_path, slug=slug or slug_of(text), scan=str(clt),
                                      node_threshold=node_threshold, edge_threshold=edge_threshold, labels=labels)
    if out:
        files["json"] = str(out)
    if html:
        graph_html(graph_json, html, feature_details=details, title=title or f"Why the next token? {text}",
                   dashboard=dashboard)
        files["html"] = str(html)
    if save:
        graph.save(save)
        files["save"] = str(save)
    replacement, completeness = graph.scores()
    strings = graph.logit_strings or [tokenizer.decode([int(i)]) for i in graph.logit_ids.tolist()]
    kinds: dict[str, int] = {}
    for node in graph_json["nodes"]:
        kinds[node["feature_type"]] = kinds.get(node["feature_type"], 0) + 1
    return {
        "prompt": text,
        "tokens": int(graph.tokens.shape[0]),
        "targets": [{"token": s, "id": int(i), "probability": round(float(p), 4)}
                    for s, i, p in zip(strings, graph.logit_ids.tolist(), graph.logit_probs.tolist())],
        "active_features": int(graph.meta.get("n_active_features", n)),  # also those left out by max_feature_nodes
        "attributed_features": int(graph.row_nodes.shape[0]) - int(graph.logit_ids.shape[0]),
        "pruned": {"nodes": len(graph_json["nodes"]), "links": len(graph_json["links"]), "by_type": kinds,
                   "node_threshold": node_threshold, "edge_threshold": edge_threshold},
        "scores": {"replacement": round(float(replacement), 4), "completeness": round(float(completeness), 4)},
        "top_features": top_features(graph_json, show),
        "labels": stats is not None,
        "seconds": round(seconds, 2),
        "files": files,
    }


def format_report(report: dict[str, Any]) -> str:
    """The report as text: targets, scores, the most influential features, where the files went."""
    lines = [f"prompt: {report['prompt']!r} ({report['tokens']} tokens)",
             "explained: " + ", ".join(f"{t['token']!r} p={t['probability']:.3f}" for t in report["targets"])]
    p = report["pruned"]
    kinds = ", ".join(f"{v} {k}" for k, v in sorted(p["by_type"].items()))
    lines.append(f"graph: {report['active_features']} active features ({report['attributed_features']} attributed) in "
                 f"{report['seconds']:.1f} s; pruned (node {p['node_threshold']}, edge {p['edge_threshold']}) to "
                 f"{p['nodes']} nodes ({kinds}) and {p['links']} links")
    s = report["scores"]
    lines.append(f"scores: replacement {s['replacement']:.3f}, completeness {s['completeness']:.3f} (1 = everything "
                 "flows through features / nothing through error nodes)")
    lines.append("")
    lines.append("most influential features on the explained logits (direct effect on the top one):")
    if not report["top_features"]:
        lines.append("  none kept by pruning")
    else:
        lines.append(f"  {'#':>3}  {'feature':<12} {'at':<18} {'act':>8} {'-> logit':>9}  label")
    for i, f in enumerate(report["top_features"], 1):
        where = f"#{f['position']} {f['token']!r}" if f["token"] is not None else f"#{f['position']}"
        act = "" if f["activation"] is None else f"{f['activation']:.3g}"
        direct = "" if f["to_logit"] is None else f"{f['to_logit']:+.3g}"
        fid = f"L{f['layer']}/{f['feature']}"
        lines.append(f"  {i:>3}  {fid:<12} {where:<18} {act:>8} {direct:>9}  "
                     f"{f['label']}".rstrip())
    if not report["labels"]:
        lines.append("(no feature statistics, so no labels: pass --stats, see `sparse-clt-hf stats`)")
    files = report["files"]
    names = {"json": "graph JSON (circuit-tracer / Neuronpedia)", "html": "HTML view (open in a browser)",
             "save": "whole graph"}
    lines.append("")
    lines += [f"saved {names[k]} to {v}" for k, v in files.items()]
    if "html" not in files:
        lines.append("Next: --html graph.html draws the graph; click a node for its inputs and outputs.")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    check_args(args)
    log = (lambda *a: print(*a, file=sys.stderr)) if args.json else print
    demo.preflight(args, args.clt, None, args.model)  # --clt, --stats, --out/--html folders, before the model loads
    model, tokenizer, clt, stats, note = load(args, log)
    prompt: Any = args.prompt
    if args.chat:
        prompt = demo.chat_input(tokenizer, args.prompt, True)["input_ids"][0]
    targets: list[Any] = args.target
    if args.versus is not None:
        from ..attribution import logit_difference

        targets = [logit_difference(model, args.target[0], args.versus, tokenizer=tokenizer)]
    report = attribute_and_report(
        model, tokenizer, clt, prompt, stats=stats, targets=targets, out=args.out, html=args.html,
        save=args.save, slug=args.slug, dashboard=dashboard_for_page(args.dashboard, args.html), node_threshold=args.node_threshold, edge_threshold=args.edge_threshold,
        show=args.show, progress=not (args.no_progress or args.json), max_n_logits=args.max_n_logits,
        desired_logit_prob=args.desired_logit_prob, max_feature_nodes=args.max_feature_nodes,
        batch_size=args.batch_size,
    )
    report["transcoder"] = str(clt) + (f" ({note})" if note else "")
    if args.json:
        print(json.dumps(report))
    else:
        print(f"transcoder: {report['transcoder']}")
        print(format_report(report))
    return 0
