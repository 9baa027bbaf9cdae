"""Dashboard statistics computed in the same streaming pass as
:func:`~sparse_clt_hf.feature_stats.feature_stats` (definitions: :mod:`.stats`).

The first read of every shard updates, per (layer, feature), the base statistics and:

- the histogram: ``B`` bins over ``[0, 2**e)`` where ``2**e`` is the smallest power of two above the
  running max. When a shard raises the max past ``2**e``, the scale doubles ``s`` times and bin ``i``
  folds into bin ``i >> s`` -- exact, since ``floor(a * B / 2**(e+s)) = floor(a * B / 2**e) >> s``, so no
  first pass is needed for the max;
- the samples: per (feature, bin), the ``S`` entries of smallest hash priority. Any quantile group is a
  union of bins, and the ``S`` smallest of a union are among the ``S`` smallest of each bin, so the
  groups' samples are picked at the end, once the histogram fixes the group boundaries. Folding bins
  merges their kept entries the same way. A block's priorities cost one gather from a per-token hash,
  one from a per-feature hash and two integer ops per entry; only entries below a per-slot threshold
  (about ``OVERSAMPLE * S`` of them) reach the sort that picks the ``S`` smallest.

The second read (the one ``feature_stats`` makes for its top contexts' tokens) takes the token window and
the feature's activations around every example, the top contexts included. Memory: ``L*M*B*S`` kept
entries (12 bytes each) and the outputs, fixed by the number of features, never by the corpus.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from ..feature_stats import STATS_FILE, FeatureStatsError, _Accumulator, block_entries, entry_rows, run_rank
from ..features import Features
from .stats import (
    _EMPTY,
    _NONE,
    _STRIDE,
    _TOP,
    DASHBOARD_FILE,
    DashboardStats,
    combine_hashes,
    key_hash,
    token_hash,
)

_NO_SCALE = -(1 << 16)  # scale exponent of a feature with no positive activation yet (all in bin 0)
_LOW32 = (1 << 32) - 1
_ENTRY_BITS = 38  # a block's slots are indexed below 2**38; keys (layer * M + feature) below 2**25
# a block's entries whose priority is above (oversample * S) / (the slot's count) of the range are not
# looked at further: a slot keeps about oversample * S candidates and lacks S (then all are taken) with
# probability ~ P(Poisson(24) < 3) ~ 2e-8 per slot
OVERSAMPLE = 8
Block = tuple[Features, torch.Tensor, torch.Tensor]  # features, document of each row, offset of each row


def _lowest(slot: torch.Tensor, prio: torch.Tensor, place: torch.Tensor, n: int):
    """The ``n`` entries of smallest (priority, place) in every slot: their indices, slots and ranks.

    slot < 2**31 and priority < 2**32 pack into one int64. Sorting the packed values alone (numpy, fast)
    gives each slot's n-th smallest; the entries at or below it (about n per slot) are then ordered with
    their indices -- by place too where a slot holds equal priorities (a hash tie, rare)."""
    packed = (slot << 32) | prio
    values = torch.from_numpy(np.sort(packed.numpy()))
    rank = run_rank(values >> 32)
    last = torch.full((int(slot.max()) + 1,), _EMPTY, dtype=torch.int64)
    nth = rank == n - 1
    last[values[nth] >> 32] = values[nth]
    cand = (packed <= last[slot]).nonzero().squeeze(1)
    c_packed = packed[cand].numpy()
    order = np.argsort(c_packed)
    ordered = c_packed[order]
    if ordered.size > 1 and bool((ordered[1:] == ordered[:-1]).any()):
        order = np.lexsort((place[cand].numpy(), prio[cand].numpy(), slot[cand].numpy()))
    idx = cand[torch.from_numpy(order)]
    rank = run_rank(slot[idx])
    keep = rank < n
    return idx[keep], slot[idx][keep], rank[keep]


class DashboardAccumulator(_Accumulator):
    """:class:`~sparse_clt_hf.feature_stats._Accumulator` plus histograms, per-bin samples and the
    exactness counters, all updated from the same entries of each block."""

    def __init__(self, layers: list[int], n_features: list[int], top_n: int, context: int, bins: int,
                 quantiles: int, samples: int) -> None:
        super().__init__(layers, n_features, top_n, context)
        n = len(self.layers) * self.m
        self.bins, self.quantiles, self.samples = bins, quantiles, samples
        self.exp = torch.full((n,), _NO_SCALE, dtype=torch.int64)
        self.hist = torch.zeros((n, bins), dtype=torch.int64)
        self.s_prio = torch.full((n * bins, samples), _EMPTY, dtype=torch.int64)
        self.s_place = torch.full((n * bins, samples), -1, dtype=torch.int64)
        if n * bins >= 1 << 31:
            raise FeatureStatsError(f"{len(self.layers)} layers x {self.m} features x {bins} bins is too many "
                                    "histogram slots (2**31 at most); use fewer bins")
        self.key_hash = key_hash(torch.arange(n))
        self.truncated = torch.zeros(len(self.layers), dtype=torch.int64)
        self.max_l0 = torch.zeros(len(self.layers), dtype=torch.int64)
        self.recorded_k = 0

    def update(self, f: Features, documents: torch.Tensor, offsets: torch.Tensor):
        key, act, flat, block_count = super().update(f, documents, offsets)
        self.recorded_k = f.indices.shape[-1]
        l0 = torch.where(f.mask.bool()[:, :, None], f.l0.long(), torch.zeros((), dtype=torch.int64))
        self.truncated += (l0 > self.recorded_k).sum((0, 1))
        if l0.numel():
            self.max_l0 = torch.maximum(self.max_l0, l0.amax((0, 1)))
        if key.numel() == 0:
            return key, act, flat, block_count
        folded = self._rescale()
        # a * B * 2**-e: exact in float64, and in float32 when B is a power of two (then a scaling only);
        # below B by construction, and truncation is the floor for what is not clamped to bin 0
        none = self.exp == _NO_SCALE  # nothing positive yet: every value in bin 0
        exact32 = self.bins & (self.bins - 1) == 0 and bool((none | (self.exp.abs() < 100)).all())
        scale = torch.where(none, 0.0, torch.pow(2.0, (-self.exp).clamp(-1000, 1000).double()) * self.bins)
        x = act * scale.float()[key] if exact32 else act.double() * scale[key]
        slot = x.long().clamp_(0, self.bins - 1).add_(key, alpha=self.bins)
        slot_count = torch.bincount(slot, minlength=self.hist.numel())
        self.hist.view(-1).add_(slot_count)
        if self.samples:
            self._sample(slot, slot_count, key, flat, f, documents, offsets, folded)
        return key, act, flat, block_count

    def _rescale(self):
        """Raise each feature's scale ``2**e`` above its (updated) running max, folding the bins (and their
        samples) of the features whose scale grew; returns the folded samples as candidates."""
        _, e = torch.frexp(self.max)  # max = mantissa * 2**e, mantissa in [0.5, 1): 2**e > max
        new = torch.where(self.max > 0, e.long(), torch.full((), _NO_SCALE, dtype=torch.int64))
        grown = ((new != self.exp) & (self.exp != _NO_SCALE)).nonzero().squeeze(1)
        folded = None
        if grown.numel():
            shift = (new - self.exp)[grown].clamp_max(62)
            to = torch.arange(self.bins)[None, :] >> shift[:, None]  # [g, B] new bin of each old bin
            h = self.hist[grown]
            self.hist[grown] = torch.zeros_like(h).scatter_add_(1, to, h)
            if self.samples:
                rows = grown[:, None] * self.bins + torch.arange(self.bins)
                p, pl = self.s_prio[rows], self.s_place[rows]  # [g, B, S]
                kept = p != _EMPTY
                slot = (grown[:, None] * self.bins + to)[:, :, None].expand(-1, -1, self.samples)
                folded = (slot[kept], p[kept], pl[kept])
                self.s_prio[rows], self.s_place[rows] = _EMPTY, -1
        self.exp = new
        return folded

    def _sample(self, slot: torch.Tensor, slot_count: torch.Tensor, key: torch.Tensor, flat: torch.Tensor | None,
                f: Features, documents: torch.Tensor, offsets: torch.Tensor, folded) -> None:
        """Keep per slot the ``S`` smallest (priority, place). An entry is looked at only below its slot's
        S-th kept priority (kept entries come from earlier rows and win ties) and below a threshold that
        leaves about ``OVERSAMPLE * S`` of the slot's entries in this block; a slot left with fewer than
        ``S`` below its threshold takes all its entries (exact either way)."""
        s = self.samples
        n_rows, t_len, n_layers, k = f.indices.shape
        documents, offsets = documents.long(), offsets.long()
        h_tok = token_hash(documents[:, None], offsets[:, None] + torch.arange(t_len)).view(-1)
        per_tok = n_layers * k
        h = h_tok[flat // per_tok] if flat is not None else h_tok[:, None].expand(-1, per_tok).reshape(-1)
        prio = combine_hashes(h, self.key_hash[key])
        kept_bound = self.s_prio[:, s - 1]
        a = OVERSAMPLE * s
        over = slot_count > a
        thr = torch.where(over, (a << 32) // slot_count.clamp_min(1), _EMPTY)
        bound = torch.minimum(thr, kept_bound)
        cand = (prio < bound[slot]).nonzero().squeeze(1)
        if bool(over.any()):
            short = over & (thr < kept_bound) & (torch.bincount(slot[cand], minlength=slot_count.numel()) < s)
            if bool(short.any()):
                more = (short[slot] & (prio >= thr[slot]) & (prio < kept_bound[slot])).nonzero().squeeze(1)
                cand = torch.cat([cand, more])
        row, t = entry_rows(cand if flat is None else flat[cand], f)
        slot, prio, place = slot[cand], prio[cand], documents[row] * _STRIDE + offsets[row] + t
        if folded is not None:
            slot, prio, place = torch.cat([folded[0], slot]), torch.cat([folded[1], prio]), torch.cat([folded[2], place])
        if slot.numel() == 0:
            return
        touched = torch.zeros(self.s_prio.shape[0], dtype=torch.bool)
        touched[slot] = True
        rows = touched.nonzero().squeeze(1)
        p, pl = self.s_prio[rows], self.s_place[rows]
        kept = p != _EMPTY
        slot = torch.cat([rows[:, None].expand(-1, s)[kept], slot])
        prio, place = torch.cat([p[kept], prio]), torch.cat([pl[kept], place])
        sel, to, rank = _lowest(slot, prio, place, s)
        self.s_prio[rows], self.s_place[rows] = _EMPTY, -1
        self.s_prio[to, rank] = prio[sel]
        self.s_place[to, rank] = place[sel]

    def finish(self, blocks: Iterable[Block]) -> DashboardStats:  # type: ignore[override]
        n, bins, q, s = self.hist.shape[0], self.bins, self.quantiles, self.samples
        hist = self.hist
        total, cum = hist.sum(1), hist.cumsum(1)
        edges = torch.zeros(n, q + 1, dtype=torch.int64)
        edges[:, -1] = bins
        for g in range(1, q):
            target = (g * total + q - 1) // q
            edges[:, g] = (cum < target[:, None]).sum(1) + 1
        edges[total == 0] = 0
        # each group's samples: the S smallest among the kept samples of its bins
        g_doc = torch.full((n * q, s), -1, dtype=torch.int64)
        g_pos = torch.full((n * q, s), -1, dtype=torch.int64)
        if s and self.hist.any():
            kept = self.s_prio.view(n, bins, s) != _EMPTY
            key, b, _ = kept.nonzero(as_tuple=True)
            prio, place = self.s_prio.view(n, bins, s)[kept], self.s_place.view(n, bins, s)[kept]
            gslot = key * q + (edges[key, 1:q] <= b[:, None]).sum(1)
            sel, to, rank = _lowest(gslot, prio, place, s)
            g_doc[to, rank] = place[sel] >> 32
            g_pos[to, rank] = place[sel] & _LOW32
        top_n, c = self.top_n, self.context
        e, width = top_n + q * s, 2 * c + 1
        ex_doc = torch.cat([self.top_d, g_doc.view(n, q * s)], 1)
        ex_pos = torch.cat([self.top_p, g_pos.view(n, q * s)], 1)
        ex_group = torch.cat([torch.full((n, top_n), _TOP, dtype=torch.int64),
                              torch.arange(q).repeat_interleave(s).expand(n, -1)], 1).clone()
        ex_group[ex_doc < 0] = _NONE
        used = ex_doc.view(-1) >= 0
        q_key = torch.arange(n).repeat_interleave(e)[used]
        tokens = torch.full((n * e, width), -1, dtype=torch.int64)
        acts = torch.zeros((n * e, width), dtype=torch.float32)
        tokens[used], acts[used] = _windows(blocks, q_key, ex_doc.view(-1)[used], ex_pos.view(-1)[used], self.m, c)
        tokens, acts = tokens.view(n, e, width), acts.view(n, e, width)
        ex_val = torch.cat([self.top_v, acts[:, top_n:, c]], 1)  # a sample's value: its window's centre
        ex_val[ex_doc < 0] = 0.0
        base = self.result(tokens[:, :top_n].contiguous())
        shape = (len(self.layers), self.m)
        scale = torch.where(self.exp != _NO_SCALE, torch.pow(2.0, self.exp.clamp(-1000, 1000).double()),
                            torch.zeros((), dtype=torch.float64))
        tensors = {"hist": hist.view(*shape, bins), "hist_top": scale.view(shape),
                   "quantile_edges": edges.view(*shape, q + 1),
                   "example_group": ex_group.view(*shape, e), "example_value": ex_val.view(*shape, e),
                   "example_document": ex_doc.view(*shape, e), "example_position": ex_pos.view(*shape, e),
                   "example_tokens": tokens.view(*shape, e, width), "example_acts": acts.view(*shape, e, width),
                   "truncated": self.truncated, "max_l0": self.max_l0, "recorded_k": torch.tensor([self.recorded_k])}
        return DashboardStats(base, bins, q, s, tensors)


def _locate(rows_of: tuple, d: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``row * T + t`` of each (document, position) in a block (-1 where the block does not hold it)."""
    row_key, documents, offsets, mask, t_len = rows_of
    r = (torch.searchsorted(row_key, d * _STRIDE + p.clamp_min(0), right=True) - 1).clamp_min(0)
    t = p - offsets[r]
    flat = r * t_len + t.clamp(0, t_len - 1)
    ok = (p >= 0) & (documents[r] == d) & (t >= 0) & (t < t_len) & mask[flat]
    return torch.where(ok, flat, -1)


