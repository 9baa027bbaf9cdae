"""The feature recorder: a site hook that encodes what every forward pass writes at the transcoder site.

Hooks it registers:

- on the model: remember the caller's token ids, and account for a pass whose decoder stack ran
  inside a compiled ``model.forward`` (no eager stack hook fired);
- on the decoder stack: place each eager pass (:mod:`.positions`) and commit it once it completed;
- at each layer's site (:mod:`.sitehooks`): encode the activation at once (long passes) or copy it
  into the decode buffer (:mod:`.buffer`), which is encoded one window at a time.

Inside a compiled region (``torch.compiler.is_compiling()``) the hooks do tensor work on static
buffers only (write at the device counter, advance it) and touch no Python state that dynamo
would guard on; the generate tap's per-step callback (:meth:`FeatureRecorder.on_step_end`) does
the Python side between steps.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ..errors import AlignmentError
from ..features import Features
from ..sites import HookPoint
from ..transcoder import CrossLayerTranscoder
from .buffer import DecodeBuffer
from .positions import (
    PassMasks,
    PassShape,
    Placement,
    cache_of,
    forward_is_compiled,
    input_ids,
    pass_shape,
    place,
)
from .record import Record
from .sitehooks import hook_sites
from .stats import CaptureStats
from .tap import CallInfo

StepCallback = Callable[[Features], None]

_RECOMPUTE_COMPILED = (
    "use_cache=False with a compiled model.forward cannot be recorded: every pass recomputes the prefix inside "
    "the compiled region, where the positions already recorded cannot be dropped; generate with the cache, or "
    "without compiling forward"
)


@dataclass
class _Pass:
    """An eager pass in flight: positions [start, start + new) of ``record``."""

    record: Record
    skip: int
    new: int
    buffered: bool
    mask: torch.Tensor
    tokens: torch.Tensor | None
    slot: int = 0
    start: int = 0  # record position of the pass's first recorded input
    staged: dict[int, tuple[torch.Tensor, ...]] = field(default_factory=dict)


class FeatureRecorder:
    """Records top-k transcoder features of every forward pass of ``model`` (see the module docstring)."""

    def __init__(
        self,
        model: nn.Module,
        stack: nn.Module,
        points: Mapping[int, HookPoint],
        transcoder: CrossLayerTranscoder,
        *,
        top_k: int,
        activation_threshold: float | None,
        chunk_size: int | None,
        window: int | None,
        on_step: StepCallback | None,
        placement: Callable[[], tuple[dict[int, torch.device], torch.dtype]],
    ) -> None:
        self.model = model
        self.stack = stack
        self.points = dict(points)
        self.transcoder = transcoder
        self.layers = list(points)
        self.top_k = top_k
        self.activation_threshold = activation_threshold
        self.chunk_size = chunk_size
        self.on_step = on_step
        self.window_setting = 1 if on_step is not None else window
        self.placement = placement  # where each layer runs and the model's dtype, now
        devices, self.dtype = placement()
        self.widths = [transcoder.encoder(x).n_features for x in self.layers]
        self.stats = CaptureStats()
        self.buffer = DecodeBuffer(self.layers, devices, self.dtype, transcoder.config.d_model)
        #: Per-layer encoders that replace ``encode_sparse`` for a layer (steering sets them for steered
        #: layers): ``fn(rows [batch * n, d], batch, start) -> (values, indices, l0)`` for positions
        #: ``start..start+n`` of the record. Used for buffered windows and unbuffered passes alike;
        #: whoever changes them flushes first, so a window is encoded under one setting.
        self.layer_encoders: dict[int, Callable[[torch.Tensor, int, int], tuple[torch.Tensor, ...]]] = {}

        self.records: list[Record] = []
        self.current: Record | None = None
        self.in_call = False
        self._call_thread = 0  # the thread running the generate call in flight
        self._pass: _Pass | None = None
        self._pending: list[tuple[int, torch.Tensor, torch.Tensor | None]] = []  # buffered (n, mask, tokens)
        self._buffer_record: Record | None = None
        self._caller: dict[str, Any] | None = None  # the model's inputs of the pass in flight
        self._eager_stack_passes = 0
        self._eager_at_step = 0
        self._call: CallInfo | None = None
        self.window = 1  # decode steps per batched encode, for the current record's batch
        self.masks = PassMasks()
        self._refused: str | None = None  # passes that ran and cannot be recorded: raised at the next read

    # ------------------------------------------------------------------ registration
    def register(self) -> list[RemovableHandle]:
        """Register every hook; on error nothing stays registered."""
        handles: list[RemovableHandle] = []
        try:
            handles.append(self.model.register_forward_pre_hook(self._on_model_pre, with_kwargs=True))
            handles.append(self.model.register_forward_hook(self._on_model_post, with_kwargs=True))
            handles.append(self.stack.register_forward_pre_hook(self._on_stack_pre, with_kwargs=True))
            handles.append(self.stack.register_forward_hook(self._on_stack_post, with_kwargs=True))
            handles.extend(hook_sites(self.points, self))
        except BaseException:
            for handle in handles:
                handle.remove()
            raise
        return handles

    # ------------------------------------------------------------------ reading
    def all_records(self, *, check: bool = True) -> list[Record]:
        """Every record so far, flushed. ``check=False`` skips the device check (one host read): only for
        a read right after a generate call whose end already checked; the flags stay set for the next."""
        self._pass = None  # a pass that started but never finished (it raised) is forgotten
        self.flush()
        if check:
            self._check_idle("reading features")
        return self.records + ([self.current] if self.current is not None and self.current.length else [])

    def record_count(self) -> int:
        """How many records :meth:`all_records` would return now (no flush, no device read)."""
        return len(self.records) + (1 if self._recorded(self.current) else 0)

    def reset(self) -> None:
        """Forget every record and free the decode buffer (made again by the next pass)."""
        self.records.clear()
        self.current = None
        self._pass = None
        self._drop_buffer()
        self.buffer.free()

    # ------------------------------------------------------------------ generate boundaries (called by the tap)
    def begin_call(self, info: CallInfo) -> None:
        if not info.use_cache and forward_is_compiled(self.model):
            raise AlignmentError(_RECOMPUTE_COMPILED)
        self._pass = None
        self.flush()
        self._check_idle("generate()")
        self._commit_current()
        self.in_call = True
        self._call_thread = threading.get_ident()
        self._call = info
        if info.batch is not None and info.prompt is not None:
            # The buffer exists before any compiled pass can write into it; a compiled model call
            # (model.compile()) runs the prefill compiled too, so it needs room for the prompt.
            self._prepare_graph_pass(info.batch, info.prompt if info.compiled_call else 1)

    def on_step_end(self, sequences: torch.Tensor) -> None:
        """Between generate steps (outside any compiled region): account for compiled passes."""
        eager, self._eager_at_step = self._eager_stack_passes != self._eager_at_step, self._eager_stack_passes
        if eager:
            return  # the step ran eagerly: its hooks accounted for it
        offset = self._call.offset if self._call is not None else 0  # positions before ``sequences``
        covered = offset + sequences.shape[1]
        rec = self.current
        accounted = self._recorded(rec) if rec is not None and rec.batch == sequences.shape[0] else 0
        if covered <= accounted:
            return  # eager passes account for themselves
        batch, new = sequences.shape[0], covered - accounted
        tokens = sequences[:, accounted - offset : covered - offset] if accounted >= offset else None
        self._account_graph(batch, new, self._mask(batch, accounted, new, None, sequences.device), tokens)

    def end_call(self, expected: int | None, what: str) -> None:
        self.in_call = False
        self._call = None
        try:
            self.flush()
            self.buffer.check(what)
        except BaseException:
            self.abort_call()
            raise
        rec = self.current
        if expected is not None and rec is not None:
            if rec.length > expected:
                rec.truncate(expected)  # a pass generate undid (e.g. a deferred stop check's extra step)
            elif rec.length < expected:
                got = rec.length
                self.current = None
                raise AlignmentError(
                    f"{what}: recorded {got} positions per row but the output has {expected} "
                    f"(sequences.shape[1] - 1); a pass ran that the hooks did not see, so nothing is reported"
                )
        self._commit_current()

    def _check_idle(self, what: str) -> None:
        """Nothing went wrong unseen (one host read): no flush disagreed, and with nothing buffered no
        compiled pass wrote either. A plain forward through a fully compiled model (``model.compile()``)
        runs our hooks only inside the compiled region, where nothing can account for it, so its
        positions are lost: say so."""
        refused, self._refused = self._refused, None
        if refused is not None:
            raise AlignmentError(f"{what}: {refused}; those passes were not recorded")
        try:
            self.buffer.check(
                what,
                idle="a compiled forward pass ran outside generate() that the attachment could not follow "
                "(with model.compile() or torch.compile(model) the hooks run only inside the compiled region; compile "
                "model.forward instead to record plain forward calls)",
            )
        finally:
            if not self.buffer.slots:
                self.buffer.reset_counters()

    def abort_call(self) -> None:
        self.in_call = False
        self._call = None
        self._pass = None
        self._drop_buffer()
        self.buffer.clear_flags()
        self.current = None  # nothing half-written is reported

    # ------------------------------------------------------------------ model hooks
    def _on_model_pre(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        if torch.compiler.is_compiling():
            return
        self._refuse_other_threads()
        ids = input_ids(args, kwargs)
        self._caller = {"ids": ids, "kwargs": kwargs, "eager": self._eager_stack_passes, "graph": None}
        if forward_is_compiled(module):
            # the stack's hooks will run inside the compiled region: place the pass here, as the eager
            # stack hook would (a fresh cache starts a new record, a cache holding a prefix pads, ...)
            shape = pass_shape(args, kwargs, None)
            if shape is None:
                return
            _, where = self._place(shape)
            if where.skip:
                raise AlignmentError(_RECOMPUTE_COMPILED)
            self._prepare_graph_pass(shape.batch, shape.length)
            self._caller["graph"] = (shape.batch, where.start, shape.length, shape.device)

    def _on_model_post(self, module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
        if torch.compiler.is_compiling():
            return
        caller, self._caller = self._caller, None
        if caller is None or caller["eager"] != self._eager_stack_passes:
            return  # the stack ran eagerly: its hooks accounted for the pass
        if caller["graph"] is None or not forward_is_compiled(module):
            return  # no stack pass at all (e.g. a vision-only call)
        batch, start, n, device = caller["graph"]
        self._account_graph(batch, n, self._mask(batch, start, n, (caller["kwargs"], n), device), caller["ids"])

    # ------------------------------------------------------------------ stack hooks
    def _on_stack_pre(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        if torch.compiler.is_compiling():
            return
        self._refuse_other_threads()
        self._pass = None
        self._eager_stack_passes += 1
        if type(cache_of(kwargs)).__name__ == "PagedAttentionCache":
            # continuous batching reached the model some other way than generate_batch (which the tap
            # refuses): its rows pack many requests, so nothing is recorded and the next read says so
            self._refused = "continuous batching (a paged cache) ran through the model: its rows pack many requests"
            return
        caller_ids = self._caller["ids"] if self._caller is not None else None
        shape = pass_shape(args, kwargs, caller_ids)
        if shape is None:
            return  # not a pass we can align (e.g. a vision-only call); site hooks ignore it
        rec, where = self._place(shape)
        new = shape.length - where.skip
        mask = self._mask(shape.batch, where.start + where.skip, new, (kwargs, shape.length), shape.device)
        tokens = shape.ids[:, where.skip :] if shape.ids is not None else None
        # Buffer every pass that fits (decode steps, and a short prefill: encoded together with the
        # steps that follow, so each encoder matrix is read once per window instead of twice).
        window = self.window
        buffered = window > 1 and self.buffer.slots + new <= window
        if not buffered and self.buffer.slots:
            self.flush()  # keep positions in order: what is buffered comes before this pass
        self._pass = _Pass(rec, where.skip, new, buffered, mask, tokens, slot=self.buffer.slots if buffered else 0,
                           start=where.start + where.skip)

    def __call__(self, layer: int, hidden: torch.Tensor) -> None:
        """The site hook. A hot path (every layer of every decode step): no syncs, no allocation."""
        if torch.compiler.is_compiling():
            self.buffer.write_graph(layer, hidden.detach())
            return None
        p = self._pass
        if p is None or layer in p.staged:
            return None
        h = hidden.detach() if hidden.requires_grad else hidden
        if h.ndim == 2:
            h = h.view(p.record.batch, -1, h.shape[-1])
        if p.skip:
            h = h[:, p.skip :]
        if p.buffered:
            self.buffer.write(layer, h, p.slot)
            p.staged[layer] = ()
            return None
        batch = h.shape[0]
        values, indices, l0 = self._encode(layer, h.reshape(-1, h.shape[-1]), batch, p.start)
        p.staged[layer] = (values.view(batch, -1, self.top_k), indices.view(batch, -1, self.top_k), l0.view(batch, -1))
        return None

    def _on_stack_post(self, module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
        if torch.compiler.is_compiling():
            ref = kwargs.get("input_ids")
            if ref is None:
                ref = kwargs.get("inputs_embeds")
            if ref is None and args:
                ref = args[0]
            if ref is not None:
                self.buffer.advance(ref.shape[1])
            return
        p, self._pass = self._pass, None
        if p is None:
            return
        if any(x not in p.staged for x in self.layers):
            return  # the pass never reached these layers (e.g. an early exit); record nothing
        rec = p.record
        if p.buffered:
            self.buffer.advance(p.new)
            self._buffer_pending(rec, p.new, p.mask, p.tokens)
        else:
            for layer in self.layers:
                rec.add(layer, *p.staged[layer])
            rec.advance(p.new, p.mask, p.tokens)
        if self.on_step is not None:  # on_step implies window=1: this pass is encoded by now
            self.on_step(self._last(rec))

    def _refuse_other_threads(self) -> None:
        """A pass from another thread while a generate call runs would interleave with its passes: refused
        before it runs (the generate call goes on unharmed)."""
        if self.in_call and threading.get_ident() != self._call_thread:
            raise AlignmentError(
                "a forward pass from another thread while generate() runs on this attached model: passes of "
                "two threads would interleave in one record; use one model per thread, or serialise the calls"
            )

    def _place(self, shape: PassShape) -> tuple[Record, Placement]:
        """Where a pass of ``shape`` goes (:func:`.positions.place`), with the record made ready for it: a
        new record, the current one cut back (rejected draft tokens of assisted decoding) or padded (positions
        already in a cache this attachment did not see)."""
        rec = self.current
        recorded = self._recorded(rec)
        if torch.is_tensor(shape.past):
            shape = replace(shape, past=self._device_past(shape.past, shape.batch, recorded))
        where = place(shape, rec.batch if rec is not None else None, recorded, self.in_call)
        if where.new_record or rec is None:
            rec = self._new_record(shape.batch)
            recorded = 0
        if where.skip == 0 and where.start < recorded:
            self.flush()
            rec.truncate(where.start)
        elif where.skip == 0 and where.start > recorded:
            self.flush()
            rec.pad(where.start - recorded)
        return rec, where

    def _device_past(self, past: torch.Tensor, batch: int, recorded: int) -> int:
        """A cache length held on the device (static caches). After the first pass of a generate call it
        must be what this record accounted for (every pass of the call is seen, in order): assume that and
        check it on the device, read with the call's end check, instead of a host sync per decode step.
        The first pass of a record reads it (a cache handed to generate may hold a prefix), and so does
        every pass outside generate (a manual loop may feed any cache)."""
        rec = self.current
        if not self.in_call or rec is None or rec.batch != batch or recorded == 0:
            return int(past)
        self.buffer.expect_value(past, recorded)
        return recorded

    def _mask(
        self, batch: int, start: int, new: int, given: tuple[dict[str, Any], int] | None, device: torch.device
    ) -> torch.Tensor:
        return self.masks(self._call.mask if self._call is not None else None, batch, start, new, given, device)

    # ------------------------------------------------------------------ compiled passes
    def _prepare_graph_pass(self, batch: int, n: int) -> None:
        """Before a compiled pass of ``n`` positions: a buffer for this batch with room for it."""
        rec = self.current
        if rec is None or rec.batch != batch:
            self.flush()
            self._commit_current()
            rec = self._new_record(batch)
        if self.buffer.slots + n > self.buffer.window:
            self.flush()
        self.buffer.ensure(batch, n)

    def _account_graph(self, batch: int, n: int, mask: torch.Tensor, tokens: torch.Tensor | None) -> None:
        """Python's side of ``n`` positions that a compiled pass wrote into the buffer."""
        rec = self.current
        if rec is None or rec.batch != batch:
            raise AlignmentError(
                "a compiled forward pass ran before this attachment had a buffer for its batch; "
                "run it through model(...) or model.generate(...) so the attachment can prepare"
            )
        self._buffer_pending(rec, n, mask, tokens)
        if self.on_step is not None:
            self.on_step(self._last(rec))

    def _buffer_pending(self, rec: Record, n: int, mask: torch.Tensor, tokens: torch.Tensor | None) -> None:
        self._buffer_record = rec
        self.buffer.slots += n
        self._pending.append((n, mask, tokens))
        if self.buffer.slots >= self.window:
            self.flush()

    def _last(self, rec: Record) -> Features:
        """The features of the pass just committed (on_step: window 1, so it is the record's last piece)."""
        self.flush()
        return rec.last_piece()

    # ------------------------------------------------------------------ records and buffer
    def _new_record(self, batch: int) -> Record:
        self.flush()
        self._commit_current()
        rec = self.current = Record(batch, self.layers, self.top_k, self.widths)
        devices, dtype = self.placement()
        if devices != self.buffer.devices or dtype != self.buffer.dtype:  # the model moved since attach
            self.dtype = dtype
            self.buffer = DecodeBuffer(self.layers, devices, dtype, self.transcoder.config.d_model)
        self.window = self._window(batch)
        self.buffer.ensure(batch, self.window)
        return rec

    def _commit_current(self) -> None:
        if self.current is not None:
            if self.current.length:  # a record no pass wrote to (a call that ran none) is not a call
                self.records.append(self.current)
            self.current = None

    def _recorded(self, rec: Record | None) -> int:
        """Positions of ``rec`` seen so far, encoded or still in the decode buffer."""
        if rec is None:
            return 0
        return rec.length + (self.buffer.slots if self._buffer_record is rec else 0)

    def _window(self, batch: int) -> int:
        if self.window_setting is not None:
            return self.window_setting
        return self.buffer.default_window(batch)

    def _drop_buffer(self) -> None:
        self.buffer.reset_counters()
        self._pending.clear()
        self._buffer_record = None

    @torch.no_grad()
    def flush(self) -> None:
        """Encode the decode buffer now (called automatically; cheap when empty)."""
        n = self.buffer.slots
        rec = self._buffer_record
        if not n or rec is None:
            return
        rows = self.buffer.take(n)
        for layer in self.layers:
            values, indices, l0 = self._encode(layer, rows[layer].reshape(rec.batch * n, -1), rec.batch, rec.length)
            rec.add(
                layer,
                values.view(rec.batch, n, self.top_k),
                indices.view(rec.batch, n, self.top_k),
                l0.view(rec.batch, n),
            )
        masks = [m for _, m, _ in self._pending]
        tokens = [t for _, _, t in self._pending]
        rec.advance(
            n,
            torch.cat(masks, dim=1) if len(masks) > 1 else masks[0],
            None if any(t is None for t in tokens) else (torch.cat(tokens, dim=1) if len(tokens) > 1 else tokens[0]),  # type: ignore[arg-type]
        )
        self.stats.flushes += 1
        self._drop_buffer()

    def _encode(
        self, layer: int, rows: torch.Tensor, batch: int, start: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Top-k of ``rows`` [batch * n, d], record positions ``start..start+n`` of each row."""
        self._encoder_on(layer, rows.device)
        t0 = time.perf_counter()
        override = self.layer_encoders.get(layer)
        if override is not None:
            out = override(rows, batch, start)
        else:
            out = self.transcoder.encode_sparse(
                rows, layer, self.top_k, activation_threshold=self.activation_threshold, chunk_size=self.chunk_size
            )
        self.stats.seconds += time.perf_counter() - t0
        self.stats.encode_calls += 1
        self.stats.rows += rows.shape[0]
        return out

    def _encoder_on(self, layer: int, device: torch.device) -> None:
        """Move ``layer``'s encoder to ``device`` if the layer runs elsewhere than we guessed (once)."""
        enc = self.transcoder.encoders[str(layer)]
        if enc.W_enc.device != device:
            self.transcoder.encoders[str(layer)] = enc.converted(device, None, decoder=False)


__all__ = ["FeatureRecorder", "PassShape", "StepCallback"]
