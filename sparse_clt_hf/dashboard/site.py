"""The static dashboard site: an index per layer and a page per feature, offline (``file://``).

Layout of ``SITE/``::

    index.html                 layer index: ``index.html#L6`` (sortable, searchable, density histogram)
    feature.html               feature page: ``feature.html#L6/942``
    dash.js, dash.css          the page code (copied from the package)
    data/meta.js               layers, widths, settings, notes
    data/L6/index.js           per feature of layer 6: count, max, mean, label (columns)
    data/L6/c3.js              features 768..1023 of layer 6: histogram, quantile groups, examples, logits

Browsers refuse ``fetch()`` of local files, so the data files are scripts that hand their JSON to
``DASH.put(name, data)`` and are loaded on demand with ``<script src>``. Token text is data, never
markup: the pages insert it with ``textContent`` only (and the JSON is ASCII-escaped).
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from ..errors import SparseCLTError
from .logits import LogitEffects
from .stats import DashboardStats, density_histogram

CHUNK = 256
STATIC = ("index.html", "feature.html", "dash.js", "dash.css")
FIRES_NOTE = ("frequency counts the positions where the feature was among the token's recorded top-k; "
              "with a top-k below the number of active features it is a lower bound")


class DashboardError(SparseCLTError, ValueError):
    """An output folder that cannot be written, or inputs that do not belong together."""


def check_out_dir(out: str | os.PathLike[str], flag: str = "--out") -> Path:
    """Raise unless ``out`` is (or can become) a writable folder; creates nothing."""
    from ..io.folders import check_writable_folder

    return check_writable_folder(out, flag, DashboardError)


def _r(v: float) -> float:
    return float(f"{v:.4g}")


def _rounded(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x`` [m, ...] rounded to 4 significant digits of each row's ``scale`` [m] (float64, so that the
    JSON shows short decimals), computed on the whole tensor at once."""
    s = scale.double().abs().clamp_min(1e-30)
    digits = (3 - s.log10().floor()).clamp(-30, 30)
    p = torch.pow(10.0, digits).view(-1, *([1] * (x.dim() - 1)))
    return (x.double() * p).round() / p


class _Labels:
    """Feature labels as :func:`sparse_clt_hf.view.feature_label` writes them, with the top tokens
    (:meth:`FeatureStats.top_tokens`: most frequent max-activating token of the top contexts, ties to
    the stronger context) read from one list per layer instead of per feature."""

    def __init__(self, center: list[list[int]], documents: list[list[int]]) -> None:
        self.center, self.documents = center, documents

    def top_tokens(self, f: int, n: int = 3) -> list[int]:
        tokens = [t for t, d in zip(self.center[f], self.documents[f]) if d >= 0 and t >= 0]
        counts = Counter(tokens)
        first: dict[int, int] = {}
        for i, t in enumerate(tokens):
            first.setdefault(t, i)
        return sorted(counts, key=lambda t: (-counts[t], first[t]))[:n]


