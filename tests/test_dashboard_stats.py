"""Dashboard statistics (histograms, quantile groups, sampled examples with windows) against a
brute-force computation over Features.to_records(), in memory and streamed from an extraction."""

from __future__ import annotations

import math
from collections import defaultdict

import pytest
import torch
from test_feature_stats import extracted, random_features  # noqa: F401  (fixture)

from sparse_clt_hf import Features, load_extracted
from sparse_clt_hf import extracted as extract_mod
from sparse_clt_hf.dashboard import DashboardStats, dashboard_stats, density_histogram
from sparse_clt_hf.dashboard.stats import priority
from sparse_clt_hf.feature_stats import FeatureStatsError


def _hash(d: int, p: int, key: int) -> int:
    """The sample priority, written out with Python integers (no overflow to emulate)."""
    def mix(x):
        for _ in range(2):
            x = ((x >> 16) ^ x) * 0x45D9F3B % 2**32
        return (x >> 16) ^ x

    h = mix(mix(d * 0x9E3779B1 % 2**32) ^ (p % 2**32)) ^ mix((key * 0x85EBCA6B + 0x165667B1) % 2**32)
    return h * 0x9E3779B1 % 2**32


def brute(feats: Features, bins: int, quantiles: int, samples: int, context: int):
    hits = defaultdict(list)
    for r in feats.to_records():
        hits[(r["layer"], r["feature"])].append((r["activation"], r["batch"], r["position"]))
    valid = {(b, t) for b, t in feats.mask.nonzero().tolist()}
    recorded = {(r["layer"], r["feature"], r["batch"], r["position"]): r["activation"] for r in feats.to_records()}
    m = max(feats.n_features)
    out = {}
    for li, layer in enumerate(feats.layers):
        for f in range(feats.n_features[li]):
            h = hits.get((layer, f), [])
            mx = max((float(torch.tensor(a, dtype=torch.float32)) for a, _, _ in h), default=0.0)
            top = 2.0 ** (math.floor(math.log2(mx)) + 1) if mx > 0 else 0.0  # smallest power of two above max
            while mx > 0 and top / 2 > mx:  # guard log2 rounding
                top /= 2
            while top <= mx and mx > 0:
                top *= 2

            def bin_of(a, top=top):  # exact: a * bins / top is a float product with a power of two
                return min(max(int(math.floor(a * bins / top)) if top > 0 else 0, 0), bins - 1)

            hist = [0] * bins
            for a, _, _ in h:
                hist[bin_of(a)] += 1
            n = len(h)
            acts = sorted(a for a, _, _ in h)
            if n:
                edges = [0] + [bin_of(acts[-(-g * n // quantiles) - 1]) + 1 for g in range(1, quantiles)] + [bins]
            else:
                edges = [0] * (quantiles + 1)
            groups = defaultdict(list)
            for a, d, p in h:
                b = bin_of(a)
                g = sum(1 for e in edges[1:quantiles] if e <= b)
                groups[g].append((_hash(d, p, li * m + f), d, p, a))
            sampled = {g: sorted(v)[:samples] for g, v in groups.items()}

            def window(d, p, layer=layer, f=f):
                qs = [q for q in range(p - context, p + context + 1) if (d, q) in valid]
                return ([int(feats.token_ids[d, q]) for q in qs], [recorded.get((layer, f, d, q), 0.0) for q in qs],
                        qs.index(p))

            out[(layer, f)] = dict(top=top, hist=hist, edges=edges, sampled=sampled, window=window, n=n)
    return out


def assert_matches(ds: DashboardStats, feats: Features, bins, quantiles, samples, context):
    ref = brute(feats, bins, quantiles, samples, context)
    for li, layer in enumerate(feats.layers):
        for f in range(feats.n_features[li]):
            r = ref[(layer, f)]
            assert ds.bin_edges(layer, f)[-1] == r["top"], (layer, f)
            assert ds.histogram(layer, f).tolist() == r["hist"], (layer, f)
            assert ds.quantile_edges(layer, f).tolist() == r["edges"], (layer, f)
            ex = ds.examples(layer, f)
            top = [e for e in ex if e.group == -1]
            assert [(e.document, e.position) for e in top] == [
                (c.document, c.position) for c in ds.base.top_contexts(layer, f)]
            for g in range(quantiles):
                got = [(e.document, e.position, e.activation) for e in ex if e.group == g]
                want = [(d, p, a) for _, d, p, a in r["sampled"].get(g, [])]
                assert [x[:2] for x in got] == [x[:2] for x in want], (layer, f, g)
                for (_, _, a), (_, _, b) in zip(got, want):
                    assert a == pytest.approx(b, rel=1e-6)
                lo, hi = ds.quantile_bounds(layer, f)[g]
                for _, _, a in got:  # each sample lies within its group's range
                    assert lo - 1e-6 <= a <= hi + 1e-6
            for e in ex:
                toks, acts, idx = r["window"](e.document, e.position)
                assert (e.token_ids, e.index) == (toks, idx)
                assert e.acts == pytest.approx(acts, rel=1e-6)
                assert e.acts[e.index] == pytest.approx(e.activation, rel=1e-6)


@pytest.mark.parametrize("bins,quantiles,samples,context", [(8, 4, 2, 2), (3, 1, 5, 0), (16, 5, 1, 4)])
def test_in_memory_matches_brute_force(bins, quantiles, samples, context):
    feats = random_features(2)
    ds = dashboard_stats(feats, top_n=3, context=context, bins=bins, quantiles=quantiles, samples=samples)
    assert_matches(ds, feats, bins, quantiles, samples, context)


def test_streamed_extraction_matches_brute_force(extracted, monkeypatch):  # noqa: F811
    feats = load_extracted(extracted)
    monkeypatch.setattr(extract_mod, "load_extracted", lambda *a: pytest.fail("must stream the shards"))
    ds = dashboard_stats(extracted, top_n=4, context=5, bins=10, quantiles=4, samples=2)
    assert_matches(ds, feats, 10, 4, 2, 5)
    back = DashboardStats.load(extracted)
    assert_matches(back, feats, 10, 4, 2, 5)


def test_priority_matches_python_integers():
    d, p, k = torch.tensor([0, 5, 2**31 + 7]), torch.tensor([3, 2**32 - 1, 0]), torch.tensor([0, 99, 3_000_000])
    assert priority(d, p, k).tolist() == [_hash(*x) for x in zip(d.tolist(), p.tolist(), k.tolist())]


def test_density_histogram_counts_every_feature():
    feats = random_features(3)
    ds = dashboard_stats(feats, top_n=2, context=1)
    for li, layer in enumerate(feats.layers):
        dens = density_histogram(ds.base, layer, bins=7)
        freq = ds.base.frequency(layer)
        assert sum(dens["counts"]) + dens["dead"] == feats.n_features[li]
        assert dens["dead"] == int((freq == 0).sum())
        for fr in freq[freq > 0].tolist():
            b = min(int((max(math.log10(fr), -7) + 7) / 7 * 7), 6)
            assert dens["counts"][b] > 0


def test_percentiles_are_monotone_and_within_range():
    ds = dashboard_stats(random_features(4), top_n=2, context=1, bins=8)
    for layer in ds.layers:
        for f in range(ds.base.n_features[ds.layers.index(layer)]):
            pct = ds.percentiles(layer, f)
            assert len(pct) == 100 and pct == sorted(pct)
            assert pct[-1] <= float(ds.base.max(layer)[f]) + 1e-6


def test_errors(tmp_path):
    feats = random_features()
    feats.token_ids = None
    with pytest.raises(FeatureStatsError, match="token_ids"):
        dashboard_stats(feats)
    with pytest.raises(FeatureStatsError, match="bins"):
        dashboard_stats(random_features(), bins=0)
    with pytest.raises(FeatureStatsError, match="dashboard.safetensors"):
        DashboardStats.load(tmp_path)


def test_exact_frequency_report():
    feats = random_features(5)
    ds = dashboard_stats(feats, top_n=2, context=1)
    assert all(ds.exact(layer)["exact"] for layer in ds.layers)  # l0 never above the recorded k
    feats.l0[0, 3, 1] = 7  # more active features than the 3 recorded, at a valid position
    feats.l0[0, 4, 1] = 5
    feats.l0[1, 0, 1] = 9  # padding: not counted
    ds = dashboard_stats(feats, top_n=2, context=1)
    assert ds.exact(3) == {"exact": True, "truncated": 0, "max_l0": int(feats.l0[..., 0][feats.mask].max()),
                           "recorded_k": 3}
    assert ds.exact(7) == {"exact": False, "truncated": 2, "max_l0": 7, "recorded_k": 3}


def test_stats_command_with_dashboard(extracted, capsys):  # noqa: F811
    from sparse_clt_hf import cli

    assert cli.main(["stats", str(extracted), "--dashboard", "--bins", "6", "--quantiles", "2", "--samples", "1",
                     "--json"]) == 0
    assert "dashboard.safetensors" in capsys.readouterr().out
    ds = DashboardStats.load(extracted)
    assert (ds.bins, ds.quantiles, ds.samples) == (6, 2, 1)
    assert_matches(ds, load_extracted(extracted), 6, 2, 1, ds.base.context)


def test_files_that_do_not_belong_together_are_refused(tmp_path):
    ds = dashboard_stats(random_features(6), top_n=3, context=2)
    ds.base.save(tmp_path / "stats.safetensors")
    ds.save(tmp_path / "dashboard.safetensors")
    assert DashboardStats.load(tmp_path).examples(3, 0) == ds.examples(3, 0)
    from sparse_clt_hf import feature_stats

    feature_stats(random_features(6), top_n=3, context=4).save(tmp_path / "stats.safetensors")
    with pytest.raises(FeatureStatsError, match="context 2.*does not belong.*context 4"):
        DashboardStats.load(tmp_path)


def test_priorities_of_one_feature_rarely_tie():
    """Priorities behave like random 32-bit numbers: over a 256 x 256 grid of (document, position) of
    one feature, ties are as rare as for random values (ties fall back to a slower exact order)."""
    d, p = torch.meshgrid(torch.arange(256), torch.arange(256), indexing="ij")
    prio = priority(d.reshape(-1), p.reshape(-1), torch.full((256 * 256,), 7))
    assert prio.min() >= 0 and prio.max() < 2**32
    assert 256 * 256 - torch.unique(prio).numel() <= 10  # random: about 0.5 expected


def test_features_sample_unrelated_positions():
    """Two features firing at the same positions get unrelated samples: the rank correlation of their
    priorities is near 0 and their 1% smallest barely overlap (about 1% of them by chance)."""
    d, p = torch.meshgrid(torch.arange(64), torch.arange(256), indexing="ij")
    d, p = d.reshape(-1), p.reshape(-1)
    for k1, k2 in [(7, 8), (0, 1), (5, 2053), (100, 101), (3, 999)]:
        r1 = priority(d, p, torch.full_like(d, k1)).argsort().argsort().double()
        r2 = priority(d, p, torch.full_like(d, k2)).argsort().argsort().double()
        assert abs(torch.corrcoef(torch.stack([r1, r2]))[0, 1]) < 0.03
        n = d.numel() // 100
        assert len(set(r1.topk(n, largest=False).indices.tolist()) & set(r2.topk(n, largest=False).indices.tolist())) < n // 10


def dense_features(seed: int, rows: int = 6, t: int = 40) -> Features:
    """Every slot recorded, 2 + 3 features for k = 2: hundreds of entries per (feature, bin), so the
    sample's threshold (about OVERSAMPLE * S per slot) is what selects; continuous activations."""
    g = torch.Generator().manual_seed(seed)
    widths, k = [3, 2], 2
    indices = torch.stack([torch.stack([torch.randperm(widths[li], generator=g)[:k] for li in range(2)])
                           for _ in range(rows * t)]).view(rows, t, 2, k).int()
    values = torch.rand(rows, t, 2, k, generator=g).sort(-1, descending=True).values * 5
    mask = torch.ones(rows, t, dtype=torch.bool)
    return Features(indices, values, torch.full((rows, t, 2), k), mask, [0, 1],
                    torch.randint(0, 9, (rows, t), generator=g), widths)


@pytest.mark.parametrize("oversample", [8, 1])
def test_threshold_sampling_is_exact_over_streamed_blocks(oversample, monkeypatch):
    """With many entries per slot, only entries below a per-slot threshold are looked at; a slot left
    with fewer than S below it (frequent with OVERSAMPLE = 1) takes all its entries. Either way the
    samples equal the brute force, in memory and over blocks with kept samples from earlier blocks."""
    from sparse_clt_hf.dashboard import accumulate

    monkeypatch.setattr(accumulate, "OVERSAMPLE", oversample)
    feats = dense_features(oversample)
    assert_matches(dashboard_stats(feats, top_n=2, context=1, bins=4, quantiles=2, samples=3), feats, 4, 2, 3, 1)
    rows, zero = torch.arange(feats.batch_size), torch.zeros(feats.batch_size, dtype=torch.int64)
    blocks = [(Features(feats.indices[a:b], feats.values[a:b], feats.l0[a:b], feats.mask[a:b], feats.layers,
                        feats.token_ids[a:b], feats.n_features), rows[a:b], zero[a:b]) for a, b in [(0, 2), (2, 3), (3, 6)]]
    acc = accumulate.DashboardAccumulator(feats.layers, feats.n_features, 2, 1, 4, 2, 3)
    for b in blocks:
        acc.update(*b)
    assert_matches(acc.finish(blocks), feats, 4, 2, 3, 1)


def test_blocks_with_a_growing_max_fold_bins_exactly():
    """Streamed in blocks whose activations grow (the max passes several powers of two, so the bins and
    their kept samples fold), with a feature that never fires positively: equal to the brute force."""
    from sparse_clt_hf.dashboard.accumulate import DashboardAccumulator

    feats = random_features(8)
    feats.values[2:] *= 3.0
    feats.values[4:] *= 7.0
    feats.values[(feats.indices == 4) & (torch.arange(2) == 0)[None, None, :, None]] = -0.5  # layer 3, feature 4
    rows = torch.arange(feats.batch_size)
    zero = torch.zeros(feats.batch_size, dtype=torch.int64)

    def block(a, b):
        f = Features(feats.indices[a:b], feats.values[a:b], feats.l0[a:b], feats.mask[a:b], feats.layers,
                     feats.token_ids[a:b], feats.n_features)
        return f, rows[a:b], zero[a:b]

    blocks = [block(0, 2), block(2, 4), block(4, 5)]
    acc = DashboardAccumulator(feats.layers, feats.n_features, 3, 2, 8, 4, 2)
    for b in blocks:
        acc.update(*b)
    ds = acc.finish(blocks)
    assert float(ds.bin_edges(3, 4)[-1]) == 0.0 and ds.histogram(3, 4).sum() == ds.histogram(3, 4)[0]
    assert_matches(ds, feats, 8, 4, 2, 2)
