"""Pruning, influence and scores on the adjacency rectangle equal the dense definitions (circuit-tracer's, written
out here on the [N, N] matrix with zero rows), on random graphs; and a graph's invariants (completeness of a logit
row, the rectangle's size with max_feature_nodes)."""

from __future__ import annotations

import pytest
import torch
from conftest import random_transcoder
from tiny_models import tiny_model

from sparse_clt_hf import attribute
from sparse_clt_hf.attribution import AttributionGraph
from sparse_clt_hf.attribution.layout import GraphLayout
from sparse_clt_hf.attribution.prune import partial_influences

# ---------------------------------------------------------------- dense textbook definitions


def dense_normalize(A):
    a = A.abs()
    return a / a.sum(1, keepdim=True).clamp(min=1e-10)


def dense_influence(A, w):
    """w (A + A^2 + ...) by the matrix series, stopped when the term is exactly zero (A is nilpotent)."""
    total = torch.zeros_like(w)
    term = w @ A
    while term.any():
        total = total + term
        term = term @ A
    return total


def dense_threshold(scores, t):
    s = torch.sort(scores, descending=True).values
    c = torch.cumsum(s, 0) / s.sum()
    return s[min(int(torch.searchsorted(c, t)), len(c) - 1)]


def dense_prune(A, lay: GraphLayout, probs, nt, et):
    w = lay.logit_weights(probs)
    infl = dense_influence(dense_normalize(A), w)
    node_mask = infl >= dense_threshold(infl, nt)
    node_mask[lay.token_start :] = True
    P = A.clone()
    P[~node_mask] = 0
    P[:, ~node_mask] = 0
    Pn = dense_normalize(P)
    scores = Pn * (dense_influence(Pn, w) + w)[:, None]
    edge_mask = scores >= dense_threshold(scores.flatten(), et)
    F = lay.n_features
    while True:
        old = node_mask.clone()
        node_mask[: lay.token_start] &= edge_mask[:, : lay.token_start].any(0)
        node_mask[:F] &= edge_mask[:F].any(1)
        if torch.equal(old, node_mask):
            break
        edge_mask[~node_mask] = False
        edge_mask[:, ~node_mask] = False
    s, order = torch.sort(infl, descending=True)
    cum = torch.zeros_like(infl)
    cum[order] = torch.cumsum(s, 0) / s.sum()
    return node_mask, edge_mask, cum


def dense_scores(A, lay, probs):
    w = lay.logit_weights(probs)
    An = dense_normalize(A)
    infl = dense_influence(An, w)
    tok = infl[lay.token_start : lay.logit_start].sum()
    err = infl[lay.error_start : lay.token_start].sum()
    non_err = 1 - An[:, lay.error_start : lay.token_start].sum(-1)
    out = infl + w
    return float(tok / (tok + err)), float((non_err * out).sum() / out.sum())


def random_graph(seed, n_feat=30, n_layers=3, T=5, K=3, drop=0.3):
    """A random graph with causal structure: feature rows (some missing), logit rows; sources only earlier nodes."""
    g = torch.Generator().manual_seed(seed)
    lay = GraphLayout(n_feat, n_layers, T, K)
    N = lay.n_nodes
    layer_of = torch.randint(0, n_layers, (n_feat,), generator=g).sort().values
    feats = torch.stack([layer_of, torch.randint(1, T, (n_feat,), generator=g), torch.arange(n_feat)], 1)
    has_row = torch.rand(n_feat, generator=g) > drop
    rows, nodes = [], []
    for i in range(n_feat):
        if not has_row[i]:
            continue
        r = torch.randn(N, generator=g) * (torch.rand(N, generator=g) < 0.5)
        r[:n_feat][layer_of >= layer_of[i]] = 0  # only earlier-layer features write into a feature
        r[lay.error_start + layer_of[i] * T : lay.token_start] = 0
        r[lay.logit_start :] = 0
        rows.append(r)
        nodes.append(i)
    for k in range(K):
        r = torch.randn(N, generator=g)
        r[lay.logit_start :] = 0
        rows.append(r)
        nodes.append(lay.logit_start + k)
    probs = torch.rand(K, generator=g)
    probs = probs / probs.sum() * 0.9
    graph = AttributionGraph(
        tokens=torch.arange(T),
        features=feats,
        activations=torch.rand(n_feat, generator=g),
        logit_ids=torch.arange(K),
        logit_probs=probs,
        adjacency=torch.stack(rows),
        row_nodes=torch.tensor(nodes),
        n_layers=n_layers,
    )
    return graph


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize(("nt", "et"), [(0.8, 0.98), (0.5, 0.9), (0.95, 0.7)])
def test_rectangle_prune_equals_dense_definition(seed, nt, et):
    graph = random_graph(seed, drop=0.3 if seed % 2 else 0.0)
    dense = graph.to_dense()
    assert dense.shape == (graph.layout.n_nodes,) * 2 and graph.adjacency.shape[0] < dense.shape[0]
    node_mask, edge_mask, cum = dense_prune(dense, graph.layout, graph.logit_probs, nt, et)
    pruned = graph.prune(nt, et)
    assert torch.equal(pruned.node_mask, node_mask)
    assert torch.equal(pruned.edge_mask, edge_mask[graph.row_nodes])
    assert not edge_mask[~torch.isin(torch.arange(len(dense)), graph.row_nodes)].any()
    torch.testing.assert_close(pruned.cumulative_scores, cum)


