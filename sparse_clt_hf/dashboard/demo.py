"""The demo transcoder's dashboards: ``sparse-clt-hf dashboard --out SITE`` (no DIR) or
``sparse-clt-hf demo --dashboard SITE``. The dashboard statistics are computed once over the same
tokens of the demo corpus as its labels (:data:`sparse_clt_hf.demo.DEMO_STATS`) and cached next to the
transcoder as ``dashboard.safetensors``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from .accumulate import dashboard_stats
from .build import build_dashboard
from .site import DashboardError, check_out_dir
from .stats import DASHBOARD_FILE, DashboardStats


@torch.no_grad()
def corpus_features(model: torch.nn.Module, tokenizer: Any, transcoder: Any, texts, *, tokens: int, seq_len: int,
                    batch_size: int, skip_first: int = 1, top_k: int | None = None, progress: bool = True):
    """The features of ``transcoder`` over about ``tokens`` tokens of ``texts``, cut as
    :func:`sparse_clt_hf.labels.corpus_stats` cuts them (same rows, same skipped first positions)."""
    from tqdm.auto import tqdm

    from ..attach import attach_clt
    from ..training_data import token_sequences

    n_rows = max(1, -(-tokens // (seq_len - skip_first)))
    ids = token_sequences(tokenizer, texts, seq_len, n_rows)
    if top_k is None:
        cfg = getattr(transcoder, "config", None)
        top_k = int(getattr(cfg, "k", None) or 32)
    device = next(model.parameters()).device
    bar = tqdm(total=ids.shape[0], desc="dashboard statistics", unit="seq", disable=not progress)
    try:
        with attach_clt(model, transcoder, top_k=top_k) as clt:
            for start in range(0, ids.shape[0], batch_size):
                chunk = ids[start : start + batch_size].to(device)
                model(input_ids=chunk, attention_mask=torch.ones_like(chunk), use_cache=False)
                bar.update(chunk.shape[0])
            feats = clt.features
    finally:
        bar.close()
    feats.mask[:, :skip_first] = False
    return feats


def demo_dashboard(out: str | os.PathLike[str], *, neuronpedia=None, circuit_tracer=None,
                   stats_options: dict[str, int] | None = None, progress: bool = True, log=print) -> dict[str, Any]:
    """Build the demo transcoder's site (and exports) from its cached statistics, computing the
    dashboard statistics once when missing (this loads the model)."""
    from .. import demo
    from ..labels import save_stats
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
                                seq_len=s["seq_len"], batch_size=s["batch_size"], progress=progress)
        stats = dashboard_stats(feats, top_n=s["top_n"], context=s["context"], **(stats_options or {}))
        save_stats(stats.base, folder, tokenizer)
        stats.save(folder / DASHBOARD_FILE)
    return build_dashboard(folder, out, clt=str(folder), tokenizer=tokenizer, lm=model, neuronpedia=neuronpedia,
                           circuit_tracer=circuit_tracer, title="Feature dashboards: the demo transcoder", log=log)
