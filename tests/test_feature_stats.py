"""feature_stats against a brute-force computation (Python loops over Features.to_records()), on
in-memory features (ties, left and right padding, layers of different widths) and on an extraction
folder streamed shard by shard (documents split across windows and shards)."""

from __future__ import annotations

import json
from collections import Counter, defaultdict

import pytest
import torch
from conftest import random_transcoder
from test_extract import DOCS, char_tokenizer
from tiny_models import tiny_model

from sparse_clt_hf import Features, FeatureStats, cli, feature_stats, load_extracted
from sparse_clt_hf import extracted as extract_mod
from sparse_clt_hf.feature_stats import FeatureStatsError


def brute_force(feats: Features, top_n: int, context: int):
    """{(layer, feature): dict(count, mean, max, contexts=[(activation, doc, pos, window, index)])}."""
    hits = defaultdict(list)
    for r in feats.to_records():
        hits[(r["layer"], r["feature"])].append((r["activation"], r["batch"], r["position"]))
    valid = {(b, t) for b, t in feats.mask.nonzero().tolist()}
    out = {}
    for li, layer in enumerate(feats.layers):
        for f in range(feats.n_features[li]):
            h = hits.get((layer, f), [])
            top = sorted(h, key=lambda x: (-x[0], x[1], x[2]))[:top_n]
            contexts = []
            for act, d, p in top:
                window = [q for q in range(p - context, p + context + 1) if (d, q) in valid]
                contexts.append((act, d, p, [int(feats.token_ids[d, q]) for q in window], window.index(p)))
            out[(layer, f)] = {
                "count": len(h),
                "mean": sum(a for a, _, _ in h) / len(h) if h else 0.0,
                "max": max((a for a, _, _ in h), default=0.0),
                "contexts": contexts,
            }
    return out, len(valid)


def brute_top_tokens(contexts, n):
    tokens = [w[i] for _, _, _, w, i in contexts]
    counts = Counter(tokens)
    return sorted(counts, key=lambda t: (-counts[t], tokens.index(t)))[:n]


def assert_matches_brute_force(stats: FeatureStats, feats: Features, top_n: int, context: int) -> None:
    ref, n_positions = brute_force(feats, top_n, context)
    assert stats.n_positions == n_positions
    assert stats.layers == feats.layers and stats.n_features == feats.n_features
    for li, layer in enumerate(feats.layers):
        m = feats.n_features[li]
        count, mean, mx, freq = stats.count(layer), stats.mean(layer), stats.max(layer), stats.frequency(layer)
        assert count.shape == mean.shape == mx.shape == freq.shape == (m,)
        for f in range(m):
            r = ref[(layer, f)]
            assert int(count[f]) == r["count"], (layer, f)
            assert float(freq[f]) == pytest.approx(r["count"] / n_positions)
            assert float(mean[f]) == pytest.approx(r["mean"], rel=1e-6, abs=1e-9)
            assert float(mx[f]) == pytest.approx(r["max"], rel=1e-6)
            got = [(c.activation, c.document, c.position, c.token_ids, c.index)
                   for c in stats.top_contexts(layer, f)]
            assert len(got) == len(r["contexts"])
            for g, e in zip(got, r["contexts"]):
                assert g[0] == pytest.approx(e[0], rel=1e-6) and g[1:] == e[1:], (layer, f, g, e)
            assert stats.top_tokens(layer, f) == brute_top_tokens(r["contexts"], 3)
            assert stats.top_tokens(layer, f, n=1) == brute_top_tokens(r["contexts"], 1)


def random_features(seed: int = 0) -> Features:
    """Top-k features with ties (activations from a small set), rows with left and right padding,
    empty slots, and two layers of different widths."""
    g = torch.Generator().manual_seed(seed)
    b, t, widths, k = 5, 14, [9, 6], 3
    indices = torch.full((b, t, 2, k), -1, dtype=torch.int32)
    values = torch.zeros((b, t, 2, k))
    for i in range(b):
        for j in range(t):
            for li, m in enumerate(widths):
                n = int(torch.randint(0, k + 1, (1,), generator=g))
                indices[i, j, li, :n] = torch.randperm(m, generator=g)[:n].int()
                vals = (torch.randint(1, 5, (n,), generator=g) * 0.5).sort(descending=True).values
                values[i, j, li, :n] = vals
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[1, :4] = False  # left padding
    mask[2, 9:] = False  # right padding
    mask[4, :] = False  # an empty row
    token_ids = torch.randint(0, 6, (b, t), generator=g)
    l0 = (indices >= 0).sum(-1)
    return Features(indices, values, l0, mask, [3, 7], token_ids, widths)


