"""A self-contained HTML page of a pruned attribution graph (:func:`graph_html`).

Input: the graph JSON that circuit-tracer's frontend and Neuronpedia read (``AttributionGraph.to_json`` /
``graph_json.graph_to_json_dict``): ``metadata`` (``prompt_tokens``, ``prompt``, ``slug``, ``scan``,
``node_threshold``), ``nodes`` (``node_id``, ``feature_type``, ``layer``, ``ctx_idx``, ``clerp``,
``activation``, ``influence``, ``token_prob``, ``is_target_logit``) and ``links`` (``source``, ``target``,
``weight``, node ids). Node kinds come from ``feature_type``: ``"embedding"`` (a token), ``"logit"``, an
``... error`` type, anything else a feature; a feature's layer and index come from its ``node_id``
(``"{layer}_{feature}_{position}"``, circuit-tracer's spelling; its ``feature`` field is a pairing of both).

The page works offline (CSS and JavaScript inline, an SVG drawn by the page's script; the data sits in one
``<script type="application/json">`` block escaped by :func:`~sparse_clt_hf.view.embed_json`):

* rows are layers (token embeddings at the bottom, then layer 0 upwards, the logits on top), columns are
  token positions (the token's text under each column); a cell with several nodes spreads them sideways;
* an edge is blue when positive and red when negative, its width and opacity its size relative to the
  strongest input of the same target;
* clicking a node (or ``PATH#node=NODE_ID``) lists its strongest inputs and outputs (clickable) and, with
  ``feature_details`` (:func:`feature_details_from_stats`), the feature's label and max-activating contexts;
  with ``dashboard``, a link to the feature's page of a ``sparse-clt-hf dashboard`` site.
"""

from __future__ import annotations

import html
import re
from collections.abc import Iterable, Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from .view import (
    CONTEXT_AFTER,
    CONTEXT_BEFORE,
    N_CONTEXTS,
    StatsLike,
    embed_json,
    feature_label,
)

DATA_ID = "graph-data"
TEMPLATE_FILE = "graph_view_template.html"
MARKERS = re.compile("__TITLE__|__DATA_ID__|__DATA__")
LOGIT_CLERP = re.compile(r'^Output "(.*)" \(p=[^)]*\)$', re.S)

#: circuit-tracer's ``feature_type`` -> the page's node kind (anything not listed, e.g. "cross layer
#: transcoder" or "transcoder", is a feature; a type naming an error is an error node)
DASHBOARD_SCHEMES = ("http", "https", "file")  #: URL schemes a dashboard link may use (besides a plain path)
KINDS = {"embedding": "token", "logit": "logit", "mlp reconstruction error": "error"}


def _kind(feature_type: str) -> str:
    return KINDS.get(feature_type, "error" if "error" in feature_type else "feature")


def feature_of(node: Mapping[str, Any]) -> tuple[int, int] | None:
    """``(layer, feature)`` of a feature node from its ``node_id`` (``"{layer}_{feature}_{pos}"``); None for
    other kinds."""
    if _kind(str(node.get("feature_type", ""))) != "feature":
        return None
    parts = str(node["node_id"]).split("_")
    try:
        if len(parts) != 3:
            raise ValueError
        return int(parts[0]), int(parts[1])
    except ValueError:
        raise ValueError(f"feature node id {node['node_id']!r}: expected LAYER_FEATURE_POSITION, e.g. 7_1234_5 "
                         "(circuit-tracer's node ids)") from None


def _logit_token(clerp: Any) -> str | None:
    """The token of a logit node from circuit-tracer's clerp ``Output " Paris" (p=0.532)``, else None."""
    m = LOGIT_CLERP.match(str(clerp or ""))
    return m.group(1) if m else None


def _num(value: Any) -> float | None:
    if value is None:
        return None
    v = float(value)
    return float(f"{v:.5g}") if v == v and abs(v) != float("inf") else None


def dashboard_site(site: str | Path | None) -> str | None:
    """``site`` (a folder or URL of a ``sparse-clt-hf dashboard`` site) as the page links to it: its feature pages
    are ``SITE/feature.html#L{layer}/{feature}``. Raises ValueError for a URL scheme other than http(s) or file
    (a ``javascript:`` or ``data:`` link would run code when clicked)."""
    if site is None:
        return None
    text = str(site)
    scheme = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*):", text.strip())
    if scheme and len(scheme.group(1)) > 1 and scheme.group(1).lower() not in DASHBOARD_SCHEMES:
        raise ValueError(f"dashboard {text!r}: expected a folder or an http(s)/file URL of a sparse-clt-hf "
                         f"dashboard site, not a {scheme.group(1)}: URL")
    return text.rstrip("/\\") or text


