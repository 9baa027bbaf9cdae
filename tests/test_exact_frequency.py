"""Exact frequencies of chosen features (dense encoding over an extraction's tokens) against dense
activations read with plain hooks and the textbook encoder formula, window by window; refusals of
other models, transcoders and bad features before any forward pass."""

from __future__ import annotations

import gzip
import json
import re
import shutil

import pytest
import torch
from conftest import random_transcoder
from test_extract import DOCS, TOP_K, reference_features, setup  # noqa: F401  (fixture)
from tiny_models import tiny_model

from sparse_clt_hf import cli, load_extracted
from sparse_clt_hf.dashboard.exact import EXACT_FILE, exact_frequency, load_exact
from sparse_clt_hf.dashboard.site import DashboardError

FEATURES = [(0, 3), (0, 17), (1, 0), (1, 47), (2, 5), (2, 63)]


@pytest.fixture(scope="module")
def extraction(setup):  # noqa: F811
    out = setup["root"] / "exact"
    args = ["extract", "--model", str(setup["model"]), "--clt", str(setup["clt"]), "--data", str(setup["data"]),
            "--out", str(out), "--top-k", str(TOP_K), "--seq-len", "16", "--batch-size", "3", "--shard-size", "4",
            "--no-progress"]
    assert cli.main(args) == 0
    return out


@pytest.fixture(scope="module")
def model(setup):  # noqa: F811
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(setup["model"])).eval()


def _cantor(a: int, b: int) -> int:
    return (a + b) * (a + b + 1) // 2 + b


def reference_counts(setup, features):  # noqa: F811
    """Active positions of each feature by dense encoding of plain-hook hidden states, document by document."""
    counts = dict.fromkeys(features, 0)
    for text in DOCS:
        _, dense = reference_features(setup, text)
        for layer, f in features:
            if dense[layer] is not None:
                counts[(layer, f)] += int((dense[layer][:, f] != 0).sum())
    return counts


def test_exact_counts_equal_dense_encoding(setup, extraction, model):  # noqa: F811
    got = exact_frequency(model, setup["clt"], extraction, FEATURES + ["L1/47"], progress=False)
    ref = reference_counts(setup, FEATURES)
    feats = load_extracted(extraction)
    assert [(e.layer, e.feature) for e in got] == FEATURES
    for e in got:
        assert e.count == ref[(e.layer, e.feature)], (e.layer, e.feature)
        li = feats.layers.index(e.layer)
        assert e.recorded == int(((feats.indices[:, :, li] == e.feature) & feats.mask[:, :, None]).sum())
        assert e.n_positions == int(feats.mask.sum())
        assert e.recorded <= e.count
    assert any(e.recorded < e.count for e in got)  # top-5 of about half the features: the counts differ
    assert load_exact(extraction) == got
    # a second call merges into the file
    exact_frequency(model, setup["tc"], extraction, ["0/1"], progress=False)
    assert [(e.layer, e.feature) for e in load_exact(extraction)] == sorted(FEATURES + [(0, 1)])


def test_topk_and_jumprelu_activity_matches_dense_encode():
    """feature_activity: the features' activity as the dense activation has it, TopK membership included."""
    x = torch.randn(40, 32, generator=torch.Generator().manual_seed(1))
    cols = torch.tensor([0, 5, 9, 31, 63])
    for activation, k in (("relu", None), ("jumprelu", None), ("topk", 7)):
        tc = random_transcoder(activation=activation, k=k, layers=(0,), seed=2)
        z, active = tc.feature_activity(x, 0, cols)
        dense = tc.encode(x, 0)
        assert torch.equal(active, dense[:, cols] != 0), activation
        assert torch.allclose(z, tc.pre_activations(x, 0)[:, cols], atol=1e-6)
        assert active.any() and not active.all()


@pytest.mark.parametrize("features,match", [
    (["9/1"], "layer 9 is not in the extraction"),
    (["1/48"], "layer 1 has 48 features"),
    (["1-2"], "feature '1-2'"),
    ([(1, -1)], "non-negative integers"),
    ([], "no features given"),
])
def test_bad_features_are_refused_before_any_forward(setup, extraction, model, features, match, monkeypatch):  # noqa: F811
    monkeypatch.setattr(model, "forward", lambda *a, **k: pytest.fail("forward ran"))
    with pytest.raises(DashboardError, match=match):
        exact_frequency(model, setup["clt"], extraction, features, progress=False)