@pytest.mark.parametrize("top_n,context", [(4, 2), (1, 0), (50, 20)])
def test_in_memory_features_match_brute_force(top_n, context):
    feats = random_features()
    stats = feature_stats(feats, top_n=top_n, context=context)
    assert_matches_brute_force(stats, feats, top_n, context)


@pytest.fixture(scope="module")
def extracted(tmp_path_factory):
    root = tmp_path_factory.mktemp("stats")
    tiny_model("llama").save_pretrained(root / "model")
    char_tokenizer().save_pretrained(root / "model")
    tc = random_transcoder(d=32, layers=(0, 2), widths=[40, 24], site="resid_mid", seed=5)
    tc.config.model_name = None
    tc.save_pretrained(root / "clt")
    data = root / "docs.txt"
    data.write_text("\n".join(DOCS))
    out = root / "out"
    assert cli.main(["extract", "--model", str(root / "model"), "--clt", str(root / "clt"), "--data", str(data),
                     "--out", str(out), "--top-k", "4", "--seq-len", "8", "--batch-size", "2", "--shard-size", "3",
                     "--no-progress"]) == 0
    return out


def test_streamed_extraction_matches_brute_force(extracted, monkeypatch):
    feats = load_extracted(extracted)  # the reference reads everything at once
    assert json.loads((extracted / "manifest.json").read_text())["n_shards"] > 4
    monkeypatch.setattr(extract_mod, "load_extracted", lambda *a: pytest.fail("stats must stream the shards"))
    stats = feature_stats(extracted, top_n=5, context=6)
    assert_matches_brute_force(stats, feats, 5, 6)
    # contexts cross window (and shard) boundaries: a window is 8 tokens, a context up to 13
    assert any(len(c.token_ids) > 8 for layer in stats.layers for f in range(stats.n_features[stats.layers.index(layer)])
               for c in stats.top_contexts(layer, f))
    loaded = FeatureStats.load(extracted / "stats.safetensors")
    assert_matches_brute_force(loaded, feats, 5, 6)
    assert FeatureStats.load(extracted).n_positions == stats.n_positions


def test_save_and_load_round_trip(tmp_path):
    stats = feature_stats(random_features(1), top_n=3, context=2)
    stats.save(tmp_path / "s.safetensors")
    back = FeatureStats.load(tmp_path / "s.safetensors")
    assert (back.layers, back.n_features, back.n_positions, back.top_n, back.context) == (
        stats.layers, stats.n_features, stats.n_positions, 3, 2)
    for layer in stats.layers:
        for fn in ("count", "frequency", "mean", "max"):
            assert torch.equal(getattr(back, fn)(layer), getattr(stats, fn)(layer))
        assert back.top_contexts(layer, 0) == stats.top_contexts(layer, 0)


def test_stats_command(extracted, capsys):
    (extracted / "stats.safetensors").unlink(missing_ok=True)
    assert cli.main(["stats", str(extracted), "--top-n", "2", "--context", "1", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    stats = FeatureStats.load(extracted)
    assert stats.top_n == 2 and stats.context == 1
    assert [entry["layer"] for entry in report["layers"]] == [0, 2]
    for entry in report["layers"]:
        freq = stats.frequency(entry["layer"])
        assert entry["alive"] == int((freq > 0).sum())
        assert entry["most_frequent"][0]["frequency"] == pytest.approx(float(freq.max()), abs=1e-6)
    assert cli.main(["stats", str(extracted)]) == 0
    assert "features fired" in capsys.readouterr().out


def test_errors(tmp_path, capsys):
    feats = random_features()
    feats.token_ids = None
    with pytest.raises(FeatureStatsError, match="token_ids"):
        feature_stats(feats)
    with pytest.raises(FeatureStatsError, match="top_n"):
        feature_stats(random_features(), top_n=0)
    with pytest.raises(ValueError, match="manifest.json"):
        feature_stats(tmp_path)
    with pytest.raises(FeatureStatsError, match="does not exist"):
        FeatureStats.load(tmp_path)
    stats = feature_stats(random_features(), top_n=2, context=1)
    with pytest.raises(KeyError, match="layer 5"):
        stats.frequency(5)
    with pytest.raises(KeyError, match="out of range"):
        stats.top_contexts(7, 6)
    assert cli.main(["stats", str(tmp_path)]) == 1
    assert "manifest.json" in capsys.readouterr().err
