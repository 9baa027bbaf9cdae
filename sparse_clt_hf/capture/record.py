"""The record of one call: encoded features per layer, appended pass by pass or window by window."""

from __future__ import annotations

import torch

from ..features import Features


class Record:
    """Features of one call (a generate call, or a run of plain forward passes over one batch).

    Pieces are kept per layer as ``[batch, t, k]`` tensors on the layer's device and joined on the
    CPU only when read. ``length`` counts committed positions; it owns ``k`` and the layer widths,
    so every piece it hands out has the same shape.
    """

    def __init__(self, batch: int, layers: list[int], k: int, widths: list[int]) -> None:
        self.batch = batch
        self.layers = list(layers)
        self.k = k
        self.widths = list(widths)
        self.length = 0
        self.values: dict[int, list[torch.Tensor]] = {x: [] for x in self.layers}
        self.indices: dict[int, list[torch.Tensor]] = {x: [] for x in self.layers}
        self.l0: dict[int, list[torch.Tensor]] = {x: [] for x in self.layers}
        self.mask: list[torch.Tensor] = []  # [B, t] pieces
        self.tokens: list[torch.Tensor | None] = []

    def add(self, layer: int, values: torch.Tensor, indices: torch.Tensor, l0: torch.Tensor) -> None:
        """One layer's features of the next positions (the caller adds every layer, then :meth:`advance`)."""
        self.values[layer].append(values)
        self.indices[layer].append(indices)
        self.l0[layer].append(l0)

    def advance(self, n: int, mask: torch.Tensor, tokens: torch.Tensor | None) -> None:
        """Commit ``n`` positions whose features every layer has added."""
        self.mask.append(mask)
        self.tokens.append(tokens)
        self.length += n

    def pad(self, n: int) -> None:
        """Positions the model saw before we did (a cache passed in by the caller): empty and masked."""
        b, k = self.batch, self.k
        for layer in self.layers:
            self.add(layer, torch.zeros(b, n, k), torch.full((b, n, k), -1, dtype=torch.int32), torch.zeros(b, n, dtype=torch.int32))
        self.advance(n, torch.zeros(b, n, dtype=torch.bool), None)

    def materialise(self) -> Features:
        """The record as :class:`Features` on the CPU."""
        b, n_layers, k = self.batch, len(self.layers), self.k
        if self.length == 0:
            return Features(
                torch.full((b, 0, n_layers, k), -1, dtype=torch.int32),
                torch.zeros(b, 0, n_layers, k),
                torch.zeros(b, 0, n_layers, dtype=torch.int32),
                torch.zeros(b, 0, dtype=torch.bool),
                list(self.layers),
                None,
                self.widths,
            )

        def cat(pieces: list[torch.Tensor]) -> torch.Tensor:
            return torch.cat([p.cpu() for p in pieces], dim=1)

        tokens = None
        if all(t is not None for t in self.tokens):
            tokens = torch.cat([t.cpu() for t in self.tokens], dim=1)  # type: ignore[union-attr]
        dtype = self.values[self.layers[0]][-1].dtype
        return Features(
            indices=torch.stack([cat(self.indices[x]) for x in self.layers], dim=2),
            values=torch.stack([cat(self.values[x]).to(dtype) for x in self.layers], dim=2),
            l0=torch.stack([cat(self.l0[x]) for x in self.layers], dim=2),
            mask=cat(self.mask).bool(),
            layers=list(self.layers),
            token_ids=tokens,
            n_features=self.widths,
        )

    def last_piece(self) -> Features:
        """The positions added by the last :meth:`advance` alone (what ``on_step`` receives)."""
        def stack(pieces: dict[int, list[torch.Tensor]]) -> torch.Tensor:
            return torch.stack([pieces[x][-1].cpu() for x in self.layers], dim=2)

        tokens = self.tokens[-1]
        return Features(
            indices=stack(self.indices),
            values=stack(self.values),
            l0=stack(self.l0),
            mask=self.mask[-1].cpu().bool().clone(),
            layers=list(self.layers),
            token_ids=None if tokens is None else tokens.cpu(),
            n_features=self.widths,
        )

    def truncate(self, n: int) -> None:
        """Drop positions >= ``n`` (assisted decoding's rejected draft tokens, a pass generate undid)."""
        if n >= self.length:
            return
        feats = self.materialise()
        for i, layer in enumerate(self.layers):
            self.values[layer] = [feats.values[:, :n, i]]
            self.indices[layer] = [feats.indices[:, :n, i]]
            self.l0[layer] = [feats.l0[:, :n, i]]
        self.mask = [feats.mask[:, :n]]
        self.tokens = [None if feats.token_ids is None else feats.token_ids[:, :n]]
        self.length = n
