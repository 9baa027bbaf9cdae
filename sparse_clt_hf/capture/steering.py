"""Steering: the second site hook. It reads a feature's activation and writes its decoder rows back.

Semantics (error-preserving, as circuit-tracer's interventions), on every forward pass:

- at the transcoder's *input* site of a steered feature's source layer ``s`` the feature's activation
  ``a`` is encoded from the stream as it is there (already steered by earlier layers), exactly as the
  transcoder computes it (``transcoder.preprocess`` and the activation object; a TopK transcoder
  encodes the whole layer, an element-wise one only the steered features' encoder rows);
- ``a' = value`` (clamp), ``a + value`` (add) or ``a * value`` (scale) at the positions the steer
  covers, ``a' = a`` elsewhere;
- ``(a' - a) @ W_dec[feature, j - s]`` is added at the transcoder's *output* site of every layer ``j``
  the feature writes to (``s`` for a PLT; ``s .. s + n_out - 1`` for a CLT). Nothing else changes: the
  transcoder's reconstruction error stays in the stream.

Everything a pass needs lives in device tensors built when the set of steers changes (feature ids,
modes, values, position bounds, selected encoder rows, decoder rows per target layer) and an absolute
position counter per device. A compiled decode step therefore runs no Python per pass: the mask of
covered positions is computed from the counter with tensor ops, and a new value (:meth:`Steering.set_value`)
or a new prompt length is an in-place write, not a recompile.

The recorder records a steered layer through :meth:`Steering.record_encoder`: the window's rows are
encoded densely, the steered features' values are replaced by ``a'`` at the covered positions, and the
top-k is taken from that, so ``Features`` show the steered run.

Hook order: the attachment registers the recorder's hooks at attach and these at the first steer, so at
a module where the transcoder both reads and writes (input site == output site) the record and the
read see the value before the steering delta; the reader hooks are registered before the writer hooks.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from ..errors import HookSiteError
from ..sites import HookPoint
from ..transcoder import CrossLayerTranscoder
from .buffer import _mark_static
from .positions import forward_is_compiled, input_ids, past_length
from .sitehooks import hook_sites
from .steer_args import END as _END
from .steer_args import (
    MODES,
    POSITION_NAMES,
    Steer,
    SteeringHandle,
    check_positions,
    check_steer,
    check_value,
)
from .tap import CallInfo

#: elements of one dense block when a whole layer is encoded (TopK reads, records of steered layers)
DENSE_BLOCK = 1 << 24

RecordEncoder = Callable[[torch.Tensor, int, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


@dataclass
class _Source:
    """Device tensors of the steers of one source layer (index i = ``steers[i]``)."""

    steers: list[Steer]
    features: torch.Tensor  # [n] long
    values: torch.Tensor  # [n] encoder dtype
    is_clamp: torch.Tensor  # [n] bool
    is_add: torch.Tensor  # [n] bool
    lo: torch.Tensor  # [n] long: first covered absolute position
    hi: torch.Tensor  # [n] long: first position after
    w_enc: torch.Tensor | None  # [n, d] encoder rows (element-wise activations), None: encode the whole layer
    b_enc: torch.Tensor | None
    threshold: torch.Tensor | None


def bounds(positions: str | slice, prompt: int | None) -> tuple[int, int]:
    """``[lo, hi)`` of absolute positions a steer covers; outside a generate call (``prompt`` None)
    every position counts as prompt."""
    if isinstance(positions, slice):
        return int(positions.start or 0), _END if positions.stop is None else int(positions.stop)
    if positions == "all":
        return 0, _END
    cut = _END if prompt is None else prompt
    return (0, cut) if positions == "prompt" else (cut, _END)


def apply_mode(a: torch.Tensor, src: _Source) -> torch.Tensor:
    """``a'`` of every steered feature (no position mask)."""
    return torch.where(src.is_clamp, src.values, torch.where(src.is_add, a + src.values, a * src.values))


