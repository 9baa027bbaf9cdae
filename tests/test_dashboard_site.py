"""The dashboard command end to end on a tiny extraction: the site's data against the statistics and
a dense logit matmul, the pages in headless chromium (index sorted, feature page examples, hostile
token text inert), the exports against circuit-tracer's reader and Neuronpedia's published fields,
the demo's dashboards, and bad input refused before any work."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import pytest
import torch
from conftest import random_transcoder
from test_extract import DOCS, char_tokenizer
from test_view import png_pixels_vary, run_chromium
from tiny_models import tiny_model

from sparse_clt_hf import cli
from sparse_clt_hf.dashboard import DashboardStats, dashboard_stats
from sparse_clt_hf.dashboard.exports import cantor
from sparse_clt_hf.dashboard.site import DashboardError, build_site
from sparse_clt_hf.view import feature_label

HOSTILE = "</script><img src=x onerror=alert(1)>"


def read_js(path: Path):
    text = path.read_text(encoding="ascii")
    m = re.fullmatch(r'DASH\.put\("([^"]+)",(.*)\);\n', text, re.S)
    assert m, text[:80]
    return m.group(1), json.loads(m.group(2))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("dash")
    model = tiny_model("llama")
    model.save_pretrained(root / "model")
    char_tokenizer().save_pretrained(root / "model")
    tc = random_transcoder(d=model.config.hidden_size, layers=(0, 2), widths=[40, 24], site="resid_mid", seed=5,
                           decoders=True)
    tc.config.model_name = None
    tc.save_pretrained(root / "clt")
    (root / "docs.txt").write_text("\n".join(DOCS))
    ext = root / "ext"
    assert cli.main(["extract", "--model", str(root / "model"), "--clt", str(root / "clt"), "--data",
                     str(root / "docs.txt"), "--out", str(ext), "--top-k", "4", "--seq-len", "8", "--batch-size", "2",
                     "--shard-size", "3", "--no-progress"]) == 0
    site, np_dir, ct_dir = root / "site", root / "np", root / "ct"
    assert cli.main(["dashboard", str(ext), "--out", str(site), "--clt", str(root / "clt"), "--model",
                     str(root / "model"), "--logits", "5", "--bins", "8", "--quantiles", "3", "--samples", "2",
                     "--neuronpedia", str(np_dir), "--circuit-tracer", str(ct_dir), "--scan", "tiny-clt", "--json"]) == 0
    return root, ext, site, np_dir, ct_dir


def test_site_data_matches_statistics_and_dense_logits(built):
    root, ext, site, _, _ = built
    ds = DashboardStats.load(ext)
    assert (ds.bins, ds.quantiles, ds.samples) == (8, 3, 2)
    from transformers import AutoModelForCausalLM

    from sparse_clt_hf import CrossLayerTranscoder

    W_U = AutoModelForCausalLM.from_pretrained(root / "model").get_output_embeddings().weight.detach().double()
    tc = CrossLayerTranscoder.from_pretrained(root / "clt", decoders=True)
    tok = char_tokenizer()
    _, meta = read_js(site / "data" / "meta.js")
    assert [entry["layer"] for entry in meta["layers"]] == [0, 2]
    for li, layer in enumerate(ds.layers):
        name, index = read_js(site / "data" / f"L{layer}" / "index.js")
        assert name == f"L{layer}" and index["count"] == ds.base.count(layer).tolist()
        assert index["label"] == [feature_label(ds.base, tok, layer, f) if c else ""  # dead features: no label
                                  for f, c in enumerate(index["count"])]
        dense = tc.encoder(layer).W_dec.double().sum(1) @ W_U.T  # [m, vocab] at once
        for f in range(ds.base.n_features[li]):
            _, chunk = read_js(site / "data" / f"L{layer}" / f"c{f // 256}.js")
            rec = chunk["features"][str(f)]
            hist, used = ds.histogram(layer, f).tolist(), ds.used_bins(layer, f)
            assert rec["h"] == hist[:used] and not any(hist[used:])  # the bins above the max are empty
            edges = ds.bin_edges(layer, f).tolist()
            assert rec["w"] == pytest.approx(edges[1] - edges[0], rel=1e-3)
            assert len(rec["ex"]) == len(ds.examples(layer, f))
            for e, got in zip(ds.examples(layer, f), rec["ex"]):
                assert got[0] == e.group and got[3] == e.token_ids and got[2] == e.index
                assert got[4] == pytest.approx(e.acts, rel=0, abs=5.01e-4 * float(ds.base.max(layer)[f]))
            assert [i for i, _ in rec["lt"]] == dense[f].argsort(descending=True)[:5].tolist()
            assert [i for i, _ in rec["lb"]] == dense[f].argsort()[:5].tolist()
            for i in [i for i, _ in rec["lt"]] + [t for e in rec["ex"] for t in e[3]]:
                assert str(i) in chunk["vocab"]


def _alive(ds: DashboardStats, layer: int) -> int:
    return int(ds.base.count(layer).argmax())


def test_pages_in_chromium(built, tmp_path):
    _, ext, site, _, _ = built
    ds = DashboardStats.load(ext)
    dom = run_chromium("--dump-dom", (site / "index.html").resolve().as_uri() + "#L2&sort=max")
    rows = [int(x) for x in re.findall(r'<tr data-feature="(\d+)"', dom)]
    mx = ds.base.max(2)
    assert len(rows) == ds.base.n_features[1]
    assert rows == sorted(range(len(mx)), key=lambda i: (-float(mx[i]), -i))
    dom = run_chromium("--dump-dom", (site / "index.html").resolve().as_uri() + "#L2&sort=id&asc=1&q=freq%3E0.05")
    rows = [int(x) for x in re.findall(r'<tr data-feature="(\d+)"', dom)]
    assert rows == [i for i, fr in enumerate(ds.base.frequency(2).tolist()) if fr > 0.05] and rows
    f = _alive(ds, 2)
    dom = run_chromium("--dump-dom", (site / "feature.html").resolve().as_uri() + f"#L2/{f}")
    assert 'id="error"' not in dom
    assert dom.count('class="ex"') == len(ds.examples(2, f))
    assert f"L2/{f}" in dom and "raises" in dom
    assert dom.count('class="tok hit"') == len(ds.examples(2, f))
    shot = tmp_path / "feature.png"
    run_chromium(f"--screenshot={shot}", "--window-size=1100,900", (site / "feature.html").resolve().as_uri() + f"#L2/{f}")
    assert png_pixels_vary(shot.read_bytes())


def test_exports(built):
    _, ext, _, np_dir, ct_dir = built
    ds = DashboardStats.load(ext)
    try:  # circuit-tracer's own reader, where installed (pip install --no-deps circuit-tracer)
        from circuit_tracer.frontend.feature_models import Model as ct_model
    except ImportError:
        ct_model = None
    files = sorted((ct_dir / "features" / "tiny-clt").glob("*.json"))
    assert len(files) == sum(ds.base.n_features)
    f = _alive(ds, 2)
    rec = json.loads((files[0].parent / f"{cantor(2, f)}.json").read_text())
    assert set(rec) == {"transcoder_id", "index", "examples_quantiles", "top_logits", "bottom_logits", "act_min",
                        "act_max", "quantile_values", "histogram", "activation_frequency"}
    assert rec["index"] == cantor(2, f) and rec["histogram"] == [float(c) for c in ds.histogram(2, f).tolist()][: ds.used_bins(2, f)]
    assert rec["act_max"] == pytest.approx(float(ds.base.max(2)[f]))
    assert rec["activation_frequency"] == pytest.approx(float(ds.base.frequency(2)[f]))
    assert len(rec["quantile_values"]) == 100 and len(rec["top_logits"]) == 5
    if ct_model is not None:
        for path in files:
            ct_model.model_validate_json(path.read_text())
    # Neuronpedia: the field names of its Feature and Activation records (neuronpedia-utils db_models)
    feature_fields = {"modelId", "layer", "index", "creatorId", "createdAt", "maxActApprox", "hasVector", "vector",
                      "vectorLabel", "vectorDefaultSteerStrength", "hookName", "topkCosSimIndices", "topkCosSimValues",
                      "neuron_alignment_indices", "neuron_alignment_values", "neuron_alignment_l1",
                      "correlated_neurons_indices", "correlated_neurons_pearson", "correlated_neurons_l1",
                      "correlated_features_indices", "correlated_features_pearson", "correlated_features_l1",
                      "neg_str", "neg_values", "pos_str", "pos_values", "frac_nonzero", "freq_hist_data_bar_heights",
                      "freq_hist_data_bar_values", "logits_hist_data_bar_heights", "logits_hist_data_bar_values",
                      "decoder_weights_dist"}
    activation_fields = {"id", "tokens", "index", "layer", "modelId", "maxValue", "maxValueTokenIndex", "minValue",
                         "values", "creatorId", "dataSource", "dataIndex", "dfaValues", "dfaTargetIndex",
                         "dfaMaxValue", "createdAt", "lossValues", "logitContributions", "binMin", "binMax",
                         "binContains", "qualifyingTokenIndex"}
    (model_dir,) = list(np_dir.iterdir())
    sources = sorted(p.name for p in model_dir.iterdir())
    assert [s.split("-")[0] for s in sources] == ["0", "2"]
    n_features = n_acts = 0
    for src in sources:
        for name in ("model.jsonl", "source.jsonl", "sourceset.jsonl", "release.jsonl"):
            json.loads((model_dir / src / name).read_text())
        for path in (model_dir / src / "features").glob("batch-*.jsonl.gz"):
            for line in gzip.decompress(path.read_bytes()).decode().splitlines():
                row = json.loads(line)
                assert set(row) == feature_fields
                n_features += 1
        for path in (model_dir / src / "activations").glob("batch-*.jsonl.gz"):
            for line in gzip.decompress(path.read_bytes()).decode().splitlines():
                row = json.loads(line)
                assert set(row) == activation_fields and len(row["tokens"]) == len(row["values"])
                n_acts += 1
    assert n_features == sum(ds.base.n_features)
    assert n_acts == sum(len(ds.examples(layer, f)) for li, layer in enumerate(ds.layers)
                         for f in range(ds.base.n_features[li]))


class HostileTokenizer:
    def decode(self, ids, **_):
        return "".join(HOSTILE if int(i) == 3 else f"t{int(i)}" for i in ids)


def test_hostile_token_text_is_inert(tmp_path):
    from test_feature_stats import random_features

    feats = random_features(2)
    ds = dashboard_stats(feats, top_n=3, context=2, bins=4, quantiles=2, samples=2)
    build_site(ds, tmp_path / "s", HostileTokenizer(), title=HOSTILE)
    f = next(f for f in range(9) if any(3 in e.token_ids for e in ds.examples(3, f)))
    dom = run_chromium("--dump-dom", (tmp_path / "s" / "feature.html").resolve().as_uri() + f"#L3/{f}")
    assert "<img" not in dom and "&lt;/script&gt;&lt;img src=x onerror=alert(1)&gt;" in dom
    dom = run_chromium("--dump-dom", (tmp_path / "s" / "index.html").resolve().as_uri() + "#L3")
    assert "<img" not in dom and "onerror=alert(1)&gt;" in dom


def test_bad_input_is_refused_before_work(built, tmp_path):
    root, ext, _, _, _ = built
    out = tmp_path / "site"
    other = random_transcoder(d=tiny_model("llama").config.hidden_size, layers=(0, 2), widths=[40, 30], decoders=True)
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(DashboardError, match=r"computed with transcoder .*clt.*not .*other"):
        from sparse_clt_hf.dashboard.build import build_dashboard

        build_dashboard(ext, out, clt=str(tmp_path / "other"), model=str(root / "model"))
    with pytest.raises(DashboardError, match=r"computed on model .*model.*not .*elsewhere"):
        build_dashboard(ext, out, model=str(tmp_path / "elsewhere"))
    assert not out.exists()
    (tmp_path / "file").write_text("x")
    assert cli.main(["dashboard", str(ext), "--out", str(tmp_path / "file" / "site")]) == 1
    assert cli.main(["dashboard", str(ext), "--out", str(out), "--circuit-tracer", str(tmp_path / "file")]) == 1
    assert cli.main(["dashboard", str(tmp_path), "--out", str(out)]) == 1
    assert not out.exists()
    # statistics without token ids
    folder = tmp_path / "copy"
    folder.mkdir()
    ds = DashboardStats.load(ext)
    ds.base.save(folder / "stats.safetensors")
    ds._t["example_tokens"].fill_(-1)
    ds.save(folder / "dashboard.safetensors")
    with pytest.raises(DashboardError, match="no token ids"):
        build_dashboard(folder, out, tokenizer=str(root / "model"))
    # statistics recorded without a transcoder name: the widths still tell another transcoder apart
    manifest = json.loads((ext / "manifest.json").read_text())
    (folder / "manifest.json").write_text(json.dumps({**manifest, "transcoder": None}))
    with pytest.raises(DashboardError, match="24 features in layer 2; transcoder .*other has 30"):
        build_dashboard(folder, out, clt=str(tmp_path / "other"), model=str(root / "model"))
    assert not out.exists()


def test_demo_dashboard(tmp_path, monkeypatch):
    from sparse_clt_hf import demo

    model = tiny_model("llama")
    tok = char_tokenizer()
    tc = random_transcoder(d=model.config.hidden_size, layers=(0, 1), widths=[40, 40], site="resid_mid",
                           decoders=True)
    tc.save_pretrained(tmp_path / "demo")
    monkeypatch.setenv(demo.DEMO_ENV, str(tmp_path / "demo"))
    monkeypatch.setattr(demo, "load_model", lambda ref: (model, tok, "tiny"))
    monkeypatch.setitem(demo.DEMO_STATS, "tokens", 256)
    monkeypatch.setitem(demo.DEMO_STATS, "seq_len", 32)
    assert cli.main(["demo", "--dashboard", str(tmp_path / "site"), "--no-progress", "--json"]) == 0
    assert (tmp_path / "demo" / "dashboard.safetensors").is_file()
    assert (tmp_path / "site" / "data" / "L1" / "c0.js").is_file()
    _, chunk = read_js(tmp_path / "site" / "data" / "L0" / "c0.js")
    assert any("lt" in rec for rec in chunk["features"].values())
    # second time: from the cached statistics, without DIR
    import sparse_clt_hf.dashboard.demo as demo_dash

    monkeypatch.setattr(demo_dash, "dashboard_stats", lambda *a, **k: pytest.fail("must reuse the cached statistics"))
    assert cli.main(["dashboard", "--out", str(tmp_path / "site2"), "--json"]) == 0
    assert (tmp_path / "site2" / "data" / "L0" / "c0.js").read_text() == (tmp_path / "site" / "data" / "L0" / "c0.js").read_text()


def test_token_view_links_to_the_dashboard(tmp_path):
    from test_view import FakeTokenizer, make_features

    feats, seq = make_features()
    build_site(dashboard_stats(feats, top_n=2, context=1, bins=4, quantiles=2, samples=1), tmp_path / "site",
               FakeTokenizer())
    page = feats.to_html(tmp_path / "view.html", FakeTokenizer(), sequences=seq, dashboard="site")
    f = int(feats.indices[0, 3, 0, 0])
    dom = run_chromium("--dump-dom", page.resolve().as_uri() + f"#t=3&f=3/{f}")
    (href,) = re.findall(r'<a class="dashboard" href="([^"]+)"', dom)
    assert href == f"site/feature.html#L3/{f}"
    target, fragment = href.split("#")
    dom = run_chromium("--dump-dom", (tmp_path / target).resolve().as_uri() + "#" + fragment)
    assert 'id="error"' not in dom and f"L3/{f}" in dom and 'class="ex"' in dom


def test_demo_dashboard_before_the_demo_ran(tmp_path, monkeypatch, capsys):
    from sparse_clt_hf import demo

    monkeypatch.setenv(demo.DEMO_ENV, str(tmp_path / "nothing"))
    monkeypatch.setattr(demo, "load_model", lambda ref: pytest.fail("must fail before loading the model"))
    assert cli.main(["dashboard", "--out", str(tmp_path / "site")]) == 1
    assert "not fitted yet" in capsys.readouterr().err
    assert not (tmp_path / "site").exists()


def _tensors_and_metadata(path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        return load_file(str(path)), f.metadata()


def test_dashboard_keeps_the_statistics_already_computed(built, tmp_path):
    import shutil

    from sparse_clt_hf import FeatureStats, feature_stats

    _, ext, _, _, _ = built
    copy = tmp_path / "ext"
    shutil.copytree(ext, copy)
    (copy / "dashboard.safetensors").unlink()
    feature_stats(copy, top_n=3, context=2)  # `stats DIR --top-n 3 --context 2`
    before = _tensors_and_metadata(copy / "stats.safetensors")
    assert cli.main(["dashboard", str(copy), "--out", str(tmp_path / "site"), "--tokenizer",
                     str(ext.parent / "model")]) == 0
    after = _tensors_and_metadata(copy / "stats.safetensors")  # written again by the same pass, unchanged
    assert after[1] == before[1] and after[0].keys() == before[0].keys()
    assert all(torch.equal(after[0][k], before[0][k]) for k in before[0])
    ds = DashboardStats.load(copy)
    assert (ds.base.top_n, ds.base.context) == (3, 2) and FeatureStats.load(copy).top_n == 3
