"""Bench for feature dashboards (issue 21), on synthetic top-k features shaped like the demo's statistics
corpus (16,384 tokens = 128 rows of 128, 4 layers of 2048 features, k 32) and on one 16k-feature layer:

- ``stats`` time vs ``stats --dashboard`` time, side by side in one run (median of --repeat, alternating);
  with ``--baseline DIR`` also the ``stats`` of another checkout (e.g. the main branch) in the same loop;
- site build time for 16,384 features (target: under a minute on CPU);
- ``--memory``: peak RSS of streaming dashboard statistics over 4 and 16 blocks of 16,384 tokens (each
  block plays a shard; both passes), each size in a fresh process: flat in corpus size;
- ``--folder DIR`` (repeatable): the same side-by-side timing on a real extraction folder, read from disk
  as the commands do (e.g. the demo corpus: ``sparse-clt-hf extract --clt <demo transcoder> --data
  corpus.jsonl --seq-len 128 --batch-size 16 --max-docs 21 --out DIR``; nothing is saved);
- ``--command DIR``: the commands as a user runs them, each in a fresh process on a copy of DIR:
  ``sparse-clt-hf stats COPY --json`` vs ``... --dashboard`` (imports, tokenizer, labels and saving
  included), and the baseline checkout's ``stats`` command (``PYTHONPATH=<baseline>``).

Usage: ``python scripts/bench_dashboards.py [--repeat 3] [--baseline /path/to/checkout] [--memory]
[--folder DIR] [--command DIR] [--json]``."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import resource
import statistics
import subprocess
import sys
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


def baseline_stats(checkout: str):
    """``feature_stats`` and ``Features`` of another checkout, imported under another package name."""
    pkg = Path(checkout) / "sparse_clt_hf"
    spec = importlib.util.spec_from_file_location("baseline_sparse_clt_hf", pkg / "__init__.py",
                                                  submodule_search_locations=[str(pkg)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["baseline_sparse_clt_hf"] = module
    spec.loader.exec_module(module)
    return importlib.import_module("baseline_sparse_clt_hf.feature_stats").feature_stats, module.Features


def stream_block(i: int, seq: int = 128, rows: int = 128, widths=(2048,) * 4, k: int = 32):
    """Block ``i`` of a synthetic stream (documents ``i * rows ..``): distinct features per position."""
    g = torch.Generator().manual_seed(1000 + i)
    n_layers = len(widths)
    base = torch.randint(0, widths[0], (rows, seq, n_layers, 1), generator=g)
    idx = ((base + torch.arange(k) * 61) % widths[0]).int()
    values = torch.empty(rows, seq, n_layers, k).exponential_(generator=g).sort(-1, descending=True).values
    tokens = torch.randint(0, 49152, (rows, seq), generator=g)
    feats = Features(idx, values, torch.full((rows, seq, n_layers), k), torch.ones(rows, seq, dtype=torch.bool),
                     list(range(n_layers)), tokens, list(widths))
    return feats, torch.arange(i * rows, (i + 1) * rows), torch.zeros(rows, dtype=torch.int64)


def memory_run(n_blocks: int) -> dict:
    """Stream ``n_blocks`` blocks through the dashboard accumulator (both passes); peak RSS in MiB."""
    from sparse_clt_hf.dashboard.accumulate import DashboardAccumulator

    acc = DashboardAccumulator(list(range(4)), [2048] * 4, 10, 8, 32, 5, 3)
    for i in range(n_blocks):
        acc.update(*stream_block(i))
    ds = acc.finish(stream_block(i) for i in range(n_blocks))
    return {"blocks": n_blocks, "tokens": n_blocks * 128 * 128, "n_positions": ds.base.n_positions,
            "peak_rss_mib": peak_rss_mib()}


def peak_rss_mib() -> float:
    """This process's peak RSS: VmHWM (Linux; ru_maxrss would carry the parent's peak across fork+exec),
    else ru_maxrss."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def time_folder(directory: str, repeat: int, base_fs) -> dict:
    """``stats`` vs ``stats --dashboard`` (and the baseline's ``stats``) on an extraction folder, in one
    alternating loop, shards read from disk each time; medians."""
    from sparse_clt_hf.extract_folder import read_manifest

    runs: dict[str, list[float]] = {"stats_s": [], "stats_dashboard_s": [], "baseline_stats_s": []}
    calls = [("stats_s", lambda: feature_stats(directory, save=False)),
             ("stats_dashboard_s", lambda: dashboard_stats(directory, save=False))]
    if base_fs is not None:
        calls.insert(0, ("baseline_stats_s", lambda: base_fs(directory, save=False)))
    for _ in range(repeat):
        for name, call in calls:
            t0 = time.perf_counter()
            call()
            runs[name].append(time.perf_counter() - t0)
    out = {"folder": directory, "tokens": read_manifest(Path(directory))["n_tokens"]}
    out.update({k: round(statistics.median(v), 3) for k, v in runs.items() if v})
    out["ratio"] = round(out["stats_dashboard_s"] / out["stats_s"], 2)
    if base_fs is not None:
        out["ratio_to_baseline_stats"] = round(out["stats_dashboard_s"] / out["baseline_stats_s"], 2)
    return out


