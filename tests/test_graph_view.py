"""The attribution-graph page (sparse_clt_hf.graph_view): the embedded data against the graph JSON it was given
(built here by hand the way circuit-tracer 0.5.0's writer spells nodes), escaping of hostile token and label
text, one-pass template filling, feature details from statistics, and (when a chromium binary is installed)
the page as a browser renders it: nodes and edges drawn, a node selected from the address, its inputs and
outputs listed, clicks followed, a screenshot that is not blank."""

from __future__ import annotations

import json
import re
import struct
from html.parser import HTMLParser
from pathlib import Path

import pytest
from test_view import HOSTILE, FakeStats, FakeTokenizer, png_pixels_vary, run_chromium

from sparse_clt_hf.graph_view import (
    DATA_ID,
    dashboard_site,
    feature_details_from_stats,
    graph_html,
    labels_from_details,
    page_data,
    top_features,
)
from sparse_clt_hf.view import feature_label

N_LAYERS = 4
TOKENS = ["<bos>", "The", " capital", HOSTILE, " France", " is"]
LOGITS = [(801, " Paris", 0.61), (802, " the", 0.22), (803, HOSTILE, 0.05)]


# ---------------------------------------------------------------------------- circuit-tracer's node spelling
def cantor(x: int, y: int) -> int:
    return (x + y) * (x + y + 1) // 2 + y


def feature_node(layer, pos, f, influence, activation, clerp=""):
    return {"node_id": f"{layer}_{f}_{pos}", "feature": cantor(layer, f), "layer": str(layer), "ctx_idx": pos,
            "feature_type": "cross layer transcoder", "token_prob": 0.0, "is_target_logit": False, "run_idx": 0,
            "reverse_ctx_idx": 0, "jsNodeId": f"{layer}_{f}-0", "clerp": clerp, "influence": influence,
            "activation": activation}


def error_node(layer, pos, influence):
    return {"node_id": f"0_{layer}_{pos}", "feature": -1, "layer": str(layer), "ctx_idx": pos,
            "feature_type": "mlp reconstruction error", "token_prob": 0.0, "is_target_logit": False, "run_idx": 0,
            "reverse_ctx_idx": 0, "jsNodeId": f"{layer}_{pos}-0", "clerp": "", "influence": influence,
            "activation": None}


def token_node(pos, vocab, influence):
    return {"node_id": f"E_{vocab}_{pos}", "feature": pos, "layer": "E", "ctx_idx": pos, "feature_type": "embedding",
            "token_prob": 0.0, "is_target_logit": False, "run_idx": 0, "reverse_ctx_idx": 0,
            "jsNodeId": f"E_{vocab}-{pos}", "clerp": "", "influence": influence, "activation": None}


def logit_node(pos, vocab, token, n_layers, target, prob):
    layer = str(n_layers + 1)
    return {"node_id": f"{layer}_{vocab}_{pos}", "feature": vocab, "layer": layer, "ctx_idx": pos,
            "feature_type": "logit", "token_prob": prob, "is_target_logit": target, "run_idx": 0,
            "reverse_ctx_idx": 0, "jsNodeId": f"L_{vocab}-{pos}", "clerp": f'Output "{token}" (p={prob:.3f})',
            "influence": None, "activation": None}