class _Vocab:
    """Token id -> text, decoded once per id."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer, self.cache = tokenizer, {}

    def __call__(self, ids: list[int]) -> dict[str, str]:
        cache = self.cache
        new = sorted({i for i in ids if i >= 0 and i not in cache})
        if new:
            texts = self.tokenizer.batch_decode([[i] for i in new]) if hasattr(self.tokenizer, "batch_decode") \
                else [self.tokenizer.decode([i]) for i in new]
            cache.update(zip(new, texts))
        return {str(i): cache[i] for i in set(ids) if i >= 0}


def _write_js(path: Path, name: str, data: Any) -> None:
    text = json.dumps(data, ensure_ascii=True, separators=(",", ":"), allow_nan=False)
    path.write_text(f"DASH.put({json.dumps(name)},{text});\n", encoding="ascii")


def _feature_record(bins: int, context: int, f: int, t: dict[str, list]) -> dict:
    """One feature's page data from the chunk's columns ``t`` (``f``: index within the chunk): the
    histogram up to the bin holding the max (bins of width ``w``), the quantile groups as
    ``[low, high, count, end bin]``, the examples."""
    mx, top, hist, edges = t["max"][f], t["top"][f], t["hist"][f], t["edges"][f]
    step = top / bins if top > 0 else 0.0
    used = max(1, min(bins, int(mx / top * bins) + 1)) if top > 0 else 1  # the bins above the max are empty
    groups = [[_r(min(a * step, mx)), _r(min(b * step, mx)), sum(hist[a:b]), min(b, used)]
              for a, b in zip(edges[:-1], edges[1:])]
    examples = []
    for g, v, window, acts in zip(t["group"][f], t["value"][f], t["tokens"][f], t["acts"][f]):
        if g == -2:
            continue
        inside = [i for i, tok in enumerate(window) if tok >= 0]
        left = sum(1 for tok in window[:context] if tok < 0)
        examples.append([g, v, context - left, [window[i] for i in inside], [acts[i] for i in inside]])
    return {"h": hist[:used], "w": _r(step), "n": sum(hist), "g": groups, "ex": examples}


def build_site(stats: DashboardStats, out: str | os.PathLike[str], tokenizer: Any, *,
               logits: dict[int, LogitEffects] | None = None, notes: list[str] | None = None, title: str = "",
               source: dict[str, Any] | None = None, chunk: int = CHUNK, exact: list | None = None) -> Path:
    """Write the static site for ``stats`` into ``out`` (see the module doc) and return ``out/index.html``.
    ``tokenizer`` decodes token ids; ``logits`` (from :func:`logit_effects`) adds logit effects; ``exact``
    (:class:`~sparse_clt_hf.dashboard.exact.ExactFrequency` items) the exact frequencies of some features."""
    out = check_out_dir(out)
    logits = logits or {}
    base = stats.base
    vocab = _Vocab(tokenizer)
    (out / "data").mkdir(parents=True, exist_ok=True)
    for name in STATIC:
        with resources.as_file(resources.files(__package__) / "site" / name) as src:
            shutil.copyfile(src, out / name)
    layers_meta = []
    for li, layer in enumerate(base.layers):
        m = base.n_features[li]
        folder = out / "data" / f"L{layer}"
        folder.mkdir(parents=True, exist_ok=True)
        count, mx, mean = base.count(layer).tolist(), base.max(layer).tolist(), base.mean(layer).tolist()
        top = _Labels(base._t["top_tokens"][li, :m, :, base.context].tolist(),  # center token of each top context
                      base._t["top_documents"][li, :m].tolist())
        tops = [top.top_tokens(f) if count[f] else [] for f in range(m)]
        vocab([tok for row in tops for tok in row])
        labels = [repr([vocab.cache[i] for i in ids]) if ids else "" for ids in tops]
        _write_js(folder / "index.js", f"L{layer}", {
            "count": count, "max": [_r(v) for v in mx], "mean": [_r(v) for v in mean], "label": labels})
        scale = base.max(layer)
        t = {"max": mx, "top": stats._t["hist_top"][li, :m].tolist()}
        for key, name in (("hist", "hist"), ("edges", "quantile_edges"), ("group", "example_group"),
                          ("value", "example_value"), ("tokens", "example_tokens"), ("acts", "example_acts")):
            t[key] = stats._t[name][li, :m]
        t["value"], t["acts"] = _rounded(t["value"], scale), _rounded(t["acts"], scale)
        eff = logits.get(layer)
        for start in range(0, m, chunk):
            stop = min(start + chunk, m)
            part = {k: (v[start:stop] if isinstance(v, list) else v[start:stop].tolist()) for k, v in t.items()}
            feats = {}
            used: list[int] = []
            for f in range(start, stop):
                rec = _feature_record(stats.bins, base.context, f - start, part)
                if eff is not None:
                    rec["lt"] = [[int(i), _r(v)] for i, v in zip(eff.top_ids[f].tolist(), eff.top_values[f].tolist())]
                    rec["lb"] = [[int(i), _r(v)] for i, v in zip(eff.bottom_ids[f].tolist(),
                                                                  eff.bottom_values[f].tolist())]
                    used += [i for i, _ in rec["lt"]] + [i for i, _ in rec["lb"]]
                for ex in rec["ex"]:
                    used += ex[3]
                feats[str(f)] = rec
            _write_js(folder / f"c{start // chunk}.js", f"L{layer}/c{start // chunk}",
                      {"features": feats, "vocab": vocab(used)})
        layers_meta.append({"layer": layer, "n_features": m, "chunk": chunk,
                            "density": density_histogram(base, layer), "alive": sum(1 for c in count if c),
                            "exact": stats.exact(layer),
                            "exact_counts": {str(e.feature): [e.count, e.recorded, e.n_positions]
                                             for e in exact or [] if e.layer == layer}})
    meta = {"title": title or "Feature dashboards", "n_positions": base.n_positions, "layers": layers_meta,
            "bins": stats.bins, "quantiles": stats.quantiles, "samples": stats.samples, "context": base.context,
            "top_n": base.top_n, "fires": FIRES_NOTE, "notes": list(notes or []), "source": source or {},
            "logits": {str(layer): e.which for layer, e in logits.items()}}
    _write_js(out / "data" / "meta.js", "meta", meta)
    return out / "index.html"
