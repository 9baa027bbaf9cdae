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
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

if TYPE_CHECKING:
    from .features import Features

DATA_ID = "clt-data"
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
    return (_TEMPLATE.replace("__TITLE__", html.escape(data["title"]))
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


_TEMPLATE = r"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>__TITLE__</title>
<style>
:root {
  --bg: #fbfbfa; --fg: #1f2328; --muted: #6a737d; --line: #e3e3e0; --panel: #ffffff;
  --accent: #d9480f; --sel: #1c64f2; --gen: #2f9e44;
}
* { box-sizing: border-box; }
html, body { margin: 0; height: 100%; }
body { background: var(--bg); color: var(--fg); font: 14px/1.45 system-ui, -apple-system, "Segoe UI", "DejaVu Sans", sans-serif;
  display: flex; flex-direction: column; }
header { padding: 10px 18px; border-bottom: 1px solid var(--line); background: var(--panel);
  display: flex; flex-wrap: wrap; align-items: center; gap: 8px 22px; }
header h1 { font-size: 16px; margin: 0; font-weight: 600; }
header .meta { color: var(--muted); font-size: 13px; }
header label { font-size: 13px; color: var(--muted); }
select, button { font: inherit; font-size: 13px; }
.legend { display: inline-flex; align-items: center; gap: 6px; font-size: 12px; color: var(--muted); }
.legend .ramp { width: 110px; height: 10px; border-radius: 3px; border: 1px solid var(--line);
  background: linear-gradient(90deg, rgba(217,72,15,0.04), rgba(217,72,15,0.85)); }
main { flex: 1; min-height: 0; display: grid; grid-template-columns: minmax(0, 1fr) 480px; }
#text { overflow: auto; padding: 18px 22px 60px; font: 15px/2.0 "DejaVu Sans Mono", ui-monospace, Menlo, Consolas, monospace;
  white-space: normal; word-break: break-word; }