@pytest.mark.parametrize("seed", range(6))
def test_rectangle_scores_equal_dense_definition(seed):
    graph = random_graph(seed, drop=0.4)
    want = dense_scores(graph.to_dense(), graph.layout, graph.logit_probs)
    assert graph.scores() == pytest.approx(want, rel=1e-5)


def test_partial_influences_equal_dense_series():
    graph = random_graph(7, drop=0.5)
    dense = graph.to_dense()
    a = dense.abs()
    An = a / a.sum(1, keepdim=True).clamp(min=1e-8)
    want = dense_influence(An, graph.layout.logit_weights(graph.logit_probs))
    got = partial_influences(graph.adjacency, graph.row_nodes, graph.logit_probs)
    torch.testing.assert_close(got, want)


def test_prune_thresholds_out_of_range_are_refused():
    graph = random_graph(0)
    with pytest.raises(ValueError, match="node_threshold"):
        graph.prune(node_threshold=1.5)
    with pytest.raises(ValueError, match="edge_threshold"):
        graph.prune(edge_threshold=-0.1)


# ---------------------------------------------------------------- invariants of real graphs

PROMPT = torch.tensor([2, 17, 5, 99, 43, 8, 61, 23])


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_logit_row_sums_to_demeaned_logit(arch):
    """Completeness: a logit row's edges + the constant terms (decoder biases, position-0 MLP outputs, biases of
    the model) equal the demeaned logit. Constants are measured by running with every source zeroed."""
    model = tiny_model(arch)
    tc = random_transcoder(decoders=True, seed=1)
    graph = attribute(model, tc, PROMPT, max_n_logits=3, desired_logit_prob=1.0)
    with torch.no_grad():
        logits = model(PROMPT[None]).logits[0, -1].double()
    demeaned = logits - logits.mean()
    lay = graph.layout
    constant = _constant_term(model, tc, graph)
    for i in range(lay.n_logits):
        row = graph.adjacency[graph.row_nodes == lay.logit_node(i)][0].double()
        got = row.sum() + constant[i]
        assert float(got) == pytest.approx(float(demeaned[graph.logit_ids[i]]), rel=1e-4, abs=1e-4)


def _constant_term(model, tc, graph):
    """The demeaned logits' part that no node explains: the frozen model with every MLP output replaced by the
    decoder biases (and position 0's real output), zero token embeddings; the final norm's scale frozen."""
    from test_attribution import Replay

    rep = Replay(model.double(), tc.double())
    rep.install()
    rep.run(graph.tokens)
    rep.mode = "replay"
    T, d = len(graph.tokens), rep.embed.shape[-1]
    for t in range(rep.n_layers):
        const = torch.zeros(1, T, d, dtype=torch.float64)
        if str(t) in tc.encoders:
            const[:] = tc.encoder(t).b_dec.double()
        const[0, 0] = rep.mlp_out[t][0, 0]
        rep.delta_out[t] = const - rep.mlp_out[t]
    rep.delta_emb = -rep.embed[0]
    rep.run(graph.tokens)
    W_u = model.get_output_embeddings().weight.double()
    u = W_u[graph.logit_ids] - W_u.mean(0, keepdim=True)
    out = (rep.final[0, -1] @ u.T).detach()
    for h in rep.handles:
        h.remove()
    model.float()
    tc.float()
    return out


def test_max_feature_nodes_limits_rows_never_n_by_n():
    model = tiny_model("llama")
    tc = random_transcoder(decoders=True, seed=2)
    full = attribute(model, tc, PROMPT, batch_size=8)
    n_active = full.meta["n_active_features"]
    assert n_active > 40
    small = attribute(model, tc, PROMPT, max_feature_nodes=20, batch_size=8)
    lay = small.layout
    assert small.features.shape[0] == 20 and lay.n_features == 20
    assert small.adjacency.shape == (20 + lay.n_logits, lay.n_nodes)
    assert small.adjacency.shape[0] < lay.n_nodes
    # the chosen features are a subset of the active ones, and their rows equal the full graph's rows
    full_index = {tuple(f): i for i, f in enumerate(full.features.tolist())}
    picks = [full_index[tuple(f)] for f in small.features.tolist()]
    cols = torch.cat([torch.tensor(picks), torch.arange(full.layout.error_start, full.layout.n_nodes)])
    full_rows = {int(n): r for n, r in zip(full.row_nodes, full.adjacency)}
    for r, node in zip(small.adjacency, small.row_nodes.tolist()):
        src = picks[node] if node < lay.n_features else full.layout.logit_node(node - lay.logit_start)
        torch.testing.assert_close(r, full_rows[src][cols])
    # greedy order: the first features chosen are the most influential on the logits from the logit rows alone
    infl = partial_influences(full.adjacency[full.row_nodes >= full.layout.logit_start],
                              full.row_nodes[full.row_nodes >= full.layout.logit_start], full.logit_probs)
    top = set(torch.argsort(infl[:n_active], descending=True)[:8].tolist())
    assert top <= set(picks)


def test_no_active_feature_gives_a_graph_of_errors_and_tokens():
    model = tiny_model("llama")
    tc = random_transcoder(decoders=True, seed=1)
    for layer in tc.layers:
        tc.encoder(layer).b_enc.data[:] = -1e3
    graph = attribute(model, tc, PROMPT, max_feature_nodes=5)
    assert graph.features.shape == (0, 3) and graph.adjacency.shape == (graph.layout.n_logits, graph.layout.n_nodes)
    replacement, completeness = graph.scores()
    assert 0.0 < replacement < 1.0 and 0.0 < completeness < 1.0  # tokens reach the logits directly and via errors
    pruned = graph.prune()
    assert pruned.node_mask[graph.layout.token_start :].all()
