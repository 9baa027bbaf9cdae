"""The graph JSON writer against circuit-tracer's own JSON (fixtures written by its create_graph_files) and
against a hand-built graph whose ids, fields and links are spelled out here (no engine needed)."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from circuit_tracer_fixtures import CASES, RUNS, Reference, load_reference

from sparse_clt_hf.attribution.graph import AttributionGraph
from sparse_clt_hf.attribution.graph_json import cantor_pairing, graph_to_json_dict, write_graph_json

NODE_FIELDS = [  # circuit-tracer's Node model, in its order
    "node_id", "feature", "layer", "ctx_idx", "feature_type", "token_prob", "is_target_logit", "run_idx",
    "reverse_ctx_idx", "jsNodeId", "clerp", "influence", "activation",
]


def graph_from_reference(ref: Reference) -> AttributionGraph:
    """circuit-tracer's graph as an AttributionGraph (its selected features; rows for features and logits)."""
    n_sel, k = len(ref.selected), len(ref.logit_ids)
    n = ref.adjacency.shape[0]
    row_nodes = torch.cat([torch.arange(n_sel), torch.arange(n - k, n)])
    return AttributionGraph(
        tokens=ref.tokens, features=ref.active_features[ref.selected], activations=ref.activations[ref.selected],
        logit_ids=ref.logit_ids, logit_probs=ref.logit_probs, adjacency=ref.adjacency[row_nodes], row_nodes=row_nodes,
        n_layers=ref.n_layers, token_strings=ref.meta["prompt_tokens"], logit_strings=ref.run["logit_strings"],
        meta={"prompt": ref.graph_json["metadata"]["prompt"], "scan": ref.meta["scan"]},
        node_mask=ref.node_mask, edge_mask=ref.edge_mask[row_nodes],
    )


@pytest.mark.parametrize("run", RUNS)
@pytest.mark.parametrize("case", CASES)
def test_same_json_as_circuit_tracer(case: str, run: str) -> None:
    """Given circuit-tracer's graph, masks and influence, the JSON equals its create_graph_files output exactly."""
    ref = load_reference(case, run)
    got = graph_to_json_dict(graph_from_reference(ref), slug=case, influence=ref.cumulative_scores)
    want = ref.graph_json
    assert got["metadata"] == want["metadata"]
    assert got["qParams"] == want["qParams"]
    assert [list(node) for node in got["nodes"]] == [NODE_FIELDS] * len(got["nodes"])
    assert [nd["node_id"] for nd in got["nodes"]] == [nd["node_id"] for nd in want["nodes"]]
    assert got["nodes"] == want["nodes"]
    assert got["links"] == want["links"]
    assert got == want


def test_default_influence_is_circuit_tracers() -> None:
    """Without ``influence``, pruning's cumulative influence is used: equal to circuit-tracer's (1e-5)."""
    pytest.importorskip("sparse_clt_hf.attribution.prune")
    ref = load_reference(CASES[0])
    got = graph_to_json_dict(graph_from_reference(ref), slug=CASES[0])
    want = {nd["node_id"]: nd["influence"] for nd in ref.graph_json["nodes"]}
    assert [nd["node_id"] for nd in got["nodes"]] == list(want)
    for node in got["nodes"]:
        if want[node["node_id"]] is None:
            assert node["influence"] is None
        else:
            assert node["influence"] == pytest.approx(want[node["node_id"]], rel=1e-5, abs=1e-7)


def test_influence_recorded_by_pruning_is_used() -> None:
    if "cumulative_scores" not in {f.name for f in dataclasses.fields(AttributionGraph)}:
        pytest.skip("AttributionGraph does not record cumulative_scores yet")
    graph = hand_graph()
    graph.cumulative_scores = INFLUENCE.flip(0)
    data = graph_to_json_dict(graph)
    assert data["nodes"][0]["influence"] == pytest.approx(INFLUENCE.flip(0)[0].item())


HOSTILE_TOKENS = ["<bos>", "</script><script>alert(1)</script>", 'q"b\\c\n\t\u2028\x00é', "\ud800lone"]


