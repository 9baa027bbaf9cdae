"""The graph JSON that circuit-tracer's frontend and Neuronpedia read, written from a pruned graph.

The schema is circuit-tracer 0.5.0's (``circuit_tracer/frontend/graph_models.py`` and
``utils/create_graph_files.py``), field for field and id for id, so a graph made here opens in its local
server and uploads to Neuronpedia like one made there:

- ``metadata``: slug, scan, transcoder_list, prompt_tokens, prompt, node_threshold, schema_version (1);
- ``qParams``: pinnedIds, supernodes, linkType ("both"), clickedId, sg_pos;
- ``nodes`` (kept nodes with a kept edge, plus every token and logit, in node order): node_id, feature, layer,
  ctx_idx, feature_type, token_prob, is_target_logit, run_idx, reverse_ctx_idx, jsNodeId, clerp, influence
  (the node's cumulative influence rank from pruning; null for logits), activation (features only);
- ``links`` (kept edges between kept nodes, ordered by target node then source node): source, target, weight.

Ids: feature ``{layer}_{feature}_{pos}``; error ``0_{layer}_{pos}``; token ``E_{token id}_{pos}``; logit
``{n_layers + 1}_{token id}_{last pos}``. circuit-tracer labels every feature ``"cross layer transcoder"``, PLT
features included; ``feature`` of a feature node is the Cantor pairing of (layer, feature id).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .graph import AttributionGraph

SCHEMA_VERSION = 1
FEATURE_TYPES = {
    "feature": "cross layer transcoder",
    "error": "mlp reconstruction error",
    "token": "embedding",
    "logit": "logit",
}
ALWAYS_SHOWN = ("embedding", "logit")  # node types kept even without a kept edge


def cantor_pairing(x: int, y: int) -> int:
    """One integer for a (layer, feature) pair, as circuit-tracer and Neuronpedia number features."""
    return (x + y) * (x + y + 1) // 2 + y


def _node(node_id: str, feature: int, layer: str, ctx_idx: int, kind: str, js_node_id: str, **extra: Any) -> dict:
    """A node with every field of circuit-tracer's ``Node`` model, in its order and with its defaults."""
    return {
        "node_id": node_id,
        "feature": feature,
        "layer": layer,
        "ctx_idx": ctx_idx,
        "feature_type": FEATURE_TYPES[kind],
        "token_prob": extra.get("token_prob", 0.0),
        "is_target_logit": extra.get("is_target_logit", False),
        "run_idx": 0,
        "reverse_ctx_idx": 0,
        "jsNodeId": js_node_id,
        "clerp": extra.get("clerp", ""),
        "influence": extra.get("influence"),
        "activation": extra.get("activation"),
    }


def _scan_name(scan: str | list[str]) -> tuple[str, list[str]]:
    """circuit-tracer names a list of transcoders ``custom-<hash>`` (its hash is Python's, salted per process;
    ours is a stable SHA-256 prefix, so the same list always gives the same name)."""
    if isinstance(scan, str):
        return scan, []
    joined = "-".join(scan)
    return "custom-" + str(int(hashlib.sha256(joined.encode()).hexdigest()[:15], 16)), list(scan)


def _prompt_tokens(graph: AttributionGraph) -> list[str]:
    if graph.token_strings is not None:
        if len(graph.token_strings) != len(graph.tokens):
            raise ValueError(
                f"graph.token_strings has {len(graph.token_strings)} entries for {len(graph.tokens)} tokens"
            )
        return [str(s) for s in graph.token_strings]
    return [str(int(t)) for t in graph.tokens]


def _logit_strings(graph: AttributionGraph) -> list[str]:
    n = len(graph.logit_ids)
    if graph.logit_strings is not None:
        if len(graph.logit_strings) != n:
            raise ValueError(f"graph.logit_strings has {len(graph.logit_strings)} entries for {n} logit targets")
        return [str(s) for s in graph.logit_strings]
    return [str(int(t)) for t in graph.logit_ids]


