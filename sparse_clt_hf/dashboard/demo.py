"""The demo transcoder's dashboards: ``sparse-clt-hf dashboard --out SITE`` (no DIR) or
``sparse-clt-hf demo --dashboard SITE``. The dashboard statistics are computed once over the same
tokens of the demo corpus as its labels (:data:`sparse_clt_hf.demo.DEMO_STATS`) and cached next to the
transcoder as ``dashboard.safetensors``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .accumulate import dashboard_stats
from .build import build_dashboard
from .site import DashboardError, check_out_dir
from .stats import DASHBOARD_FILE, DashboardStats


def demo_dashboard(out: str | os.PathLike[str], *, neuronpedia=None, circuit_tracer=None,
                   stats_options: dict[str, int] | None = None, progress: bool = True, log=print) -> dict[str, Any]:
    """Build the demo transcoder's site (and exports) from its cached statistics, computing the
    dashboard statistics once when missing (this loads the model)."""
    from .. import demo
    from ..labels import corpus_features, save_stats
    from ..training import python_texts

    check_out_dir(out)
    for flag, path in (("--neuronpedia", neuronpedia), ("--circuit-tracer", circuit_tracer)):
        if path is not None:
            check_out_dir(path, flag)
    folder = demo.demo_transcoder_dir()
    if not (folder / "config.yaml").is_file():
        raise DashboardError(f"the demo transcoder is not fitted yet ({folder}): run `sparse-clt-hf demo` once, "
                             "or pass an extraction folder")
    model, tokenizer, _ = demo.load_model(None)
    if not DashboardStats.is_current(folder / DASHBOARD_FILE):
        log(f"computing the demo transcoder's dashboard statistics (once) -> {Path(folder) / DASHBOARD_FILE}")
        s = demo.DEMO_STATS
        feats = corpus_features(model, tokenizer, str(folder), python_texts(), tokens=s["tokens"],
                                seq_len=s["seq_len"], batch_size=s["batch_size"], progress=progress,
                                desc="dashboard statistics")
        stats = dashboard_stats(feats, top_n=s["top_n"], context=s["context"], **(stats_options or {}))
        save_stats(stats.base, folder, tokenizer)
        stats.save(folder / DASHBOARD_FILE)
    return build_dashboard(folder, out, clt=str(folder), tokenizer=tokenizer, lm=model, neuronpedia=neuronpedia,
                           circuit_tracer=circuit_tracer, title="Feature dashboards: the demo transcoder", log=log)