def make_graph_json(hostile_label: bool = True) -> dict:
    """A pruned graph over 6 tokens and 4 layers: 9 features (one cell holds three), 3 error nodes, the
    6 token embeddings and 3 logits; every link goes up the layers; positive and negative weights."""
    feats = [(0, 1, 11, 2.5), (0, 2, 12, 1.0), (1, 3, 13, 3.25), (1, 4, 7, 0.5), (2, 4, 99, 4.0),
             (2, 4, 100, 1.5), (2, 4, 101, 0.75), (3, 5, 42, 6.0), (3, 5, 43, 2.0)]
    nodes = [feature_node(layer, pos, f, 0.1 * i, act, clerp=(HOSTILE if hostile_label and f == 42 else f"feat {f}"))
             for i, (layer, pos, f, act) in enumerate(feats)]
    nodes += [error_node(1, 5, 0.5), error_node(2, 3, 0.6), error_node(3, 5, 0.7)]
    nodes += [token_node(p, 100 + p, 0.8) for p in range(len(TOKENS))]
    nodes += [logit_node(len(TOKENS) - 1, v, t, N_LAYERS, i == 0, p) for i, (v, t, p) in enumerate(LOGITS)]
    ids = {n["node_id"]: n for n in nodes}
    links = [
        ("E_101_1", "0_11_1", 1.5), ("E_102_2", "0_12_2", 0.8), ("E_103_3", "1_13_3", 2.0), ("0_11_1", "1_13_3", -0.6),
        ("1_13_3", "2_99_4", 1.2), ("E_104_4", "2_99_4", 0.9), ("0_12_2", "2_100_4", -0.4), ("1_7_4", "2_101_4", 0.3),
        ("2_99_4", "3_42_5", 2.2), ("2_100_4", "3_42_5", -0.7), ("0_2_3", "3_42_5", 0.5), ("E_105_5", "3_43_5", 1.1),
        ("0_1_5", "3_43_5", 0.2), ("E_104_4", "1_7_4", 0.6), ("2_101_4", "3_43_5", -0.25),
        ("3_42_5", "5_801_5", 3.0), ("3_43_5", "5_801_5", 1.0), ("0_3_5", "5_801_5", 0.8), ("2_99_4", "5_801_5", 1.7),
        ("3_42_5", "5_802_5", -1.1), ("3_43_5", "5_802_5", 0.9), ("E_105_5", "5_803_5", 0.4), ("3_42_5", "5_803_5", -0.3),
    ]
    assert all(s in ids and t in ids for s, t, _ in links)
    return {
        "metadata": {"slug": "capital-test", "scan": "test-clt", "transcoder_list": [], "prompt_tokens": TOKENS,
                     "prompt": "The capital" + HOSTILE + " France is", "node_threshold": 0.8, "schema_version": 1},
        "qParams": {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""},
        "nodes": nodes,
        "links": [{"source": s, "target": t, "weight": w} for s, t, w in links],
    }


def embedded(text: str) -> dict:
    m = re.search(rf'<script type="application/json" id="{DATA_ID}">(.*?)</script>', text, re.S)
    assert m, "no data block"
    return json.loads(m.group(1))


# ---------------------------------------------------------------------------- the data
def test_embedded_data_round_trips_to_the_graph_json(tmp_path):
    g = make_graph_json()
    path = graph_html(g, tmp_path / "g.html")
    data = embedded(path.read_text(encoding="utf-8"))
    assert data["tokens"] == TOKENS and data["n_layers"] == N_LAYERS
    assert [n["id"] for n in data["nodes"]] == [n["node_id"] for n in g["nodes"]]
    ids = [n["id"] for n in data["nodes"]]
    assert [(ids[s], ids[t], w) for s, t, w in data["links"]] == [(x["source"], x["target"], x["weight"]) for x in g["links"]]
    for n, src in zip(data["nodes"], g["nodes"]):
        assert n["pos"] == src["ctx_idx"]
        kind = {"embedding": "token", "logit": "logit", "mlp reconstruction error": "error"}.get(src["feature_type"], "feature")
        assert n["kind"] == kind
        if kind == "feature":  # layer/feature read back from node ids, not from the paired 'feature' field
            layer, f, _ = map(int, src["node_id"].split("_"))
            assert (n["layer"], n["feature"]) == (layer, f) and cantor(layer, f) == src["feature"]
            assert n["act"] == src["activation"] and n["label"] == src["clerp"]
        # rows: embeddings 0, layer l at l + 1, logits on top
        assert n["row"] == (0 if kind == "token" else N_LAYERS + 1 if kind == "logit" else int(src["layer"]) + 1)
    logits = [n for n in data["nodes"] if n["kind"] == "logit"]
    assert [(n["token"], n["prob"], n["target"]) for n in logits] == [(t, p, i == 0) for i, (_, t, p) in enumerate(LOGITS)]
    assert data["meta"]["slug"] == "capital-test" and data["details"] is None