def hand_graph() -> AttributionGraph:
    """2 layers, 4 positions, 2 features, 1 logit; N = 2 + 8 + 4 + 1 = 15 nodes.

    Nodes: features 0 = (layer 0, pos 1, feat 5), 1 = (layer 1, pos 3, feat 7); errors 2..9 (layer l, pos p at
    2 + 4 l + p); tokens 10..13; logit 14. Rows are stored out of node order (1, 14, 0) on purpose.
    """
    n = 15
    rows = torch.zeros(3, n)
    rows[2, 11], rows[2, 10] = 0.5, 0.1  # feature 0 <- token pos 1, token pos 0
    rows[0, 0], rows[0, 3], rows[0, 13] = 0.7, -0.2, 0.3  # feature 1 <- feature 0, error (0, 1), token pos 3
    rows[1, 1], rows[1, 0], rows[1, 8], rows[1, 13] = 1.25, -0.375, 0.0625, 0.875  # logit <- ...
    node_mask = torch.zeros(n, dtype=torch.bool)
    node_mask[[0, 1, 3, 10, 11, 12, 13, 14]] = True  # error (1, 2) = node 8 pruned
    edge_mask = rows != 0
    edge_mask[2, 10] = False  # token pos 0 -> feature 0 pruned (the token node stays: tokens always show)
    return AttributionGraph(
        tokens=torch.tensor([2, 40, 41, 42]), features=torch.tensor([[0, 1, 5], [1, 3, 7]]),
        activations=torch.tensor([1.5, 2.0]), logit_ids=torch.tensor([9]), logit_probs=torch.tensor([0.8]),
        adjacency=rows, row_nodes=torch.tensor([1, 14, 0]), n_layers=2, token_strings=list(HOSTILE_TOKENS),
        logit_strings=['"</script>'], meta={"transcoder": "org/clt"}, node_mask=node_mask, edge_mask=edge_mask,
    )


INFLUENCE = torch.linspace(0.05, 0.95, 15)


def test_hand_built_graph_ids_fields_and_links(tmp_path) -> None:
    graph = hand_graph()
    path = write_graph_json(graph, tmp_path / "my-graph.json", influence=INFLUENCE, labels={(1, 7): "says <b>&</b>"})
    raw = path.read_bytes()
    assert raw.isascii()  # every odd character escaped: valid JSON whatever the tokens hold
    data = json.loads(raw)
    meta = data["metadata"]
    assert meta == {
        "slug": "my-graph", "scan": "org/clt", "transcoder_list": [], "prompt_tokens": HOSTILE_TOKENS,
        "prompt": "".join(HOSTILE_TOKENS), "node_threshold": 0.8, "schema_version": 1,
    }
    assert data["qParams"] == {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""}
    nodes = {nd["node_id"]: nd for nd in data["nodes"]}
    assert list(nodes) == ["0_5_1", "1_7_3", "0_0_1", "E_2_0", "E_40_1", "E_41_2", "E_42_3", "3_9_3"]
    assert all(list(nd) == NODE_FIELDS for nd in data["nodes"])
    f0, f1, err, tok, logit = nodes["0_5_1"], nodes["1_7_3"], nodes["0_0_1"], nodes["E_40_1"], nodes["3_9_3"]
    assert (f0["feature"], f0["layer"], f0["ctx_idx"], f0["jsNodeId"]) == (cantor_pairing(0, 5), "0", 1, "0_5-0")
    assert cantor_pairing(0, 5) == 20 and cantor_pairing(1, 7) == 43
    assert f0["feature_type"] == "cross layer transcoder" and f0["activation"] == 1.5 and f0["clerp"] == ""
    assert f1["clerp"] == "says <b>&</b>" and f1["influence"] == pytest.approx(INFLUENCE[1].item())
    assert (err["feature"], err["layer"], err["ctx_idx"], err["jsNodeId"]) == (-1, "0", 1, "0_1-0")
    assert err["feature_type"] == "mlp reconstruction error" and err["activation"] is None
    assert (tok["feature"], tok["layer"], tok["ctx_idx"], tok["jsNodeId"]) == (1, "E", 1, "E_40-1")
    assert tok["feature_type"] == "embedding" and tok["influence"] == pytest.approx(INFLUENCE[11].item())
    assert (logit["feature"], logit["layer"], logit["ctx_idx"], logit["jsNodeId"]) == (9, "3", 3, "L_9-3")
    assert logit["is_target_logit"] and logit["token_prob"] == pytest.approx(0.8)
    assert logit["clerp"] == 'Output ""</script>" (p=0.800)' and logit["influence"] is None
    assert data["links"] == [  # by target node, then source node; edges touching pruned nodes dropped
        {"source": "E_40_1", "target": "0_5_1", "weight": 0.5},
        {"source": "0_5_1", "target": "1_7_3", "weight": pytest.approx(0.7)},
        {"source": "0_0_1", "target": "1_7_3", "weight": pytest.approx(-0.2)},
        {"source": "E_42_3", "target": "1_7_3", "weight": pytest.approx(0.3)},
        {"source": "0_5_1", "target": "3_9_3", "weight": -0.375},
        {"source": "1_7_3", "target": "3_9_3", "weight": 1.25},
        {"source": "E_42_3", "target": "3_9_3", "weight": 0.875},
    ]


