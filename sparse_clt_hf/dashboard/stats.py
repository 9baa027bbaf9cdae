"""Dashboard statistics: per-feature activation histograms, quantile groups, examples sampled from each
group with their context windows, over an extraction (streamed) or in-memory Features.

On top of :func:`~sparse_clt_hf.feature_stats.feature_stats` (count, sum, max, top contexts), per
(layer, feature):

- ``hist`` [B]: the recorded activations in ``B`` equal bins over ``[0, top)``, where ``top`` (tensor
  ``hist_top``) is the smallest power of two above the feature's max (bin of ``a`` is
  ``floor(a * B / top)``; a value <= 0 lands in bin 0; ``top`` 0 when nothing positive was recorded).
  The max lies in the upper half, so between ``B/2`` and ``B`` bins cover ``[0, max]``. A power-of-two
  scale needs no first pass for the max: when the running max passes ``top``, bins fold exactly (see
  :mod:`.accumulate`). Memory ``L * M * B`` counters, independent of the corpus.
- ``quantile_edges`` [Q + 1] bin indices: group ``g`` holds bins ``[e_g, e_(g+1))``; ``e_g`` (0 < g < Q)
  is one past the bin holding the ``g/Q`` quantile (the activation of rank ``ceil(g * n / Q)``), so the
  boundaries are bin edges, exact for the histogram (a group may be empty when a bin is heavy).
- ``samples``: up to ``S`` examples per group, a uniform sample without replacement: the ``S``
  entries with the smallest hash priority of ``(document, position, feature)`` (deterministic,
  mergeable across shards; ties go to the earlier position), kept per bin while streaming and picked
  per group at the end.
- each example (the ``top_n`` top contexts, then the samples) with its token window (``context``
  tokens either side, -1 outside the document) and the feature's activation at every window token
  (0 where the feature was not recorded), read in the pass ``feature_stats`` makes for its windows.

"Fires" means "is among the token's recorded top-k" (as in ``feature_stats``): histograms, quantiles
and samples see only recorded activations. With an extraction whose ``top_k`` is below the number of
active features (``l0``), weak activations are missing and frequency is a lower bound; extract with
a larger ``top_k`` (or the transcoder's own ``k`` for a TopK transcoder, which is then exact).
:meth:`DashboardStats.exact` tells which case a layer is in: the positions whose ``l0`` exceeded the
recorded ``k`` and the largest ``l0`` (the ``top_k`` that records every active feature densely).

File ``DIR/dashboard.safetensors``: tensors ``hist`` [L, M, B] int64, ``hist_top`` [L, M] float64, ``quantile_edges`` [L, M, Q+1]
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
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..feature_stats import STATS_FILE, FeatureStats, FeatureStatsError
from ..io.structured import load_json

FORMAT = "sparse-clt-hf-dashboard-stats"
VERSION = 2  # 2: power-of-two histogram scale (hist_top)
DASHBOARD_FILE = "dashboard.safetensors"
_STRIDE = 1 << 32  # document * stride + position
_M32 = (1 << 32) - 1
_PRIORITY_MUL = 0x9E3779B1  # odd: a bijection mod 2**32
_EMPTY = torch.iinfo(torch.int64).max
_TOP, _NONE = -1, -2


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


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A bijection of [0, 2**32) that scatters nearby inputs (an xorshift-multiply integer hash)."""
    x = ((x >> 16) ^ x) * 0x45D9F3B & _M32
    x = ((x >> 16) ^ x) * 0x45D9F3B & _M32
    return (x >> 16) ^ x


def token_hash(documents: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Pseudo-random int64 in [0, 2**32) of (document, position): distinct positions of a document
    stay distinct (documents < 2**31, positions < 2**32)."""
    return _mix32(_mix32((documents * 0x9E3779B1) & _M32) ^ (positions & _M32))


def key_hash(keys: torch.Tensor) -> torch.Tensor:
    """Pseudo-random int64 in [0, 2**32) of a feature key (keys < 2**32)."""
    return _mix32((keys * 0x85EBCA6B + 0x165667B1) & _M32)


def priority(documents: torch.Tensor, positions: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Deterministic pseudo-random int64 in [0, 2**32) of (document, position, feature key):
    ``(token_hash ^ key_hash) * C mod 2**32``. The sample keeps the smallest: for one feature a
    bijection of the positions' hashes, so a uniform sample without replacement, mergeable across
    shards; the multiplication carries the key's bits upwards, so that features firing at the same
    positions get unrelated samples. A block hashes its tokens and its features once and pays one
    gather, an xor and a multiplication per entry."""
    return combine_hashes(token_hash(documents, positions), key_hash(keys))


def combine_hashes(token_h: torch.Tensor, key_h: torch.Tensor) -> torch.Tensor:
    """The priority of hashes (in place on ``token_h``)."""
    return token_h.bitwise_xor_(key_h).mul_(_PRIORITY_MUL).bitwise_and_(_M32)


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
        """[B] int64: recorded activations per bin over ``[0, top)`` (see :meth:`bin_edges`)."""
        return self._at("hist", layer, feature).clone()

    def bin_edges(self, layer: int, feature: int) -> torch.Tensor:
        """[B + 1] float64: ``linspace(0, top, B + 1)``, ``top`` the smallest power of two above the max."""
        top = float(self._at("hist_top", layer, feature))
        return torch.linspace(0.0, top, self.bins + 1, dtype=torch.float64)

    def used_bins(self, layer: int, feature: int) -> int:
        """How many bins (from the first) reach the feature's max: the rest are empty by construction."""
        top, mx = float(self._at("hist_top", layer, feature)), float(self.base.max(layer)[feature])
        return max(1, min(self.bins, int(mx / top * self.bins) + 1)) if top > 0 else 1

    def quantile_edges(self, layer: int, feature: int) -> torch.Tensor:
        """[Q + 1] int64 bin indices delimiting the quantile groups (see the module doc)."""
        return self._at("quantile_edges", layer, feature).clone()

    def quantile_bounds(self, layer: int, feature: int) -> list[tuple[float, float]]:
        """Each group's activation range ``[lo, hi)`` (bin edges, capped at the max; the last one closed)."""
        edges, e = self.bin_edges(layer, feature).tolist(), self.quantile_edges(layer, feature).tolist()
        mx = float(self.base.max(layer)[feature])
        return [(min(edges[a], mx), min(edges[b], mx)) for a, b in zip(e[:-1], e[1:])]

    def percentiles(self, layer: int, feature: int, n: int = 100) -> list[float]:
        """Activation at each of ``1/n .. n/n`` of the recorded activations, interpolated linearly inside
        the histogram's bins (approximate to a bin width) and capped at the max."""
        hist = self.histogram(layer, feature).double()
        mx = float(self.base.max(layer)[feature])
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
            out.append(min(float(edges[b] + (edges[b + 1] - edges[b]) * min(max(inside, 0.0), 1.0)), mx))
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

    @staticmethod
    def is_current(path: str | os.PathLike[str]) -> bool:
        """Whether ``path`` is a dashboard statistics file of this version (else it must be recomputed)."""
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
        except Exception:  # noqa: BLE001 - missing or damaged: not current
            return False
        return meta.get("format") == FORMAT and meta.get("version") == str(VERSION)

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
        if meta.get("version") != str(VERSION):
            raise FeatureStatsError(f"{path} has version {meta.get('version')!r} of the dashboard statistics; this "
                                    f"version reads {VERSION}: recompute it with `sparse-clt-hf stats DIR --dashboard`")
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
