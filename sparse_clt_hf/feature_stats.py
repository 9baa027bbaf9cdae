"""Per-feature statistics over a corpus: how often each feature fires, how strongly, and where.

:func:`feature_stats` streams the shards of an extraction folder (or reads an in-memory
:class:`~sparse_clt_hf.Features`) and keeps, per (layer, feature), a count, a sum, a maximum and the
``top_n`` strongest activations with their (document, position): fixed-size tensors updated shard by
shard, so memory depends on the number of features, never on the corpus. A second pass reads the
token windows around those positions.

"Fires" means "is among the recorded top-k of that token and layer": frequency, mean and max see only
what the extraction recorded.

File format (``DIR/stats.safetensors``): tensors ``count`` [L, M] int64, ``sum`` [L, M] float64,
``max`` [L, M] float32, ``top_values`` [L, M, n] float32 (-inf in empty slots), ``top_documents`` and
``top_positions`` [L, M, n] int64 (-1 empty), ``top_tokens`` [L, M, n, 2c+1] int64 (the tokens at
positions ``position - c .. position + c`` of the document, -1 outside it), where ``M`` is the widest
layer (narrower layers padded); metadata ``format`` = ``sparse-clt-hf-feature-stats``, ``version``,
``layers``, ``n_features``, ``n_positions``, ``top_n``, ``context`` (JSON strings).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .errors import SparseCLTError
from .features import Features
from .io.structured import load_json

FORMAT = "sparse-clt-hf-feature-stats"
VERSION = 1
STATS_FILE = "stats.safetensors"
_DOC_STRIDE = 1 << 32  # key = document * stride + position (documents < 2**31, positions < 2**32)


class FeatureStatsError(SparseCLTError, ValueError):
    """Features that cannot give statistics (no token ids, no layers) or an unreadable stats file."""


@dataclass
class Context:
    """One max-activating context of a feature."""

    document: int  # document id (input order)
    position: int  # token position within the document
    activation: float
    token_ids: list[int] = field(default_factory=list)  # window around it, clipped at the document's edges
    index: int = 0  # index within token_ids of the max-activating token


class FeatureStats:
    """Frequency, mean, max and top contexts of every feature of every layer (see the module doc)."""

    def __init__(self, layers: list[int], n_features: list[int], n_positions: int, top_n: int, context: int,
                 tensors: dict[str, torch.Tensor]) -> None:
        self.layers = list(layers)
        self.n_features = list(n_features)
        self.n_positions = int(n_positions)
        self.top_n = int(top_n)
        self.context = int(context)
        self._t = tensors

    def __repr__(self) -> str:
        return (f"FeatureStats(layers={self.layers}, n_features={self.n_features}, n_positions={self.n_positions}, "
                f"top_n={self.top_n}, context={self.context})")

    def _li(self, layer: int) -> int:
        try:
            return self.layers.index(layer)
        except ValueError:
            raise KeyError(f"layer {layer} has no statistics; layers: {self.layers}") from None

    def _row(self, name: str, layer: int) -> torch.Tensor:
        li = self._li(layer)
        return self._t[name][li, : self.n_features[li]]

    def count(self, layer: int) -> torch.Tensor:
        """[m] int64: valid positions where the feature is in the recorded top-k."""
        return self._row("count", layer).clone()

    def frequency(self, layer: int) -> torch.Tensor:
        """[m] float64: ``count / n_positions``."""
        return self._row("count", layer).double() / max(self.n_positions, 1)

    def mean(self, layer: int) -> torch.Tensor:
        """[m] float64: mean activation over the positions where the feature fired (0 if never)."""
        c = self._row("count", layer)
        return torch.where(c > 0, self._row("sum", layer) / c.clamp_min(1), torch.zeros((), dtype=torch.float64))

    def max(self, layer: int) -> torch.Tensor:
        """[m] float32: largest recorded activation (0 if never fired)."""
        return torch.where(self._row("count", layer) > 0, self._row("max", layer), torch.zeros(()))

    def top_contexts(self, layer: int, feature: int) -> list[Context]:
        """Up to ``top_n`` strongest activations, descending (ties: earlier document, then position)."""
        li = self._li(layer)
        if not 0 <= feature < self.n_features[li]:
            raise KeyError(f"feature {feature} out of range: layer {layer} has {self.n_features[li]} features")
        vals = self._t["top_values"][li, feature].tolist()
        docs = self._t["top_documents"][li, feature].tolist()
        poss = self._t["top_positions"][li, feature].tolist()
        toks = self._t["top_tokens"][li, feature].tolist()
        out = []
        for v, d, p, window in zip(vals, docs, poss, toks):
            if d < 0:
                break
            left = sum(1 for t in window[: self.context] if t < 0)
            out.append(Context(int(d), int(p), float(v), [int(t) for t in window if t >= 0], self.context - left))
        return out

    def top_tokens(self, layer: int, feature: int, n: int = 3) -> list[int]:
        """The ``n`` most frequent max-activating token ids among the feature's top contexts (ties: the
        token of the stronger context first)."""
        contexts = self.top_contexts(layer, feature)
        tokens = [c.token_ids[c.index] for c in contexts if c.token_ids]
        counts = Counter(tokens)
        first = {}
        for i, t in enumerate(tokens):
            first.setdefault(t, i)
        return sorted(counts, key=lambda t: (-counts[t], first[t]))[:n]

    # ------------------------------------------------------------------ IO
    def save(self, path: str | os.PathLike[str]) -> None:
        """Write one safetensors file (tensors and JSON metadata; see the module doc), atomically."""
        from safetensors.torch import save_file

        path = Path(path)
        meta = {"format": FORMAT, "version": str(VERSION), "layers": json.dumps(self.layers),
                "n_features": json.dumps(self.n_features), "n_positions": str(self.n_positions),
                "top_n": str(self.top_n), "context": str(self.context)}
        tmp = path.with_name(path.name + ".tmp")
        save_file({k: v.contiguous() for k, v in self._t.items()}, str(tmp), metadata=meta)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> FeatureStats:
        """Read a file written by :meth:`save` (or an extraction folder holding ``stats.safetensors``)."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        path = Path(path)
        if path.is_dir():
            path = path / STATS_FILE
        if not path.is_file():
            raise FeatureStatsError(f"{path} does not exist: compute it with `sparse-clt-hf stats DIR`")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
            tensors = load_file(str(path)) if meta.get("format") == FORMAT else {}
        except Exception as exc:  # safetensors raises its own types (and OSError) for damaged files
            raise FeatureStatsError(f"{path}: not a readable statistics file ({type(exc).__name__}: {exc})") from exc
        if meta.get("format") != FORMAT:
            raise FeatureStatsError(f"{path} is not a feature statistics file (format {meta.get('format')!r})")
        return cls(*_checked_stats(path, meta, tensors), tensors)


