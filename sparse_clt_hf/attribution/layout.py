"""Where each node of an attribution graph sits in the adjacency's columns (circuit-tracer's node order).

Nodes, in order: active features ``[0, n_features)`` | error nodes, layer-major (layer ``l``, position ``p`` at
``error_start + l * n_positions + p``) | token embeddings (position ``p`` at ``token_start + p``) | logit targets
(``logit_start + i``). Error nodes exist for every model layer (a layer the transcoder does not cover has its
whole MLP output as error). This is the one place that knows the order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GraphLayout:
    """Sizes of the four node groups of one graph and the offsets derived from them."""

    n_features: int
    n_layers: int
    n_positions: int
    n_logits: int

    @property
    def error_start(self) -> int:
        return self.n_features

    @property
    def token_start(self) -> int:
        return self.n_features + self.n_layers * self.n_positions

    @property
    def logit_start(self) -> int:
        return self.token_start + self.n_positions

    @property
    def n_nodes(self) -> int:
        return self.logit_start + self.n_logits

    def error_node(self, layer: int, position: int) -> int:
        return self.error_start + layer * self.n_positions + position

    def token_node(self, position: int) -> int:
        return self.token_start + position

    def logit_node(self, i: int) -> int:
        return self.logit_start + i

    def kind_of(self, node: int) -> str:
        """``"feature"``, ``"error"``, ``"token"`` or ``"logit"``."""
        if not 0 <= node < self.n_nodes:
            raise IndexError(f"node {node} is outside the graph's {self.n_nodes} nodes")
        if node < self.error_start:
            return "feature"
        if node < self.token_start:
            return "error"
        return "token" if node < self.logit_start else "logit"

    def logit_weights(self, logit_probs: torch.Tensor) -> torch.Tensor:
        """[n_nodes] float32: the logits' probabilities at their nodes, zero elsewhere (pruning's seed)."""
        w = torch.zeros(self.n_nodes, dtype=torch.float32, device=logit_probs.device)
        w[self.logit_start :] = logit_probs.float()
        return w