def time_command(directory: str, repeat: int, baseline: str | None) -> dict:
    """Wall time of ``python -m sparse_clt_hf stats COPY --json`` with and without ``--dashboard`` (and of
    the baseline checkout's command), alternating, each in a fresh process, on a copy of ``directory``
    (the commands write their statistics and the tokenizer there); medians. A first untimed run of
    each saves the tokenizer next to the shards, as the first `stats` on a folder does."""
    import os
    import shutil

    runs: dict[str, list[float]] = {"stats_s": [], "stats_dashboard_s": [], "baseline_stats_s": []}
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "extraction"
        shutil.copytree(directory, copy)
        here = str(Path(__file__).resolve().parents[1])
        calls = [("stats_s", here, []), ("stats_dashboard_s", here, ["--dashboard"])]
        if baseline:
            calls.insert(0, ("baseline_stats_s", baseline, []))
        for i in range(repeat + 1):
            for name, root, extra in calls:
                env = {**os.environ, "PYTHONPATH": root}
                t0 = time.perf_counter()
                subprocess.run([sys.executable, "-m", "sparse_clt_hf", "stats", str(copy), "--json", *extra],
                               check=True, capture_output=True, env=env)
                if i:
                    runs[name].append(time.perf_counter() - t0)
    out = {k: round(statistics.median(v), 3) for k, v in runs.items() if v}
    out["ratio"] = round(out["stats_dashboard_s"] / out["stats_s"], 2)
    if baseline:
        out["ratio_to_baseline_stats"] = round(out["stats_dashboard_s"] / out["baseline_stats_s"], 2)
    return out


class Vocab:
    def batch_decode(self, ids):
        return [f"tok{i[0]}" for i in ids]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--baseline", default=None, help="another checkout whose `stats` is timed in the same loop")
    ap.add_argument("--memory", action="store_true", help="also peak RSS over 4 and 16 streamed blocks")
    ap.add_argument("--folder", action="append", default=[], help="also time an extraction folder (repeatable)")
    ap.add_argument("--command", default=None, help="also time the stats command on a copy of this extraction")
    ap.add_argument("--memory-run", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_run is not None:
        print(json.dumps(memory_run(args.memory_run)))
        return
    feats = synthetic(128, 128, [2048] * 4, 32)
    base_fs = None
    if args.baseline:
        base_fs, base_features = baseline_stats(args.baseline)
        base_feats = base_features(feats.indices, feats.values, feats.l0, feats.mask, feats.layers, feats.token_ids,
                                   feats.n_features)
    t_stats, t_dash, t_base = [], [], []
    for _ in range(args.repeat):
        if base_fs is not None:
            t0 = time.perf_counter()
            base_fs(base_feats, top_n=10, context=8)
            t_base.append(time.perf_counter() - t0)
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
    if t_base:
        b = statistics.median(t_base)
        out.update(baseline_stats_s=round(b, 3), ratio_to_baseline_stats=round(d / b, 2))
    out["folders"] = [time_folder(d, args.repeat, base_fs) for d in args.folder]
    if args.command:
        out["command"] = time_command(args.command, args.repeat, args.baseline)
    if args.memory:
        out["memory"] = [json.loads(subprocess.run([sys.executable, __file__, "--memory-run", str(n)], check=True,
                                                   capture_output=True, text=True).stdout) for n in (4, 16)]
    if args.json:
        print(json.dumps(out))
    else:
        print(f"stats {s:.2f} s, stats with dashboards {d:.2f} s: {d / s:.2f}x (16,384 tokens, 4 x 2048 features, k 32)")
        print(f"site build, 16,384 features: {t_site:.1f} s, {site_mb:.0f} MiB")
        if t_base:
            print(f"baseline stats ({args.baseline}) {out['baseline_stats_s']:.2f} s: stats with dashboards are "
                  f"{out['ratio_to_baseline_stats']:.2f}x it")
        for f in out["folders"]:
            line = (f"{f['folder']} ({f['tokens']:,} tokens): stats {f['stats_s']:.2f} s, stats with dashboards "
                    f"{f['stats_dashboard_s']:.2f} s: {f['ratio']:.2f}x")
            if "baseline_stats_s" in f:
                line += f"; baseline stats {f['baseline_stats_s']:.2f} s: {f['ratio_to_baseline_stats']:.2f}x it"
            print(line)
        if "command" in out:
            c = out["command"]
            line = (f"commands on {args.command}: `stats` {c['stats_s']:.2f} s, `stats --dashboard` "
                    f"{c['stats_dashboard_s']:.2f} s: {c['ratio']:.2f}x")
            if "baseline_stats_s" in c:
                line += f"; baseline `stats` {c['baseline_stats_s']:.2f} s: {c['ratio_to_baseline_stats']:.2f}x it"
            print(line)
        for m in out.get("memory", []):
            print(f"streamed {m['tokens']:,} tokens ({m['blocks']} blocks): peak RSS {m['peak_rss_mib']:.0f} MiB")


if __name__ == "__main__":
    main()