def _node_influence(graph: AttributionGraph, node_threshold: float, edge_threshold: float) -> torch.Tensor:
    """[N] each node's cumulative influence rank (what circuit-tracer's JSON calls ``influence``): the one pruning
    recorded on the graph, else computed by pruning's influence."""
    recorded = getattr(graph, "cumulative_scores", None)
    if recorded is not None:
        return recorded
    from .prune import prune

    result = prune(graph.adjacency, graph.row_nodes, graph.layout, graph.logit_probs, node_threshold, edge_threshold)
    return result.cumulative_scores


def _nodes(
    graph: AttributionGraph, node_mask: torch.Tensor, influence: torch.Tensor, labels: Mapping[tuple[int, int], str]
) -> dict[int, dict]:
    """Every kept node, keyed by its node index."""
    lay = graph.layout
    n_pos = lay.n_positions
    features, activations = graph.features.tolist(), graph.activations.float().tolist()
    tokens, logit_ids = graph.tokens.tolist(), graph.logit_ids.tolist()
    logit_probs, logit_strings = graph.logit_probs.float().tolist(), _logit_strings(graph)
    infl = influence.float().tolist()
    logit_layer = str(graph.n_layers + 1)
    nodes: dict[int, dict] = {}
    for i in torch.nonzero(node_mask).flatten().tolist():
        kind = lay.kind_of(i)
        if kind == "feature":
            layer, pos, feat = features[i]
            nodes[i] = _node(
                f"{layer}_{feat}_{pos}", cantor_pairing(layer, feat), str(layer), pos, kind, f"{layer}_{feat}-0",
                influence=infl[i], activation=activations[i], clerp=labels.get((layer, feat), ""),
            )
        elif kind == "error":
            layer, pos = divmod(i - lay.error_start, n_pos)
            nodes[i] = _node(f"0_{layer}_{pos}", -1, str(layer), pos, kind, f"{layer}_{pos}-0", influence=infl[i])
        elif kind == "token":
            pos = i - lay.token_start
            tok = tokens[pos]
            nodes[i] = _node(f"E_{tok}_{pos}", pos, "E", pos, kind, f"E_{tok}-{pos}", influence=infl[i])
        else:
            k = i - lay.logit_start
            vocab_idx, prob, pos = logit_ids[k], logit_probs[k], n_pos - 1
            nodes[i] = _node(
                f"{logit_layer}_{vocab_idx}_{pos}", vocab_idx, logit_layer, pos, kind, f"L_{vocab_idx}-{pos}",
                token_prob=prob, is_target_logit=k == 0, clerp=f'Output "{logit_strings[k]}" (p={prob:.3f})',
            )
    return nodes


def _links(graph: AttributionGraph, nodes: dict[int, dict], edge_mask: torch.Tensor) -> list[dict]:
    """Kept edges between kept nodes, ordered by (target node, source node) as circuit-tracer lists them."""
    r, c = torch.nonzero(edge_mask, as_tuple=True)
    target = graph.row_nodes.long()[r]
    order = torch.argsort(target * graph.layout.n_nodes + c)
    r, c, target = r[order], c[order], target[order]
    weights = graph.adjacency[r, c].float().tolist()
    links = []
    for dst, src, w in zip(target.tolist(), c.tolist(), weights):
        if src in nodes and dst in nodes:
            if not math.isfinite(w):
                raise ValueError(f"edge {nodes[src]['node_id']} -> {nodes[dst]['node_id']} has weight {w}")
            links.append({"source": nodes[src]["node_id"], "target": nodes[dst]["node_id"], "weight": w})
    return links


