"""Dashboard statistics: per-feature activation histograms, quantile groups, examples sampled from each
group with their context windows, over an extraction (streamed) or in-memory Features.

On top of :func:`~sparse_clt_hf.feature_stats.feature_stats` (count, sum, max, top contexts), per
(layer, feature):

- ``hist`` [B]: the recorded activations in ``B`` equal bins over ``[0, max]`` (bin of ``a`` is
  ``min(floor(a / max * B), B - 1)``; a value <= 0 lands in bin 0). The bins come from the first pass's
  max, so this is a second pass; memory ``L * M * B`` counters, independent of the corpus.
- ``quantile_edges`` [Q + 1] bin indices: group ``g`` holds bins ``[e_g, e_(g+1))``; ``e_g`` (0 < g < Q)
  is one past the bin holding the ``g/Q`` quantile (the activation of rank ``ceil(g * n / Q)``), so the
  boundaries are bin edges, exact for the histogram (a group may be empty when a bin is heavy).
- ``samples``: up to ``S`` examples per group, a uniform sample without replacement: the ``S``
  entries with the smallest hash priority of ``(document, position, feature)`` (deterministic,
  mergeable across shards; ties go to the earlier position). A third pass.
- each example (the ``top_n`` top contexts, then the samples) with its token window (``context``
  tokens either side, -1 outside the document) and the feature's activation at every window token
  (0 where the feature was not recorded). A fourth, light pass.

"Fires" means "is among the token's recorded top-k" (as in ``feature_stats``): histograms, quantiles
and samples see only recorded activations. With an extraction whose ``top_k`` is below the number of
active features (``l0``), weak activations are missing and frequency is a lower bound; extract with
a larger ``top_k`` (or the transcoder's own ``k`` for a TopK transcoder, which is then exact).
:meth:`DashboardStats.exact` tells which case a layer is in: the positions whose ``l0`` exceeded the
recorded ``k`` and the largest ``l0`` (the ``top_k`` that records every active feature densely).

File ``DIR/dashboard.safetensors``: tensors ``hist`` [L, M, B] int64, ``quantile_edges`` [L, M, Q+1]
int64, ``example_group`` [L, M, E] int64 (-1 top context, else the group; -2 empty), ``example_value``
[L, M, E] float32, ``example_document``/``example_position`` [L, M, E] int64, ``example_tokens``
[L, M, E, 2c+1] int64, ``example_acts`` [L, M, E, 2c+1] float32 with ``E = top_n + Q * S``,
``truncated`` and ``max_l0`` [L] int64, ``recorded_k`` [1] (see :meth:`DashboardStats.exact`); metadata
``format``, ``version``, ``bins``, ``quantiles``, ``samples`` and the base statistics' ``layers``,
``n_features``, ``n_positions``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..feature_stats import STATS_FILE, FeatureStats, FeatureStatsError, feature_stats
from ..features import Features
from ..io.structured import load_json

FORMAT = "sparse-clt-hf-dashboard-stats"
VERSION = 1
DASHBOARD_FILE = "dashboard.safetensors"
_STRIDE = 1 << 32  # document * stride + position
_P = (1 << 31) - 1  # hash modulus (products stay below 2**62)
_EMPTY = torch.iinfo(torch.int64).max
_TOP, _NONE = -1, -2

Block = tuple[Features, torch.Tensor, torch.Tensor]  # features, document of each row, offset of each row


@dataclass
class Example:
    """One example of a feature: ``group`` -1 for a top context, else its quantile group."""

    group: int
    activation: float
    document: int
    position: int
    token_ids: list[int] = field(default_factory=list)  # the window, clipped at the document's edges
    acts: list[float] = field(default_factory=list)  # the feature's activation at each window token
    index: int = 0  # index in token_ids of the example's token


def priority(documents: torch.Tensor, positions: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Deterministic pseudo-random int64 in [0, 2**31 - 1) of (document, position, feature key): the
    sample keeps the smallest (a uniform sample without replacement, mergeable across shards)."""
    h = (documents % _P) * 1_103_515_245 % _P
    h = (h + (positions % _P) * 1_597_334_677 % _P) % _P
    h = (h + (keys % _P) * 40_503 % _P) % _P
    h = h * 48_271 % _P
    return h * 16_807 % _P