def _checked_stats(path: Path, meta: dict[str, str], t: dict[str, torch.Tensor]) -> tuple:
    """layers, n_features, n_positions, top_n, context of a stats file, each checked against the tensors."""

    def fail(what: str) -> FeatureStatsError:
        return FeatureStatsError(f"{path}: {what} (damaged, or not written by feature_stats); compute it again")

    layers = load_json(meta.get("layers", ""), f"{path} metadata 'layers'", error=FeatureStatsError, limit=1 << 20)
    widths = load_json(meta.get("n_features", ""), f"{path} metadata 'n_features'", error=FeatureStatsError,
                       limit=1 << 20)
    if not isinstance(layers, list) or not layers or not all(type(x) is int and x >= 0 for x in layers):
        raise fail(f"metadata 'layers' is {str(layers)[:80]!r}; expected layer numbers")
    if not isinstance(widths, list) or len(widths) != len(layers) or not all(type(w) is int and w > 0 for w in widths):
        raise fail(f"metadata 'n_features' is {str(widths)[:80]!r}; expected one positive width per layer")
    numbers = {}
    for key in ("n_positions", "top_n", "context"):
        value = meta.get(key, "")
        if not (value.isascii() and value.isdigit() and len(value) < 19):
            raise fail(f"metadata {key!r} is {value[:40]!r}; expected a non-negative integer")
        numbers[key] = int(value)
    n, c, m = numbers["top_n"], numbers["context"], max(widths)
    shapes = {"count": (len(layers), m), "sum": (len(layers), m), "max": (len(layers), m),
              "top_values": (len(layers), m, n), "top_documents": (len(layers), m, n),
              "top_positions": (len(layers), m, n), "top_tokens": (len(layers), m, n, 2 * c + 1)}
    for key, shape in shapes.items():
        if key not in t or tuple(t[key].shape) != shape:
            got = list(t[key].shape) if key in t else "missing"
            raise fail(f"tensor {key!r} is {got}; expected shape {list(shape)}")
    return layers, widths, numbers["n_positions"], n, c


