"""The attachment: hook lifecycle and capture of transcoder features during forward passes.

``attach_clt(model, ref)`` registers

- one forward pre-hook and one forward hook on the model itself, which work out which token
  positions each pass adds (prefill, decode step, chunked prefill, ``use_cache=False`` recompute,
  assisted-decoding rollback) and commit a pass only once it completed;
- one hook per transcoder layer on that layer's site, which encodes the site activation on the
  layer's device right away (prefill) or copies it into a small per-layer buffer (decode steps)
  that is encoded in one batched call when it fills, when ``generate`` returns, or when features
  are read;
- a thin wrapper around ``model.generate`` (shared by all attachments of a model) that marks call
  boundaries, refuses beam search and discards the record of a call that raised.

Hooks never modify inputs or outputs, so the model's results are bitwise unchanged.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .errors import AlignmentError, IncompatibleTranscoderError
from .features import Features
from .sites import find_decoder_layers, model_dims, resolve_site
from .transcoder import CrossLayerTranscoder, check_compatible

StepCallback = Callable[[Features], None]

# Rows per batched decode encode: on the 2-core CPU an encode of 256 rows costs 1.12x per row what one of
# 1024 rows costs, 512 rows 1.0x (d 576, m 4096-8192), so 512 keeps windowed decoding at the floor.
DEFAULT_BUFFER_ROWS = 512
DEFAULT_BUFFER_BYTES = 64 * 2**20  # cap on the decode buffer, all layers together
MAX_WINDOW = 256  # batch 1: one batched encode per 256 decode steps (buffer <= DEFAULT_BUFFER_BYTES)


# ---------------------------------------------------------------------------- records
@dataclass
class _Record:
    """Features of one call (a generate call, or a sequence of plain forward passes)."""

    batch: int
    layers: list[int]
    length: int = 0  # committed positions
    values: dict[int, list[torch.Tensor]] = field(default_factory=dict)  # layer -> [B, t, k] pieces
    indices: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    l0: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    mask: list[torch.Tensor] = field(default_factory=list)  # [B, t] pieces
    tokens: list[torch.Tensor | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        for layer in self.layers:
            self.values.setdefault(layer, [])
            self.indices.setdefault(layer, [])
            self.l0.setdefault(layer, [])

    def add(self, layer: int, values: torch.Tensor, indices: torch.Tensor, l0: torch.Tensor) -> None:
        self.values[layer].append(values)
        self.indices[layer].append(indices)
        self.l0[layer].append(l0)

    def materialise(self, k: int, widths: list[int]) -> Features:
        def cat(pieces: list[torch.Tensor]) -> torch.Tensor:
            return torch.cat([p.cpu() for p in pieces], dim=1)

        if self.length == 0:
            b = self.batch
            empty = Features(
                torch.full((b, 0, len(self.layers), k), -1, dtype=torch.int32),
                torch.zeros(b, 0, len(self.layers), k),
                torch.zeros(b, 0, len(self.layers), dtype=torch.int32),
                torch.zeros(b, 0, dtype=torch.bool),
                list(self.layers),
                None,
                widths,
            )
            return empty
        tokens = None
        if all(t is not None for t in self.tokens):
            tokens = torch.cat([t.cpu() for t in self.tokens], dim=1)  # type: ignore[union-attr]
        dtype = self.values[self.layers[0]][0].dtype
        return Features(
            indices=torch.stack([cat(self.indices[x]) for x in self.layers], dim=2),
            values=torch.stack([cat(self.values[x]).to(dtype) for x in self.layers], dim=2),
            l0=torch.stack([cat(self.l0[x]) for x in self.layers], dim=2),
            mask=cat(self.mask).bool(),
            layers=list(self.layers),
            token_ids=tokens,
            n_features=widths,
        )

    def truncate(self, n: int, k: int, widths: list[int]) -> None:
        """Drop positions >= n (assisted decoding rejected draft tokens)."""
        if n >= self.length:
            return
        feats = self.materialise(k, widths)
        for i, layer in enumerate(self.layers):
            self.values[layer] = [feats.values[:, :n, i]]
            self.indices[layer] = [feats.indices[:, :n, i]]
            self.l0[layer] = [feats.l0[:, :n, i]]
        self.mask = [feats.mask[:, :n]]
        self.tokens = [None if feats.token_ids is None else feats.token_ids[:, :n]]
        self.length = n


@dataclass
class _Pass:
    """What the current forward pass adds: positions [start, start + new) of the record."""

    record: _Record
    skip: int  # leading input positions already recorded (use_cache=False recompute)
    new: int
    buffered: bool
    mask: torch.Tensor  # [B, new]
    tokens: torch.Tensor | None  # [B, new]
    slot: int = 0
    staged: dict[int, tuple[torch.Tensor, ...]] = field(default_factory=dict)  # layer -> encoded (or () if buffered)


# ---------------------------------------------------------------------------- generate tap
class _GenerateTap:
    """Wraps ``model.generate`` once per model and tells every attachment where calls begin and end."""

    ATTR = "_sparse_clt_generate_tap"

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.listeners: list[CLTAttachment] = []
        self.original = model.generate  # bound method (class attribute)
        self.had_instance_attr = "generate" in model.__dict__
        self.saved_instance_attr = model.__dict__.get("generate")

        @functools.wraps(self.original)
        def generate(*args: Any, **kwargs: Any) -> Any:
            listeners = list(self.listeners)
            for att in listeners:
                att._begin_call(kwargs)
            try:
                out = self.original(*args, **kwargs)
            except BaseException:
                for att in listeners:
                    att._abort_call()
                raise
            for att in listeners:
                att._end_call()
            return out

        model.generate = generate  # type: ignore[method-assign]

    @classmethod
    def join(cls, model: nn.Module, att: CLTAttachment) -> None:
        tap = model.__dict__.get(cls.ATTR)
        if tap is None:
            tap = cls(model)
            model.__dict__[cls.ATTR] = tap
        tap.listeners.append(att)

    @classmethod
    def leave(cls, model: nn.Module, att: CLTAttachment) -> None:
        tap = model.__dict__.get(cls.ATTR)
        if tap is None:
            return
        if att in tap.listeners:
            tap.listeners.remove(att)
        if not tap.listeners:
            if tap.had_instance_attr:
                model.generate = tap.saved_instance_attr  # type: ignore[method-assign]
            else:
                model.__dict__.pop("generate", None)
            del model.__dict__[cls.ATTR]


# ---------------------------------------------------------------------------- the attachment
class CLTAttachment:
    """A transcoder attached to a model. Read :attr:`features`; call :meth:`detach` when done.

    Several ``generate`` calls (or independent forward calls) in a row are *appended*: ``features``
    stacks them along the batch axis (positions right-padded, ``mask`` False there); ``calls`` keeps
    them apart; :meth:`reset` clears everything.
    """

    def __init__(
        self,
        model: nn.Module,
        transcoder: CrossLayerTranscoder,
        *,
        layers: Iterable[int] | None = None,
        top_k: int = 32,
        activation_threshold: float | None = None,
        chunk_size: int | None = None,
        window: int | None = None,
        dtype: torch.dtype | None = None,
        site: str | None = None,
        on_step: StepCallback | None = None,
    ) -> None:
        if not isinstance(top_k, int) or top_k <= 0:
            raise ValueError(f"top_k must be a positive integer, got {top_k!r}")
        if chunk_size is not None and chunk_size <= 0:
            raise ValueError(f"chunk_size must be positive (or None: automatic), got {chunk_size!r}")
        if window is not None and window <= 0:
            raise ValueError(f"window must be a positive number of decode steps, got {window!r}")
        self.model = model
        self.top_k = top_k
        self.activation_threshold = activation_threshold
        self.chunk_size = chunk_size
        self.on_step = on_step
        self._window_setting = 1 if on_step is not None else window

        layers_path, decoder_layers = find_decoder_layers(model)
        stack = model.get_submodule(layers_path.rpartition(".")[0])
        check_compatible(transcoder.config, *model_dims(model))
        wanted = list(transcoder.layers) if layers is None else sorted({int(x) for x in layers})
        out_of_range = [x for x in wanted if not 0 <= x < len(decoder_layers)]
        if out_of_range:
            raise IncompatibleTranscoderError(
                f"layers {out_of_range} are out of range: the model has {len(decoder_layers)} layers"
            )
        missing = [x for x in wanted if x not in transcoder.layers]
        if missing:
            raise IncompatibleTranscoderError(
                f"the transcoder has no encoder for layers {missing}; it has layers {transcoder.layers}"
            )
        self.layers = wanted
        self.site = site or transcoder.config.input_site
        # Resolve every hook point before registering anything, so a bad site leaves no hook behind.
        points = {layer: resolve_site(model, self.site, layer) for layer in wanted}

        self._dtype = _model_dtype(model)
        compute_dtype = dtype or self._dtype
        encoders = {
            layer: transcoder.encoder(layer).converted(
                _layer_device(decoder_layers[layer]), compute_dtype, decoder=False
            )
            for layer in wanted
        }
        sub = transcoder.select_layers(wanted)
        self.transcoder = CrossLayerTranscoder(sub.config, encoders)
        self.widths = [self.transcoder.encoder(x).n_features for x in wanted]

        self._records: list[_Record] = []
        self._current: _Record | None = None
        self._pass: _Pass | None = None
        self._in_call = False
        self._buffers: dict[int, torch.Tensor] = {}
        self._buffer_slots = 0  # filled slots (same for every layer)
        self._buffer_record: _Record | None = None
        self._window = 1
        self._handles: list[RemovableHandle] = []
        self._attached = True
        self._caller_ids: torch.Tensor | None = None

        try:
            # Token ids are read where the caller passes them (the model); positions are worked out on
            # the module that runs the decoder layers, which every pass goes through (transformers
            # 4.57 runs chunked prefill through forward() directly, bypassing the model's hooks).
            self._handles.append(model.register_forward_pre_hook(self._on_model_pre, with_kwargs=True))
            self._handles.append(stack.register_forward_pre_hook(self._on_stack_pre, with_kwargs=True))
            self._handles.append(stack.register_forward_hook(self._on_stack_post, with_kwargs=True))
            for layer, point in points.items():
                hook = functools.partial(self._on_site, layer)
                if point.which == "input":
                    handle = point.module.register_forward_pre_hook(
                        lambda mod, args, kwargs, _h=hook: _h(_first_tensor(args, kwargs)), with_kwargs=True
                    )
                else:
                    handle = point.module.register_forward_hook(
                        lambda mod, args, out, _h=hook: _h(out if torch.is_tensor(out) else out[0])
                    )
                self._handles.append(handle)
            if hasattr(model, "generate"):
                _GenerateTap.join(model, self)
        except BaseException:
            self.detach()
            raise

    # ------------------------------------------------------------------ public API
    @property
    def features(self) -> Features:
        """Everything recorded since attach or the last :meth:`reset`, calls stacked along the batch axis."""
        calls = self.calls
        if not calls:
            raise LookupError("no features recorded yet: run a forward pass or generate() first")
        return Features.concat(calls)

    @property
    def calls(self) -> list[Features]:
        """Features of each recorded call separately."""
        self._discard_open_pass()
        self.flush()
        records = self._records + ([self._current] if self._current is not None else [])
        return [r.materialise(self.top_k, self.widths) for r in records]

    def generate(self, *args: Any, **kwargs: Any) -> tuple[Any, Features]:
        """``model.generate(...)`` and the features of this call only."""
        before = len(self._records) + (1 if self._current is not None else 0)
        out = self.model.generate(*args, **kwargs)
        calls = self.calls
        new = calls[before:]
        if not new:
            raise AlignmentError("generate() ran no forward pass, so it recorded no features")
        return out, Features.concat(new)

    def reset(self) -> None:
        """Forget every recorded feature (hooks stay)."""
        self._records.clear()
        self._current = None
        self._pass = None
        self._buffer_slots = 0
        self._buffer_record = None

    def detach(self) -> None:
        """Remove every hook and the generate wrapper. Idempotent."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self._attached:
            _GenerateTap.leave(self.model, self)
            self._attached = False
        if self._pass is not None:
            self._discard_open_pass()
        if self._buffer_slots:
            self.flush()

    @property
    def attached(self) -> bool:
        return self._attached

    def __enter__(self) -> CLTAttachment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()

    def __repr__(self) -> str:
        return (
            f"CLTAttachment(layers={self.layers}, site={self.site!r}, top_k={self.top_k}, "
            f"attached={self._attached})"
        )

    # ------------------------------------------------------------------ generate boundaries
    def _begin_call(self, kwargs: dict[str, Any]) -> None:
        config = kwargs.get("generation_config") or getattr(self.model, "generation_config", None)
        beams = kwargs.get("num_beams", getattr(config, "num_beams", 1)) or 1
        if beams > 1:
            raise AlignmentError(
                f"beam search (num_beams={beams}) reorders rows at every step, so features could not be "
                "aligned with the returned sequences; use greedy or sampling, or detach the transcoder"
            )
        self._discard_open_pass()
        self.flush()
        self._commit_current()
        self._in_call = True

    def _end_call(self) -> None:
        self._in_call = False
        self.flush()
        self._commit_current()

    def _abort_call(self) -> None:
        self._in_call = False
        self._pass = None
        self._buffer_slots = 0
        self._buffer_record = None
        self._current = None  # nothing half-written is reported

    def _commit_current(self) -> None:
        if self._current is not None:
            self._records.append(self._current)
            self._current = None

    # ------------------------------------------------------------------ hooks
    def _on_model_pre(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        self._caller_ids = _input_ids(args, kwargs)

    def _on_stack_pre(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        self._discard_open_pass()
        ids = _input_ids(args, kwargs)
        embeds = kwargs.get("inputs_embeds")
        caller_ids, self._caller_ids = self._caller_ids, None
        if ids is None and caller_ids is not None and embeds is not None and caller_ids.shape == embeds.shape[:2]:
            ids = caller_ids  # multimodal models pass embeddings to the text stack
        ref = ids if ids is not None else embeds
        if ref is None:
            return  # not a pass we can align (e.g. a vision-only call); layer hooks will ignore it
        batch, length = ref.shape[0], ref.shape[1]
        past = _past_length(kwargs)

        rec = self._current
        recorded = self._recorded(rec)
        skip = 0
        if rec is not None and rec.batch == batch and past > 0:
            start = past
        elif rec is not None and rec.batch == batch and past == 0 and self._in_call and length > recorded > 0:
            start, skip = 0, recorded  # use_cache=False: the prefix is recomputed, record only the new part
        else:
            if self._current is not None:
                self.flush()
                self._commit_current()
            rec = self._current = _Record(batch, list(self.layers))
            self._buffers.clear()  # decode buffers are per record: its batch, dtype and devices
            start, recorded = past, 0
        if skip == 0 and start < recorded:
            self.flush()
            rec.truncate(start, self.top_k, self.widths)  # rejected draft tokens of assisted decoding
        elif skip == 0 and start > recorded:
            self.flush()
            _pad_record(rec, start - recorded, self.top_k, self.widths)

        new = length - skip
        mask = kwargs.get("attention_mask")
        if torch.is_tensor(mask) and mask.ndim == 2 and mask.shape[0] == batch and mask.shape[1] >= length:
            new_mask = mask[:, mask.shape[1] - new :].bool()
        else:
            new_mask = torch.ones(batch, new, dtype=torch.bool, device=ref.device)
        tokens = ids[:, skip:] if ids is not None else None
        # Buffer every pass that fits (decode steps, and a short prefill: encoded together with the
        # steps that follow, so each encoder matrix is read once per window instead of twice).
        window = self._decode_window(batch)
        buffered = window > 1 and self._buffer_slots + new <= window
        if not buffered and self._buffer_slots:
            self.flush()  # keep positions in order: what is buffered comes before this pass
        self._pass = _Pass(rec, skip, new, buffered, new_mask, tokens, slot=self._buffer_slots if buffered else 0)

    def _on_site(self, layer: int, hidden: torch.Tensor) -> None:
        # A hot path (every layer of every decode step): no no_grad context (the copy reads a
        # detached tensor and encode_sparse runs under no_grad itself), no per-step allocation.
        p = self._pass
        if p is None or layer in p.staged:
            return
        h = hidden.detach() if hidden.requires_grad else hidden
        if h.ndim == 2:
            h = h.view(p.record.batch, -1, h.shape[-1])
        if p.skip:
            h = h[:, p.skip :]
        if p.buffered:
            buf = self._buffers.get(layer)
            if buf is None:
                buf = self._new_buffer(layer, h)
            buf[:, p.slot : p.slot + p.new].copy_(h)
            p.staged[layer] = ()
            return
        self._encoder_on(layer, h.device)
        batch, d = h.shape[0], h.shape[-1]
        values, indices, l0 = self.transcoder.encode_sparse(
            h.reshape(-1, d),
            layer,
            self.top_k,
            activation_threshold=self.activation_threshold,
            chunk_size=self.chunk_size,
        )
        p.staged[layer] = (
            values.view(batch, -1, self.top_k),
            indices.view(batch, -1, self.top_k),
            l0.view(batch, -1),
        )

    def _on_stack_post(self, module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
        p = self._pass
        if p is None:
            return
        self._pass = None
        missing = [x for x in self.layers if x not in p.staged]
        if missing:
            return  # the pass never reached these layers (e.g. an early exit); record nothing
        rec = p.record
        rec.mask.append(p.mask)
        rec.tokens.append(p.tokens)
        if p.buffered:
            self._buffer_record = rec
            self._buffer_slots += p.new
            if self._buffer_slots >= self._window:
                self.flush()
        else:
            for layer in self.layers:
                rec.add(layer, *p.staged[layer])
            rec.length += p.new
        if self.on_step is not None:  # on_step implies window=1: this pass was encoded in its hooks
            self.on_step(self._pass_features(p))

    def _pass_features(self, p: _Pass) -> Features:
        """Features of one encoded pass alone (what on_step receives), without re-reading the record."""

        def stack(i: int) -> torch.Tensor:
            return torch.stack([p.staged[layer][i].cpu() for layer in self.layers], dim=2)

        return Features(
            indices=stack(1),
            values=stack(0),
            l0=stack(2),
            mask=p.mask.cpu(),
            layers=list(self.layers),
            token_ids=None if p.tokens is None else p.tokens.cpu(),
            n_features=self.widths,
        )

    # ------------------------------------------------------------------ buffer
    def _decode_window(self, batch: int) -> int:
        if self._window_setting is not None:
            self._window = self._window_setting
        else:
            d = self.transcoder.config.d_model
            itemsize = torch.finfo(self._dtype).bits // 8
            by_rows = math.ceil(DEFAULT_BUFFER_ROWS / batch)
            by_bytes = DEFAULT_BUFFER_BYTES // max(1, batch * d * itemsize * len(self.layers))
            self._window = max(1, min(MAX_WINDOW, by_rows, by_bytes))
        return self._window

    def _new_buffer(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        """This record's decode buffer of ``layer``: [batch, window, d] on the layer's device, made once."""
        self._encoder_on(layer, h.device)
        buf = self._buffers[layer] = torch.empty(
            (h.shape[0], self._window, h.shape[-1]), dtype=h.dtype, device=h.device
        )
        return buf

    def _encoder_on(self, layer: int, device: torch.device) -> None:
        """Move ``layer``'s encoder to ``device`` if the layer runs elsewhere than we guessed (once)."""
        enc = self.transcoder.encoders[str(layer)]
        if enc.W_enc.device != device:
            self.transcoder.encoders[str(layer)] = enc.converted(device, None, decoder=False)

    def _recorded(self, rec: _Record | None) -> int:
        """Positions of ``rec`` seen so far, encoded or still in the decode buffer."""
        if rec is None:
            return 0
        return rec.length + (self._buffer_slots if self._buffer_record is rec else 0)

    @torch.no_grad()
    def flush(self) -> None:
        """Encode the decode-step buffer now (called automatically; cheap when empty)."""
        n = self._buffer_slots
        rec = self._buffer_record
        if not n or rec is None:
            return
        batch = rec.batch
        for layer in self.layers:
            buf = self._buffers[layer][:, :n]
            values, indices, l0 = self.transcoder.encode_sparse(
                buf.reshape(batch * n, -1),
                layer,
                self.top_k,
                activation_threshold=self.activation_threshold,
                chunk_size=self.chunk_size,
            )
            rec.add(
                layer,
                values.view(batch, n, self.top_k),
                indices.view(batch, n, self.top_k),
                l0.view(batch, n),
            )
        rec.length += n
        self._buffer_slots = 0
        self._buffer_record = None

    def _discard_open_pass(self) -> None:
        """A pass that started but never finished (it raised): forget what it staged."""
        self._pass = None


# ---------------------------------------------------------------------------- helpers
def _first_tensor(args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
    if args and torch.is_tensor(args[0]):
        return args[0]
    for key in ("hidden_states", "x", "input", "hidden_state"):
        if torch.is_tensor(kwargs.get(key)):
            return kwargs[key]
    for value in kwargs.values():
        if torch.is_tensor(value) and value.is_floating_point():
            return value
    raise RuntimeError("could not find the hidden states among the hooked module's inputs")


def _input_ids(args: tuple, kwargs: dict[str, Any]) -> torch.Tensor | None:
    ids = kwargs.get("input_ids")
    if ids is None and args and torch.is_tensor(args[0]) and not args[0].is_floating_point():
        ids = args[0]
    return ids


def _past_length(kwargs: dict[str, Any]) -> int:
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if cache is None:
        return 0
    getter = getattr(cache, "get_seq_length", None)
    if getter is not None:
        return int(getter())
    if isinstance(cache, (tuple, list)) and cache and cache[0] is not None:  # legacy tuple cache
        return int(cache[0][0].shape[-2])
    return 0


def _pad_record(rec: _Record, n: int, k: int, widths: list[int]) -> None:
    """Positions the model saw before we did (a cache passed in by the caller): empty, masked."""
    b = rec.batch
    for layer in rec.layers:
        rec.add(
            layer,
            torch.zeros(b, n, k),
            torch.full((b, n, k), -1, dtype=torch.int32),
            torch.zeros(b, n, dtype=torch.int32),
        )
    rec.mask.append(torch.zeros(b, n, dtype=torch.bool))
    rec.tokens.append(None)
    rec.length += n


def _model_dtype(model: nn.Module) -> torch.dtype:
    dtype = getattr(model, "dtype", None)
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _layer_device(layer: nn.Module) -> torch.device:
    """Where a decoder layer executes: accelerate's execution device if it dispatched the layer
    (weights may sit on 'meta' or the CPU), else the device of its first real parameter."""
    for mod in layer.modules():
        device = getattr(getattr(mod, "_hf_hook", None), "execution_device", None)
        if device is not None:
            return torch.device(f"cuda:{device}" if isinstance(device, int) else device)
    for p in layer.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


def attach_clt(
    model: nn.Module,
    transcoder: CrossLayerTranscoder | str | Path,
    *,
    layers: Iterable[int] | None = None,
    top_k: int = 32,
    activation_threshold: float | None = None,
    chunk_size: int | None = None,
    window: int | None = None,
    dtype: torch.dtype | None = None,
    site: str | None = None,
    on_step: StepCallback | None = None,
    format: str | None = None,
    **hub_kwargs: Any,
) -> CLTAttachment:
    """Attach a transcoder to ``model`` and record its top-k features on every forward pass.

    ``transcoder`` is a :class:`CrossLayerTranscoder`, a local folder, a Hub reference or a registry
    name. Only the encoders of ``layers`` (default: all the transcoder has) are loaded; each lives on
    the device of the layer it serves, in ``dtype`` (default: the model's). ``activation_threshold``
    keeps only activations >= it. ``window`` is the number of decode steps buffered before one
    batched encode (default: automatic); ``on_step(features)`` is called after every forward pass
    (it implies ``window=1``). ``site`` overrides the transcoder's hook site.
    """
    if not isinstance(transcoder, CrossLayerTranscoder):
        from .loading import load_for_model

        transcoder = load_for_model(transcoder, model, layers=layers, format=format, **hub_kwargs)
    return CLTAttachment(
        model,
        transcoder,
        layers=layers,
        top_k=top_k,
        activation_threshold=activation_threshold,
        chunk_size=chunk_size,
        window=window,
        dtype=dtype,
        site=site,
        on_step=on_step,
    )