def test_nodes_without_kept_edges_are_left_out_but_tokens_and_logits_stay() -> None:
    graph = hand_graph()
    graph.edge_mask = torch.zeros_like(graph.edge_mask)
    data = graph_to_json_dict(graph, influence=INFLUENCE)
    assert [nd["node_id"] for nd in data["nodes"]] == ["E_2_0", "E_40_1", "E_41_2", "E_42_3", "3_9_3"]
    assert data["links"] == []


def test_scan_list_gets_a_stable_custom_name() -> None:
    graph = hand_graph()
    a = graph_to_json_dict(graph, scan=["org/a", "org/b"], influence=INFLUENCE)["metadata"]
    b = graph_to_json_dict(graph, scan=["org/a", "org/b"], influence=INFLUENCE)["metadata"]
    assert a["scan"] == b["scan"] and a["scan"].startswith("custom-") and a["scan"][7:].isdigit()
    assert a["transcoder_list"] == ["org/a", "org/b"]
    assert graph_to_json_dict(graph, scan=["org/a"], influence=INFLUENCE)["metadata"]["scan"] != a["scan"]


def test_bad_input_is_named() -> None:
    graph = hand_graph()
    graph.meta = {}
    with pytest.raises(ValueError, match="scan"):
        graph_to_json_dict(graph, influence=INFLUENCE)
    with pytest.raises(ValueError, match=r"influence has shape \(3,\); expected \(15,\)"):
        graph_to_json_dict(graph, scan="s", influence=torch.zeros(3))
    graph.token_strings = ["a"]
    with pytest.raises(ValueError, match="token_strings has 1 entries for 4 tokens"):
        graph_to_json_dict(graph, scan="s", influence=INFLUENCE)
    graph = hand_graph()
    graph.edge_mask = graph.edge_mask[:2]
    with pytest.raises(ValueError, match="edge_mask"):
        graph_to_json_dict(graph, influence=INFLUENCE)
    graph = hand_graph()
    graph.adjacency = graph.adjacency.clone()
    graph.adjacency[1, 1] = math.nan
    with pytest.raises(ValueError, match=r"edge 1_7_3 -> 3_9_3 has weight nan"):
        graph_to_json_dict(graph, influence=INFLUENCE)
    with pytest.raises(ValueError, match=r"should end in \.json"):
        write_graph_json(hand_graph(), "graph.html", influence=INFLUENCE)


def test_unpruned_graph_is_pruned_with_the_thresholds(monkeypatch) -> None:
    pruned, seen = hand_graph(), []
    graph = hand_graph()
    graph.node_mask = graph.edge_mask = None

    def fake_prune(self, node_threshold=0.8, edge_threshold=0.98):
        seen.append((node_threshold, edge_threshold))
        return pruned

    monkeypatch.setattr(AttributionGraph, "prune", fake_prune)
    data = graph_to_json_dict(graph, node_threshold=0.5, edge_threshold=0.9, influence=INFLUENCE)
    assert seen == [(0.5, 0.9)] and data["metadata"]["node_threshold"] == 0.5
    assert len(data["links"]) == 7


def test_index_file_lists_each_slug_once(tmp_path) -> None:
    graph = hand_graph()
    for name in ("a.json", "b.json", "a.json"):
        write_graph_json(graph, tmp_path / name, influence=INFLUENCE, update_index=True)
    index = json.loads((tmp_path / "graph-metadata.json").read_text())
    assert sorted(g["slug"] for g in index["graphs"]) == ["a", "b"]
