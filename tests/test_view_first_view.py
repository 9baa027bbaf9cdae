"""The HTML view as a newcomer first meets it (issue 20 items 2-4, issue 23's page items): the first shading
varies and means something, L0 is never offered where it is constant, steers are named and marked, bars
beyond the feature's corpus max stay proportional, the unsteered run sits beside the steered one, the
template is filled in one pass, and a page without positions takes arrow keys. Browser checks run in headless
chromium (skipped without it) with a script appended to the page that records what the page shows."""

from __future__ import annotations

import html
import json
import math
import re

import pytest
import torch
from test_view import FakeStats, FakeTokenizer, embedded, make_features, run_chromium

from sparse_clt_hf import Features
from sparse_clt_hf.view import DATA_ID, page_data

PROBE = """<script>
window.__errors = [];
window.addEventListener("error", e => window.__errors.push(String(e.message)));
window.addEventListener("load", () => {
  const rec = (name, value) => { document.body.dataset[name] = value; };
  const q = s => document.querySelector(s);
  const toks = [...document.querySelectorAll("#text .tok")].filter(s => !s.classList.contains("unrec"));
  rec("legendMin", q("#legend-min").textContent);
  rec("legendMax", q("#legend-max").textContent);
  rec("mode", q("#mode").value);
  rec("modes", [...q("#mode").options].map(o => o.value).join(","));
  rec("shades", JSON.stringify(toks.map(s => s.style.background)));
  rec("info", q("#runinfo").hidden ? "" : q("#runinfo").textContent);
  rec("bars", JSON.stringify([...document.querySelectorAll("tr.feat-row")].map(tr => [
    tr.dataset.layer + "/" + tr.dataset.feature, tr.classList.contains("steered"),
    parseFloat(tr.querySelector(".bar").style.width)])));
  rec("ticks", String(document.querySelectorAll(".barcell .tick").length));
  __ACTIONS__
  rec("errors", window.__errors.join("|") || "none");
});
</script>
</body>"""


def probe(path, fragment: str = "", actions: str = "") -> dict[str, str]:
    """Open the page in chromium with PROBE appended; the body's data attributes it recorded."""
    text = path.read_text(encoding="utf-8")
    path.write_text(text.replace("</body>", PROBE.replace("__ACTIONS__", actions)), encoding="utf-8")
    out = run_chromium("--dump-dom", path.resolve().as_uri() + fragment)
    body = re.search(r"<body[^>]*>", out).group(0)
    attrs = {k: html.unescape(v) for k, v in re.findall(r'data-([a-z-]+)="([^"]*)"', body)}
    assert attrs.get("ready") == "1", "the page script did not finish"
    return attrs


def topk_features() -> tuple[Features, torch.Tensor]:
    """As a TopK transcoder records: the same L0 (8) at every position of every layer."""
    feats, seq = make_features()
    feats.l0 = torch.full_like(feats.l0, 8)
    return feats, seq


# ---------------------------------------------------------------------------- the first view
@pytest.mark.parametrize("with_stats", [True, False])
def test_first_view_shading_varies_and_is_not_a_constant_l0(tmp_path, with_stats):
    feats, seq = topk_features()
    stats = FakeStats() if with_stats else None
    path = feats.to_html(tmp_path / "v.html", FakeTokenizer(), stats, sequences=seq, prompt_len=5)
    got = probe(path)
    assert got["errors"] == "none"
    shades = [s for s in json.loads(got["shades"])]
    assert len(set(shades)) >= 3, f"the first view is (nearly) one colour: {shades}"
    assert got["legend-min"] != got["legend-max"].split(" ")[0]
    modes = got["modes"].split(",")
    assert not any(m.startswith("l0") for m in modes), f"L0 offered although constant: {modes}"
    if with_stats:
        # each token's strongest feature as a share of that feature's corpus max
        assert got["mode"] == "share" and got["legend-max"].startswith("100% ") and "corpus max" in got["legend-max"]
    else:
        assert got["mode"] == "act:0" and got["legend-max"].endswith("top activation, layer 3")
        top = float(got["legend-max"].split(" ")[0])
        expected = max(float(feats.values[0, t, 0].max()) for t in range(feats.num_positions))
        assert top == pytest.approx(expected, abs=0.01)