def test_another_transcoder_or_model_is_refused(setup, extraction, model, tmp_path, monkeypatch):  # noqa: F811
    other = random_transcoder(d=32, layers=(0, 1, 2), widths=[64, 48, 64], seed=4)
    other.config.model_name = None
    with pytest.raises(DashboardError, match="not the one .* was extracted with"):
        exact_frequency(model, other, extraction, ["0/3"], progress=False)
    other_model = tiny_model("llama", seed=5)
    monkeypatch.setattr(other_model, "forward", lambda *a, **k: pytest.fail("forward ran"))
    with pytest.raises(DashboardError, match="this model is not the one"):
        exact_frequency(other_model, setup["clt"], extraction, ["0/3"], progress=False)


def test_recomputation_disagreeing_with_the_extraction_is_refused(setup, extraction, model, tmp_path):  # noqa: F811
    """Without fingerprints (an older manifest), a model whose activations differ is caught by the
    recorded entries themselves, naming the feature and the position."""
    folder = tmp_path / "old"
    shutil.copytree(extraction, folder)
    (folder / EXACT_FILE).unlink(missing_ok=True)
    manifest = json.loads((folder / "manifest.json").read_text())
    del manifest["inputs"]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    shifted = random_transcoder(d=32, layers=(0, 1, 2), widths=[64, 48, 64], seed=3)
    shifted.config.model_name = None
    with torch.no_grad():
        shifted.encoder(1).b_enc.add_(0.5)
    with pytest.raises(DashboardError, match=r"feature 1/\d+ at document \d+ position \d+: the extraction recorded"):
        exact_frequency(model, shifted, folder, [(1, f) for f in range(48)], progress=False)
    assert not (folder / EXACT_FILE).exists()


def test_stats_command_exact_option(setup, extraction, capsys):  # noqa: F811
    assert cli.main(["stats", str(extraction), "--json", "--exact", "0/3,2/5", "--model", str(setup["model"]),
                     "--clt", str(setup["clt"]), "--device", "cpu"]) == 0
    out = json.loads(capsys.readouterr().out)
    ref = reference_counts(setup, [(0, 3), (2, 5)])
    assert [(e["layer"], e["feature"], e["count"]) for e in out["exact"]] == [(0, 3, ref[(0, 3)]), (2, 5, ref[(2, 5)])]


def test_dashboard_page_shows_the_exact_frequency(setup, extraction, model, tmp_path):  # noqa: F811
    from test_view import run_chromium

    found = exact_frequency(model, setup["clt"], extraction, [(2, f) for f in range(64)], progress=False)
    e = max((x for x in found if x.recorded), key=lambda x: x.count - x.recorded)
    assert e.count > e.recorded > 0
    site = tmp_path / "site"
    assert cli.main(["dashboard", str(extraction), "--out", str(site), "--model", str(setup["model"]),
                     "--circuit-tracer", str(tmp_path / "ct"), "--neuronpedia", str(tmp_path / "np")]) == 0
    # the exports carry the exact frequency where it is known, the recorded one elsewhere
    (ct,) = [json.loads(p.read_text()) for p in (tmp_path / "ct").rglob("*.json")
             if json.loads(p.read_text())["index"] == _cantor(2, e.feature)]
    assert ct["activation_frequency"] == pytest.approx(e.frequency) != pytest.approx(e.recorded_frequency)
    records = [json.loads(line) for p in (tmp_path / "np").rglob("features/batch-*.jsonl.gz")
               for line in gzip.decompress(p.read_bytes()).decode().splitlines()]
    (rec,) = [r for r in records if r["layer"].startswith("2-") and int(r["index"]) == e.feature]
    assert rec["frac_nonzero"] == pytest.approx(e.frequency)
    other = [r for r in records if r["layer"].startswith("2-") and int(r["index"]) != e.feature]
    assert all(r["frac_nonzero"] <= 1 for r in other) and len(other) == 63
    dom = run_chromium("--dump-dom", (site / "feature.html").resolve().as_uri() + f"#L2/{e.feature}")
    shown = re.search(rf"exact frequency ([0-9.]+)% \({e.count} of {e.n_positions} positions, by dense encoding", dom)
    assert shown and float(shown.group(1)) == pytest.approx(100 * e.count / e.n_positions, rel=5e-3)
    assert f"the recorded top-k saw {e.recorded})" in dom
    assert "stats DIR --exact L/F" in dom
    (extraction / EXACT_FILE).unlink()
    assert cli.main(["dashboard", str(extraction), "--out", str(site), "--model", str(setup["model"])]) == 0
    dom = run_chromium("--dump-dom", (site / "feature.html").resolve().as_uri() + f"#L2/{e.feature}")
    assert "exact frequency" not in dom and "frequency" in dom