def graph_to_json_dict(
    graph: AttributionGraph,
    *,
    slug: str | None = None,
    scan: str | list[str] | None = None,
    node_threshold: float = 0.8,
    edge_threshold: float = 0.98,
    labels: Mapping[tuple[int, int], str] | None = None,
    influence: torch.Tensor | None = None,
) -> dict:
    """circuit-tracer's graph JSON (as a dict) for the pruned ``graph``.

    ``graph`` is pruned with ``graph.prune(node_threshold, edge_threshold)`` unless it already carries
    ``node_mask`` / ``edge_mask``. ``scan`` names the transcoders (Neuronpedia needs it to find the features):
    default ``graph.meta["scan"]``, then ``graph.meta["transcoder"]``. ``labels`` maps (layer, feature id) to a
    feature's label, written into ``clerp``. ``influence`` ([N]) is each node's cumulative influence rank;
    by default the graph's ``cumulative_scores`` (set by ``prune``), else computed by pruning's influence.
    """
    if graph.node_mask is None or graph.edge_mask is None:
        graph = graph.prune(node_threshold, edge_threshold)
    assert graph.node_mask is not None and graph.edge_mask is not None
    n = graph.layout.n_nodes
    if tuple(graph.node_mask.shape) != (n,) or tuple(graph.edge_mask.shape) != tuple(graph.adjacency.shape):
        raise ValueError(
            f"node_mask {tuple(graph.node_mask.shape)} / edge_mask {tuple(graph.edge_mask.shape)} do not fit a graph "
            f"of {n} nodes with adjacency {tuple(graph.adjacency.shape)}"
        )
    scan = scan if scan is not None else graph.meta.get("scan", graph.meta.get("transcoder"))
    if scan is None:
        raise ValueError("pass scan=... (the transcoders' name): the graph's meta records none")
    scan_name, transcoder_list = _scan_name(scan)
    if influence is None:
        influence = _node_influence(graph, node_threshold, edge_threshold)
    if tuple(influence.shape) != (n,):
        raise ValueError(f"influence has shape {tuple(influence.shape)}; expected ({n},), one value per node")

    nodes = _nodes(graph, graph.node_mask.bool(), influence, labels or {})
    links = _links(graph, nodes, graph.edge_mask.bool())
    linked = {x for link in links for x in (link["source"], link["target"])}
    used = [node for node in nodes.values() if node["node_id"] in linked or node["feature_type"] in ALWAYS_SHOWN]
    prompt_tokens = _prompt_tokens(graph)
    prompt = graph.meta.get("prompt")
    return {
        "metadata": {
            "slug": slug or str(graph.meta.get("slug", "attribution-graph")),
            "scan": scan_name,
            "transcoder_list": transcoder_list,
            "prompt_tokens": prompt_tokens,
            "prompt": prompt if isinstance(prompt, str) else "".join(prompt_tokens),
            "node_threshold": node_threshold,
            "schema_version": SCHEMA_VERSION,
        },
        "qParams": {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""},
        "nodes": used,
        "links": links,
    }


def write_graph_json(
    graph: AttributionGraph,
    path: str | Path,
    *,
    slug: str | None = None,
    scan: str | list[str] | None = None,
    node_threshold: float = 0.8,
    edge_threshold: float = 0.98,
    labels: Mapping[tuple[int, int], str] | None = None,
    influence: torch.Tensor | None = None,
    update_index: bool = False,
) -> Path:
    """Write :func:`graph_to_json_dict` to ``path`` (UTF-8 JSON, non-ASCII escaped, so any token text stays
    valid). ``update_index``: also add the graph's metadata to ``graph-metadata.json`` next to it, the index
    circuit-tracer's local server lists graphs from."""
    path = Path(path)
    if path.suffix != ".json":
        raise ValueError(f"graph JSON path {str(path)!r} should end in .json")
    data = graph_to_json_dict(
        graph, slug=slug or path.stem, scan=scan, node_threshold=node_threshold, edge_threshold=edge_threshold,
        labels=labels, influence=influence,
    )
    text = json.dumps(data, ensure_ascii=True, allow_nan=False, separators=(",", ":"))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    if update_index:
        index_path = path.parent / "graph-metadata.json"
        from ..io.structured import load_json_object

        index = load_json_object(index_path.read_bytes(), str(index_path)) if index_path.exists() else {"graphs": []}
        slug_ = data["metadata"]["slug"]
        index["graphs"] = [g for g in index.get("graphs", []) if g.get("slug") != slug_] + [data["metadata"]]
        index_path.write_text(json.dumps(index, ensure_ascii=True, indent=2), encoding="utf-8")
    return path