def test_first_view_share_is_computed_from_the_stats(tmp_path):
    """The share the page shades by, read back from the tooltips, against max(value / feature max) here."""
    feats, seq = make_features()
    stats = FakeStats()
    path = feats.to_html(tmp_path / "v.html", FakeTokenizer(), stats, sequences=seq, prompt_len=5)
    got = probe(path, actions='rec("titles", JSON.stringify(toks.map(s => s.title)));')
    titles = json.loads(got["titles"])
    for t, title in enumerate(titles):
        expected = max(float(feats.values[0, t, li, j]) / float(stats.max(layer)[int(feats.indices[0, t, li, j])])
                       for li, layer in enumerate(feats.layers) for j in range(feats.k)
                       if feats.indices[0, t, li, j] >= 0) if (feats.indices[0, t] >= 0).any() else 0.0
        assert title.endswith(f" {round(100 * expected)}%"), (t, title)


def test_l0_offered_where_it_varies(tmp_path):
    feats, seq = make_features()  # L0 differs between positions in both layers
    got = probe(feats.to_html(tmp_path / "v.html", FakeTokenizer(), sequences=seq))
    modes = got["modes"].split(",")
    assert {"l0", "l0:0", "l0:1"} <= set(modes) and got["mode"] != "l0"


# ---------------------------------------------------------------------------- steering on the page
def steered_features() -> tuple[Features, torch.Tensor, FakeStats, float]:
    """Row 0 with feature 3 of layer 3 at 440% of its corpus max at position 3 and 2067% at position 4."""
    feats, seq = make_features()
    stats = FakeStats()
    fmax = float(stats.max(3)[3])
    for t, share in ((3, 4.4), (4, 20.67)):
        feats.indices[0, t, 0, 0] = 3
        feats.values[0, t, 0, 0] = share * fmax
    return feats, seq, stats, fmax


def test_steered_page_names_the_steer_and_scales_bars_beyond_the_max(tmp_path):
    feats, seq, stats, _ = steered_features()
    steers = [{"layer": 3, "feature": 3, "value": 40.0, "mode": "clamp", "positions": "all", "targets": [3, 4]}]
    path = feats.to_html(tmp_path / "s.html", FakeTokenizer(), stats, sequences=seq, prompt_len=5, steers=steers)
    assert embedded(path.read_text(encoding="utf-8"))["steers"] == [
        {"layer": 3, "feature": 3, "value": 40.0, "mode": "clamp", "positions": "all"}]
    widths = {}
    for t in (3, 4):
        got = probe(path, f"#t={t}")
        assert got["errors"] == "none"
        assert "Steered: L3/3 clamped to 40.0" in got["info"]
        bars = json.loads(got["bars"])
        assert int(got["ticks"]) == len(bars)  # the 100% tick on every bar with statistics
        marked = [name for name, is_steered, _ in bars if is_steered]
        assert marked == ["3/3"]
        widths[t] = next(w for name, _, w in bars if name == "3/3")
        path = feats.to_html(tmp_path / "s.html", FakeTokenizer(), stats, sequences=seq, prompt_len=5, steers=steers)
    # 100% of the max sits at 60% of the track, each further 10x adds 20%
    assert widths[3] == pytest.approx(60 + 20 * math.log10(4.4), abs=0.2)
    assert widths[4] == pytest.approx(60 + 20 * math.log10(20.67), abs=0.2)
    assert widths[4] - widths[3] > 10


def test_bars_are_linear_when_nothing_exceeds_the_max(tmp_path):
    feats, seq = make_features()
    stats = FakeStats()  # every max is above every activation here
    got = probe(feats.to_html(tmp_path / "b.html", FakeTokenizer(), stats, sequences=seq), "#t=3")
    bars = json.loads(got["bars"])
    expected = [100 * float(v) / float(stats.max(layer)[int(f)]) for li, layer in enumerate(feats.layers)
                for f, v in zip(feats.indices[0, 3, li], feats.values[0, 3, li]) if f >= 0]
    assert [w for _, _, w in bars] == pytest.approx([max(1.0, e) for e in expected], abs=0.1)
    assert got["ticks"] == "0"  # no 100% tick: the track is 0-100%


