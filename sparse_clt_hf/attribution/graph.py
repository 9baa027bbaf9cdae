"""The attribution graph: active features, error nodes, token embeddings and logit targets, and the direct
effects between them (a rectangle: rows for the attributed nodes only, never an N x N matrix).

Saved as one safetensors file (tensors) whose metadata holds the rest as JSON: no pickle.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from .layout import GraphLayout
from .prune import graph_scores, prune

_TENSORS = ("tokens", "features", "activations", "logit_ids", "logit_probs", "adjacency", "row_nodes")
_OPTIONAL_TENSORS = ("node_mask", "edge_mask", "cumulative_scores")


@dataclass
class AttributionGraph:
    """Why the model produced its next-token logits, as circuit-tracer defines it.

    ``adjacency[r, c]`` is the direct effect of source node ``c`` on target node ``row_nodes[r]`` in the local
    replacement model (for a feature target: on its pre-activation; for a logit target: on that logit minus the
    mean logit). Columns follow :class:`GraphLayout` (features | errors | tokens | logits). Rows exist only for
    the attributed nodes (the logits and the features); error and token nodes have none. With
    ``max_feature_nodes`` the features that were not attributed are left out of the graph, as circuit-tracer does
    (``meta["n_active_features"]`` counts them all).
    """

    tokens: torch.Tensor  #: [T] int64, the prompt exactly as attributed
    features: torch.Tensor  #: [n, 3] int64 (layer, position, feature id) of the attributed features, sorted
    activations: torch.Tensor  #: [n] float32, the features' activations
    logit_ids: torch.Tensor  #: [K] int64, the explained tokens
    logit_probs: torch.Tensor  #: [K] float32, their probabilities at the last position
    adjacency: torch.Tensor  #: [R, N] float32, row = target node, column = source node
    row_nodes: torch.Tensor  #: [R] int64, the node index (layout order) of each adjacency row, unique
    n_layers: int  #: the model's decoder layers (every layer has error-node slots)
    token_strings: list[str] | None = None  #: decoded prompt tokens, for display
    logit_strings: list[str] | None = None  #: decoded targets, for display
    meta: dict[str, Any] = field(default_factory=dict)  #: model, transcoder, settings, library versions
    node_mask: torch.Tensor | None = None  #: [N] bool, set on a pruned graph
    edge_mask: torch.Tensor | None = None  #: [R, N] bool, set on a pruned graph
    cumulative_scores: torch.Tensor | None = None  #: [N] set on a pruned graph: each node's cumulative influence

    @property
    def layout(self) -> GraphLayout:
        return GraphLayout(int(self.features.shape[0]), self.n_layers, int(self.tokens.shape[0]), int(self.logit_ids.shape[0]))

    def to_dense(self) -> torch.Tensor:
        """[N, N] with zero rows for nodes without a row (small graphs, comparisons with circuit-tracer)."""
        n = self.layout.n_nodes
        dense = torch.zeros(n, n, dtype=self.adjacency.dtype)
        dense[self.row_nodes] = self.adjacency
        return dense

    def prune(self, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> AttributionGraph:
        """A copy with ``node_mask`` / ``edge_mask`` / ``cumulative_scores`` set (circuit-tracer's influence-based
        pruning, computed on the rectangle)."""
        result = prune(self.adjacency, self.row_nodes, self.layout, self.logit_probs, node_threshold, edge_threshold)
        return replace(
            self,
            node_mask=result.node_mask,
            edge_mask=result.edge_mask,
            cumulative_scores=result.cumulative_scores,
            meta={**self.meta, "node_threshold": node_threshold, "edge_threshold": edge_threshold},
        )

    def scores(self) -> tuple[float, float]:
        """(replacement score, completeness score), as circuit-tracer computes them."""
        return graph_scores(self.adjacency, self.row_nodes, self.layout, self.logit_probs)

    def to_json(self, path: str | Path, *, slug: str | None = None, scan: str | None = None, **kwargs: Any) -> Path:
        """The graph JSON that circuit-tracer's frontend and Neuronpedia read (pruned nodes and links only)."""
        from .graph_json import write_graph_json

        return write_graph_json(self, path, slug=slug, scan=scan, **kwargs)

    def save(self, path: str | Path) -> Path:
        """safetensors (tensors) + JSON metadata in one file; no pickle."""
        from safetensors.torch import save_file

        path = Path(path)
        tensors = {name: getattr(self, name).contiguous().cpu() for name in _TENSORS}
        for name in _OPTIONAL_TENSORS:
            value = getattr(self, name)
            if value is not None:
                tensors[name] = value.contiguous().cpu()
        info = {
            "format": "sparse_clt_hf.attribution_graph",
            "version": 1,
            "n_layers": self.n_layers,
            "token_strings": self.token_strings,
            "logit_strings": self.logit_strings,
            "meta": self.meta,
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path), metadata={"graph": json.dumps(info)})
        return path

    @classmethod
    def load(cls, path: str | Path) -> AttributionGraph:
        """A graph written by :meth:`save` (checked: a clear error for another file)."""
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no attribution graph at {path}")
        try:
            with safe_open(str(path), framework="pt") as f:
                header = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except SafetensorError as exc:
            raise ValueError(f"{path} is not a safetensors file: {exc}") from None
        from ..io.structured import load_json_object

        try:
            info = load_json_object(header["graph"], f"{path} metadata", error=ValueError)
            if info.get("format") != "sparse_clt_hf.attribution_graph":
                raise KeyError("format")
            fields = {name: tensors[name] for name in _TENSORS}
            n_layers = int(info["n_layers"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{path} is not an attribution graph written by AttributionGraph.save ({exc})") from None
        optional = {name: tensors.get(name) for name in _OPTIONAL_TENSORS}
        graph = cls(
            **fields,
            n_layers=n_layers,
            token_strings=info.get("token_strings"),
            logit_strings=info.get("logit_strings"),
            meta=info.get("meta") or {},
            **optional,
        )
        if graph.adjacency.shape != (graph.row_nodes.shape[0], graph.layout.n_nodes):
            raise ValueError(
                f"{path}: adjacency has shape {tuple(graph.adjacency.shape)}, expected "
                f"[{graph.row_nodes.shape[0]}, {graph.layout.n_nodes}] for its nodes"
            )
        return graph
