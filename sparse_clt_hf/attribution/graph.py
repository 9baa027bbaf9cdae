"""The attribution graph: active features, error nodes, token embeddings and logit targets, and the direct
effects between them (a rectangle: rows for the attributed nodes only, never an N x N matrix).

INTERFACE SKELETON (lead): fields are fixed; method bodies are filled in by the engine work.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .layout import GraphLayout


@dataclass
class AttributionGraph:
    """Why the model produced its next-token logits, as circuit-tracer defines it.

    ``adjacency[r, c]`` is the direct effect of source node ``c`` on target node ``row_nodes[r]`` in the local
    replacement model (for a feature target: on its pre-activation; for a logit target: on that logit minus the
    mean logit). Columns follow :class:`GraphLayout` (features | errors | tokens | logits). Rows exist only for
    the attributed nodes (the logits and the features chosen by influence); a node without a row has no
    incoming edges recorded.
    """

    tokens: torch.Tensor  #: [T] int64, the prompt exactly as attributed
    features: torch.Tensor  #: [n, 3] int64 (layer, position, feature id), sorted by (layer, position, feature)
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

    @property
    def layout(self) -> GraphLayout:
        return GraphLayout(int(self.features.shape[0]), self.n_layers, int(self.tokens.shape[0]), int(self.logit_ids.shape[0]))

    def to_dense(self) -> torch.Tensor:
        """[N, N] with zero rows for nodes without a row (small graphs, comparisons with circuit-tracer)."""
        raise NotImplementedError

    def prune(self, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> AttributionGraph:
        """A copy with ``node_mask`` / ``edge_mask`` set (circuit-tracer's influence-based pruning)."""
        raise NotImplementedError

    def scores(self) -> tuple[float, float]:
        """(replacement score, completeness score), as circuit-tracer computes them."""
        raise NotImplementedError

    def to_json(self, path: str | Path, *, slug: str | None = None, scan: str | None = None, **kwargs: Any) -> Path:
        """The graph JSON that circuit-tracer's frontend and Neuronpedia read (pruned nodes and links only)."""
        raise NotImplementedError

    def save(self, path: str | Path) -> Path:
        """safetensors (tensors) + JSON metadata in one file; no pickle."""
        raise NotImplementedError

    @classmethod
    def load(cls, path: str | Path) -> AttributionGraph:
        raise NotImplementedError
