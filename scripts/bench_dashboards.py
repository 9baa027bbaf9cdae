"""Bench for feature dashboards (issue 21), on synthetic top-k features shaped like the demo's statistics
corpus (16,384 tokens = 128 rows of 128, 4 layers of 2048 features, k 32) and on one 16k-feature layer:

- ``stats`` time vs ``stats --dashboard`` time, side by side in one run (median of --repeat, alternating);
- site build time for 16,384 features (target: under a minute on CPU).

Usage: ``python scripts/bench_dashboards.py [--repeat 3] [--json]``. Prints one line per measure."""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from sparse_clt_hf import Features
from sparse_clt_hf.dashboard import dashboard_stats
from sparse_clt_hf.dashboard.site import build_site
from sparse_clt_hf.feature_stats import feature_stats


def synthetic(rows: int, seq: int, widths: list[int], k: int, seed: int = 0) -> Features:
    """Top-k features with a heavy-tailed feature frequency (Zipf-like) and exponential activations; the
    k features of a position are distinct, as in an extraction (Gumbel top-k: sampling without
    replacement)."""
    g = torch.Generator().manual_seed(seed)
    n_layers = len(widths)
    idx = torch.empty(rows, seq, n_layers, k, dtype=torch.int32)
    for li, m in enumerate(widths):
        log_w = -0.8 * torch.arange(1, m + 1, dtype=torch.float64).log()
        perm = torch.randperm(m, generator=g)
        for r in range(rows):
            gumbel = -(-torch.rand(seq, m, generator=g, dtype=torch.float64).clamp_min(1e-300).log()).log()
            choice = (log_w + gumbel).topk(k, dim=1).indices
            idx[r, :, li] = perm[choice].int()
    values = torch.empty(rows, seq, n_layers, k).exponential_(generator=g).sort(-1, descending=True).values
    l0 = torch.full((rows, seq, n_layers), k)
    mask = torch.ones(rows, seq, dtype=torch.bool)
    tokens = torch.randint(0, 49152, (rows, seq), generator=g)
    return Features(idx, values, l0, mask, list(range(n_layers)), tokens, list(widths))


class Vocab:
    def batch_decode(self, ids):
        return [f"tok{i[0]}" for i in ids]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    feats = synthetic(128, 128, [2048] * 4, 32)
    t_stats, t_dash = [], []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        feature_stats(feats, top_n=10, context=8)
        t_stats.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        dashboard_stats(feats, top_n=10, context=8)
        t_dash.append(time.perf_counter() - t0)
    s, d = statistics.median(t_stats), statistics.median(t_dash)
    big = synthetic(128, 128, [16384], 32, seed=1)
    ds = dashboard_stats(big, top_n=10, context=8)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        build_site(ds, tmp, Vocab())
        t_site = time.perf_counter() - t0
        site_mb = sum(p.stat().st_size for p in Path(tmp).rglob("*") if p.is_file()) / 2**20
    out = {"stats_s": round(s, 3), "stats_dashboard_s": round(d, 3), "ratio": round(d / s, 2),
           "site_16k_features_s": round(t_site, 2), "site_mb": round(site_mb, 1), "torch_threads": torch.get_num_threads()}
    if args.json:
        print(json.dumps(out))
    else:
        print(f"stats {s:.2f} s, stats with dashboards {d:.2f} s: {d / s:.2f}x (16,384 tokens, 4 x 2048 features, k 32)")
        print(f"site build, 16,384 features: {t_site:.1f} s, {site_mb:.0f} MiB")


if __name__ == "__main__":
    main()