def density_histogram(stats: FeatureStats, layer: int, bins: int = 40, low: float = -7.0) -> dict:
    """Feature density of one layer: counts of ``log10(frequency)`` in ``bins`` equal bins over
    ``[low, 0]`` (lower frequencies go to the first bin) and the number of features that never fired."""
    freq = stats.frequency(layer)
    alive = freq > 0
    logf = freq[alive].log10().clamp(low, 0.0)
    idx = ((logf - low) / -low * bins).floor().long().clamp(0, bins - 1)
    counts = torch.bincount(idx, minlength=bins)
    return {"edges": [low + i * -low / bins for i in range(bins + 1)], "counts": counts.tolist(),
            "dead": int((~alive).sum()), "n_features": len(freq)}


def _entries(f: Features, documents: torch.Tensor, offsets: torch.Tensor, m: int):
    """Every recorded (key = layer index * M + feature, activation, document, position), in row order."""
    mask = f.mask.bool()
    valid = (f.indices >= 0) & mask[:, :, None, None]
    w, t, li, ki = valid.nonzero(as_tuple=True)
    key = li * m + f.indices[w, t, li, ki].long()
    return key, f.values[w, t, li, ki].float(), documents[w].long(), offsets[w].long() + t


def _bins(act: torch.Tensor, mx: torch.Tensor, n_bins: int) -> torch.Tensor:
    scaled = torch.where(mx > 0, act.double() / mx.double().clamp_min(1e-300) * n_bins, torch.zeros((), dtype=torch.float64))
    return scaled.floor().long().clamp(0, n_bins - 1)