class Steering:
    """The steers of one attachment, their device tensors and their hooks (see the module docstring)."""

    def __init__(
        self,
        model: nn.Module,
        stack: nn.Module,
        transcoder: CrossLayerTranscoder,
        input_points: Mapping[int, HookPoint],
        output_point: Callable[[int], HookPoint],
        *,
        top_k: int,
        activation_threshold: float | None,
    ) -> None:
        self.model = model
        self.stack = stack
        self.transcoder = transcoder
        self.input_points = dict(input_points)
        self.output_point = output_point
        self.top_k = top_k
        self.activation_threshold = activation_threshold
        self.steers: list[Steer] = []
        self.handles: list[RemovableHandle] = []
        #: the recorder's per-layer encoders for the steered layers (see :meth:`record_encoder`)
        self.layer_encoders: dict[int, RecordEncoder] = {}
        self._sources: dict[int, _Source] = {}
        self._targets: dict[int, list[tuple[int, torch.Tensor]]] = {}  # j -> [(source, rows [n, d])]
        self._coeff: dict[int, torch.Tensor] = {}  # source -> (a' - a) masked, of the pass in flight
        self._coeff_pass: dict[int, int] = {}
        self._pos: dict[str, torch.Tensor] = {}  # device -> absolute position of the pass's first input
        self._prompt: int | None = None
        self._pass_id = 0
        self._batch = 1

    # ------------------------------------------------------------------ the set of steers
    @property
    def active(self) -> bool:
        return bool(self.steers)

    def set_steers(self, steers: list[Steer]) -> None:
        """Replace the steers. The new device tensors and hooks are built aside and swapped in only when
        everything succeeded: on any error the previous steers stay, with their hooks, exactly as they were."""
        state = self._build(list(steers))
        encoders = self.record_encoders(state["_sources"])
        handles: list[RemovableHandle] = []
        if steers:
            handles = self._register(state["_sources"], state["_targets"])
        old, self.handles, self.layer_encoders = self.handles, handles, encoders
        for handle in old:
            handle.remove()
        self.steers = list(steers)
        self._sources, self._targets, self._pos = state["_sources"], state["_targets"], state["_pos"]
        self._coeff, self._coeff_pass = state["_coeff"], {}

    def set_value(self, steer: Steer, value: float) -> None:
        """A new value for an active steer: an in-place write (a compiled step is not recompiled)."""
        src = self._sources[steer.layer]
        i = next(i for i, s in enumerate(src.steers) if s is steer)
        src.values[i] = value
        steer.value = value

    def remove(self) -> None:
        self.set_steers([])

    # ------------------------------------------------------------------ generate boundaries
    def begin_call(self, info: CallInfo) -> None:
        self._prompt = info.prompt
        self._batch = info.batch or self._batch
        for p in self._pos.values():
            p.zero_()
        self._update_bounds()

    def end_call(self) -> None:
        self._prompt = None
        self._update_bounds()

    def _update_bounds(self) -> None:
        for src in self._sources.values():
            lo, hi = zip(*(bounds(s.positions, self._prompt) for s in src.steers))
            src.lo.copy_(torch.tensor(lo, dtype=torch.long))
            src.hi.copy_(torch.tensor(hi, dtype=torch.long))

    # ------------------------------------------------------------------ building
    @torch.inference_mode(False)  # normal tensors: updated in place later, in or out of inference mode
    def _build(self, steers: list[Steer]) -> dict[str, Any]:
        """The per-steer-set state (device tensors, target rows, position counters) of ``steers``; nothing
        of ``self`` changes."""
        tc = self.transcoder
        by_layer: dict[int, list[Steer]] = {}
        for s in steers:
            by_layer.setdefault(s.layer, []).append(s)
        elementwise = not tc.activation.takes_k
        sources: dict[int, _Source] = {}
        targets: dict[int, list[tuple[int, torch.Tensor]]] = {}
        coeff: dict[int, torch.Tensor] = {}
        devices: dict[str, torch.device] = {}
        for layer, group in sorted(by_layer.items()):
            enc = tc.encoder(layer)
            dev, dtype = enc.W_enc.device, enc.W_enc.dtype
            devices[str(dev)] = dev
            feats = torch.tensor([s.feature for s in group], dtype=torch.long, device=dev)
            lo, hi = zip(*(bounds(s.positions, self._prompt) for s in group))
            src = _Source(
                group,
                feats,
                torch.tensor([s.value for s in group], dtype=dtype, device=dev),
                torch.tensor([s.mode == "clamp" for s in group], device=dev),
                torch.tensor([s.mode == "add" for s in group], device=dev),
                torch.tensor(lo, dtype=torch.long, device=dev),
                torch.tensor(hi, dtype=torch.long, device=dev),
                enc.W_enc[feats].contiguous() if elementwise else None,
                enc.b_enc[feats].contiguous() if elementwise else None,
                enc.threshold[feats].contiguous() if elementwise and enc.threshold is not None else None,
            )
            for t in (src.values, src.lo, src.hi):
                _mark_static(t)
            sources[layer] = src
            # a placeholder keeps the keys of the per-pass dict stable (a compiled step guards on them)
            coeff[layer] = torch.zeros(1, 1, len(group), dtype=dtype, device=dev)
            for j in sorted({j for s in group for j in s.rows}):
                rows = torch.stack([s.rows[j] if j in s.rows else torch.zeros_like(next(iter(s.rows.values())))
                                    for s in group])
                targets.setdefault(j, []).append((layer, rows))
        pos = {k: self._pos.get(k, torch.zeros(1, dtype=torch.long, device=d)) for k, d in devices.items()}
        for p in pos.values():
            _mark_static(p)
        return {"_sources": sources, "_targets": targets, "_coeff": coeff, "_coeff_pass": {}, "_pos": pos}

    def _register(self, sources: dict[int, _Source], targets: dict[int, Any]) -> list[RemovableHandle]:
        handles: list[RemovableHandle] = []
        try:
            handles.append(self.model.register_forward_pre_hook(self._on_model_pre, with_kwargs=True))
            handles.append(self.stack.register_forward_pre_hook(self._on_stack_pre, with_kwargs=True))
            handles.append(self.stack.register_forward_hook(self._on_stack_post, with_kwargs=True))
            # readers first: where a site is both read and written, the read sees the unsteered value
            handles.extend(hook_sites({s: self.input_points[s] for s in sources}, self._read))
            handles.extend(hook_sites({j: self.output_point(j) for j in targets}, self._write))
        except BaseException:
            for handle in handles:
                handle.remove()
            raise
        return handles

    # ------------------------------------------------------------------ hooks
    def _on_model_pre(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        """Through a compiled ``model.forward`` the stack's hooks run inside the compiled region: the pass's
        first position is set here instead, from the cache the model was given."""
        if torch.compiler.is_compiling() or not forward_is_compiled(module):
            return
        self._set_start(kwargs)
        ids = input_ids(args, kwargs)
        ref = ids if ids is not None else kwargs.get("inputs_embeds")
        if ref is not None:
            self._batch = ref.shape[0]

    def _on_stack_pre(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        if torch.compiler.is_compiling():
            self._set_start(kwargs)  # tensor ops only (a static cache's length is a device tensor)
            return
        self._pass_id += 1
        self._set_start(kwargs)
        ref = _stack_input(args, kwargs)
        if ref is not None:
            self._batch = ref.shape[0]

    def _set_start(self, kwargs: dict[str, Any]) -> None:
        """The absolute position of the pass's first input: the length of the cache it continues."""
        past = past_length(kwargs)  # a device tensor for static caches: copied, never read on the host
        for p in self._pos.values():
            if torch.is_tensor(past):
                p.copy_(past.reshape(1))
            else:
                p.fill_(past)

    def _on_stack_post(self, module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
        ref = _stack_input(args, kwargs)
        if ref is not None and ref.ndim >= 2:
            for p in self._pos.values():
                p.add_(ref.shape[1])

    def _read(self, layer: int, hidden: torch.Tensor) -> None:
        """Input site of a steered source layer: ``(a' - a)`` of its steered features, masked by position."""
        src = self._sources.get(layer)
        if src is None:
            return None
        h = hidden if hidden.ndim == 3 else hidden.view(self._batch, -1, hidden.shape[-1])
        with torch.no_grad():
            a = self._activations(src, layer, h)  # [B, L, n]
            covered = self._covered(src, h.shape[1], a.device)  # [L, n]
            self._coeff[layer] = torch.where(covered, apply_mode(a, src) - a, torch.zeros_like(a))
        if not torch.compiler.is_compiling():
            self._coeff_pass[layer] = self._pass_id
        return None

    def _write(self, layer: int, hidden: torch.Tensor) -> torch.Tensor | None:
        """Output site of a target layer: add ``(a' - a) @ W_dec`` of every source writing here."""
        terms = self._targets.get(layer)
        if not terms:
            return None
        delta: torch.Tensor | None = None
        for src, rows in terms:
            if not torch.compiler.is_compiling() and self._coeff_pass.get(src) != self._pass_id:
                raise HookSiteError(
                    f"steering: the output site of layer {layer} ran before the input site of layer {src} "
                    "in this forward pass, so the steered activation is not known there (the transcoder's "
                    "input site must come before its output site)"
                )
            c = self._coeff[src].to(device=rows.device, dtype=rows.dtype)
            term = c @ rows  # [B, L, d]
            delta = term if delta is None else delta + term
        assert delta is not None
        return hidden + delta.reshape(hidden.shape).to(hidden.device, hidden.dtype)

    def _covered(self, src: _Source, length: int, device: torch.device) -> torch.Tensor:
        """[L, n] bool: position ``pos + i`` lies in ``[lo, hi)`` of each steer (tensor ops only)."""
        p = self._pos[str(device)] + torch.arange(length, device=device)
        return (p[:, None] >= src.lo) & (p[:, None] < src.hi)

    def _activations(self, src: _Source, layer: int, h: torch.Tensor) -> torch.Tensor:
        """Activations [B, L, n] of the steered features, as the transcoder computes them."""
        tc = self.transcoder
        if src.w_enc is not None:  # element-wise activation: the steered features' rows suffice
            z = F.linear(tc.preprocess(h, layer), src.w_enc, src.b_enc)
            return tc.activation.dense(z, src.threshold, tc.config.k)
        step = max(1, DENSE_BLOCK // max(1, h.shape[0] * tc.encoder(layer).n_features))
        parts = [tc.activate(tc.pre_activations(h[:, i : i + step], layer), layer).index_select(-1, src.features)
                 for i in range(0, h.shape[1], step)]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    # ------------------------------------------------------------------ recording
    def record_encoders(self, sources: Mapping[int, _Source]) -> dict[int, RecordEncoder]:
        """The recorder's per-layer encoders for the steered layers ``sources`` (see :meth:`record_encode`)."""
        return {layer: self._record_encoder(layer) for layer in sources}

    def _record_encoder(self, layer: int) -> RecordEncoder:
        def encode(rows: torch.Tensor, batch: int, start: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            return self.record_encode(layer, rows, batch, start)

        return encode

    @torch.no_grad()
    def record_encode(
        self, layer: int, rows: torch.Tensor, batch: int, start: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Top-k (values, indices, l0) of ``rows`` [batch * n, d] (positions ``start..start+n`` of each
        row, batch-major) with the steered features at ``a'``; same layout as ``encode_sparse``."""
        tc, src = self.transcoder, self._sources[layer]
        m = tc.encoder(layer).n_features
        n = rows.shape[0] // batch
        x = rows.view(batch, n, -1)
        k = min(self.top_k, m)
        values = torch.zeros(batch, n, self.top_k, dtype=tc.encoder(layer).W_enc.dtype, device=rows.device)
        indices = torch.full((batch, n, self.top_k), -1, dtype=torch.int32, device=rows.device)
        l0 = torch.zeros(batch, n, dtype=torch.int32, device=rows.device)
        step = max(1, DENSE_BLOCK // max(1, batch * m))
        for t0 in range(0, n, step):
            t1 = min(n, t0 + step)
            dense = tc.encode(x[:, t0:t1], layer)  # [B, c, m]
            a = dense.index_select(-1, src.features)
            pos = torch.arange(start + t0, start + t1, device=rows.device)
            covered = (pos[:, None] >= src.lo) & (pos[:, None] < src.hi)
            steered = torch.where(covered, apply_mode(a, src), a)
            dense.index_copy_(-1, src.features, steered)
            if self.activation_threshold is not None:
                dense.masked_fill_(dense < self.activation_threshold, 0)
            top_v, top_i = dense.topk(k, dim=-1)
            values[:, t0:t1, :k] = top_v
            indices[:, t0:t1, :k] = top_i.to(torch.int32).masked_fill_(top_v == 0, -1)
            l0[:, t0:t1] = (dense != 0).sum(-1, dtype=torch.int32)
        return values.view(batch * n, -1), indices.view(batch * n, -1), l0.view(-1)


def _stack_input(args: tuple, kwargs: dict[str, Any]) -> torch.Tensor | None:
    ref = kwargs.get("input_ids")
    if ref is None:
        ref = kwargs.get("inputs_embeds")
    if ref is None and args and torch.is_tensor(args[0]):
        ref = args[0]
    return ref


__all__ = [
    "MODES",
    "POSITION_NAMES",
    "RecordEncoder",
    "Steer",
    "Steering",
    "SteeringHandle",
    "check_positions",
    "check_steer",
    "check_value",
]
