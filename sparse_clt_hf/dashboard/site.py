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
from importlib import resources
from pathlib import Path
from typing import Any

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
    import tempfile

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DashboardError(f"{flag} {out} exists and is not a folder")
    probe = out
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise DashboardError(f"{flag} {out}: {probe} is not a folder")
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as exc:
        raise DashboardError(f"{flag} {out} is not writable ({probe}: {exc.strerror or exc})") from None
    return out


def _r(v: float) -> float:
    return float(f"{v:.4g}")


class _Vocab:
    """Token id -> text, decoded once per id."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer, self.cache = tokenizer, {}

    def __call__(self, ids) -> dict[str, str]:
        new = sorted({int(i) for i in ids if int(i) >= 0} - set(self.cache))
        if new:
            texts = self.tokenizer.batch_decode([[i] for i in new]) if hasattr(self.tokenizer, "batch_decode") \
                else [self.tokenizer.decode([i]) for i in new]
            self.cache.update(zip(new, texts))
        return {str(int(i)): self.cache[int(i)] for i in ids if int(i) >= 0}


def _write_js(path: Path, name: str, data: Any) -> None:
    text = json.dumps(data, ensure_ascii=True, separators=(",", ":"), allow_nan=False)
    path.write_text(f"DASH.put({json.dumps(name)},{text});\n", encoding="ascii")


def _feature_record(bins: int, context: int, f: int, t: dict[str, list]) -> dict:
    """One feature's page data from the chunk's columns ``t`` (``f``: index within the chunk)."""
    mx, hist, edges = t["max"][f], t["hist"][f], t["edges"][f]
    step = mx / bins if mx > 0 else 0.0
    groups = [[_r(a * step), _r(b * step), sum(hist[a:b])] for a, b in zip(edges[:-1], edges[1:])]
    examples = []
    for g, v, window, acts in zip(t["group"][f], t["value"][f], t["tokens"][f], t["acts"][f]):
        if g == -2:
            continue
        inside = [i for i, tok in enumerate(window) if tok >= 0]
        left = sum(1 for tok in window[:context] if tok < 0)
        examples.append([g, _r(v), context - left, [window[i] for i in inside], [_r(acts[i]) for i in inside]])
    return {"h": hist, "n": sum(hist), "g": groups, "ex": examples}


def build_site(stats: DashboardStats, out: str | os.PathLike[str], tokenizer: Any, *,
               logits: dict[int, LogitEffects] | None = None, notes: list[str] | None = None, title: str = "",
               source: dict[str, Any] | None = None, chunk: int = CHUNK) -> Path:
    """Write the static site for ``stats`` into ``out`` (see the module doc) and return ``out/index.html``.
    ``tokenizer`` decodes token ids; ``logits`` (from :func:`logit_effects`) adds logit effects."""
    from ..view import feature_label

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
        top_tokens = base._t["top_tokens"][li, :m, :, base.context].tolist()  # center token of each top context
        vocab([tok for row in top_tokens for tok in row])
        labels = [feature_label(base, _CachedDecode(vocab), layer, f) if count[f] else "" for f in range(m)]
        _write_js(folder / "index.js", f"L{layer}", {
            "count": count, "max": [_r(v) for v in mx], "mean": [_r(v) for v in mean], "label": labels})
        t = {"max": mx}
        for key, name in (("hist", "hist"), ("edges", "quantile_edges"), ("group", "example_group"),
                          ("value", "example_value"), ("tokens", "example_tokens"), ("acts", "example_acts")):
            t[key] = stats._t[name][li, :m]
        eff = logits.get(layer)
        for start in range(0, m, chunk):
            stop = min(start + chunk, m)
            part = {k: (v[start:stop].tolist() if k != "max" else v[start:stop]) for k, v in t.items()}
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
                            "exact": stats.exact(layer)})
    meta = {"title": title or "Feature dashboards", "n_positions": base.n_positions, "layers": layers_meta,
            "bins": stats.bins, "quantiles": stats.quantiles, "samples": stats.samples, "context": base.context,
            "top_n": base.top_n, "fires": FIRES_NOTE, "notes": list(notes or []), "source": source or {},
            "logits": {str(layer): e.which for layer, e in logits.items()}}
    _write_js(out / "data" / "meta.js", "meta", meta)
    return out / "index.html"


class _CachedDecode:
    """A tokenizer stand-in whose ``decode([id])`` reads the site's decoded-token cache."""

    def __init__(self, vocab: _Vocab) -> None:
        self.vocab = vocab

    def decode(self, ids, **_: Any) -> str:
        return "".join(self.vocab(ids).values())
