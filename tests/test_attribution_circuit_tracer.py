"""Fidelity: our attribution graphs equal circuit-tracer's own on the same tiny model, transcoder and prompt.

The references were written by circuit-tracer 0.5.0 itself (nnsight backend, CPU, fp32, transformers 4.57.3)
with scripts/circuit_tracer_reference.py in a separate virtualenv; this test only reads them (see
tests/circuit_tracer_fixtures.py and docs/attribution-fidelity.md). Cases: Llama CLT JumpReLU (hook_resid_mid),
Llama CLT ReLU (mlp.hook_in), Gemma 2 PLT ReLU (ln2.hook_normalized, sliding window, soft-capping), Qwen3 PLT
JumpReLU with a skip connection (mlp.hook_in); each once on all features and once with max_feature_nodes.
"""

from __future__ import annotations

from functools import cache

import pytest
import torch
import transformers as tf
from circuit_tracer_fixtures import CASES, CUSTOM_CASES, RUNS, Reference, load_reference

import sparse_clt_hf
from sparse_clt_hf.attribution.graph import AttributionGraph
from sparse_clt_hf.attribution.graph_json import graph_to_json_dict

attribute = getattr(sparse_clt_hf, "attribute", None)
pytestmark = [
    pytest.mark.skipif(attribute is None, reason="sparse_clt_hf.attribute is not implemented yet"),
    pytest.mark.filterwarnings("ignore:transcoder was trained on"),  # the fixtures' model_name is not a Hub id
]

RTOL = 1e-4  # adjacency: relative to the largest entry of the matrix (fp32 on both sides)


@cache
def _model(case: str, attn_implementation: str | None = "eager") -> torch.nn.Module:
    """The fixture's model with eager attention, as circuit-tracer loads it (on transformers 4.57, Gemma 2 under
    sdpa drops the attention soft-capping, so the model itself computes something else)."""
    folder = load_reference(case).model_dir
    return tf.AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, attn_implementation=attn_implementation
    ).eval()


@cache
def _ours(case: str, run: str) -> tuple[AttributionGraph, Reference]:
    ref = load_reference(case, run)
    settings = {k: ref.run[k] for k in ("max_n_logits", "desired_logit_prob", "max_feature_nodes", "batch_size")}
    if run == "custom":
        settings["targets"] = [sparse_clt_hf.CustomTarget(label, prob, vec)
                               for label, prob, vec in zip(ref.run["labels"], ref.run["probs"], ref.custom_vecs)]
    graph = attribute(_model(case), str(ref.transcoder_dir), ref.tokens.tolist(), **settings)
    return graph, ref


def _ref_feature_columns(graph: AttributionGraph, ref: Reference) -> torch.Tensor:
    """For each of circuit-tracer's feature nodes (its selected features), our column index."""
    ours = {tuple(f): i for i, f in enumerate(graph.features.tolist())}
    wanted = ref.active_features[ref.selected].tolist()
    missing = [f for f in wanted if tuple(f) not in ours]
    assert not missing, f"features of circuit-tracer's graph missing from ours: {missing[:5]}"
    return torch.tensor([ours[tuple(f)] for f in wanted], dtype=torch.long)


def _column_map(graph: AttributionGraph, ref: Reference) -> torch.Tensor:
    """[N_ref] our column of each of circuit-tracer's nodes (features | errors | tokens | logits)."""
    n_sel = len(ref.selected)
    rest = torch.arange(graph.layout.error_start, graph.layout.n_nodes)
    mapped = torch.cat([_ref_feature_columns(graph, ref), rest])
    assert len(mapped) == ref.adjacency.shape[0], "node counts differ beyond the features"
    assert len(rest) == ref.adjacency.shape[0] - n_sel
    return mapped