.tok { cursor: pointer; padding: 2px 1px; margin: 0 0.5px; border-radius: 3px; border: 1px solid transparent; white-space: pre; }
.tok:hover { border-color: #999; }
.tok.selected { border-color: var(--sel); box-shadow: 0 0 0 1px var(--sel); }
.tok.special { color: #7950f2; }
.tok.unrec { color: var(--muted); border: 1px dashed #aaa; background: repeating-linear-gradient(45deg, #f1f1ef, #f1f1ef 4px, #fff 4px, #fff 8px); }
.prompt-end { display: inline-block; font: 600 10px/1 system-ui, sans-serif; color: #fff; background: var(--gen);
  padding: 3px 5px; margin: 0 4px; border-radius: 3px; vertical-align: 2px; letter-spacing: 0.02em; }
#panel { border-left: 1px solid var(--line); background: var(--panel); min-height: 0; display: flex; flex-direction: column; }
#token { flex: 1 1 55%; min-height: 0; overflow: auto; padding: 14px 16px 30px; }
#feature { flex: 1 1 45%; min-height: 0; overflow: auto; padding: 12px 16px 24px; border-bottom: 2px solid #f3c4a7; background: #fffaf6; }
#feature[hidden] { display: none; }
#panel h2 { font-size: 15px; margin: 0 0 4px; }
#panel h3 { font-size: 13px; margin: 14px 0 4px; color: var(--muted); font-weight: 600; text-transform: uppercase; letter-spacing: 0.04em; }
.hint { color: var(--muted); font-size: 13px; }
.tokname { font-family: "DejaVu Sans Mono", ui-monospace, monospace; background: #f1f3f5; padding: 1px 4px; border-radius: 3px; white-space: pre; }
table.feats { border-collapse: collapse; width: 100%; font-size: 13px; table-layout: fixed; }
table.feats td, table.feats th { padding: 3px 6px 3px 0; text-align: left; vertical-align: middle; }
table.feats th { color: var(--muted); font-weight: 500; font-size: 11px; border-bottom: 1px solid var(--line); }
table.feats td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
table.feats tr.feat-row { cursor: pointer; }
table.feats tr.feat-row:hover { background: #f4f6fb; }
table.feats tr.feat-row.active { background: #fff1e6; }
.fid { font-family: "DejaVu Sans Mono", ui-monospace, monospace; color: var(--sel); white-space: nowrap; }
.bar { height: 8px; background: rgba(217,72,15,0.75); border-radius: 2px; min-width: 1px; }
.barcell { padding-right: 8px !important; }
.label { color: #495057; font-size: 12px; }
.chip { font-family: "DejaVu Sans Mono", ui-monospace, monospace; background: #eef0f3; border-radius: 3px; padding: 0 3px; margin-right: 3px;
  white-space: pre-wrap; word-break: break-all; display: inline-block; line-height: 1.35; }
h2 .label .chip { font-size: 12px; }
.layerhead { display: flex; justify-content: space-between; align-items: baseline; margin-top: 12px;
  padding-bottom: 2px; border-bottom: 1px solid var(--line); }
.layerhead b { font-size: 13px; }
.layerhead span { color: var(--muted); font-size: 12px; }
.close { float: right; border: none; background: none; cursor: pointer; font-size: 16px; color: var(--muted); }
.ctx { font: 12.5px/1.8 "DejaVu Sans Mono", ui-monospace, monospace; padding: 4px 0; border-bottom: 1px dashed var(--line); word-break: break-word; }
.ctx .cmeta { font: 11px system-ui, sans-serif; color: var(--muted); display: block; }
.ctx .ct { white-space: pre; }
.ctx mark { background: rgba(217,72,15,0.8); color: #fff; border-radius: 2px; padding: 0 1px; }
.hits a { color: var(--sel); cursor: pointer; text-decoration: none; margin: 0 10px 2px 0; white-space: pre; display: inline-block; }
.hits a:hover { text-decoration: underline; }
@media (max-width: 900px) { main { grid-template-columns: 1fr; } #panel { border-left: none; border-top: 1px solid var(--line); } }
</style>
</head>
<body>
<header>
  <h1 id="title"></h1>
  <span class="meta" id="meta"></span>
  <label>shade by <select id="mode"></select></label>
  <span class="legend"><span id="legend-min">0</span><span class="ramp"></span><span id="legend-max"></span></span>
</header>
<main>
  <div id="text" tabindex="0"></div>
  <aside id="panel">
    <div id="token"></div>
    <div id="feature" hidden></div>
  </aside>
</main>
<script type="application/json" id="__DATA_ID__">__DATA__</script>
<script>
"use strict";
(function () {
  const D = JSON.parse(document.getElementById("__DATA_ID__").textContent);
  const toks = D.tokens;
  const byT = new Map(toks.map((tk, i) => [tk.t, i]));
  const special = new Set(D.special || []);
  const stats = D.stats;
  const state = { sel: null, hover: null, feat: null, mode: "l0" };
  const spans = [];

  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }
  function raw(id) { const s = D.vocab[String(id)]; return s === undefined ? "?" : s; }
  function visible(s) { return s.replace(/ /g, "\u00b7").replace(/\r?\n/g, "\u21b5").replace(/\t/g, "\u2192"); }
  function shown(id) { const v = visible(raw(id)); return v === "" ? "\u2205" : v; }
  function fmt(v) { return Math.abs(v) >= 100 ? v.toFixed(0) : Math.abs(v) >= 10 ? v.toFixed(1) : v.toFixed(2); }
  function pct(x) { return x >= 0.1 ? (100 * x).toFixed(1) + "%" : x >= 0.001 ? (100 * x).toFixed(2) + "%" : (100 * x).toPrecision(2) + "%"; }
  function maxOf(xs, start) { let m = start; for (const x of xs) if (x !== null && x > m) m = x; return m; }
  function minOf(xs) { let m = Infinity; for (const x of xs) if (x !== null && x < m) m = x; return m === Infinity ? 0 : m; }
  function key(layer, f) { return layer + "/" + f; }
  function st(layer, f) { return stats ? stats[key(layer, f)] || null : null; }
  function activation(tk, li, f) {
    if (!tk.rec) return null;
    for (const p of tk.f[li]) if (p[0] === f) return p[1];
    return 0;
  }
  function labelNode(s) {
    const span = el("span", "label");
    if (!s) return span;
    for (const id of s.top) span.appendChild(el("span", "chip", visible(raw(id))));
    return span;
  }

  // ------------------------------------------------------------------ header
  document.getElementById("title").textContent = D.title;
  const nShown = toks.filter(tk => tk.rec).length;
  let meta = nShown + " positions" + (D.batch_size > 1 ? " \u00b7 row " + D.row + " of " + D.batch_size : "") +
    " \u00b7 layers " + D.layers.join(", ") + " \u00b7 top-" + D.k + " per layer";
  if (D.prompt_len !== null && D.prompt_len !== undefined) meta += " \u00b7 prompt ends before #" + D.prompt_len;
  if (!stats) meta += " \u00b7 no feature statistics (no labels)";
  document.getElementById("meta").textContent = meta;
  const modeSel = document.getElementById("mode");
  function addOpt(value, text) { const o = el("option", null, text); o.value = value; modeSel.appendChild(o); return o; }
  addOpt("l0", "L0, all layers");
  D.layers.forEach((layer, li) => addOpt("l0:" + li, "L0, layer " + layer));
  const featOpt = addOpt("feat", "selected feature");
  featOpt.disabled = true;
  modeSel.addEventListener("change", () => { state.mode = modeSel.value; shade(); });

  // ------------------------------------------------------------------ text
  const textBox = document.getElementById("text");
  toks.forEach((tk, i) => {
    if (D.prompt_len !== null && D.prompt_len !== undefined && tk.t === D.prompt_len) {
      const m = el("span", "prompt-end", "generated \u2192");
      m.title = "the prompt ends here; the tokens after this mark were generated";
      textBox.appendChild(m);
    }
    const s = el("span", "tok", shown(tk.id));
    s.dataset.t = tk.t;
    if (special.has(tk.id)) s.classList.add("special");
    if (!tk.rec) { s.classList.add("unrec"); s.title = "#" + tk.t + " not recorded (never fed back to the model)"; }
    s.addEventListener("mouseenter", () => { state.hover = i; renderToken(); });
    s.addEventListener("mouseleave", () => { state.hover = null; renderToken(); });
    s.addEventListener("click", () => select(i, true));
    textBox.appendChild(s);
    textBox.appendChild(document.createElement("wbr"));
    spans.push(s);
    if (raw(tk.id).indexOf("\n") >= 0) textBox.appendChild(document.createElement("br"));
  });

  function shadeValues() {
    if (state.mode === "feat" && state.feat) {
      const li = state.feat.li, f = state.feat.f;
      const vals = toks.map(tk => activation(tk, li, f));
      const s = st(D.layers[li], f);
      const pageMax = maxOf(vals, 0);
      const scale = s && s.max > 0 ? Math.max(s.max, pageMax) : pageMax;
      return { vals, lo: 0, scale, what: "L" + D.layers[li] + "/" + f + (s && s.max > 0 ? " (scale: feature max)" : "") };
    }
    let vals;
    if (state.mode.startsWith("l0:")) { const li = +state.mode.slice(3); vals = toks.map(tk => tk.rec ? tk.l0[li] : null); }
    else vals = toks.map(tk => tk.rec ? tk.l0.reduce((a, b) => a + b, 0) : null);
    // L0 varies around a level: shade from the lowest value on the page to the highest
    return { vals, lo: minOf(vals), scale: maxOf(vals, 0), what: state.mode === "l0" ? "L0 (sum of layers)" : "L0" };
  }
  function shade() {
    const { vals, lo, scale, what } = shadeValues();
    document.getElementById("legend-min").textContent = String(lo === 0 ? 0 : lo);
    document.getElementById("legend-max").textContent = (Number.isInteger(scale) ? String(scale) : fmt(scale)) + " " + what;
    spans.forEach((s, i) => {
      const v = vals[i];
      if (v === null) { s.style.background = ""; return; }
      const x = scale > lo ? Math.min(1, (v - lo) / (scale - lo)) : (v > 0 ? 1 : 0);
      s.style.background = x > 0 ? "rgba(217,72,15," + (0.06 + 0.79 * x).toFixed(3) + ")" : "";
      s.style.color = x > 0.6 ? "#fff" : "";
      const tk = toks[i];
      s.title = "#" + tk.t + " " + JSON.stringify(raw(tk.id)) + " id " + tk.id + " \u00b7 " + what + " " + fmt(v);
    });
  }

  // ------------------------------------------------------------------ token panel
  function renderToken() {
    const box = document.getElementById("token");
    box.textContent = "";
    const i = state.hover !== null ? state.hover : state.sel;
    if (i === null) {
      box.appendChild(el("p", "hint", "Hover a token to see its strongest features per layer; click to select it " +
        "(the address gets #t=N, a link to that token). Click a feature to shade the text by it. \u2190/\u2192 move the selection."));
      return;
    }
    const tk = toks[i];
    const h = el("h2");
    h.appendChild(document.createTextNode("#" + tk.t + " "));
    h.appendChild(el("span", "tokname", shown(tk.id)));
    h.appendChild(el("span", "hint", "  id " + tk.id + (i === state.sel ? "" : " (hover)")));
    box.appendChild(h);
    const gen = D.prompt_len !== null && D.prompt_len !== undefined;
    const where = gen ? (tk.t >= D.prompt_len ? "generated token" : "prompt token") : "input token";
    const next = i + 1 < toks.length && toks[i + 1].t === tk.t + 1 ? toks[i + 1] : null;
    const p = el("p", "hint", where + (next ? "; these features were computed while predicting the next token " : ""));
    if (next) p.appendChild(el("span", "tokname", shown(next.id)));
    box.appendChild(p);
    if (!tk.rec) {
      box.appendChild(el("p", null, "Not recorded: generate() never feeds its last token back to the model, " +
        "so no features were computed at this position."));
      return;
    }
    D.layers.forEach((layer, li) => {
      const head = el("div", "layerhead");
      head.appendChild(el("b", null, "Layer " + layer));
      const n = tk.f[li].length;
      head.appendChild(el("span", null, "L0 " + tk.l0[li] + (tk.l0[li] > n ? " \u00b7 top " + n + " shown" : "")));
      box.appendChild(head);
      if (!n) { box.appendChild(el("p", "hint", "no active features")); return; }
      const table = el("table", "feats");
      table.dataset.layer = layer;
      const cg = el("colgroup");
      for (const w of stats ? [66, 62, 44, 40, null, 50] : [66, 90, 50, 0, null, 0]) { const c = el("col"); if (w !== null) c.style.width = w + "px"; cg.appendChild(c); }
      table.appendChild(cg);
      const hr = el("tr");
      ["feature", "", "act", stats ? "%max" : "", stats ? "label" : "", stats ? "freq" : ""].forEach(c => hr.appendChild(el("th", null, c)));
      table.appendChild(hr);
      const rowMax = tk.f[li][0][1];
      for (const [f, v] of tk.f[li]) {
        const s = st(layer, f);
        const tr = el("tr", "feat-row");
        tr.dataset.layer = layer; tr.dataset.feature = f;
        if (state.feat && state.feat.li === li && state.feat.f === f) tr.classList.add("active");
        tr.appendChild(el("td", "fid", "L" + layer + "/" + f));
        const bc = el("td", "barcell"); const bar = el("div", "bar");
        const frac = s && s.max > 0 ? v / s.max : (rowMax > 0 ? v / rowMax : 0);
        bar.style.width = Math.max(1, Math.round(100 * Math.min(1, frac))) + "%";
        bc.appendChild(bar); tr.appendChild(bc);
        tr.appendChild(el("td", "num", fmt(v)));
        tr.appendChild(el("td", "num", s && s.max > 0 ? Math.round(100 * v / s.max) + "%" : ""));
        const lc = el("td"); lc.appendChild(labelNode(s)); tr.appendChild(lc);
        tr.appendChild(el("td", "num", s ? pct(s.freq) : ""));
        tr.addEventListener("click", () => selectFeature(li, f, true));
        table.appendChild(tr);
      }
      box.appendChild(table);
    });
  }

  // ------------------------------------------------------------------ feature panel
  function renderFeature() {
    const box = document.getElementById("feature");
    box.textContent = "";
    if (!state.feat) { box.hidden = true; return; }
    box.hidden = false;
    const { li, f } = state.feat; const layer = D.layers[li]; const s = st(layer, f);
    box.dataset.layer = layer; box.dataset.feature = f;
    const close = el("button", "close", "\u00d7"); close.title = "clear the feature (Esc)";
    close.addEventListener("click", () => clearFeature());
    box.appendChild(close);
    const h = el("h2", null, "Feature L" + layer + "/" + f + " ");
    h.appendChild(labelNode(s));
    box.appendChild(h);
    if (s) box.appendChild(el("p", "hint", "frequency " + pct(s.freq) + " \u00b7 mean " + fmt(s.mean) + " \u00b7 max " + fmt(s.max) +
      " \u00b7 active at " + s.count + (D.stats_positions ? " of " + D.stats_positions : "") + " positions"));
    else if (stats) box.appendChild(el("p", "hint", "no statistics for this layer"));
    const hits = [];
    toks.forEach((tk, i) => { const v = activation(tk, li, f); if (v) hits.push([v, i]); });
    hits.sort((a, b) => b[0] - a[0]);
    box.appendChild(el("h3", null, "In this text"));
    box.appendChild(el("p", "hint", hits.length ? "among the top-" + D.k + " at " + hits.length + " of " + nShown +
      " positions; strongest:" : "not among the recorded top-" + D.k + " anywhere in this text"));
    const hl = el("div", "hits");
    for (const [v, i] of hits.slice(0, 8)) {
      const a = el("a", null, "#" + toks[i].t + " " + shown(toks[i].id) + " " + fmt(v) + (s && s.max > 0 ? " (" + Math.round(100 * v / s.max) + "%)" : ""));
      a.addEventListener("click", () => select(i, true));
      hl.appendChild(a);
    }
    box.appendChild(hl);
    if (!s) return;
    box.appendChild(el("h3", null, "Max-activating contexts"));
    if (!s.ctx.length) box.appendChild(el("p", "hint", "none recorded"));
    for (const c of s.ctx) {
      const d = el("div", "ctx");
      d.appendChild(el("span", "cmeta", "doc " + c.doc + " \u00b7 position " + c.pos + " \u00b7 activation " + fmt(c.act) +
        (s.max > 0 ? " (" + Math.round(100 * c.act / s.max) + "% of max)" : "")));
      if (c.cut[0]) d.appendChild(el("span", "ct", "\u2026"));
      c.ids.forEach((id, j) => { d.appendChild(el(j === c.i ? "mark" : "span", "ct", shown(id))); d.appendChild(document.createElement("wbr")); });
      if (c.cut[1]) d.appendChild(el("span", "ct", "\u2026"));
      box.appendChild(d);
    }
  }

  // ------------------------------------------------------------------ selection and address
  function updateHash() {
    const parts = [];
    if (state.sel !== null) parts.push("t=" + toks[state.sel].t);
    if (state.feat) parts.push("f=" + key(D.layers[state.feat.li], state.feat.f));
    const h = parts.join("&");
    try { history.replaceState(null, "", h ? "#" + h : location.pathname + location.search); } catch (e) { location.hash = h; }
  }
  function select(i, push) {
    if (state.sel !== null) spans[state.sel].classList.remove("selected");
    state.sel = i;
    if (i !== null) { spans[i].classList.add("selected"); spans[i].scrollIntoView({ block: "nearest" }); }
    renderToken();
    if (push) updateHash();
  }
  function selectFeature(li, f, push) {
    state.feat = { li, f }; state.mode = "feat"; featOpt.disabled = false; modeSel.value = "feat";
    featOpt.textContent = "feature L" + D.layers[li] + "/" + f;
    shade(); renderFeature(); renderToken();
    if (push) updateHash();
  }
  function clearFeature() {
    state.feat = null; featOpt.disabled = true; featOpt.textContent = "selected feature";
    if (state.mode === "feat") { state.mode = "l0"; modeSel.value = "l0"; }
    shade(); renderFeature(); renderToken(); updateHash();
  }
  function fromHash() {
    const q = new URLSearchParams(location.hash.replace(/^#/, ""));
    const t = q.get("t");
    if (t !== null && byT.has(+t)) select(byT.get(+t), false);
    const f = q.get("f");
    if (f && /^-?\d+\/\d+$/.test(f)) {
      const [layer, feat] = f.split("/").map(Number);
      const li = D.layers.indexOf(layer);
      if (li >= 0) selectFeature(li, feat, false);
    }
  }
  window.addEventListener("hashchange", fromHash);
  document.addEventListener("keydown", e => {
    if (e.target && e.target.tagName === "SELECT") return;
    if (e.key === "Escape" && state.feat) clearFeature();
    else if (e.key === "ArrowRight" || e.key === "ArrowLeft") {
      const d = e.key === "ArrowRight" ? 1 : -1;
      const i = state.sel === null ? 0 : Math.min(toks.length - 1, Math.max(0, state.sel + d));
      select(i, true); e.preventDefault();
    }
  });
  shade(); renderFeature(); renderToken(); fromHash();
  document.body.dataset.ready = "1";
})();
</script>
</body>
</html>
"""