# ---------------------------------------------------------------------------- computation
def run_rank(sorted_keys: torch.Tensor) -> torch.Tensor:
    """Rank of each entry in its run of equal values of ``sorted_keys``."""
    i = torch.arange(sorted_keys.numel())
    start = torch.ones_like(sorted_keys, dtype=torch.bool)
    start[1:] = sorted_keys[1:] != sorted_keys[:-1]
    return i - torch.where(start, i, 0).cummax(0).values


def _top_candidates(key: torch.Tensor, act: torch.Tensor, n: int, kept_nth: torch.Tensor,
                    block_count: torch.Tensor) -> torch.Tensor:
    """Indices (ascending) of the entries that can be among their key's ``n`` strongest: at or above the
    key's n-th strongest activation of the block (ties included) and above ``kept_nth`` [keys].
    ``block_count`` [keys]: entries of each key in the block (the sorted runs' starts, without a rank)."""
    bits = (act + 0.0).view(torch.int32).long()  # + 0.0: -0.0 becomes 0.0
    if bool((act < 0).any()):
        bits = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # ordered like the floats
    packed = (key << 32) - bits + ((1 << 31) - 1)  # ascending: key, then activation descending
    values = torch.from_numpy(np.sort(packed.numpy()))
    start = block_count.cumsum(0) - block_count
    full = (block_count >= n).nonzero().squeeze(1)
    bound = torch.full_like(kept_nth, torch.iinfo(torch.int64).max, dtype=torch.int64)
    bound[full] = values[start[full] + n - 1]
    ok = packed <= bound[key]
    if bool((kept_nth > float("-inf")).any()):
        ok &= act > kept_nth[key]
    return ok.nonzero().squeeze(1)


def block_entries(f: Features, m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The recorded entries of a block in row order: key (layer index * ``m`` + feature), activation,
    and each entry's flat index into ``f.indices`` (None when every slot is recorded: then the entries
    are the slots themselves, and no index array is built)."""
    n_rows, t_len, n_layers, k = f.indices.shape
    idx = f.indices
    layer_base = torch.arange(n_layers, dtype=torch.int64)[:, None] * m
    if bool(f.mask.bool().all()) and bool((idx >= 0).all()):
        return (idx + layer_base).reshape(-1), f.values.reshape(-1).float(), None
    valid = (idx >= 0) & f.mask.bool()[:, :, None, None]
    flat = valid.reshape(-1).nonzero().squeeze(1)
    key = (flat // k % n_layers) * m + idx.reshape(-1)[flat]
    return key, f.values.reshape(-1)[flat].float(), flat


def entry_rows(flat: torch.Tensor, f: Features) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and position in the row of flat entry indices of ``f.indices``."""
    _, t_len, n_layers, k = f.indices.shape
    tok = flat // (n_layers * k)
    return tok // t_len, tok % t_len