def test_bad_graph_json_names_what_is_wrong():
    g = make_graph_json()
    g["links"].append({"source": "9_9_9", "target": "5_801_5", "weight": 1.0})
    with pytest.raises(ValueError, match=r"link 23: '9_9_9' is not the node_id"):
        page_data(g)
    with pytest.raises(ValueError, match="'nodes' and 'links'"):
        page_data({"nodes": []})
    g = make_graph_json()
    del g["nodes"][2]["ctx_idx"]
    with pytest.raises(ValueError, match="node 2: needs node_id"):
        page_data(g)
    g = make_graph_json()
    g["nodes"].append(dict(g["nodes"][0]))
    with pytest.raises(ValueError, match="appears twice"):
        page_data(g)
    g = make_graph_json()
    g["nodes"][0]["node_id"] = "weird"
    with pytest.raises(ValueError, match="expected LAYER_FEATURE_POSITION"):
        page_data(g)
    with pytest.raises(ValueError, match=r"feature_details\['3/42'\]: a context"):
        page_data(make_graph_json(), {"3/42": {"label": "x", "top_contexts": [{"tokens": ["a"], "index": 4}]}})


def test_colliding_circuit_tracer_ids(tmp_path):
    """circuit-tracer spells error (layer 1, position 5) "0_1_5", like feature 1 of layer 0 at position 5: both
    nodes are kept, and a link naming that id goes to the node that can be its source (a lower layer)."""
    g = make_graph_json()
    g["nodes"].insert(0, feature_node(0, 5, 1, 0.05, 1.25))  # "0_1_5", as the error node (1, 5) already is
    g["links"].append({"source": "0_1_5", "target": "1_7_4", "weight": 9.0})  # position 5 -> 4: impossible, first
    g["links"].append({"source": "E_105_5", "target": "0_1_5", "weight": 0.5})  # both fit: the first (feature)
    g["links"].append({"source": "0_1_5", "target": "3_43_5", "weight": -0.5})
    data = page_data(g)
    ids = [(n["id"], n["kind"]) for n in data["nodes"]]
    assert ids.count(("0_1_5", "feature")) == 1 and ids.count(("0_1_5", "error")) == 1
    feat, err = ids.index(("0_1_5", "feature")), ids.index(("0_1_5", "error"))
    # the original link "0_1_5" -> "3_43_5" (weight 0.2) and the new ones
    resolved = {(s, t, w) for s, t, w in data["links"]}
    where = {n["id"]: i for i, n in reversed(list(enumerate(data["nodes"])))}
    assert (feat, where["3_43_5"], 0.2) in resolved and (feat, where["1_7_4"], 9.0) in resolved
    assert (where["E_105_5"], feat, 0.5) in resolved
    g["links"].append({"source": "1_13_3", "target": "0_1_5", "weight": 1.0})  # only the error (layer 1) is above
    assert (where["1_13_3"], feat, 1.0) in {tuple(x) for x in page_data(g)["links"]}  # row 2 -> row 1: no pair fits
    g["links"][-1] = {"source": "0_11_1", "target": "0_1_5", "weight": 1.0}  # layer 0 -> the error (layer 1) fits
    assert (where["0_11_1"], err, 1.0) in {tuple(x) for x in page_data(g)["links"]}
    text = graph_html(g, tmp_path / "g.html").read_text(encoding="utf-8")
    assert embedded(text)["nodes"][err]["kind"] == "error"


