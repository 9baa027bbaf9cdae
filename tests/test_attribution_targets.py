"""Custom attribution targets (circuit-tracer's CustomTarget): directions instead of token logits, against the
float64 replay of the frozen model (tests/test_attribution.py) and by linearity against token targets; bad
targets refused before any forward pass. Also the leading positions without features (zero_positions; Gemma 3
instruction-tuned models: circuit-tracer's 4-token chat prefix)."""

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


def test_zero_positions_equal_the_frozen_model_replay():
    """zero_positions=3: no features and no error at positions 0-2, the rest as the replay computes it."""
    model = tiny_model("llama")
    kw = dict(activation="relu", decoders=True, seed=3)
    tc = random_transcoder(**kw)
    graph = attribute(model, tc, PROMPT, batch_size=32, zero_positions=3)
    assert graph.features[:, 1].min() >= 3 and graph.meta["zero_positions"] == 3
    ref, acts = reference_rows(tiny_model("llama").double(), random_transcoder(**kw).double(), PROMPT, graph, zero=3)
    want = [[layer, p, f] for layer in tc.layers for p, f in torch.nonzero(acts[layer]).tolist()]
    assert graph.features.tolist() == want
    got = graph.adjacency[:, : graph.layout.logit_start].double()
    assert (got - ref).abs().max() <= 2e-4 * ref.abs().max()
    for layer in range(graph.layout.n_layers):
        for pos in range(3):
            assert not graph.adjacency[:, graph.layout.error_node(layer, pos)].any()
    with pytest.raises(ValueError, match=r"zero_positions must be an integer in \[0, 8\)"):
        attribute(model, tc, PROMPT, zero_positions=8)


def _gemma3_it():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(vocab_size=2400, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=4,
                           max_position_embeddings=64)
    model = Gemma3ForCausalLM(cfg).eval()
    model.config._name_or_path = "google/gemma-3-1b-it"
    return model


def test_gemma3_it_prompts_skip_the_chat_prefix_as_circuit_tracer_does(monkeypatch):
    model = _gemma3_it()
    tc = random_transcoder(decoders=True, seed=3, layers=(0, 1, 2))
    tc.config.model_name = None
    prefix = [2, 105, 2364, 107]
    graph = attribute(model, tc, prefix + [17, 5, 99, 43], batch_size=32)
    assert graph.meta["zero_positions"] == 4 and len(graph.features) and graph.features[:, 1].min() >= 4
    ones = attribute(model, tc, prefix + [17, 5, 99, 43], batch_size=32, zero_positions=1)
    assert ones.features[:, 1].min() < 4  # the prefix's own features, when asked for
    monkeypatch.setattr(model, "forward", lambda *a, **k: pytest.fail("forward ran"))
    with pytest.raises(ValueError, match="must start with its chat prefix"):
        attribute(model, tc, [2, 17, 5, 99, 43], batch_size=32)
