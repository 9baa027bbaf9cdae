"""``sparse-clt-hf attribute`` and ``demo --attribute``: the wiring around the attribution engine.

The engine is replaced by a fake ``sparse_clt_hf.attribute`` returning a hand-built graph whose ``to_json`` writes
circuit-tracer's graph JSON the way circuit-tracer 0.5.0 spells it (test_graph_view's node builders), so these
tests check what the command passes to the engine, what it prints and which files it writes. The last test
(slow) runs the real engine end to end and is skipped until ``sparse_clt_hf.attribute`` exists."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch
from test_demo import char_tokenizer, tiny_dirs  # noqa: F401  (fixture)
from test_graph_view import feature_node, logit_node, token_node
from test_view import FakeStats
from tiny_models import N_LAYERS, tiny_model

import sparse_clt_hf
from sparse_clt_hf import cli
from sparse_clt_hf import demo as demo_mod
from sparse_clt_hf import models as models_mod
from sparse_clt_hf.attribution.graph import AttributionGraph
from sparse_clt_hf.graph_view import DATA_ID
from sparse_clt_hf.view import feature_label

#: (layer, position from the end, feature, activation, cumulative influence, kept by pruning)
FEATURES = [(0, -2, 3, 1.5, 0.5, True), (1, -3, 20, 0.7, 0.9, False), (1, -1, 5, 2.25, 0.3, True),
            (2, -1, 7, 4.0, 0.1, True)]


class FakeGraph(AttributionGraph):
    """prune / scores / to_json / save by hand (what the engine's graph provides)."""

    calls: dict

    def prune(self, node_threshold=0.8, edge_threshold=0.98):
        self.calls["prune"] = (node_threshold, edge_threshold)
        keep = torch.ones(self.layout.n_nodes, dtype=torch.bool)
        keep[: len(FEATURES)] = torch.tensor([f[5] for f in FEATURES])
        pruned = dataclasses.replace(self, node_mask=keep, edge_mask=torch.ones_like(self.adjacency, dtype=torch.bool))
        pruned.calls = self.calls
        return pruned

    def scores(self):
        return 0.75, 0.9

    def to_json(self, path, *, slug=None, scan=None, **kwargs):
        self.calls["to_json"] = dict(slug=slug, scan=scan, **kwargs)
        labels = kwargs.get("labels") or {}
        T = int(self.tokens.shape[0])
        nodes = []
        for (layer, pos, f), (*_, act, infl, kept) in zip(self.features.tolist(), FEATURES):
            if kept:
                nodes.append(feature_node(layer, pos, f, infl, act, clerp=labels.get((layer, f), "")))
        nodes += [token_node(p, int(t), 0.95) for p, t in enumerate(self.tokens.tolist())]
        nodes += [logit_node(T - 1, int(i), s, self.n_layers, j == 0, float(p))
                  for j, (i, s, p) in enumerate(zip(self.logit_ids.tolist(), self.logit_strings, self.logit_probs.tolist()))]
        ids = [n["node_id"] for n in nodes]
        top_logit = ids[-len(self.logit_ids)]
        links = [(ids[0], ids[1], 0.8), (ids[1], ids[2], -0.4), (ids[2], top_logit, 2.0), (ids[1], top_logit, 0.5),
                 (f"E_{int(self.tokens[T - 2])}_{T - 2}", ids[0], 1.0)]
        data = {"metadata": {"slug": slug, "scan": scan, "transcoder_list": [], "prompt_tokens": self.token_strings,
                             "prompt": "".join(self.token_strings), "node_threshold": kwargs.get("node_threshold"),
                             "schema_version": 1},
                "qParams": {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""},
                "nodes": nodes, "links": [{"source": s, "target": t, "weight": w} for s, t, w in links]}
        Path(path).write_text(json.dumps(data), encoding="utf-8")
        return Path(path)

    def save(self, path):
        self.calls["save"] = str(path)
        Path(path).write_bytes(b"graph")
        return Path(path)


@pytest.fixture
def fake_engine(monkeypatch):
    """``sparse_clt_hf.attribute`` replaced; returns the dict of what it was called with."""
    calls: dict = {}

    def attribute(model, transcoder, prompt, *, tokenizer=None, targets=None, **kwargs):
        calls.update(model=model, transcoder=transcoder, prompt=prompt, tokenizer=tokenizer, targets=targets, **kwargs)
        if isinstance(prompt, str):
            ids = [tokenizer.bos_token_id] + tokenizer(prompt, add_special_tokens=False)["input_ids"]
        else:
            ids = [int(t) for t in prompt]
        T = len(ids)
        if targets:
            logit_ids = [t if isinstance(t, int) else tokenizer(t, add_special_tokens=False)["input_ids"][0] for t in targets]
        else:
            logit_ids = [40, 41]
        feats = torch.tensor([[layer, T + pos, f] for layer, pos, f, *_ in FEATURES])
        n_nodes = len(FEATURES) + N_LAYERS * T + T + len(logit_ids)
        graph = FakeGraph(
            tokens=torch.tensor(ids), features=feats, activations=torch.tensor([f[3] for f in FEATURES]),
            logit_ids=torch.tensor(logit_ids), logit_probs=torch.tensor([0.625, 0.25][: len(logit_ids)]),
            adjacency=torch.zeros(len(logit_ids) + 2, n_nodes), row_nodes=torch.arange(len(logit_ids) + 2),
            n_layers=N_LAYERS, token_strings=[tokenizer.decode([i]) for i in ids],
            logit_strings=[tokenizer.decode([i]) for i in logit_ids], meta={"n_active_features": 9})
        graph.calls = calls
        return graph

    monkeypatch.setattr(sparse_clt_hf, "attribute", attribute, raising=False)
    return calls


@pytest.fixture
def fake_stats(monkeypatch):
    """Statistics for layers 0 and 1 (16 features each) wherever the commands look for them."""
    import sparse_clt_hf.labels as labels

    stats = FakeStats(layers=(0, 1))
    monkeypatch.setattr(labels, "find_stats", lambda clt, path=None: stats)
    return stats


def embedded(text: str) -> dict:
    return json.loads(re.search(rf'<script type="application/json" id="{DATA_ID}">(.*?)</script>', text, re.S).group(1))


def test_attribute_text_report_and_files(tiny_dirs, fake_engine, fake_stats, tmp_path, capsys):  # noqa: F811
    model_dir, clt_dir = tiny_dirs
    out, page, saved = tmp_path / "g.json", tmp_path / "g.html", tmp_path / "g.safetensors"
    rc = cli.main(["attribute", "--model", str(model_dir), "--clt", str(clt_dir), "--prompt", "hi </b>", "--target", "x",
                   "--max-feature-nodes", "7", "--batch-size", "3", "--node-threshold", "0.7", "--edge-threshold", "0.9",
                   "--device", "cpu", "--out", str(out), "--html", str(page), "--save", str(saved), "--no-progress",
                   "--dashboard", "../site/"])
    assert rc == 0
    text = capsys.readouterr().out
    # what reached the engine: the raw text, its tokenizer, the target string and the limits
    c = fake_engine
    assert c["prompt"] == "hi </b>" and c["targets"] == ["x"] and c["tokenizer"] is not None
    assert (c["max_feature_nodes"], c["batch_size"], c["max_n_logits"], c["desired_logit_prob"]) == (7, 3, 10, 0.95)
    assert c["transcoder"] == str(clt_dir) and c["progress"] is False
    assert c["prune"] == (0.7, 0.9)
    # the graph JSON: the thresholds and the labels of the kept features (from the statistics), none for the pruned one
    tok = c["tokenizer"]
    kept = [(layer, f) for layer, _, f, *_, k in FEATURES if k and layer in (0, 1)]
    assert c["to_json"]["labels"] == {(layer, f): feature_label(fake_stats, tok, layer, f) for layer, f in kept}
    assert (c["to_json"]["node_threshold"], c["to_json"]["edge_threshold"]) == (0.7, 0.9)
    assert c["to_json"]["slug"] == "hi-b" and c["to_json"]["scan"] == str(clt_dir)
    graph_json = json.loads(out.read_text())
    data = embedded(page.read_text(encoding="utf-8"))
    assert [n["id"] for n in data["nodes"]] == [n["node_id"] for n in graph_json["nodes"]]
    assert set(data["details"]) == {"0/3", "1/5"} and data["title"] == "Why the next token? hi </b>"
    assert data["dashboard"] == "../site"  # feature pages: ../site/feature.html#L{layer}/{feature}
    assert saved.read_bytes() == b"graph"
    # the summary: target and probability, scores, features by influence (smallest cumulative first), files
    assert "explained: 'x' p=0.625" in text
    assert "replacement 0.750, completeness 0.900" in text
    rows = [line for line in text.splitlines() if re.match(r"\s+\d+  L", line)]
    assert [re.search(r"L(\d+/\d+)", r).group(1) for r in rows] == ["2/7", "1/5", "0/3"]
    assert rows[0].split()[-1] == "+2" and feature_label(fake_stats, tok, 1, 5) in rows[1]
    assert f"saved graph JSON (circuit-tracer / Neuronpedia) to {out}" in text
    assert f"saved HTML view (open in a browser) to {page}" in text and f"saved whole graph to {saved}" in text


def test_attribute_json_and_chat_template(tiny_dirs, fake_engine, tmp_path, capsys):  # noqa: F811
    model_dir, clt_dir = tiny_dirs
    rc = cli.main(["attribute", "--json", "--model", str(model_dir), "--clt", str(clt_dir), "--prompt", "hi",
                   "--chat-template", "--show", "2"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)  # stdout: one JSON document
    expected = demo_mod.chat_input(char_tokenizer(), "hi")["input_ids"][0]
    assert torch.equal(torch.as_tensor(fake_engine["prompt"]), expected)  # the templated ids, used as given
    assert fake_engine["targets"] is None
    assert [t["id"] for t in report["targets"]] == [40, 41] and report["targets"][0]["probability"] == 0.625
    assert [(f["layer"], f["feature"]) for f in report["top_features"]] == [(2, 7), (1, 5)]
    assert report["scores"] == {"replacement": 0.75, "completeness": 0.9} and report["files"] == {}
    assert report["labels"] is False and report["tokens"] == len(expected)
    assert (report["active_features"], report["attributed_features"]) == (9, 2)  # all active, and the rows


@pytest.mark.parametrize("extra, message", [
    (["--node-threshold", "1.5"], "expected shares between 0 and 1"),
    (["--max-feature-nodes", "0"], "--max-feature-nodes 0: expected a positive integer"),
    (["--desired-logit-prob", "0"], "expected a probability"),
    (["--prompt", ""], "--prompt is empty"),
    (["--versus", "b"], "--versus 'b' needs exactly one --target (got 0)"),
    (["--out", "/nonexistent/dir/g.json"], "does not exist"),
    (["--out", "graph.txt"], "should end in .json"),
    (["--save", "/nonexistent/dir/g.safetensors"], "does not exist"),
    (["--dashboard", "site"], "--dashboard site: the links go into the page; add --html"),
    (["--html", "g.html", "--dashboard", "javascript:alert(1)"], "not a javascript: URL"),
])
def test_bad_arguments_fail_before_the_model_loads(tiny_dirs, monkeypatch, fake_engine, capsys, extra, message):  # noqa: F811
    model_dir, clt_dir = tiny_dirs
    monkeypatch.setattr(models_mod, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    rc = cli.main(["attribute", "--json", "--model", str(model_dir), "--clt", str(clt_dir), *extra])
    assert rc == 1 and message in json.loads(capsys.readouterr().out)["error"]


def test_a_dashboard_folder_given_from_here_is_linked_relative_to_the_page(tmp_path, monkeypatch):
    from sparse_clt_hf.commands.attribute import dashboard_for_page

    (tmp_path / "site").mkdir()
    (tmp_path / "out" / "pages").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert dashboard_for_page("site", "out/pages/g.html") == "../../site"
    assert dashboard_for_page("site/", "g.html") == "site"
    assert dashboard_for_page("../site", "out/pages/g.html") == "../site"  # not a folder here: relative to the page
    assert dashboard_for_page("https://x.org/site", "g.html") == "https://x.org/site"
    assert dashboard_for_page(str(tmp_path / "site"), "g.html") == str(tmp_path / "site")


def test_model_without_transcoder_is_an_error(monkeypatch, capsys):
    monkeypatch.setattr(models_mod, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    assert cli.main(["attribute", "--json", "--model", "some/model"]) == 1
    assert "--clt is required with --model" in json.loads(capsys.readouterr().out)["error"]


def test_demo_attribute_explains_the_first_generated_token(tiny_dirs, monkeypatch, fake_engine, tmp_path, capsys):  # noqa: F811
    _, clt_dir = tiny_dirs
    tok, model = char_tokenizer(), tiny_model("llama")
    monkeypatch.setattr(models_mod, "load_model", lambda ref=None, **kw: (model, tok, "tiny"))
    monkeypatch.setattr(demo_mod, "model_dims_before_loading", lambda ref: None)  # not SmolLM2's width here
    rc = cli.main(["demo", "--clt", str(clt_dir), "--prompt", "hi", "--max-new-tokens", "3", "--attribute", str(tmp_path)])
    assert rc == 0
    text = capsys.readouterr().out
    enc = demo_mod.chat_input(tok, "hi")
    with torch.no_grad():  # the first greedy token, computed here with a plain forward pass
        first = int(model(**enc).logits[0, -1].argmax())
    assert torch.equal(torch.as_tensor(fake_engine["prompt"]), enc["input_ids"][0])
    assert fake_engine["targets"] == [first] and fake_engine["max_feature_nodes"] == 256
    assert (tmp_path / "graph.json").is_file() and (tmp_path / "graph.html").is_file()
    assert f"why the first generated token {tok.decode([first])!r}?" in text
    assert f"saved HTML view (open in a browser) to {tmp_path / 'graph.html'}" in text


def test_demo_attribute_folder_must_exist(monkeypatch, capsys):
    monkeypatch.setattr(models_mod, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    assert cli.main(["demo", "--json", "--attribute", "/nonexistent/folder"]) == 1
    assert "--attribute /nonexistent/folder: no such folder" in json.loads(capsys.readouterr().out)["error"]


def saved_model_and_clt(tmp_path):
    """A tiny Llama with the char tokenizer in tmp_path/model, a random CLT with decoders in tmp_path/clt."""
    from conftest import random_transcoder

    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "model")
    char_tokenizer().save_pretrained(tmp_path / "model")
    tc = random_transcoder(d=32, layers=range(N_LAYERS), site="mlp_in", decoders=True)
    tc.config.model_name = None
    tc.save_pretrained(tmp_path / "clt")
    return model, tc


@pytest.mark.slow
def test_attribute_end_to_end_with_the_engine(tmp_path, capsys):
    """The real engine on a tiny model and a random CLT with decoders: the command's files agree with each other
    and with the graph the library returns for the same prompt."""
    if not hasattr(sparse_clt_hf, "attribute"):
        pytest.skip("the attribution engine (sparse_clt_hf.attribute) is not merged yet")
    model, tc = saved_model_and_clt(tmp_path)
    from sparse_clt_hf.labels import corpus_stats, save_stats

    stats = corpus_stats(model, char_tokenizer(), tc, ["hello world, the cat sat on the mat. " * 8] * 4, tokens=600,
                         seq_len=32, batch_size=8, progress=False)
    save_stats(stats, tmp_path / "stats")
    out, page = tmp_path / "g.json", tmp_path / "g.html"
    rc = cli.main(["attribute", "--json", "--model", str(tmp_path / "model"), "--clt", str(tmp_path / "clt"),
                   "--prompt", "hello world", "--device", "cpu", "--dtype", "float32", "--out", str(out),
                   "--html", str(page), "--save", str(tmp_path / "g.safetensors"), "--stats", str(tmp_path / "stats"),
                   "--no-progress"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    graph_json = json.loads(out.read_text())
    ids = {n["node_id"] for n in graph_json["nodes"]}
    assert all(x["source"] in ids and x["target"] in ids for x in graph_json["links"])
    assert report["pruned"]["nodes"] == len(graph_json["nodes"]) and report["pruned"]["links"] == len(graph_json["links"])
    data = embedded(page.read_text(encoding="utf-8"))
    assert [n["id"] for n in data["nodes"]] == [n["node_id"] for n in graph_json["nodes"]]
    # labels from the statistics: in the JSON's clerp and in the page's details, for every kept feature
    feature_nodes = [n for n in graph_json["nodes"] if n["feature_type"] == "cross layer transcoder"]
    assert feature_nodes and report["labels"]
    for n in feature_nodes:
        layer, f, _ = map(int, n["node_id"].split("_"))
        label = feature_label(stats, char_tokenizer(), layer, f) if stats.top_tokens(layer, f, 1) else ""
        assert n["clerp"] == label and data["details"][f"{layer}/{f}"]["label"] == label
    graph = sparse_clt_hf.attribute(model, str(tmp_path / "clt"), "hello world", tokenizer=char_tokenizer())
    assert [t["id"] for t in report["targets"]] == graph.logit_ids.tolist()
    assert report["scores"]["replacement"] == pytest.approx(graph.scores()[0], abs=1e-4)
    loaded = AttributionGraph.load(tmp_path / "g.safetensors")
    assert torch.equal(loaded.features, graph.features)


def test_attribution_example(monkeypatch, fake_engine, tmp_path, capsys):
    """examples/attribution.py on the tiny model (its transcoder trained in seconds), the engine faked."""
    import importlib.util
    import sys

    monkeypatch.setenv("SPARSE_CLT_HF_EXAMPLE_TINY", "1")
    examples = Path(__file__).resolve().parent.parent / "examples"
    monkeypatch.syspath_prepend(str(examples))
    spec = importlib.util.spec_from_file_location("example_attribution", examples / "attribution.py")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        result = module.main("hello", html=str(tmp_path / "g.html"), max_feature_nodes=50)
    finally:
        sys.modules.pop("_common", None)
    assert fake_engine["prompt"] == "hello" and fake_engine["max_feature_nodes"] == 50
    assert (tmp_path / "g.html").is_file() and (tmp_path / "g.json").is_file()
    assert [(f["layer"], f["feature"]) for f in result["top"]] == [(2, 7), (1, 5), (0, 3)]
    out = capsys.readouterr().out
    assert "most influential features:" in out and "L2/7" in out and "replacement score 0.750" in out
    assert "9 active features (4 attributed)" in out


def test_attribute_versus_explains_a_logit_difference(tmp_path, capsys):
    """--target a --versus b: one custom target, logit(a) - logit(b), labelled so, weight 1, with the virtual
    id after the vocabulary; its row is the library's logit_difference graph's."""
    model, tc = saved_model_and_clt(tmp_path)
    rc = cli.main(["attribute", "--json", "--model", str(tmp_path / "model"), "--clt", str(tmp_path / "clt"),
                   "--prompt", "hello world", "--target", "a", "--versus", "b", "--device", "cpu", "--dtype", "float32",
                   "--save", str(tmp_path / "g.safetensors"), "--no-progress"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    vocab = model.config.vocab_size
    assert report["targets"] == [{"token": "'a' - 'b'", "id": vocab, "probability": 1.0}]
    saved = AttributionGraph.load(tmp_path / "g.safetensors")
    want = sparse_clt_hf.attribute(model, str(tmp_path / "clt"), "hello world", tokenizer=char_tokenizer(),
                                   targets=[sparse_clt_hf.logit_difference(model, "a", "b", tokenizer=char_tokenizer())])
    torch.testing.assert_close(saved.adjacency, want.adjacency)
