"""A self-contained HTML page to read recorded features token by token (:meth:`Features.to_html`).

The page works offline: CSS and JavaScript are inline and the data sits in one
``<script type="application/json">`` block (every ``<``, ``>`` and ``&`` in it escaped, so token text
cannot close the script). Tokens are shown as the tokenizer decodes each id on its own, whitespace
made visible (``·`` space, ``↵`` newline, ``→`` tab); padding positions are left out.

* The text is shaded by L0 (active features per position, all layers or one) or, once a feature is
  chosen, by that feature's activation (0 where it was not among the recorded top-k).
* Hovering a token shows its top features per layer; clicking selects it (``PATH#t=N`` opens with
  token N selected, and the address follows the selection). Arrow keys move the selection.
* Clicking a feature shades the text by it and, with ``stats``, lists its max-activating contexts.
  ``PATH#t=N&f=LAYER/FEATURE`` opens with that feature chosen.
* With ``stats`` (see :class:`StatsLike`) every feature shown carries its label (its top tokens),
  frequency and max, and activations are also given as a fraction of the feature's max. Only the
  statistics of the features that appear on the page are embedded.

Position ``t`` holds the features computed while the model read token ``t`` (predicting token
``t + 1``). After ``generate`` the last token of ``sequences`` was never fed back, so it has no
features: pass ``sequences`` to show it anyway (marked "not recorded"), and ``prompt_len`` to mark
where the generation starts.
"""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

if TYPE_CHECKING:
    from .features import Features

DATA_ID = "clt-data"
TEMPLATE_FILE = "view_template.html"
N_CONTEXTS = 5
CONTEXT_BEFORE = 16
CONTEXT_AFTER = 6


class ContextLike(Protocol):
    """One max-activating context: ``token_ids[index]`` is where the feature fired with ``activation``."""

    document: int
    position: int
    activation: float
    token_ids: Sequence[int]
    index: int


class StatsLike(Protocol):
    """What the view reads from per-feature statistics (``sparse_clt_hf.feature_stats.FeatureStats``)."""

    layers: list[int]
    n_features: list[int]
    n_positions: int

    def frequency(self, layer: int) -> torch.Tensor: ...

    def mean(self, layer: int) -> torch.Tensor: ...

    def max(self, layer: int) -> torch.Tensor: ...

    def count(self, layer: int) -> torch.Tensor: ...

    def top_contexts(self, layer: int, feature: int) -> Sequence[ContextLike]: ...

    def top_tokens(self, layer: int, feature: int, n: int = 3) -> list[int]: ...


def feature_label(stats: StatsLike | None, tokenizer: Any, layer: int, feature: int, n: int = 3) -> str:
    """A feature's label: its ``n`` top tokens decoded, e.g. ``"[' comprehension', ' generator', ' list']"``.

    Empty when there are no statistics for that layer."""
    if stats is None or layer not in stats.layers:
        return ""
    ids = [int(i) for i in stats.top_tokens(layer, feature, n)]
    return repr([tokenizer.decode([i]) for i in ids])


def _round(v: float) -> float:
    return float(f"{v:.4g}")


def _special_ids(tokenizer: Any) -> list[int]:
    ids = getattr(tokenizer, "all_special_ids", None) or []
    return sorted({int(i) for i in ids})