def test_hostile_text_is_escaped_and_title_cannot_inject(tmp_path):
    g = make_graph_json()
    details = {"3/42": {"label": HOSTILE, "top_contexts": [HOSTILE, {"tokens": ["a", HOSTILE], "index": 1, "activation": 2}]}}
    for title in ("__DATA__", "__DATA_ID__", HOSTILE, "__TITLE__"):
        text = graph_html(g, tmp_path / "g.html", feature_details=details, title=title).read_text(encoding="utf-8")
        assert "<img" not in text and text.count("</script>") == 2  # the data block's and the script's own
        assert text.count(f'id="{DATA_ID}"') == 1
        data = embedded(text)
        assert data["title"] == title and data["tokens"][3] == HOSTILE and data["details"]["3/42"]["label"] == HOSTILE
        head = re.search(r"<title>(.*?)</title>", text, re.S).group(1)
        assert head in (title, "&lt;/script&gt;&lt;img src=x onerror=alert(1)&gt;")


def test_page_is_self_contained(tmp_path):
    text = graph_html(make_graph_json(), tmp_path / "g.html").read_text(encoding="utf-8")

    class Refs(HTMLParser):
        found: list[str] = []

        def handle_starttag(self, tag, attrs):
            self.found += [v for k, v in attrs if k in ("src", "href") and v]

    p = Refs()
    p.feed(text)
    assert p.found == [] and "http://" not in text.replace("http://www.w3.org/2000/svg", "") and "https://" not in text
    assert "@import" not in text and "url(" not in text


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        graph_html(make_graph_json(), tmp_path / "nope" / "g.html")


def test_feature_details_from_stats():
    """Labels, contexts and numbers for the graph's features that the statistics cover, computed from the
    FakeStats tables directly."""
    stats, tok = FakeStats(), FakeTokenizer()  # layers 3 and 5, 16 features each
    g = make_graph_json()
    g["nodes"].append(feature_node(3, 5, 9, 0.9, 1.0))
    details = feature_details_from_stats(g, stats, tok, n_contexts=2)
    # layers 0-2 have no statistics; 3/42 and 3/43 lie beyond the statistics' 16 features
    assert set(details) == {"3/9"}
    d = details["3/9"]
    assert d["label"] == feature_label(stats, tok, 3, 9)
    assert d["max"] == pytest.approx(float(stats.max(3)[9])) and d["frequency"] == pytest.approx(float(stats.frequency(3)[9]))
    ctx = stats.top_contexts(3, 9)
    assert len(d["top_contexts"]) == 2
    first, second = d["top_contexts"]
    # a window of 16 tokens before and 6 after the max-activating one, each decoded on its own
    assert first["tokens"] == [tok.decode([i]) for i in ctx[0].token_ids[4:27]] and first["index"] == 16
    assert second["tokens"] == [tok.decode([i]) for i in ctx[1].token_ids] and second["tokens"][second["index"]] == HOSTILE
    assert [c["activation"] for c in d["top_contexts"]] == pytest.approx([c.activation for c in ctx])
    assert labels_from_details(details) == {(3, 9): d["label"]}
    assert set(page_data(g, {**details, "2/1": {"label": "not on the page"}})["details"]) == {"3/9"}


def test_feature_that_never_fired_has_no_label():
    class Silent(FakeStats):
        def top_contexts(self, layer, feature):
            return [] if feature == 9 else super().top_contexts(layer, feature)

        def top_tokens(self, layer, feature, n=3):
            return [] if feature == 9 else super().top_tokens(layer, feature, n)

    details = feature_details_from_stats([(3, 9), (3, 8)], Silent(), FakeTokenizer())
    assert details["3/9"]["label"] == "" and details["3/9"]["top_contexts"] == [] and details["3/8"]["label"]
    assert labels_from_details(details) == {(3, 8): details["3/8"]["label"]}


