"""Influence, pruning and graph scores on the adjacency rectangle (pure tensor functions).

The adjacency is stored as ``rows`` [R, N] with ``row_nodes`` [R] (the node of each row); every other node has a
zero row. Each function here equals circuit-tracer's function of the same name applied to the dense [N, N] matrix
with those zero rows (``normalize_matrix``, ``compute_influence``, ``prune_graph``, ``compute_graph_scores``,
``compute_partial_influences``), without ever building it: memory grows with R x N, never with N^2.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .layout import GraphLayout


def normalize_rows(rows: torch.Tensor, floor: float = 1e-10) -> torch.Tensor:
    """``|rows|`` divided by each row's sum (at least ``floor``): circuit-tracer's ``normalize_matrix``."""
    out = rows.abs()
    out /= out.sum(dim=1, keepdim=True).clamp(min=floor)  # in place: one copy of the rectangle, not two
    return out


def influence(normalized: torch.Tensor, row_nodes: torch.Tensor, weights: torch.Tensor, max_iter: int = 1000) -> torch.Tensor:
    """``w A + w A^2 + ...`` ([N]) for the dense ``A`` whose rows ``row_nodes`` are ``normalized`` (others zero)."""
    current = weights[row_nodes] @ normalized
    total = current.clone()
    for _ in range(max_iter):
        if not current.any():
            return total
        current = current[row_nodes] @ normalized
        total += current
    raise RuntimeError(f"influence computation did not converge after {max_iter} iterations (is the graph cyclic?)")


def partial_influences(rows: torch.Tensor, row_nodes: torch.Tensor, logit_probs: torch.Tensor, max_iter: int = 128) -> torch.Tensor:
    """Influence of every column on the logits from the rows computed so far (circuit-tracer's
    ``compute_partial_influences``: the ranking used to choose the next features to attribute)."""
    normalized = normalize_rows(rows, floor=1e-8)
    prod = torch.zeros(rows.shape[1], dtype=rows.dtype, device=rows.device)
    prod[-len(logit_probs) :] = logit_probs.to(rows.dtype)
    total = torch.zeros_like(prod)
    for _ in range(max_iter):
        prod = prod[row_nodes] @ normalized
        if not prod.any():
            return total
        total += prod
    raise RuntimeError("partial influences did not converge")


def find_threshold(scores: torch.Tensor, threshold: float, n_total: int | None = None) -> torch.Tensor:
    """The score above which ``threshold`` of the total lies; ``scores`` may leave out ``n_total - len`` zeros."""
    sorted_scores = torch.sort(scores, descending=True).values
    cumulative = torch.cumsum(sorted_scores, dim=0) / torch.sum(sorted_scores)
    index = int(torch.searchsorted(cumulative, torch.tensor(threshold, dtype=cumulative.dtype)).item())
    n_total = len(sorted_scores) if n_total is None else n_total
    if index >= len(sorted_scores) and n_total > len(sorted_scores):
        return torch.zeros((), dtype=scores.dtype)  # the cut falls among the left-out zeros
    return sorted_scores[min(index, len(sorted_scores) - 1)]


class PruneResult(NamedTuple):
    node_mask: torch.Tensor  #: [N] bool, nodes kept
    edge_mask: torch.Tensor  #: [R, N] bool, edges kept (rows as in the adjacency)
    cumulative_scores: torch.Tensor  #: [N] each node's cumulative influence rank (circuit-tracer's node "influence")


def prune(
    rows: torch.Tensor,
    row_nodes: torch.Tensor,
    layout: GraphLayout,
    logit_probs: torch.Tensor,
    node_threshold: float = 0.8,
    edge_threshold: float = 0.98,
) -> PruneResult:
    """circuit-tracer's ``prune_graph`` on the rectangle: keep the nodes and edges that carry ``node_threshold`` /
    ``edge_threshold`` of the influence on the logits; tokens and logits are always kept."""
    for name, value in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be between 0.0 and 1.0, got {value}")
    rows = rows.float()
    n = layout.n_nodes
    if rows.shape[1] != n:
        raise ValueError(f"the adjacency has {rows.shape[1]} columns but the layout has {n} nodes")
    weights = layout.logit_weights(logit_probs).to(rows.device)
    keep_always = layout.token_start  # tokens and logits
    node_influence = influence(normalize_rows(rows), row_nodes, weights)
    node_mask = node_influence >= find_threshold(node_influence, node_threshold)
    node_mask[keep_always:] = True

    pruned = rows.clone()
    pruned[~node_mask[row_nodes]] = 0
    pruned[:, ~node_mask] = 0
    normalized = normalize_rows(pruned)
    pruned_influence = influence(normalized, row_nodes, weights) + weights
    edge_scores = normalized * pruned_influence[row_nodes][:, None]
    edge_mask = edge_scores >= find_threshold(edge_scores.flatten(), edge_threshold, n * n)

    is_feature_row = row_nodes < layout.n_features
    feature_rows = row_nodes[is_feature_row]

    def restrict() -> None:
        node_mask[:keep_always] &= edge_mask[:, :keep_always].any(0)  # feature / error nodes need outgoing edges
        has_in = torch.zeros(layout.n_features, dtype=torch.bool, device=rows.device)
        has_in[feature_rows] = edge_mask[is_feature_row].any(1)
        node_mask[: layout.n_features] &= has_in  # feature nodes need incoming edges

    old = node_mask.clone()
    restrict()
    while not torch.equal(node_mask, old):
        old.copy_(node_mask)
        edge_mask[~node_mask[row_nodes]] = False
        edge_mask[:, ~node_mask] = False
        restrict()

    sorted_scores, order = torch.sort(node_influence, descending=True)
    cumulative = torch.zeros_like(node_influence)
    cumulative[order] = torch.cumsum(sorted_scores, dim=0) / torch.sum(sorted_scores)
    return PruneResult(node_mask, edge_mask, cumulative)


def graph_scores(rows: torch.Tensor, row_nodes: torch.Tensor, layout: GraphLayout, logit_probs: torch.Tensor) -> tuple[float, float]:
    """(replacement score, completeness score): circuit-tracer's ``compute_graph_scores`` on the rectangle."""
    rows = rows.float()
    weights = layout.logit_weights(logit_probs).to(rows.device)
    normalized = normalize_rows(rows)
    node_influence = influence(normalized, row_nodes, weights)
    errors = slice(layout.error_start, layout.token_start)
    token_influence = node_influence[layout.token_start : layout.logit_start].sum()
    error_influence = node_influence[errors].sum()
    replacement = token_influence / (token_influence + error_influence)
    non_error = torch.ones(layout.n_nodes, dtype=rows.dtype, device=rows.device)
    non_error[row_nodes] = 1 - normalized[:, errors].sum(dim=-1)
    output_influence = node_influence + weights
    completeness = (non_error * output_influence).sum() / output_influence.sum()
    return float(replacement), float(completeness)