def _keep_lowest(score: torch.Tensor, cols: list[torch.Tensor], slot: torch.Tensor, new_score: torch.Tensor,
                 new_cols: list[torch.Tensor], n: int) -> None:
    """Keep per slot the ``n`` lowest scores (scores in ``[0, 2**31)``; stored ones first among ties,
    then arrival order)."""
    if slot.numel() == 0:
        return
    order = (slot * (_P + 1) + new_score).sort(stable=True).indices  # by slot, then score, then arrival
    s_sorted = slot[order]
    uniq, counts = torch.unique_consecutive(s_sorted, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(s_sorted.numel()) - torch.repeat_interleave(starts, counts)
    keep = rank < n
    sel, r = order[keep], rank[keep]
    row = torch.searchsorted(uniq, s_sorted[keep])
    cand_s = torch.full((uniq.numel(), n), _EMPTY, dtype=score.dtype)
    cand_s[row, r] = new_score[sel]
    all_s = torch.cat([score[uniq], cand_s], 1)
    best = all_s.sort(dim=1, stable=True).indices[:, :n]
    score[uniq] = all_s.gather(1, best)
    for col, new in zip(cols, new_cols):
        cand = torch.full((uniq.numel(), n), -1, dtype=col.dtype)
        cand[row, r] = new[sel].to(col.dtype)
        col[uniq] = torch.cat([col[uniq], cand], 1).gather(1, best)


class DashboardStats:
    """Histograms, quantile groups and examples of every feature (see the module doc), with the base
    :class:`FeatureStats` as ``base``."""

    def __init__(self, base: FeatureStats, bins: int, quantiles: int, samples: int,
                 tensors: dict[str, torch.Tensor]) -> None:
        self.base = base
        self.bins, self.quantiles, self.samples = int(bins), int(quantiles), int(samples)
        self._t = tensors

    def __repr__(self) -> str:
        return (f"DashboardStats(layers={self.base.layers}, n_features={self.base.n_features}, bins={self.bins}, "
                f"quantiles={self.quantiles}, samples={self.samples})")

    @property
    def layers(self) -> list[int]:
        return self.base.layers

    def _at(self, name: str, layer: int, feature: int) -> torch.Tensor:
        li = self.base._li(layer)
        if not 0 <= feature < self.base.n_features[li]:
            raise KeyError(f"feature {feature} out of range: layer {layer} has {self.base.n_features[li]} features")
        return self._t[name][li, feature]

    def histogram(self, layer: int, feature: int) -> torch.Tensor:
        """[B] int64: recorded activations per bin over ``[0, max]``."""
        return self._at("hist", layer, feature).clone()

    def bin_edges(self, layer: int, feature: int) -> torch.Tensor:
        """[B + 1] float64: ``linspace(0, max, B + 1)``."""
        mx = float(self.base.max(layer)[feature])
        return torch.linspace(0.0, mx, self.bins + 1, dtype=torch.float64)

    def quantile_edges(self, layer: int, feature: int) -> torch.Tensor:
        """[Q + 1] int64 bin indices delimiting the quantile groups (see the module doc)."""
        return self._at("quantile_edges", layer, feature).clone()

    def quantile_bounds(self, layer: int, feature: int) -> list[tuple[float, float]]:
        """Each group's activation range ``[lo, hi)`` (the last one closed at max)."""
        edges, e = self.bin_edges(layer, feature).tolist(), self.quantile_edges(layer, feature).tolist()
        return [(edges[a], edges[b]) for a, b in zip(e[:-1], e[1:])]

    def percentiles(self, layer: int, feature: int, n: int = 100) -> list[float]:
        """Activation at each of ``1/n .. n/n`` of the recorded activations, interpolated linearly inside
        the histogram's bins (approximate to a bin width)."""
        hist = self.histogram(layer, feature).double()
        total = float(hist.sum())
        edges = self.bin_edges(layer, feature)
        if total == 0:
            return [0.0] * n
        cum = torch.cat([torch.zeros(1, dtype=torch.float64), hist.cumsum(0)])
        out = []
        for i in range(1, n + 1):
            target = total * i / n
            b = int(torch.searchsorted(cum[1:], torch.tensor([target], dtype=torch.float64))[0].clamp_max(self.bins - 1))
            inside = (target - float(cum[b])) / max(float(hist[b]), 1.0)
            out.append(float(edges[b] + (edges[b + 1] - edges[b]) * min(max(inside, 0.0), 1.0)))
        return out

    def examples(self, layer: int, feature: int) -> list[Example]:
        """Top contexts (group -1, strongest first), then each group's samples (by priority)."""
        groups = self._at("example_group", layer, feature).tolist()
        vals = self._at("example_value", layer, feature).tolist()
        docs = self._at("example_document", layer, feature).tolist()
        poss = self._at("example_position", layer, feature).tolist()
        toks = self._at("example_tokens", layer, feature).tolist()
        acts = self._at("example_acts", layer, feature).tolist()
        c = self.base.context
        out = []
        for g, v, d, p, window, a in zip(groups, vals, docs, poss, toks, acts):
            if g == _NONE:
                continue
            inside = [i for i, t in enumerate(window) if t >= 0]
            left = sum(1 for t in window[:c] if t < 0)
            out.append(Example(int(g), float(v), int(d), int(p), [int(window[i]) for i in inside],
                               [float(a[i]) for i in inside], c - left))
        return out

    def exact(self, layer: int) -> dict:
        """Whether frequencies of ``layer`` are exact: ``truncated`` counts the positions with more
        active features (``l0``) than the ``recorded_k`` kept; when 0, every active feature was recorded.
        ``max_l0`` is the ``top_k`` an extraction needs for exact counts (dense encoding of all features)."""
        li = self.base._li(layer)
        trunc = int(self._t["truncated"][li])
        return {"exact": trunc == 0, "truncated": trunc, "max_l0": int(self._t["max_l0"][li]),
                "recorded_k": int(self._t["recorded_k"][0])}

    # ------------------------------------------------------------------ IO
    def save(self, path: str | os.PathLike[str]) -> None:
        """Write ``dashboard.safetensors`` (atomically); the base statistics are saved separately."""
        from safetensors.torch import save_file

        path = Path(path)
        b = self.base
        meta = {"format": FORMAT, "version": str(VERSION), "bins": str(self.bins), "quantiles": str(self.quantiles),
                "samples": str(self.samples), "layers": json.dumps(b.layers), "n_features": json.dumps(b.n_features),
                "n_positions": str(b.n_positions), "top_n": str(b.top_n), "context": str(b.context)}
        tmp = path.with_name(path.name + ".tmp")
        save_file({k: v.contiguous() for k, v in self._t.items()}, str(tmp), metadata=meta)
        os.replace(tmp, path)

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> DashboardStats:
        """Read ``DIR/dashboard.safetensors`` with ``DIR/stats.safetensors`` (they must belong together)."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        directory = Path(directory)
        path = directory / DASHBOARD_FILE
        if not path.is_file():
            raise FeatureStatsError(f"{path} does not exist: compute it with `sparse-clt-hf stats DIR --dashboard`")
        base = FeatureStats.load(directory / STATS_FILE)
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise FeatureStatsError(f"{path} is not a dashboard statistics file (format {meta.get('format')!r})")
        try:
            mine = (load_json(meta["layers"], f"{path} layers", error=FeatureStatsError),
                    load_json(meta["n_features"], f"{path} n_features", error=FeatureStatsError),
                    int(meta["n_positions"]), int(meta["top_n"]), int(meta["context"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise FeatureStatsError(f"{path}: damaged metadata ({type(exc).__name__}: {exc})") from exc
        theirs = (base.layers, base.n_features, base.n_positions, base.top_n, base.context)
        if mine != theirs:
            what = "layers {}, widths {}, {} positions, top_n {}, context {}"
            raise FeatureStatsError(
                f"{path} ({what.format(*mine)}) does not belong with {directory / STATS_FILE} "
                f"({what.format(*theirs)}): recompute both with `sparse-clt-hf stats DIR --dashboard`")
        return cls(base, int(meta["bins"]), int(meta["quantiles"]), int(meta["samples"]), load_file(str(path)))


# ---------------------------------------------------------------------------- computation
def _windows(blocks: Iterable[Block], key: torch.Tensor, doc: torch.Tensor, pos: torch.Tensor, m: int,
             context: int, chunk: int = 1 << 20) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens and the feature's activations [Q, 2c+1] around each query (key, document, position): each
    window position is looked up among the block's recorded entries, sorted once by (row, position, key)."""
    span = torch.arange(-context, context + 1)
    n_q = key.numel()
    # queries in (document, position) order: the lookups below then walk the sorted entries in order
    by_place = (doc * _STRIDE + pos).argsort()
    key, doc, pos = key[by_place], doc[by_place], pos[by_place]
    tokens = torch.full((n_q, span.numel()), -1, dtype=torch.int64)
    acts = torch.zeros((n_q, span.numel()), dtype=torch.float32)
    for f, documents, offsets in blocks:
        if documents.numel() == 0:
            continue
        documents, offsets = documents.long(), offsets.long()
        lo, hi = int(documents.min()), int(documents.max())
        near = ((doc >= lo) & (doc <= hi)).nonzero(as_tuple=True)[0]
        if near.numel() == 0:
            continue
        n_rows, t_len, n_layers, _ = f.indices.shape
        row_key = documents * _STRIDE + offsets
        rows = row_key.argsort()
        row_key = row_key[rows]
        mask = f.mask.bool()
        # every slot's key ((position * L + layer) * (m + 1) + feature + 1; empty slots: feature -1), in the
        # dense order, which is ascending once each (position, layer)'s k slots are sorted
        slot_idx, order = f.indices.sort(dim=-1)
        entry = ((torch.arange(n_rows * t_len * n_layers).view(n_rows, t_len, n_layers, 1) * (m + 1))
                 + slot_idx.long() + 1).reshape(-1)
        entry_val = f.values.gather(-1, order).float().reshape(-1)
        width = span.numel()
        tok_flat, mask_flat = f.token_ids.reshape(-1), mask.reshape(-1)
        for start in range(0, near.numel(), max(1, chunk // width)):
            q = near[start : start + max(1, chunk // width)]
            p = (pos[q][:, None] + span).reshape(-1)
            d = doc[q].repeat_interleave(width)
            at = (torch.searchsorted(row_key, d * _STRIDE + p.clamp_min(0), right=True) - 1).clamp_min(0)
            r = rows[at]
            tt = p - offsets[r]
            ok = (p >= 0) & (documents[r] == d) & (tt >= 0) & (tt < t_len)
            flat = r * t_len + tt.clamp(0, t_len - 1)
            ok &= mask_flat[flat]
            out = (q[:, None] * width + span + context).reshape(-1)
            sel = ok.nonzero(as_tuple=True)[0]
            tokens.view(-1)[out[sel]] = tok_flat[flat[sel]].long()
            if entry.numel() == 0:
                continue
            k_sel = key[q].repeat_interleave(width)[sel]
            qk = ((flat[sel] * n_layers + k_sel // m) * (m + 1)) + k_sel % m + 1
            hit_at = torch.searchsorted(entry, qk).clamp_max(entry.numel() - 1)
            hit = entry[hit_at] == qk
            acts.view(-1)[out[sel[hit]]] = entry_val[hit_at[hit]]
    back = torch.empty_like(by_place)
    back[by_place] = torch.arange(n_q)
    return tokens[back], acts[back]


def _compute(base: FeatureStats, blocks, bins: int, quantiles: int, samples: int) -> DashboardStats:
    """Passes 2-4 over ``blocks`` (a callable giving a fresh iterator of :data:`Block`)."""
    n_layers, m = len(base.layers), max(base.n_features)
    n = n_layers * m
    mx = torch.stack([torch.nn.functional.pad(base.max(layer), (0, m - w))
                      for layer, w in zip(base.layers, base.n_features)]).reshape(n)
    # pass 2: histograms, and how many (position, layer) had more active features than were recorded
    hist = torch.zeros(n * bins, dtype=torch.int64)
    truncated = torch.zeros(n_layers, dtype=torch.int64)
    max_l0 = torch.zeros(n_layers, dtype=torch.int64)
    recorded_k = 0
    for f, documents, offsets in blocks():
        key, act, _, _ = _entries(f, documents, offsets, m)
        hist += torch.bincount(key * bins + _bins(act, mx[key], bins), minlength=n * bins)
        recorded_k = f.indices.shape[-1]
        l0 = torch.where(f.mask.bool()[:, :, None], f.l0.long(), torch.zeros((), dtype=torch.int64))
        truncated += (l0 > recorded_k).sum((0, 1))
        if l0.numel():
            max_l0 = torch.maximum(max_l0, l0.amax((0, 1)))
    hist = hist.view(n, bins)
    total = hist.sum(1)
    cum = hist.cumsum(1)
    edges = torch.zeros(n, quantiles + 1, dtype=torch.int64)
    edges[:, -1] = bins
    for g in range(1, quantiles):
        target = (g * total + quantiles - 1) // quantiles
        edges[:, g] = (cum < target[:, None]).sum(1) + 1
    edges[total == 0] = 0
    # pass 3: samples of each group
    s_score = torch.full((n * quantiles, samples), _EMPTY, dtype=torch.int64)
    s_doc = torch.full((n * quantiles, samples), -1, dtype=torch.int64)
    s_pos = torch.full((n * quantiles, samples), -1, dtype=torch.int64)
    s_val = torch.full((n * quantiles, samples), -1, dtype=torch.float32)
    for f, documents, offsets in blocks():
        key, act, doc, pos = _entries(f, documents, offsets, m)
        b = _bins(act, mx[key], bins)
        group = (edges[key, 1:quantiles] <= b[:, None]).sum(1)
        _keep_lowest(s_score, [s_doc, s_pos, s_val], key * quantiles + group, priority(doc, pos, key),
                     [doc, pos, act], samples)
    # examples: top contexts then samples
    top_n = base.top_n
    e = top_n + quantiles * samples
    t = base._t
    ex_doc = torch.cat([t["top_documents"].reshape(n, top_n), s_doc.view(n, quantiles * samples)], 1)
    ex_pos = torch.cat([t["top_positions"].reshape(n, top_n), s_pos.view(n, quantiles * samples)], 1)
    ex_val = torch.cat([t["top_values"].reshape(n, top_n).float(), s_val.view(n, quantiles * samples)], 1)
    ex_group = torch.cat([torch.full((n, top_n), _TOP, dtype=torch.int64),
                          torch.arange(quantiles).repeat_interleave(samples).expand(n, -1)], 1).clone()
    ex_group[ex_doc < 0] = _NONE
    ex_val[ex_doc < 0] = 0.0
    used = ex_doc.view(-1) >= 0
    q_key = torch.arange(n).repeat_interleave(e)[used]
    # pass 4: windows
    width = 2 * base.context + 1
    tokens = torch.full((n * e, width), -1, dtype=torch.int64)
    acts = torch.zeros((n * e, width), dtype=torch.float32)
    tok, act = _windows(blocks(), q_key, ex_doc.view(-1)[used], ex_pos.view(-1)[used], m, base.context)
    tokens[used], acts[used] = tok, act
    shape = (n_layers, m)
    tensors = {"hist": hist.view(*shape, bins), "quantile_edges": edges.view(*shape, quantiles + 1),
               "example_group": ex_group.view(*shape, e), "example_value": ex_val.view(*shape, e),
               "example_document": ex_doc.view(*shape, e), "example_position": ex_pos.view(*shape, e),
               "example_tokens": tokens.view(*shape, e, width), "example_acts": acts.view(*shape, e, width),
               "truncated": truncated, "max_l0": max_l0, "recorded_k": torch.tensor([recorded_k])}
    return DashboardStats(base, bins, quantiles, samples, tensors)


def dashboard_stats(
    source: str | os.PathLike[str] | Features,
    *,
    top_n: int = 10,
    context: int = 8,
    bins: int = 32,
    quantiles: int = 5,
    samples: int = 3,
    save: bool = True,
    base: FeatureStats | None = None,
) -> DashboardStats:
    """Dashboard statistics of an extraction folder (streamed; saved as ``DIR/stats.safetensors`` and
    ``DIR/dashboard.safetensors`` when ``save``) or of in-memory Features with ``token_ids`` (rows are
    documents). ``base``: the :func:`feature_stats` of the same source when already computed."""
    for name, v, lo in (("bins", bins, 1), ("quantiles", quantiles, 1), ("samples", samples, 0)):
        if not isinstance(v, int) or v < lo:
            raise FeatureStatsError(f"{name} must be an integer >= {lo}, got {v!r}")
    if isinstance(source, Features):
        if source.token_ids is None:
            raise FeatureStatsError("these Features have no token_ids, so examples cannot be shown; "
                                    "record them with a forward pass given input_ids")
        base = base or feature_stats(source, top_n=top_n, context=context)
        rows = torch.arange(source.batch_size)
        zeros = torch.zeros(source.batch_size, dtype=torch.int64)

        def blocks() -> Iterator[Block]:
            yield source, rows, zeros

        return _compute(base, blocks, bins, quantiles, samples)

    from ..extracted import iter_extracted

    directory = Path(source)
    base = base or feature_stats(directory, top_n=top_n, context=context, save=save)

    def shards() -> Iterator[Block]:
        for s in iter_extracted(directory):
            yield s.features, s.documents, s.offsets

    stats = _compute(base, shards, bins, quantiles, samples)
    if save:
        stats.save(directory / DASHBOARD_FILE)
    return stats