def test_top_features_by_cumulative_influence():
    g = make_graph_json()
    feats = [n for n in g["nodes"] if n["feature_type"] == "cross layer transcoder"]
    expected = sorted(feats, key=lambda n: n["influence"])[:4]  # smaller cumulative influence ranks higher
    top = top_features(g, 4)
    assert [f"{f['layer']}_{f['feature']}_{f['position']}" for f in top] == [n["node_id"] for n in expected]
    into_paris = {x["source"]: x["weight"] for x in g["links"] if x["target"] == "5_801_5"}  # the target logit
    for f, n in zip(top, expected):
        assert f["to_logit"] == into_paris.get(n["node_id"]) and f["token"] == TOKENS[n["ctx_idx"]]
        assert (f["activation"], f["label"]) == (n["activation"], n["clerp"])


def test_template_ships_with_the_package():
    tomllib = pytest.importorskip("tomllib")
    root = Path(__file__).resolve().parent.parent
    data = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["sparse_clt_hf"]
    assert "graph_view_template.html" in data and (root / "sparse_clt_hf" / "graph_view_template.html").is_file()


# ---------------------------------------------------------------------------- in a browser
class GraphDom(HTMLParser):
    """Nodes, edges and the panel's link lists of a dumped page."""

    def __init__(self):
        super().__init__()
        self.nodes: list[dict] = []
        self.edges: list[dict] = []
        self.lists: dict[str, list[str]] = {}
        self.current: str | None = None
        self.depth = 0
        self.panel_text: list[str] = []
        self.in_panel = 0
        self.body: dict = {}
        self.dashboard_links: list[dict] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        classes = (a.get("class") or "").split()
        if tag == "a" and "dashboard" in classes:
            self.dashboard_links.append(a)
        if tag == "body":
            self.body = a
        if tag == "g" and "node" in classes and "data-id" in a:
            self.nodes.append(a)
        if tag == "path" and "edge" in classes:
            self.edges.append(a)
        if tag == "ul" and a.get("id"):
            self.current = a["id"]
            self.lists[self.current] = []
        if tag == "li" and self.current:
            self.lists[self.current].append(a.get("data-id"))
        if a.get("id") == "panel":
            self.in_panel = 1
        elif self.in_panel and tag not in ("wbr", "br"):
            self.in_panel += 1

    def handle_endtag(self, tag):
        if tag == "ul":
            self.current = None
        if self.in_panel and tag not in ("wbr", "br"):
            self.in_panel -= 1

    def handle_data(self, data):
        if self.in_panel:
            self.panel_text.append(data)


def dump(path, fragment: str = "") -> GraphDom:
    out = run_chromium("--dump-dom", path.resolve().as_uri() + fragment)
    p = GraphDom()
    p.feed(out)
    assert p.body.get("data-ready") == "1", "the page script did not finish"
    assert "<img" not in out
    return p


def test_browser_draws_every_node_and_edge(tmp_path):
    g = make_graph_json()
    p = dump(graph_html(g, tmp_path / "g.html"))
    assert [a["data-id"] for a in p.nodes] == [n["node_id"] for n in g["nodes"]]
    signs = {(x["source"], x["target"]): ("pos" if x["weight"] >= 0 else "neg") for x in g["links"]}
    assert {(e["data-source"], e["data-target"]): e["class"].split()[1] for e in p.edges} == signs
    # every node sits in its token's column and its layer's row: same ctx_idx -> same column band, rows ordered
    xy = {a["data-id"]: tuple(map(float, re.match(r"translate\(([-\d.]+),([-\d.]+)\)", a["transform"]).groups()))
          for a in p.nodes}
    rows = {}
    for n in g["nodes"]:
        row = 0 if n["layer"] == "E" else int(n["layer"]) + 1
        rows.setdefault(row, set()).add(xy[n["node_id"]][1])
    assert all(len(ys) == 1 for ys in rows.values())
    ys = [rows[r].pop() for r in sorted(rows)]
    assert ys == sorted(ys, reverse=True)  # embeddings at the bottom, logits on top
    cols = {}
    for n in g["nodes"]:
        if n["feature_type"] != "logit":
            cols.setdefault(n["ctx_idx"], []).append(xy[n["node_id"]][0])
    spans = [(min(v), max(v)) for _, v in sorted(cols.items())]
    assert all(a[1] < b[0] for a, b in zip(spans, spans[1:]))  # columns left to right, not overlapping
    # the logits (all at the last position) in a line, most likely first, the last one above the last column
    logits = sorted((n for n in g["nodes"] if n["feature_type"] == "logit"), key=lambda n: -n["token_prob"])
    xs = [xy[n["node_id"]][0] for n in logits]
    assert xs == sorted(xs) and xs[-1] >= spans[-1][0] and xs[0] > 0
    # the start panel lists the explained logits, most likely first
    assert p.lists["logits"] == [n["node_id"] for n in g["nodes"] if n["feature_type"] == "logit"]


