"""What a response says about features and text: per-token feature records, labels, and the text of a
completion cut at its stop strings (the same rule for whole responses and streamed chunks).

A token record is ``{"position", "token_id", "token", "kind", "features": [{"layer", "feature",
"activation", "label"}, ...]}``: ``position`` is the token's index in the request's own prompt +
completion sequence (as :class:`~sparse_clt_hf.features.Features` positions are, without the batch's
left padding); ``features`` are the strongest features read at that position across the requested
layers, strongest first. The last token of a completion was never read by the model, so its
``features`` is empty (the features that predicted it are those of the token before).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import torch

from ..features import Features


class SharedTokenizer:
    """A tokenizer used from the event loop and the worker thread: one call at a time (a fast
    tokenizer's Rust core refuses concurrent calls that reconfigure padding or truncation)."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._lock = threading.Lock()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            return self._tokenizer(*args, **kwargs)

    def decode(self, *args: Any, **kwargs: Any) -> str:
        with self._lock:
            return self._tokenizer.decode(*args, **kwargs)

    def apply_chat_template(self, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            return self._tokenizer.apply_chat_template(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tokenizer, name)


class FeatureReader:
    """Turns one forward pass's :class:`Features` (copied to the host once) into token records."""

    def __init__(self, piece: Features) -> None:
        self.layers = list(piece.layers)
        self.values = piece.values.detach().float().cpu()
        self.indices = piece.indices.detach().cpu()

    def top(self, row: int, t: int, layers: Sequence[int], n: int, label: Any) -> list[dict[str, Any]]:
        """The ``n`` strongest features at piece position ``t`` of batch row ``row`` across ``layers``."""
        li = [self.layers.index(x) for x in layers]
        vals = self.values[row, t, li]  # [L, k]
        idx = self.indices[row, t, li]
        flat = vals.masked_fill(idx < 0, float("-inf")).flatten()
        n = min(n, int((idx >= 0).sum()))
        if n <= 0:
            return []
        top_v, top_i = flat.topk(n)
        k = vals.shape[1]
        out = []
        for v, i in zip(top_v.tolist(), top_i.tolist()):
            j, slot = divmod(i, k)
            layer, feature = layers[j], int(idx[j, slot])
            out.append({"layer": layer, "feature": feature, "activation": v, "label": label(layer, feature)})
        return out


class Labels:
    """A feature's label: its most frequent max-activating tokens in the statistics' corpus (cached), or
    None without statistics for that layer."""

    def __init__(self, stats: Any, tokenizer: Any, n: int = 3) -> None:
        self.stats = stats
        self.tokenizer = tokenizer
        self.n = n
        self._cache: dict[tuple[int, int], list[str] | None] = {}

    def __call__(self, layer: int, feature: int) -> list[str] | None:
        key = (layer, feature)
        if key not in self._cache:
            s = self.stats
            if s is None or layer not in s.layers or feature >= s.n_features[s.layers.index(layer)]:
                self._cache[key] = None
            else:
                self._cache[key] = [self.tokenizer.decode([int(t)]) for t in s.top_tokens(layer, feature, self.n)]
        return self._cache[key]


def token_record(tokenizer: Any, position: int, token_id: int, kind: str,
                 features: list[dict[str, Any]] | None) -> dict[str, Any]:
    return {"position": position, "token_id": token_id, "token": tokenizer.decode([token_id]), "kind": kind,
            "features": features or []}


# ---------------------------------------------------------------------------- text
def decode(tokenizer: Any, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=True)


def find_stop(text: str, stops: Sequence[str]) -> int | None:
    """Where the first stop string starts in ``text`` (None: none there)."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


class TextStream:
    """The text of one completion as tokens arrive: :meth:`push` returns what may be sent now (held
    back: an incomplete character, and a tail that could start a stop string); :meth:`finish` the rest,
    cut before the first stop string, as a whole response would be."""

    def __init__(self, tokenizer: Any, stops: Sequence[str]) -> None:
        self.tokenizer = tokenizer
        self.stops = list(stops)
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.ids: list[int] = []
        self.sent = 0
        self.stopped = False

    def text(self) -> str:
        text = decode(self.tokenizer, self.ids)
        cut = find_stop(text, self.stops)
        if cut is not None:
            self.stopped = True
            return text[:cut]
        return text

    def push(self, token_id: int) -> str:
        if self.stopped:
            return ""
        self.ids.append(token_id)
        text = self.text()
        end = len(text) if self.stopped else len(text) - self.hold
        if not self.stopped and text.endswith("\ufffd"):
            end = min(end, len(text) - 1)
        return self._take(end, text)

    def finish(self) -> str:
        return self._take(None, self.text())

    def _take(self, end: int | None, text: str) -> str:
        end = len(text) if end is None else max(end, self.sent)
        out, self.sent = text[self.sent:end], end
        return out


def completion_text(tokenizer: Any, ids: Sequence[int], stops: Sequence[str]) -> str:
    stream = TextStream(tokenizer, stops)
    stream.ids = list(ids)
    return stream.finish()


def padded_rows(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ``input_ids`` and ``attention_mask`` [rows, longest]."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        if p:
            ids[i, width - len(p):] = torch.tensor(list(p), dtype=torch.long)
            mask[i, width - len(p):] = 1
    return ids, mask