def _windows(blocks: Iterable[Block], key: torch.Tensor, doc: torch.Tensor, pos: torch.Tensor, m: int,
             context: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens and the feature's activations [Q, 2c+1] around each query (key, document, position), -1 and
    0 outside the document. Rows of each block come in (document, position) order: a window is read from
    the query's own row; its positions outside that row (a document continued in the next row or block)
    are searched over the rows. Activations: the block's entries sorted as packed
    ``key << 38 | slot index`` values; each window's entries of its key are one contiguous run."""
    span = torch.arange(-context, context + 1)
    width = span.numel()
    tokens = torch.full((key.numel(), width), -1, dtype=torch.int64)
    acts = torch.zeros((key.numel(), width), dtype=torch.float32)
    for f, documents, offsets in blocks:
        n_rows, t_len, n_layers, k = f.indices.shape
        if n_rows == 0:
            continue
        if n_rows * t_len * n_layers * k >= 1 << _ENTRY_BITS or n_layers * m >= 1 << (62 - _ENTRY_BITS):
            raise FeatureStatsError(f"a block of {n_rows} x {t_len} x {n_layers} x {k} slots and {n_layers} x {m} "
                                    "features is too large to index; use smaller shards")
        documents, offsets = documents.long(), offsets.long()
        near = ((doc >= documents.min()) & (doc <= documents.max())).nonzero().squeeze(1)
        if near.numel() == 0:
            continue
        mask = f.mask.bool()
        rows_of = (documents * _STRIDE + offsets, documents, offsets, mask.reshape(-1), t_len)
        centre = _locate(rows_of, doc[near], pos[near])
        inside = (centre >= 0).nonzero().squeeze(1)
        c_in, q_in = centre[inside], near[inside]
        r, t = c_in // t_len, c_in % t_len
        tok = torch.where(mask, f.token_ids.long(), -1)
        win = torch.nn.functional.pad(tok, (context, context), value=-1).unfold(1, width, 1)[r, t]
        tokens[q_in] = torch.where(win >= 0, win, tokens[q_in])  # keep what another block found
        # the block's entries, sorted by (key, position)
        per_pos = n_layers * k
        e_key, _, entry = block_entries(f, m)
        packed = e_key.bitwise_left_shift_(_ENTRY_BITS).bitwise_or_(
            entry if entry is not None else torch.arange(e_key.numel()))
        packed = np.sort(packed.numpy())
        low = (1 << _ENTRY_BITS) - 1
        # in-row windows: the run of the key's entries between the window's first and last position
        row0 = r * t_len
        first = row0 + (t - context).clamp_min(0)
        last = row0 + (t + context).clamp_max(t_len - 1)
        kk = key[q_in] << _ENTRY_BITS
        start = _search(packed, kk | first * per_pos)
        count = _search(packed, kk | (last + 1) * per_pos) - start
        which = torch.repeat_interleave(torch.arange(q_in.numel()), count)
        at = start[which] + torch.arange(which.numel()) - torch.repeat_interleave(count.cumsum(0) - count, count)
        e = torch.from_numpy(packed)[at] & low
        acts[q_in[which], e // per_pos - c_in[which] + context] = f.values.reshape(-1)[e].float()
        # positions outside the query's row (or queries of this block's documents held elsewhere): only
        # the queries whose window leaves the row (or whose centre is not here) are looked at
        t_all = torch.full_like(centre, -1)
        t_all[inside] = t
        need = ((t_all < context) | (t_all + context >= t_len)).nonzero().squeeze(1)
        if need.numel() == 0:
            continue
        want = pos[near][need][:, None] + span
        t_need = t_all[need][:, None] + span
        out_row = (centre[need] < 0)[:, None] | (t_need < 0) | (t_need >= t_len)
        qs, js = (out_row & (want >= 0)).nonzero(as_tuple=True)
        if qs.numel() == 0:
            continue
        qs = need[qs]
        flat = _locate(rows_of, doc[near][qs], pos[near][qs] + span[js])
        ok = flat >= 0
        qs, js, flat = near[qs[ok]], js[ok], flat[ok]
        tokens[qs, js] = tok.reshape(-1)[flat]
        needle = (key[qs] << _ENTRY_BITS) | flat * per_pos
        start = _search(packed, needle).clamp_max(max(packed.size - 1, 0))
        got = torch.from_numpy(packed)[start] if packed.size else needle - needle - 1
        hit = (got >> _ENTRY_BITS == key[qs]) & ((got & low) // per_pos == flat)
        acts[qs[hit], js[hit]] = f.values.reshape(-1)[got[hit] & low].float()
    return tokens, acts


def _search(sorted_values: np.ndarray, needles: torch.Tensor) -> torch.Tensor:
    """``searchsorted`` (left) of ``needles`` in ``sorted_values``; numpy walks sorted needles fastest."""
    n = needles.numpy()
    by = np.argsort(n)
    out = torch.empty(n.size, dtype=torch.int64)
    out[torch.from_numpy(by)] = torch.from_numpy(np.searchsorted(sorted_values, n[by]))
    return out


def dashboard_stats(
    source: str | os.PathLike[str] | Features,
    *,
    top_n: int = 10,
    context: int = 8,
    bins: int = 32,
    quantiles: int = 5,
    samples: int = 3,
    save: bool = True,
) -> DashboardStats:
    """Dashboard statistics, with the base :func:`~sparse_clt_hf.feature_stats.feature_stats` as
    ``.base``, of an extraction folder (streamed, read twice like ``feature_stats``; saved as
    ``DIR/stats.safetensors`` and ``DIR/dashboard.safetensors`` when ``save``) or of in-memory Features
    with ``token_ids`` (rows are documents)."""
    for name, v, lo in (("top_n", top_n, 1), ("context", context, 0), ("bins", bins, 1),
                        ("quantiles", quantiles, 1), ("samples", samples, 0)):
        if not isinstance(v, int) or isinstance(v, bool) or v < lo:
            raise FeatureStatsError(f"{name} must be an integer >= {lo}, got {v!r}")
    if isinstance(source, Features):
        if source.token_ids is None:
            raise FeatureStatsError("these Features have no token_ids, so examples cannot be shown; "
                                    "record them with a forward pass given input_ids")
        if not source.n_features:
            raise FeatureStatsError("these Features have no n_features (layer widths)")
        rows = torch.arange(source.batch_size)
        zeros = torch.zeros(source.batch_size, dtype=torch.int64)
        acc = DashboardAccumulator(source.layers, source.n_features, top_n, context, bins, quantiles, samples)
        acc.update(source, rows, zeros)
        return acc.finish([(source, rows, zeros)])

    from ..extract_folder import read_manifest
    from ..extracted import iter_extracted

    directory = Path(source)
    manifest = read_manifest(directory)
    acc = DashboardAccumulator(manifest["layers"], manifest["n_features"], top_n, context, bins, quantiles, samples)
    for shard in iter_extracted(directory):
        acc.update(shard.features, shard.documents, shard.offsets)

    def shards() -> Iterator[Block]:
        for s in iter_extracted(directory):
            yield s.features, s.documents, s.offsets

    stats = acc.finish(shards())
    if save:
        stats.base.save(directory / STATS_FILE)
        stats.save(directory / DASHBOARD_FILE)
    return stats