def page_data(graph_json: Mapping[str, Any], feature_details: Mapping[str, Any] | None = None,
              title: str | None = None, dashboard: str | Path | None = None) -> dict[str, Any]:
    """The JSON-ready content of the page (see :func:`graph_html`): ``nodes`` (``id``, ``kind``, ``row``
    (0 = embeddings, ``l + 1`` = layer ``l``, ``n_layers + 1`` = logits), ``pos``, ``layer``, ``feature``,
    ``label``, ``act``, ``infl``, ``prob``, ``target``), ``links`` as ``[source index, target index, weight]``,
    ``tokens`` (one string per position), ``n_layers``, ``meta``, ``details`` (of the features on the page) and
    ``dashboard`` (:func:`dashboard_site`).

    Raises ValueError naming the node or link that does not fit the schema."""
    if not isinstance(graph_json, Mapping) or not isinstance(graph_json.get("nodes"), list) \
            or not isinstance(graph_json.get("links"), list):
        raise ValueError("graph_json: expected circuit-tracer's graph JSON, a dict with 'nodes' and 'links' lists "
                         "(AttributionGraph.to_json writes one)")
    meta_in = graph_json.get("metadata") or {}
    nodes: list[dict[str, Any]] = []
    index: dict[str, list[int]] = {}
    for i, n in enumerate(graph_json["nodes"]):
        try:
            node_id, ftype, pos = str(n["node_id"]), str(n["feature_type"]), int(n["ctx_idx"])
            layer_text = str(n["layer"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"graph_json node {i}: needs node_id, feature_type, layer and ctx_idx ({e!r})") from None
        kind = _kind(ftype)
        if any(nodes[k]["kind"] == kind for k in index.get(node_id, [])):
            raise ValueError(f"graph_json node {i}: node_id {node_id!r} appears twice")
        if pos < 0:
            raise ValueError(f"graph_json node {node_id!r}: ctx_idx {pos} is negative")
        fl = feature_of(n)
        layer = fl[0] if fl else (int(layer_text) if kind in ("feature", "error") else None)
        index.setdefault(node_id, []).append(i)
        nodes.append({
            "id": node_id, "kind": kind, "pos": pos, "layer": layer, "feature": fl[1] if fl else None,
            "label": str(n.get("clerp") or ""), "act": _num(n.get("activation")), "infl": _num(n.get("influence")),
            "prob": _num(n.get("token_prob")) if kind == "logit" else None, "target": bool(n.get("is_target_logit")),
            "token": _logit_token(n.get("clerp")) if kind == "logit" else None,
        })
    n_layers = 1 + max((n["layer"] for n in nodes if n["layer"] is not None), default=-1)
    logit_layers = [int(n0["layer"]) for n0 in graph_json["nodes"]
                    if _kind(str(n0["feature_type"])) == "logit" and str(n0["layer"]).lstrip("-").isdigit()]
    n_layers = max([n_layers] + [x - 1 for x in logit_layers])  # circuit-tracer puts logits at layer n_layers + 1
    for n in nodes:
        n["row"] = {"token": 0, "logit": n_layers + 1}.get(n["kind"], (n["layer"] or 0) + 1)
    links = []
    for j, link in enumerate(graph_json["links"]):
        try:
            s, t = _resolve(nodes, index[str(link["source"])], index[str(link["target"])])
        except KeyError as e:
            raise ValueError(f"graph_json link {j}: {e} is not the node_id of any node (links name their "
                             "source and target nodes)") from None
        w = _num(link["weight"])
        links.append([s, t, 0.0 if w is None else w])
    n_pos = 1 + max((n["pos"] for n in nodes), default=-1)
    tokens = [str(t) for t in (meta_in.get("prompt_tokens") or [])]
    if len(tokens) < n_pos:
        tokens += [""] * (n_pos - len(tokens))
    used = {f"{n['layer']}/{n['feature']}" for n in nodes if n["kind"] == "feature"}
    details = _check_details(feature_details, used) if feature_details is not None else None
    meta = {k: meta_in.get(k) for k in ("slug", "scan", "prompt", "node_threshold") if meta_in.get(k) is not None}
    return {
        "version": 1,
        "title": title or f"attribution graph: {meta.get('prompt') or meta.get('slug') or ''}".rstrip(": "),
        "meta": meta,
        "tokens": tokens,
        "n_layers": n_layers,
        "nodes": nodes,
        "links": links,
        "details": details,
        "dashboard": dashboard_site(dashboard),
    }


def _resolve(nodes: list[dict[str, Any]], sources: list[int], targets: list[int]) -> tuple[int, int]:
    """The (source, target) nodes a link names. circuit-tracer's ids can collide: error node (layer ``l``, position
    ``p``) is ``0_l_p``, like feature ``l`` of layer 0 at ``p``. A link between such ids goes to the pair that can
    carry an edge (the source in a lower row than its target, at the same or an earlier position), else the first."""
    for s in sources:
        for t in targets:
            if nodes[s]["row"] < nodes[t]["row"] and nodes[s]["pos"] <= nodes[t]["pos"]:
                return s, t
    return sources[0], targets[0]


def _check_details(details: Mapping[str, Any], used: set[str]) -> dict[str, Any]:
    """The entries of ``details`` for the features on the page, checked: ``label`` (text) and
    ``top_contexts`` (text, or ``{"tokens": [text], "index": int, "activation": float}``)."""
    if not isinstance(details, Mapping):
        raise ValueError("feature_details: expected a dict {'LAYER/FEATURE': {'label': ..., 'top_contexts': [...]}}")
    out: dict[str, Any] = {}
    for key, entry in details.items():
        if key not in used:
            continue
        if not isinstance(entry, Mapping):
            raise ValueError(f"feature_details[{key!r}]: expected a dict with 'label' and 'top_contexts'")
        contexts = []
        for c in entry.get("top_contexts") or []:
            if isinstance(c, str):
                contexts.append(c)
            elif isinstance(c, Mapping) and isinstance(c.get("tokens"), Sequence) and \
                    0 <= int(c.get("index", -1)) < len(c["tokens"]):
                contexts.append({"tokens": [str(t) for t in c["tokens"]], "index": int(c["index"]),
                                 "activation": _num(c.get("activation"))})
            else:
                raise ValueError(f"feature_details[{key!r}]: a context must be text or {{'tokens': [...], "
                                 f"'index': i, 'activation': a}} with 0 <= i < len(tokens), got {c!r:.200}")
        item = {"label": str(entry.get("label") or ""), "top_contexts": contexts}
        item.update({k: _num(entry[k]) for k in ("frequency", "mean", "max") if entry.get(k) is not None})
        out[key] = item
    return out


def feature_details_from_stats(graph: Mapping[str, Any] | Iterable[tuple[int, int]], stats: StatsLike, tokenizer: Any,
                               *, n_contexts: int = N_CONTEXTS) -> dict[str, Any]:
    """``{"LAYER/FEATURE": {"label", "top_contexts", "frequency", "mean", "max"}}`` for the features of ``graph``
    (a graph JSON dict, or ``(layer, feature)`` pairs) that ``stats`` covers
    (:class:`~sparse_clt_hf.feature_stats.FeatureStats`; its token ids decoded with ``tokenizer``): the label is
    the feature's top tokens (:func:`~sparse_clt_hf.view.feature_label`), a context a window of tokens around one
    of its max activations."""
    pairs = ([fl for n in graph.get("nodes", []) if (fl := feature_of(n)) is not None]
             if isinstance(graph, Mapping) else [(int(a), int(b)) for a, b in graph])
    wanted = sorted(set(pairs))
    out: dict[str, Any] = {}
    for layer, feature in wanted:
        if layer not in stats.layers or not 0 <= feature < stats.n_features[stats.layers.index(layer)]:
            continue
        contexts = []
        for c in list(stats.top_contexts(layer, feature))[:n_contexts]:
            ids = [int(i) for i in c.token_ids]
            lo, hi = max(0, int(c.index) - CONTEXT_BEFORE), min(len(ids), int(c.index) + CONTEXT_AFTER + 1)
            contexts.append({"tokens": [tokenizer.decode([i]) for i in ids[lo:hi]], "index": int(c.index) - lo,
                             "activation": float(c.activation)})
        out[f"{layer}/{feature}"] = {
            # a feature that never fired in the statistics' corpus has no top tokens, so no label
            "label": feature_label(stats, tokenizer, layer, feature) if stats.top_tokens(layer, feature, 1) else "",
            "top_contexts": contexts,
            "frequency": float(stats.frequency(layer)[feature]),
            "mean": float(stats.mean(layer)[feature]),
            "max": float(stats.max(layer)[feature]),
        }
    return out


def top_features(graph_json: Mapping[str, Any], n: int = 10) -> list[dict[str, Any]]:
    """The ``n`` most influential feature nodes of a pruned graph JSON, most influential first: ``layer``,
    ``feature``, ``position``, ``token``, ``activation``, ``influence``, ``label`` and ``to_logit`` (the direct
    effect on the top logit, None without a link). circuit-tracer's node ``influence`` is cumulative: the share
    of all influence on the logits held by the nodes at least as influential as this one, so smaller ranks
    higher."""
    nodes = graph_json.get("nodes", [])
    tokens = (graph_json.get("metadata") or {}).get("prompt_tokens") or []
    logits = sorted((x for x in nodes if _kind(str(x.get("feature_type"))) == "logit"),
                    key=lambda x: (not x.get("is_target_logit"), -float(x.get("token_prob") or 0)))
    top_logit = logits[0]["node_id"] if logits else None
    to_logit = {link["source"]: float(link["weight"]) for link in graph_json.get("links", [])
                if link["target"] == top_logit}
    feats = [x for x in nodes if feature_of(x) is not None]
    feats.sort(key=lambda x: float("inf") if x.get("influence") is None else float(x["influence"]))
    out = []
    for x in feats[:n]:
        layer, feature = feature_of(x)  # type: ignore[misc]
        pos = int(x["ctx_idx"])
        out.append({"layer": layer, "feature": feature, "position": pos,
                    "token": tokens[pos] if pos < len(tokens) else None, "activation": _num(x.get("activation")),
                    "influence": _num(x.get("influence")), "label": str(x.get("clerp") or ""),
                    "to_logit": to_logit.get(x["node_id"])})
    return out


def labels_from_details(details: Mapping[str, Any]) -> dict[tuple[int, int], str]:
    """``{(layer, feature): label}`` (what ``AttributionGraph.to_json(labels=...)`` writes into ``clerp``) from
    :func:`feature_details_from_stats`'s ``{"LAYER/FEATURE": {"label": ...}}``."""
    out: dict[tuple[int, int], str] = {}
    for key, entry in details.items():
        if entry.get("label"):
            layer, _, feature = key.partition("/")
            out[int(layer), int(feature)] = str(entry["label"])
    return out


def render_html(data: dict[str, Any]) -> str:
    """The page for :func:`page_data`'s output. The markers are filled in one pass, so a title or token that
    spells a marker stays text."""
    template = (resources.files(__package__) / TEMPLATE_FILE).read_text(encoding="utf-8")
    fill = {"__TITLE__": html.escape(data["title"]), "__DATA_ID__": DATA_ID, "__DATA__": embed_json(data)}
    return MARKERS.sub(lambda m: fill[m.group(0)], template)


def graph_html(graph_json: Mapping[str, Any], path: str | Path, *, feature_details: Mapping[str, Any] | None = None,
               title: str | None = None, dashboard: str | Path | None = None) -> Path:
    """Write the page of ``graph_json`` (a pruned graph's circuit-tracer JSON, as a dict) to ``path``.

    ``feature_details``: ``{"LAYER/FEATURE": {"label": str, "top_contexts": [...]}}`` shown for a clicked
    feature (:func:`feature_details_from_stats` builds it from statistics); ``title``: the page's heading
    (default: the prompt); ``dashboard``: the folder (relative to the page, or absolute) or URL of a
    ``sparse-clt-hf dashboard`` site: a selected feature's panel links to its page there."""
    path = Path(path)
    if not path.resolve().parent.is_dir():
        raise FileNotFoundError(f"{path}: the folder {path.resolve().parent} does not exist")
    path.write_text(render_html(page_data(graph_json, feature_details, title, dashboard)), encoding="utf-8")
    return path