def test_compare_page_shows_both_runs(tmp_path):
    feats, seq, stats, _ = steered_features()
    base, base_seq = make_features()
    base_seq = base_seq.clone()
    base_seq[0, -1] = 13  # the unsteered run wrote "!" last instead of " sat"
    steers = [{"layer": 3, "feature": 3, "value": 40.0}]
    path = feats.to_html(tmp_path / "c.html", FakeTokenizer(), stats, sequences=seq, prompt_len=5, steers=steers,
                         baseline=base, baseline_sequences=base_seq)
    data = embedded(path.read_text(encoding="utf-8"))
    assert [tk["id"] for tk in data["baseline"]["tokens"]] == base_seq[0].tolist()
    assert data["vocab"]["13"] == "!"
    got = probe(path)
    assert "steered" in got["info"] and "without the steers" in got["info"]
    assert " the cat\n sat" in got["info"] and " the cat\n!" in got["info"]
    assert "diverge at #8" in got["info"]
    # the baseline run is inspectable: its own tokens and features, no steer marks
    got = probe(feats.to_html(tmp_path / "c.html", FakeTokenizer(), stats, sequences=seq, prompt_len=5,
                              steers=steers, baseline=base, baseline_sequences=base_seq), "#run=1&t=3")
    bars = json.loads(got["bars"])
    expected = [f"{feats.layers[li]}/{int(f)}" for li in range(2) for f in base.indices[0, 3, li].tolist() if f >= 0]
    assert [name for name, _, _ in bars] == expected and not any(s for _, s, _ in bars)


def test_every_shading_and_both_runs_work(tmp_path):
    """Every option of the shading selector and of the run selector, chosen as a user would: no script error,
    and each shading names itself in the legend."""
    feats, seq, stats, _ = steered_features()
    base, base_seq = make_features()
    path = feats.to_html(tmp_path / "m.html", FakeTokenizer(), stats, sequences=seq, prompt_len=5,
                         steers=[{"layer": 3, "feature": 3, "value": 40.0}], baseline=base, baseline_sequences=base_seq)
    actions = """const legends = [];
  const run = q("#run"), mode = q("#mode");
  for (const r of ["0", "1"]) {
    run.value = r; run.dispatchEvent(new Event("change"));
    for (const o of [...mode.options].filter(o => !o.disabled)) {
      mode.value = o.value; mode.dispatchEvent(new Event("change"));
      legends.push(r + "|" + o.value + "|" + q("#legend-max").textContent);
    }
    document.querySelector("#text .tok").click();
    document.querySelector("tr.feat-row").click();
    legends.push(r + "|feat|" + q("#legend-max").textContent + "|" + location.hash);
  }
  rec("legends", JSON.stringify(legends));"""
    got = probe(path, actions=actions)
    assert got["errors"] == "none"
    legends = json.loads(got["legends"])
    names = {"share": "strongest feature, share of its corpus max", "act:0": "top activation, layer 3",
             "share:1": "strongest in layer 5, share of its max"}
    for entry in legends:
        run, mode, legend = entry.split("|")[:3]
        if mode in names:
            assert legend.endswith(names[mode]), entry
    assert any(e.startswith("1|feat|") and "|#run=1&t=0&f=" in e for e in legends)  # the address names the run


def test_baseline_must_have_the_same_layers():
    feats, seq = make_features()
    other = Features(feats.indices[:, :, :1], feats.values[:, :, :1], feats.l0[:, :, :1], feats.mask, [3],
                     feats.token_ids, [16])
    with pytest.raises(ValueError, match="baseline layers"):
        page_data(feats, FakeTokenizer(), sequences=seq, baseline=other, baseline_sequences=seq)
    with pytest.raises(ValueError, match="steers"):
        page_data(feats, FakeTokenizer(), sequences=seq, steers=[{"layer": 3}])


# ---------------------------------------------------------------------------- issue 23: the template and 0 tokens
@pytest.mark.parametrize("title", ["__DATA__", "__DATA_ID__", "__TITLE__", "a __DATA__ b"])
def test_title_equal_to_a_marker_stays_a_title(tmp_path, title):
    feats, seq = make_features()
    text = feats.to_html(tmp_path / "t.html", FakeTokenizer(), sequences=seq, title=title).read_text(encoding="utf-8")
    assert re.search(r"<title>(.*?)</title>", text).group(1) == title
    assert embedded(text)["title"] == title and f'id="{DATA_ID}"' in text
    assert text.count('"version":1') == 1  # the data appears once, in its own block


def test_zero_token_page_takes_arrow_keys(tmp_path):
    empty = Features(torch.zeros(1, 0, 2, 4, dtype=torch.int32), torch.zeros(1, 0, 2, 4), torch.zeros(1, 0, 2, dtype=torch.long),
                     torch.zeros(1, 0, dtype=torch.bool), [3, 5], torch.zeros(1, 0, dtype=torch.long), [16, 16])
    path = empty.to_html(tmp_path / "e.html", FakeTokenizer())
    keys = """for (const key of ["ArrowRight", "ArrowLeft", "ArrowRight", "Escape"])
    document.dispatchEvent(new KeyboardEvent("keydown", { key }));
  rec("afterKeys", location.hash || "-");"""
    got = probe(path, actions=keys)
    assert got["errors"] == "none" and got["after-keys"] == "-"