@pytest.mark.parametrize("case", CASES)
def test_same_features_activations_and_targets(case: str) -> None:
    graph, ref = _ours(case, "full")
    assert graph.tokens.tolist() == ref.tokens.tolist()
    assert graph.n_layers == ref.n_layers
    assert graph.features.tolist() == ref.active_features.tolist()
    torch.testing.assert_close(graph.activations.float(), ref.activations, rtol=1e-4, atol=1e-6)
    assert graph.logit_ids.tolist() == ref.logit_ids.tolist()
    torch.testing.assert_close(graph.logit_probs.float(), ref.logit_probs, rtol=1e-4, atol=1e-7)


FULL_AND_CUSTOM = [(c, "full") for c in CASES] + [(c, "custom") for c in CUSTOM_CASES]


@pytest.mark.parametrize("case,run", FULL_AND_CUSTOM)
def test_same_adjacency(case: str, run: str) -> None:
    graph, ref = _ours(case, run)
    dense = graph.to_dense().float()
    assert dense.shape == ref.adjacency.shape
    scale = ref.adjacency.abs().max().item()
    err = (dense - ref.adjacency).abs()
    worst = divmod(int(err.argmax()), dense.shape[1])
    assert err.max().item() <= RTOL * scale, (
        f"max |ours - circuit-tracer| = {err.max().item():.3g} at (target {graph.layout.kind_of(worst[0])} "
        f"{worst[0]}, source {graph.layout.kind_of(worst[1])} {worst[1]}); matrix scale {scale:.3g}"
    )
    assert torch.equal(dense != 0, ref.adjacency != 0) or err.max().item() <= RTOL * scale


@pytest.mark.parametrize("case,run", FULL_AND_CUSTOM)
def test_same_pruning_and_scores(case: str, run: str) -> None:
    graph, ref = _ours(case, run)
    pruned = graph.prune(ref.meta["node_threshold"], ref.meta["edge_threshold"])
    assert pruned.node_mask is not None and pruned.edge_mask is not None
    assert torch.nonzero(pruned.node_mask).flatten().tolist() == torch.nonzero(ref.node_mask).flatten().tolist()
    ours_edges = torch.zeros_like(ref.edge_mask)
    ours_edges[graph.row_nodes.long()] = pruned.edge_mask.bool()
    diff = torch.nonzero(ours_edges != ref.edge_mask).tolist()
    assert not diff, f"{len(diff)} edges differ (target, source), e.g. {diff[:5]}"
    replacement, completeness = graph.scores()
    assert replacement == pytest.approx(ref.run["replacement_score"], rel=1e-4)
    assert completeness == pytest.approx(ref.run["completeness_score"], rel=1e-4)


@pytest.mark.parametrize("case,run", [(c, r) for c in CASES for r in RUNS] + [(c, "custom") for c in CUSTOM_CASES])
def test_same_graph_json(case: str, run: str) -> None:
    graph, ref = _ours(case, run)
    got = graph_to_json_dict(graph, slug=case, scan=ref.meta["scan"])
    want = ref.graph_json
    assert [nd["node_id"] for nd in got["nodes"]] == [nd["node_id"] for nd in want["nodes"]]
    for a, b in zip(got["nodes"], want["nodes"]):
        for key in ("feature", "layer", "ctx_idx", "feature_type", "jsNodeId", "is_target_logit"):
            assert a[key] == b[key], (a["node_id"], key)
        for key in ("influence", "activation", "token_prob"):
            assert (a[key] is None) == (b[key] is None), (a["node_id"], key)
            if b[key] is not None:
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (a["node_id"], key)
    assert [(lk["source"], lk["target"]) for lk in got["links"]] == [(lk["source"], lk["target"]) for lk in want["links"]]
    scale = max(abs(lk["weight"]) for lk in want["links"])
    for a, b in zip(got["links"], want["links"]):
        assert abs(a["weight"] - b["weight"]) <= RTOL * scale, (a, b)