def test_browser_selects_node_from_address(tmp_path):
    g = make_graph_json()
    details = {"3/42": {"label": "capital cities", "top_contexts": [{"tokens": ["in", " Paris", "."], "index": 1,
                                                                     "activation": 5.5}], "max": 8.0}}
    path = graph_html(g, tmp_path / "g.html", feature_details=details)
    p = dump(path, "#node=3_42_5")
    selected = [a["data-id"] for a in p.nodes if "selected" in a["class"].split()]
    assert selected == ["3_42_5"]
    incoming = sorted((x for x in g["links"] if x["target"] == "3_42_5"), key=lambda x: -abs(x["weight"]))
    outgoing = sorted((x for x in g["links"] if x["source"] == "3_42_5"), key=lambda x: -abs(x["weight"]))
    assert p.lists["inputs"] == [x["source"] for x in incoming]  # strongest first, by absolute weight
    assert p.lists["outputs"] == [x["target"] for x in outgoing]
    text = "".join(p.panel_text)
    assert "capital cities" in text and "L3/42" in text and "activation 6.000" in text.replace("\xa0", " ")
    assert "75%" in text  # activation 6 of its max 8
    assert "Max-activating contexts" in text and "·Paris" in text
    # only the selected node's edges are highlighted
    hl = {(e["data-source"], e["data-target"]) for e in p.edges if "hl" in e["class"].split()}
    assert hl == {(x["source"], x["target"]) for x in incoming + outgoing}


def test_browser_unknown_node_in_address_selects_nothing(tmp_path):
    p = dump(graph_html(make_graph_json(), tmp_path / "g.html"), "#node=nope")
    assert not [a for a in p.nodes if "selected" in a["class"].split()] and "logits" in p.lists


DRIVER = """<script>
(function () {
  const rec = (name, value) => { document.body.dataset[name] = value; };
  const hovered = document.querySelector('g.node[data-id="2_99_4"]');
  hovered.dispatchEvent(new MouseEvent("mouseenter"));
  rec("hoverLit", document.querySelectorAll("path.edge.hl").length + "|" + location.hash);
  hovered.dispatchEvent(new MouseEvent("mouseleave"));
  rec("leaveLit", document.querySelectorAll("path.edge.hl").length);
  document.querySelector('g.node[data-id="2_99_4"]').dispatchEvent(new MouseEvent("click", { bubbles: true }));
  document.querySelector('g.node[data-id="E_101_1"]').dispatchEvent(new MouseEvent("mouseenter"));
  rec("hoverWhileSelected", document.querySelector("g.node.selected").dataset.id);
  rec("afterClick", location.hash);
  rec("firstInput", document.querySelector("#inputs li").dataset.id);
  document.querySelector('#outputs li[data-id="3_42_5"]').click();
  rec("afterFollow", location.hash + "|" + document.querySelector("g.node.selected").dataset.id);
  document.dispatchEvent(new KeyboardEvent("keydown", { key: "Escape" }));
  rec("afterEscape", location.hash + "|" + document.querySelectorAll("g.node.selected").length);
})();
</script>
</body>"""