class _Accumulator:
    """Running per-(layer, feature) statistics, updated one block of rows at a time."""

    def __init__(self, layers: list[int], n_features: list[int], top_n: int, context: int) -> None:
        self.layers, self.n_features = list(layers), list(n_features)
        self.top_n, self.context = top_n, context
        n_layers, m = len(layers), max(n_features)
        self.m = m
        self.n_positions = 0
        self.count = torch.zeros(n_layers * m, dtype=torch.int64)
        self.sum = torch.zeros(n_layers * m, dtype=torch.float64)
        self.max = torch.full((n_layers * m,), float("-inf"), dtype=torch.float32)
        self.top_v = torch.full((n_layers * m, top_n), float("-inf"), dtype=torch.float32)
        self.top_d = torch.full((n_layers * m, top_n), -1, dtype=torch.int64)
        self.top_p = torch.full((n_layers * m, top_n), -1, dtype=torch.int64)

    def update(self, f: Features, documents: torch.Tensor, offsets: torch.Tensor):
        """Rows of ``f`` are (pieces of) documents ``documents`` starting at position ``offsets``; rows
        must come in (document, position) order across calls, which makes ties resolve to the earliest.
        Returns the block's recorded entries (key = layer index * M + feature, activation, flat index or
        None: see :func:`block_entries`) and each key's count in the block, for accumulators that extend
        this one in the same pass."""
        self.n_positions += int(f.mask.bool().sum())
        key, act, flat = block_entries(f, self.m)
        block_count = torch.bincount(key, minlength=self.count.numel())
        if key.numel():
            self._add(key, act, flat, block_count, f, documents, offsets)
        return key, act, flat, block_count

    def _add(self, key: torch.Tensor, act: torch.Tensor, flat: torch.Tensor | None, block_count: torch.Tensor,
             f: Features, documents: torch.Tensor, offsets: torch.Tensor) -> None:
        self.count += block_count
        self.sum.index_add_(0, key, act.double())
        self.max.scatter_reduce_(0, key, act, reduce="amax")
        # only entries at or above their key's n-th strongest of this block, and above the n-th kept one
        # (kept ones win ties), can enter: found by sorting packed (key, activation) values alone
        cand = _top_candidates(key, act, self.top_n, self.top_v[:, -1], block_count)
        if cand.numel() == 0:
            return
        row, t = entry_rows(cand if flat is None else flat[cand], f)
        key, act = key[cand], act[cand]
        doc, pos = documents[row].long(), offsets[row].long() + t
        # top-n candidates per key: order by key, activation descending, then (document, position)
        # (nonzero() yields rows in order, so stable sorts keep the earliest first among ties)
        o1 = act.sort(descending=True, stable=True).indices
        order = o1[key[o1].sort(stable=True).indices]
        k_sorted = key[order]
        uniq, counts = torch.unique_consecutive(k_sorted, return_counts=True)
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.arange(k_sorted.numel()) - torch.repeat_interleave(starts, counts)
        keep = rank < self.top_n
        sel, r, kk = order[keep], rank[keep], k_sorted[keep]
        slot = torch.searchsorted(uniq, kk)
        n_u = uniq.numel()
        cand_v = torch.full((n_u, self.top_n), float("-inf"), dtype=torch.float32)
        cand_d = torch.full((n_u, self.top_n), -1, dtype=torch.int64)
        cand_p = torch.full((n_u, self.top_n), -1, dtype=torch.int64)
        cand_v[slot, r], cand_d[slot, r], cand_p[slot, r] = act[sel], doc[sel], pos[sel]
        # merge with what is kept: existing entries come first, so they win ties (earlier rows)
        all_v = torch.cat([self.top_v[uniq], cand_v], 1)
        all_d = torch.cat([self.top_d[uniq], cand_d], 1)
        all_p = torch.cat([self.top_p[uniq], cand_p], 1)
        best = all_v.sort(dim=1, descending=True, stable=True).indices[:, : self.top_n]
        self.top_v[uniq] = all_v.gather(1, best)
        self.top_d[uniq] = all_d.gather(1, best)
        self.top_p[uniq] = all_p.gather(1, best)

    def contexts(self, blocks: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Token windows [L*M, n, 2c+1] around every kept (document, position), from ``blocks`` of
        (token_ids [R, T], mask [R, T], documents [R], offsets [R]) covering the corpus in order."""
        c = self.context
        span = torch.arange(-c, c + 1)
        out = torch.full((*self.top_d.shape, 2 * c + 1), -1, dtype=torch.int64)
        used = self.top_d >= 0
        q_doc = self.top_d[used]
        q_key = (q_doc * _DOC_STRIDE + self.top_p[used])[:, None] + span  # [Q, 2c+1]
        q_key = torch.where(self.top_p[used][:, None] + span >= 0, q_key, -1)
        found = torch.full(q_key.shape, -1, dtype=torch.int64)
        for tokens, mask, documents, offsets in blocks:
            r, t = mask.bool().nonzero(as_tuple=True)
            if r.numel() == 0:
                continue
            keys = documents[r].long() * _DOC_STRIDE + offsets[r].long() + t  # ascending
            toks = tokens[r, t].long()
            lo, hi = int(documents[r].min()), int(documents[r].max())
            near = (q_doc >= lo) & (q_doc <= hi)
            if not near.any():
                continue
            q = q_key[near]
            at = torch.searchsorted(keys, q).clamp_max(keys.numel() - 1)
            hit = keys[at] == q
            sub = found[near]
            sub[hit] = toks[at][hit]
            found[near] = sub
        out[used] = found
        return out

    def finish(self, blocks) -> FeatureStats:
        return self.result(self.contexts(blocks))

    def result(self, top_tokens: torch.Tensor) -> FeatureStats:
        """The statistics, with the token windows ``top_tokens`` [L*M, n, 2c+1] of the top contexts."""
        n_layers = len(self.layers)
        shape = (n_layers, self.m)
        tensors = {
            "count": self.count.view(shape),
            "sum": self.sum.view(shape),
            "max": self.max.view(shape),
            "top_values": self.top_v.view(*shape, self.top_n),
            "top_documents": self.top_d.view(*shape, self.top_n),
            "top_positions": self.top_p.view(*shape, self.top_n),
            "top_tokens": top_tokens.view(*shape, self.top_n, 2 * self.context + 1),
        }
        return FeatureStats(self.layers, self.n_features, self.n_positions, self.top_n, self.context, tensors)


def feature_stats(
    source: str | os.PathLike[str] | Features,
    *,
    top_n: int = 10,
    context: int = 8,
    save: bool = True,
    verify: bool = False,
) -> FeatureStats:
    """Statistics of every (layer, feature) over an extraction folder (streamed shard by shard; saved
    as ``DIR/stats.safetensors`` when ``save``) or an in-memory :class:`Features` with ``token_ids``
    (rows are documents 0..B-1, positions are the row's position indices; nothing is saved).

    ``top_n`` contexts are kept per feature, each with ``context`` tokens either side. Shards are checked
    as :func:`~sparse_clt_hf.iter_extracted` checks them (``verify``: their sha256 too)."""
    if not isinstance(top_n, int) or top_n <= 0:
        raise FeatureStatsError(f"top_n must be a positive integer, got {top_n!r}")
    if not isinstance(context, int) or context < 0:
        raise FeatureStatsError(f"context must be a non-negative integer, got {context!r}")
    if isinstance(source, Features):
        if source.token_ids is None:
            raise FeatureStatsError("these Features have no token_ids, so contexts cannot be shown; "
                                    "record them with a forward pass given input_ids")
        widths = source.n_features
        if not widths:
            raise FeatureStatsError("these Features have no n_features (layer widths)")
        rows = torch.arange(source.batch_size)
        zeros = torch.zeros(source.batch_size, dtype=torch.int64)
        acc = _Accumulator(source.layers, widths, top_n, context)
        acc.update(source, rows, zeros)
        return acc.finish([(source.token_ids, source.mask, rows, zeros)])

    from .extract_folder import read_manifest
    from .extracted import iter_extracted

    directory = Path(source)
    manifest = read_manifest(directory)
    acc = _Accumulator(manifest["layers"], manifest["n_features"], top_n, context)
    for shard in iter_extracted(directory, verify=verify):
        acc.update(shard.features, shard.documents, shard.offsets)
    blocks = ((s.features.token_ids, s.features.mask, s.documents, s.offsets) for s in iter_extracted(directory, verify=verify))
    stats = acc.finish(blocks)
    if save:
        stats.save(directory / STATS_FILE)
    return stats
