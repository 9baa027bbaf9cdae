"""The feature container: top-k transcoder features per (batch row, token position, layer).

Position ``t`` is the input token at index ``t`` of the sequence the model saw (for ``generate()``:
index ``t`` of ``sequences``, left padding included), so after ``generate`` ``T = sequences.shape[1] - 1``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors.torch import save_file


class FeatureHit(NamedTuple):
    """One active feature: where it fired and how strongly."""

    batch: int
    position: int
    layer: int
    feature: int
    activation: float


@dataclass
class Features:
    """Top-k features. ``indices`` [B, T, L, k] int32 (-1 in empty slots), ``values`` [B, T, L, k]
    (0 in empty slots, sorted descending), ``l0`` [B, T, L] (active features before truncation),
    ``mask`` [B, T] (False on padding), ``layers`` (the L axis), ``token_ids`` [B, T] when known,
    ``n_features`` (width of each layer, for :meth:`to_dense`)."""

    indices: torch.Tensor
    values: torch.Tensor
    l0: torch.Tensor
    mask: torch.Tensor
    layers: list[int]
    token_ids: torch.Tensor | None = None
    n_features: list[int] | None = None

    # ------------------------------------------------------------------ shape
    @property
    def batch_size(self) -> int:
        return self.indices.shape[0]

    @property
    def num_positions(self) -> int:
        return self.indices.shape[1]

    @property
    def k(self) -> int:
        return self.indices.shape[3]

    @property
    def nbytes(self) -> int:
        """Bytes held by the feature tensors (values, indices, l0, mask, token ids)."""
        tensors = (self.values, self.indices, self.l0, self.mask, self.token_ids)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def __len__(self) -> int:
        return self.num_positions

    def __repr__(self) -> str:
        b, t, n_layers, k = self.indices.shape
        return f"Features(batch={b}, positions={t}, layers={self.layers if n_layers <= 8 else n_layers}, k={k})"

    def _layer_pos(self, layer: int) -> int:
        try:
            return self.layers.index(layer)
        except ValueError:
            raise KeyError(f"layer {layer} was not recorded; recorded layers: {self.layers}") from None

    # ------------------------------------------------------------------ views
    def layer(self, layer: int) -> dict[str, Any]:
        """One layer in the original sparse-clt dict form: ``layer``, ``activations`` [B, T, k],
        ``indices`` [B, T, k], ``sparsity`` [B, T] (active features before truncation)."""
        i = self._layer_pos(layer)
        return {
            "layer": layer,
            "activations": self.values[:, :, i],
            "indices": self.indices[:, :, i],
            "sparsity": self.l0[:, :, i],
        }

    def positions(self, start: int, stop: int | None = None) -> Features:
        """Features of positions ``start:stop`` only."""
        sl = slice(start, stop)
        return Features(
            self.indices[:, sl],
            self.values[:, sl],
            self.l0[:, sl],
            self.mask[:, sl],
            list(self.layers),
            None if self.token_ids is None else self.token_ids[:, sl],
            self.n_features,
        )

    def top(self, n: int = 10, *, layer: int | None = None) -> list[FeatureHit]:
        """The ``n`` strongest activations across batch rows, positions and layers (padding excluded)."""
        values = self.values.float()
        if layer is not None:
            keep = torch.zeros(len(self.layers), dtype=torch.bool)
            keep[self._layer_pos(layer)] = True
            values = values.masked_fill(~keep.view(1, 1, -1, 1).to(values.device), float("-inf"))
        valid = (self.indices >= 0) & self.mask[:, :, None, None].to(self.indices.device)
        flat = values.masked_fill(~valid, float("-inf")).flatten()
        n = min(n, int(valid.sum()))
        if n <= 0:
            return []
        vals, idx = flat.topk(n)
        b, t, n_layers, k = self.values.shape
        hits = []
        for v, i in zip(vals.tolist(), idx.tolist()):
            bi, rest = divmod(i, t * n_layers * k)
            ti, rest = divmod(rest, n_layers * k)
            li, ki = divmod(rest, k)
            hits.append(FeatureHit(bi, ti, self.layers[li], int(self.indices[bi, ti, li, ki]), v))
        return hits

    def to_dense(self, layer: int, n_features: int | None = None) -> torch.Tensor:
        """Dense activations [B, T, m] of one layer (zeros where a feature was not in the top-k)."""
        i = self._layer_pos(layer)
        m = n_features or (self.n_features[i] if self.n_features else None)
        if m is None:
            raise ValueError("to_dense needs n_features (the layer width) for features loaded without it")
        idx = self.indices[:, :, i].long()
        vals = self.values[:, :, i]
        dense = torch.zeros(*idx.shape[:2], m + 1, dtype=vals.dtype, device=vals.device)
        dense.scatter_(-1, torch.where(idx < 0, m, idx), vals)
        return dense[..., :m]

    def to_records(self, *, include_padding: bool = False) -> list[dict[str, Any]]:
        """One dict per active feature (batch, position, layer, feature, activation, token_id, rank),
        ready for ``pandas.DataFrame(features.to_records())``."""
        valid = self.indices >= 0
        if not include_padding:
            valid &= self.mask[:, :, None, None].to(valid.device)
        nz = valid.nonzero().tolist()
        vals = self.values[valid].float().tolist()
        feats = self.indices[valid].tolist()
        records = []
        for (b, t, li, rank), v, f in zip(nz, vals, feats):
            rec = {"batch": b, "position": t, "layer": self.layers[li], "feature": f, "activation": v, "rank": rank}
            if self.token_ids is not None:
                rec["token_id"] = int(self.token_ids[b, t])
            records.append(rec)
        return records

    # ------------------------------------------------------------------ combine
    @staticmethod
    def concat(parts: Sequence[Features]) -> Features:
        """Stack several calls along the batch axis, right-padding positions (mask False there)."""
        if not parts:
            raise ValueError("nothing to concatenate")
        if len(parts) == 1:
            return parts[0]
        layers = parts[0].layers
        if any(p.layers != layers for p in parts):
            raise ValueError("cannot concatenate features recorded on different layers")
        t = max(p.num_positions for p in parts)

        def pad(x: torch.Tensor, fill: Any) -> torch.Tensor:
            if x.shape[1] == t:
                return x
            shape = (x.shape[0], t - x.shape[1], *x.shape[2:])
            return torch.cat([x, torch.full(shape, fill, dtype=x.dtype, device=x.device)], dim=1)

        have_tokens = all(p.token_ids is not None for p in parts)
        return Features(
            torch.cat([pad(p.indices, -1) for p in parts]),
            torch.cat([pad(p.values, 0) for p in parts]),
            torch.cat([pad(p.l0, 0) for p in parts]),
            torch.cat([pad(p.mask, False) for p in parts]),
            list(layers),
            torch.cat([pad(p.token_ids, -1) for p in parts]) if have_tokens else None,
            parts[0].n_features,
        )

    # ------------------------------------------------------------------ IO
    def to_html(
        self,
        path: str | Path,
        tokenizer: Any,
        stats: Any = None,
        row: int = 0,
        *,
        sequences: Any = None,
        prompt_len: int | None = None,
        title: str | None = None,
        steers: Sequence[Mapping[str, Any]] | None = None,
        baseline: Features | None = None,
        baseline_sequences: Any = None,
        dashboard: str | None = None,
    ) -> Path:
        """Write a self-contained HTML page to read batch row ``row`` token by token: the text shaded by
        each token's strongest feature (its share of the feature's corpus max with ``stats``) or by a chosen
        feature, each token's top features per layer, and with ``stats`` (per-feature
        statistics, :class:`sparse_clt_hf.view.StatsLike`) labels, frequencies and max-activating
        contexts. ``sequences`` (e.g. ``generate``'s output) adds the last token, which has no features;
        ``prompt_len`` marks where the generation starts. ``path#t=N`` opens with token N selected.
        ``steers`` (e.g. ``clt.steering``) names the steers on the page and marks the steered features;
        ``baseline`` (with ``baseline_sequences``): the same prompt's features without them, shown beside.
        ``dashboard`` (a ``sparse-clt-hf dashboard`` site's folder, relative to the page or a URL) links
        each selected feature to its dashboard page. See :mod:`sparse_clt_hf.view`."""
        from .view import write_html

        return write_html(self, path, tokenizer, stats, row, sequences=sequences, prompt_len=prompt_len, title=title,
                          steers=steers, baseline=baseline, baseline_sequences=baseline_sequences, dashboard=dashboard)

    def save(self, path: str | Path) -> None:
        """Write to one safetensors file (metadata: layers, widths)."""
        tensors = {"indices": self.indices, "values": self.values, "l0": self.l0, "mask": self.mask}
        if self.token_ids is not None:
            tensors["token_ids"] = self.token_ids
        meta = {"layers": json.dumps(self.layers), "n_features": json.dumps(self.n_features), "format": "sparse-clt-hf"}
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path), metadata=meta)

    @classmethod
    def load(cls, path: str | Path) -> Features:
        """Read a file written by :meth:`save`; a missing, corrupt or inconsistent file is a
        :class:`~sparse_clt_hf.errors.FeaturesFileError` naming the file and what is wrong."""
        from safetensors import safe_open

        from .errors import FeaturesFileError

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:  # safetensors raises its own types (and OSError) for missing/corrupt files
            raise FeaturesFileError(
                f"{path}: not a readable features file ({type(exc).__name__}: {exc})"
            ) from exc
        return cls(*_checked_fields(str(path), meta, tensors))


def _checked_fields(label: str, meta: dict[str, str], t: dict[str, torch.Tensor]) -> tuple:
    """The constructor arguments of a features file, each checked against the others."""
    from .errors import FeaturesFileError

    def fail(what: str) -> FeaturesFileError:
        return FeaturesFileError(f"{label}: {what} (not a features file written by Features.save, or corrupt)")

    if "layers" not in meta:
        raise fail("no 'layers' metadata")
    from .io.structured import load_json

    layers = load_json(meta["layers"], f"{label} metadata", error=FeaturesFileError, limit=1 << 20)
    widths = load_json(meta.get("n_features", "null"), f"{label} metadata", error=FeaturesFileError,
                       limit=1 << 20)
    if not isinstance(layers, list) or not all(type(x) is int and x >= 0 for x in layers):
        raise fail(f"metadata 'layers' is {meta['layers'][:80]!r}; expected a list of layer numbers")
    if widths is not None and (
        not isinstance(widths, list) or len(widths) != len(layers) or not all(type(x) is int and x > 0 for x in widths)
    ):
        raise fail(f"metadata 'n_features' is {meta['n_features'][:80]!r}; expected one positive width per layer")
    missing = [k for k in ("indices", "values", "l0", "mask") if k not in t]
    if missing:
        raise fail(f"missing tensors {missing}; found {sorted(t)}")
    idx, vals, l0, mask, tok = t["indices"], t["values"], t["l0"], t["mask"], t.get("token_ids")
    if idx.ndim != 4 or idx.shape[2] != len(layers):
        raise fail(f"'indices' has shape {list(idx.shape)}; expected [batch, positions, {len(layers)}, k]")
    b, n, _, _ = idx.shape
    checks = [
        ("indices", idx, idx.shape, not idx.is_floating_point() and idx.dtype != torch.bool, "integer"),
        ("values", vals, idx.shape, vals.is_floating_point(), "floating-point"),
        ("l0", l0, idx.shape[:3], not l0.is_floating_point() and l0.dtype != torch.bool, "integer"),
        ("mask", mask, (b, n), mask.dtype == torch.bool, "bool"),
    ]
    if tok is not None:
        checks.append(("token_ids", tok, (b, n), not tok.is_floating_point() and tok.dtype != torch.bool, "integer"))
    for name, tensor, shape, dtype_ok, kind in checks:
        if tuple(tensor.shape) != tuple(shape) or not dtype_ok:
            raise fail(
                f"{name!r} is {kind if dtype_ok else str(tensor.dtype)} of shape {list(tensor.shape)}; "
                f"expected {kind} of shape {list(shape)}"
            )
    if idx.numel() and int(idx.min()) < -1:
        raise fail(f"'indices' holds {int(idx.min())}; expected feature ids or -1 in empty slots")
    if widths is not None and idx.numel():
        over = [(layer, w) for i, (layer, w) in enumerate(zip(layers, widths)) if int(idx[:, :, i].max()) >= w]
        if over:
            raise fail(f"feature ids reach past the widths of (layer, width) {over}")
    return idx, vals, l0, mask, layers, tok, widths