def page_data(
    features: Features,
    tokenizer: Any,
    stats: StatsLike | None = None,
    row: int = 0,
    *,
    sequences: torch.Tensor | Sequence[int] | None = None,
    prompt_len: int | None = None,
    title: str | None = None,
    n_contexts: int = N_CONTEXTS,
) -> dict[str, Any]:
    """The JSON-ready content of the page for batch row ``row`` (see :func:`write_html`).

    ``tokens``: one entry per shown position, in order: ``t`` (position = index in the sequence),
    ``id``, ``rec`` (features recorded), and when recorded ``l0`` (per layer) and ``f`` (per layer, the
    ``[feature, activation]`` pairs of the filled top-k slots, strongest first). ``vocab`` maps every id
    used on the page to its decoded text. ``stats`` maps ``"layer/feature"`` to that feature's
    statistics (``freq``, ``mean``, ``max``, ``count``, ``top`` token ids, ``ctx`` contexts) or is None.
    """
    b, n_pos, n_layers, _ = features.indices.shape
    if not 0 <= row < b:
        raise IndexError(f"row {row} out of range: the features hold {b} batch row(s)")
    seq: list[int] | None = None
    if sequences is not None:
        s = torch.as_tensor(sequences)
        if s.dim() == 2:
            s = s[row]
        if s.dim() != 1:
            raise ValueError(f"sequences must be [S] or [B, S], got shape {tuple(torch.as_tensor(sequences).shape)}")
        seq = [int(i) for i in s.tolist()]
        if len(seq) < n_pos:
            raise ValueError(f"sequences has {len(seq)} tokens but the features cover {n_pos} positions")
    mask = features.mask[row].bool().tolist()
    if features.token_ids is not None:
        ids = [int(i) for i in features.token_ids[row].tolist()]
        if seq is not None:
            bad = [t for t in range(n_pos) if mask[t] and ids[t] != seq[t]]
            if bad:
                raise ValueError(f"sequences disagree with the recorded token ids at positions {bad[:5]}: "
                                 "pass the sequences these features were recorded on (same row)")
    elif seq is not None:
        ids = seq[:n_pos]
    else:
        raise ValueError("these features carry no token ids: pass sequences= (the token ids they were recorded on)")

    indices = features.indices[row].tolist()  # [T][L][k]
    values = features.values[row].float().tolist()
    l0 = features.l0[row].tolist()
    tokens: list[dict[str, Any]] = []
    used: set[tuple[int, int]] = set()
    for t in range(n_pos):
        if not mask[t]:
            continue
        per_layer = []
        for li in range(n_layers):
            pairs = [[int(f), _round(v)] for f, v in zip(indices[t][li], values[t][li]) if f >= 0]
            used.update((features.layers[li], f) for f, _ in pairs)
            per_layer.append(pairs)
        tokens.append({"t": t, "id": ids[t], "rec": True, "l0": [int(x) for x in l0[t]], "f": per_layer})
    if seq is not None:
        tokens.extend({"t": t, "id": seq[t], "rec": False} for t in range(n_pos, len(seq)))

    stats_data = _stats_data(stats, used, n_contexts) if stats is not None else None
    vocab_ids = {tok["id"] for tok in tokens}
    for entry in (stats_data or {}).values():
        vocab_ids.update(entry["top"])
        for c in entry["ctx"]:
            vocab_ids.update(c["ids"])
    vocab = {str(i): tokenizer.decode([i]) for i in sorted(vocab_ids)}
    return {
        "version": 1,
        "title": title or "sparse-clt-hf features",
        "row": row,
        "batch_size": b,
        "layers": list(features.layers),
        "k": features.k,
        "n_positions": n_pos,
        "prompt_len": prompt_len,
        "tokens": tokens,
        "vocab": vocab,
        "special": _special_ids(tokenizer),
        "stats": stats_data,
        "stats_positions": None if stats is None else int(stats.n_positions),
    }


def _stats_data(stats: StatsLike, used: set[tuple[int, int]], n_contexts: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for layer in sorted({layer for layer, _ in used}):
        if layer not in stats.layers:
            continue
        feats = sorted(f for lay, f in used if lay == layer)
        idx = torch.tensor(feats, dtype=torch.long)
        cols = {name: torch.as_tensor(getattr(stats, name)(layer))[idx].tolist()
                for name in ("frequency", "mean", "max", "count")}
        for j, f in enumerate(feats):
            ctx = []
            for c in list(stats.top_contexts(layer, f))[:n_contexts]:
                c_ids = [int(i) for i in c.token_ids]
                lo = max(0, int(c.index) - CONTEXT_BEFORE)
                hi = min(len(c_ids), int(c.index) + CONTEXT_AFTER + 1)
                ctx.append({"doc": int(c.document), "pos": int(c.position), "act": _round(float(c.activation)),
                            "ids": c_ids[lo:hi], "i": int(c.index) - lo, "cut": [lo > 0, hi < len(c_ids)]})
            out[f"{layer}/{f}"] = {
                "freq": float(cols["frequency"][j]), "mean": _round(float(cols["mean"][j])),
                "max": _round(float(cols["max"][j])), "count": int(cols["count"][j]),
                "top": [int(i) for i in stats.top_tokens(layer, f, 3)], "ctx": ctx,
            }
    return out


def embed_json(data: Any) -> str:
    """JSON safe inside a ``<script>`` element: ``<``, ``>`` and ``&`` become ``\\u003c``-style escapes
    (they only occur inside strings), so no text can close the element or open a comment."""
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return (text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
            .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))


def render_html(data: dict[str, Any]) -> str:
    """The page for :func:`page_data`'s output."""
    return (_template().replace("__TITLE__", html.escape(data["title"]))
            .replace("__DATA_ID__", DATA_ID)
            .replace("__DATA__", embed_json(data)))


def write_html(
    features: Features,
    path: str | Path,
    tokenizer: Any,
    stats: StatsLike | None = None,
    row: int = 0,
    **kwargs: Any,
) -> Path:
    """Write the page for batch row ``row`` to ``path``; keyword arguments go to :func:`page_data`."""
    path = Path(path)
    data = page_data(features, tokenizer, stats, row, **kwargs)
    path.write_text(render_html(data), encoding="utf-8")
    return path


def _template() -> str:
    """The page (HTML, CSS and JS in one file shipped with the package; data and title are filled in)."""
    return (resources.files(__package__) / TEMPLATE_FILE).read_text(encoding="utf-8")