@pytest.mark.parametrize("case", CASES)
def test_max_feature_nodes_same_choice_and_rows(case: str) -> None:
    """With max_feature_nodes, the same features are chosen greedily and the rows both computed agree."""
    graph, ref = _ours(case, "topk")
    assert graph.logit_ids.tolist() == ref.logit_ids.tolist()
    is_feature_row = graph.row_nodes < graph.layout.n_features
    ours_chosen = sorted(map(tuple, graph.features[graph.row_nodes[is_feature_row].long()].tolist()))
    assert ours_chosen == sorted(map(tuple, ref.active_features[ref.selected].tolist()))
    columns = _column_map(graph, ref)
    # rows: circuit-tracer's selected features then logits; ours looked up by node
    ref_rows = torch.cat([torch.arange(len(ref.selected)), torch.arange(ref.adjacency.shape[0] - len(ref.logit_ids), ref.adjacency.shape[0])])
    our_nodes = columns[ref_rows]
    position = {int(n): i for i, n in enumerate(graph.row_nodes.tolist())}
    ours = graph.adjacency[[position[int(n)] for n in our_nodes]][:, columns].float()
    want = ref.adjacency[ref_rows]
    scale = want.abs().max().item()
    assert (ours - want).abs().max().item() <= RTOL * scale
    replacement, completeness = graph.scores()
    assert replacement == pytest.approx(ref.run["replacement_score"], rel=1e-4)
    assert completeness == pytest.approx(ref.run["completeness_score"], rel=1e-4)


def test_default_attention_gives_circuit_tracers_graph_too() -> None:
    """circuit-tracer runs eager attention; ours freezes whatever implementation the model was loaded with (sdpa
    by default; a model without attention soft-capping computes the same under both)."""
    case = "llama_clt_jumprelu"
    ref = load_reference(case)
    graph = attribute(_model(case, None), str(ref.transcoder_dir), ref.tokens.tolist())
    assert graph.features.tolist() == ref.active_features.tolist()
    scale = ref.adjacency.abs().max().item()
    assert (graph.to_dense().float() - ref.adjacency).abs().max().item() <= RTOL * scale


@pytest.mark.parametrize("case", ["gemma2_plt_relu"])  # its logits include hostile strings
def test_token_strings_and_logit_labels_as_circuit_tracer_decodes_them(case: str) -> None:
    """With the tokenizer, the prompt tokens and the logit nodes' labels (hostile strings among them) match."""
    ref = load_reference(case)
    tokenizer = tf.AutoTokenizer.from_pretrained(ref.model_dir)
    graph = attribute(_model(case), str(ref.transcoder_dir), ref.tokens.tolist(), tokenizer=tokenizer)
    assert graph.token_strings == ref.meta["prompt_tokens"]
    assert graph.logit_strings == ref.run["logit_strings"]
    got = graph_to_json_dict(graph, slug=case, scan=ref.meta["scan"])
    assert got["metadata"]["prompt_tokens"] == ref.graph_json["metadata"]["prompt_tokens"]
    clerps = [(nd["node_id"], nd["clerp"]) for nd in got["nodes"] if nd["feature_type"] == "logit"]
    assert clerps == [(nd["node_id"], nd["clerp"]) for nd in ref.graph_json["nodes"] if nd["feature_type"] == "logit"]


@pytest.mark.parametrize("case", CUSTOM_CASES)
def test_custom_targets_same_ids_weights_and_labels(case: str) -> None:
    """circuit-tracer's CustomTarget: virtual ids after the vocabulary, the weights as given, the labels."""
    graph, ref = _ours(case, "custom")
    assert graph.logit_ids.tolist() == ref.logit_ids.tolist()
    assert min(ref.logit_ids.tolist()) >= _model(case).config.vocab_size
    torch.testing.assert_close(graph.logit_probs.float(), ref.logit_probs)
    assert graph.logit_strings == ref.run["logit_strings"] == ref.run["labels"]
    assert graph.features.tolist() == ref.active_features.tolist()