def test_browser_click_follow_and_escape(tmp_path):
    """The page's own handlers, driven by events dispatched from an injected script."""
    path = graph_html(make_graph_json(), tmp_path / "g.html")
    path.write_text(path.read_text(encoding="utf-8").replace("</body>", DRIVER), encoding="utf-8")
    out = run_chromium("--dump-dom", path.resolve().as_uri())
    attrs = dict(re.findall(r'data-([a-z-]+)="([^"]*)"', re.search(r"<body[^>]*>", out).group(0)))
    assert attrs["ready"] == "1"
    # hovering previews a node's edges (2 inputs, 2 outputs) without selecting it; a selection stays put
    assert attrs["hover-lit"] == "4|" and attrs["leave-lit"] == "0"
    assert attrs["after-click"] == "#node=2_99_4" and attrs["hover-while-selected"] == "2_99_4"
    assert attrs["first-input"] == "1_13_3"  # weight 1.2 beats the embedding's 0.9
    assert attrs["after-follow"] == "#node=3_42_5|3_42_5"
    assert attrs["after-escape"] == "|0"


HOSTILE_SITE = '../my "site" </script><b>&amp;</b>/'


def test_browser_links_a_feature_to_its_dashboard_page(tmp_path):
    g = make_graph_json()
    path = graph_html(g, tmp_path / "g.html", dashboard=HOSTILE_SITE)
    p = dump(path, "#node=3_42_5")
    # the dashboard site's route for a feature page (sparse_clt_hf/dashboard/site.py): feature.html#L{layer}/{feature}
    assert [(a["href"], a.get("target")) for a in p.dashboard_links] == [
        ('../my "site" </script><b>&amp;</b>/feature.html#L3/42', "_blank")]
    assert "<b>" not in "".join(p.panel_text)
    assert dump(path, "#node=0_2_3").dashboard_links == []  # an error node has no dashboard page
    assert dump(path, "#node=E_101_1").dashboard_links == []
    assert dump(graph_html(g, tmp_path / "plain.html"), "#node=3_42_5").dashboard_links == []
    site = "https://example.org/dash"
    assert [a["href"] for a in dump(graph_html(g, tmp_path / "u.html", dashboard=site + "/"), "#node=1_7_4")
            .dashboard_links] == [site + "/feature.html#L1/7"]


@pytest.mark.parametrize("site", ["javascript:alert(1)", " JavaScript:alert(1)", "data:text/html,<b>x</b>", "vbscript:x"])
def test_a_dashboard_url_that_would_run_code_is_refused(tmp_path, site):
    with pytest.raises(ValueError, match="expected a folder or an http"):
        graph_html(make_graph_json(), tmp_path / "g.html", dashboard=site)
    assert not (tmp_path / "g.html").exists()


def test_dashboard_folders_and_web_addresses_are_kept():
    assert [dashboard_site(s) for s in ("site", "../site/", "C:\\sites\\dash\\", "file:///tmp/site/", "http://h/d")] == [
        "site", "../site", "C:\\sites\\dash", "file:///tmp/site", "http://h/d"]
    assert dashboard_site(None) is None and dashboard_site("/") == "/"


def test_browser_screenshot_not_blank(tmp_path):
    path = graph_html(make_graph_json(), tmp_path / "g.html", title="The capital of France")
    shot = tmp_path / "shot.png"
    run_chromium(f"--screenshot={shot}", "--window-size=1280,800", path.resolve().as_uri() + "#node=3_42_5")
    data = shot.read_bytes()
    assert struct.unpack(">II", data[16:24]) == (1280, 800)
    assert png_pixels_vary(data)

