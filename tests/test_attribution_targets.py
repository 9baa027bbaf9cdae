"""Custom attribution targets (circuit-tracer's CustomTarget): directions instead of token logits, against the
float64 replay of the frozen model (tests/test_attribution.py) and by linearity against token targets; bad
targets refused before any forward pass."""

from __future__ import annotations

import pytest
import torch
from conftest import random_transcoder
from test_attribution import PROMPT, reference_rows
from tiny_models import tiny_model

from sparse_clt_hf import AttributionGraph, CustomTarget, attribute, logit_difference
from sparse_clt_hf.attribution.graph_json import graph_to_json_dict


@pytest.mark.parametrize("arch,activation,span", [("llama", "relu", None), ("gemma2", "jumprelu", 1)])
def test_custom_directions_equal_the_frozen_model_replay(arch, activation, span, tmp_path):
    model = tiny_model(arch)
    kw = dict(activation=activation, span=span, decoders=True, seed=3)
    tc = random_transcoder(**kw)
    d = model.config.hidden_size
    g = torch.Generator().manual_seed(7)
    targets = [CustomTarget("a direction", 0.7, torch.randn(d, generator=g)), ("another", 0.3, torch.randn(d, generator=g))]
    graph = attribute(model, tc, PROMPT, targets=targets, batch_size=32)
    vocab = model.config.vocab_size
    assert graph.logit_ids.tolist() == [vocab, vocab + 1]  # circuit-tracer's virtual ids
    assert graph.logit_strings == ["a direction", "another"]
    torch.testing.assert_close(graph.logit_probs, torch.tensor([0.7, 0.3]))
    vecs = torch.stack([targets[0].vec, targets[1][2]])
    ref, _ = reference_rows(tiny_model(arch).double(), random_transcoder(**kw).double(), PROMPT, graph, vecs)
    got = graph.adjacency[:, : graph.layout.logit_start].double()
    scale = ref.abs().max()
    assert (got - ref).abs().max() <= 2e-4 * scale, float((got - ref).abs().max() / scale)
    # graph JSON: circuit-tracer's logit node id with the virtual id, the label in the clerp
    logit_nodes = [n for n in graph_to_json_dict(graph, slug="t", scan="s")["nodes"] if n["feature_type"] == "logit"]
    assert [n["node_id"].split("_")[1:] for n in logit_nodes] == [[str(vocab), str(len(PROMPT) - 1)],
                                                                  [str(vocab + 1), str(len(PROMPT) - 1)]]
    assert logit_nodes[0]["clerp"] == 'Output "a direction" (p=0.700)'
    back = AttributionGraph.load(graph.save(tmp_path / "g"))
    assert back.logit_ids.tolist() == [vocab, vocab + 1] and back.logit_strings == graph.logit_strings
    assert torch.equal(back.logit_probs, graph.logit_probs) and back.meta["custom_targets"] is True


def test_logit_difference_is_the_difference_of_token_rows():
    """A logit-difference target's row equals the difference of the two token targets' rows (the mean
    unembedding row cancels), with every feature attributed in both graphs."""
    model = tiny_model("llama")
    tc = random_transcoder(decoders=True, seed=3)
    a, b = 17, 99
    tokens = attribute(model, tc, PROMPT, targets=[a, b], batch_size=32)
    diff = attribute(model, tc, PROMPT, targets=[logit_difference(model, a, b)], batch_size=32)
    assert torch.equal(tokens.features, diff.features)
    cut = tokens.layout.logit_start
    row = {int(n): i for i, n in enumerate(tokens.row_nodes)}
    want = tokens.adjacency[row[cut], :cut] - tokens.adjacency[row[cut + 1], :cut]
    (got,) = [diff.adjacency[i, :cut] for i, n in enumerate(diff.row_nodes) if int(n) == diff.layout.logit_start]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))
    assert diff.logit_strings == ["17 - 99"] and float(diff.logit_probs[0]) == 1.0


@pytest.mark.parametrize("targets,match", [
    ([CustomTarget("x", 1.0, torch.zeros(5))], r"vec has shape \[5\]; expected \[32\]"),
    ([CustomTarget("x", 1.0, torch.zeros(32)), 17], "mixes CustomTarget directions with tokens"),
    ([CustomTarget("x", float("nan"), torch.zeros(32))], "prob must be a finite number"),
    ([CustomTarget("x", -1.0, torch.zeros(32))], "prob must be a finite number >= 0"),
    ([CustomTarget(3, 1.0, torch.zeros(32))], "token_str must be a str"),
    ([CustomTarget("x", 1.0, torch.full((32,), float("inf")))], "vec must be finite"),
    ([CustomTarget("x", 0.0, torch.zeros(32))], "probs are all 0"),
])
def test_bad_custom_targets_are_refused_before_any_forward(targets, match, monkeypatch):
    model = tiny_model("llama")
    tc = random_transcoder(decoders=True, seed=3)
    monkeypatch.setattr(model, "forward", lambda *a, **k: pytest.fail("forward ran"))
    with pytest.raises(ValueError, match=match):
        attribute(model, tc, PROMPT, targets=targets)
