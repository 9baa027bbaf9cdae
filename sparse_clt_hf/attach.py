"""``attach_clt``: validate, load the encoders a model needs, and start the capture engine.

The attachment is the user's handle: it owns the hooks (registered by the
:class:`~sparse_clt_hf.capture.FeatureRecorder`), joins the model's generate tap, and gives back
features per call. Everything is checked before the first hook is registered, so a bad argument
leaves the model untouched. The recorder's hooks never modify inputs or outputs: the model's results
are bitwise unchanged unless a feature is steered (:meth:`CLTAttachment.steer`, see
:mod:`sparse_clt_hf.capture.steering`). A deep copy (or pickle) of an attached model is a plain model
(no hook, no wrapper).
"""

from __future__ import annotations

import math
import numbers
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .capture import CaptureStats, FeatureRecorder, StepCallback
from .capture.copy_guard import CopyGuard
from .capture.steering import Steer, Steering, SteeringHandle, check_steer, check_value
from .capture.tap import CallInfo, GenerateTap
from .errors import AlignmentError, IncompatibleTranscoderError
from .features import Features
from .io.refs import resolve
from .loading import choose_input_transform, load_decoder_rows, load_for_model
from .sites import HookPoint, find_decoder_layers, model_dims, resolve_site_in_layer
from .transcoder import CrossLayerTranscoder, check_compatible

__all__ = ["CLTAttachment", "SteeringHandle", "StepCallback", "attach_clt"]


class CLTAttachment:
    """A transcoder attached to a model. Read :attr:`features`; call :meth:`detach` when done.

    Several ``generate`` calls (or independent forward calls) in a row are *appended*: ``features``
    stacks them along the batch axis (positions right-padded, ``mask`` False there); ``calls`` keeps
    them apart; :meth:`reset` clears everything. One call at a time: a generate started from a
    second thread while one runs is refused with :class:`AlignmentError`, and so is every call that
    changes the attachment's state (steer, ``handle.set``/``remove``, clear_steering, flush, reset,
    detach, reading features) from a thread other than the one running generate. Such calls and the
    start and end of a generate call are serialised by one lock, so none sees the other half-done.
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
        source: Any = None,
    ) -> None:
        _check_options(top_k, activation_threshold, chunk_size, window, dtype, site, on_step)
        self._lock = threading.RLock()  # state changes vs the start and end of a generate call
        self.model = model
        self.top_k = top_k
        self.activation_threshold = activation_threshold
        layers_path, decoder_layers = find_decoder_layers(model)
        stack = model.get_submodule(layers_path.rpartition(".")[0])
        check_compatible(transcoder.config, *model_dims(model))
        wanted = _check_layers(layers, transcoder, len(decoder_layers))
        widest = max(transcoder.encoder(x).n_features for x in wanted)
        if top_k > widest:
            raise ValueError(
                f"top_k={top_k} is larger than the widest selected layer ({widest} features): "
                f"choose top_k <= {widest}"
            )
        self.layers = wanted
        self.site = site or transcoder.config.input_site
        # every hook point is resolved before anything is registered, so a bad site leaves no hook behind
        self.transcoder, points = settle_transcoder(model, transcoder, wanted, dtype=dtype, site=self.site)
        self.widths = [self.transcoder.encoder(x).n_features for x in wanted]
        self._recorder = FeatureRecorder(
            model,
            stack,
            points,
            self.transcoder,
            top_k=top_k,
            activation_threshold=activation_threshold,
            chunk_size=chunk_size,
            window=window,
            on_step=on_step,
            placement=lambda: ({x: _layer_device(decoder_layers[x]) for x in wanted}, _model_dtype(model)),
        )
        # where steer() reads decoder rows: the reference (and format, variant) or the in-memory transcoder
        self._source = source if source is not None else {"source": transcoder}
        output_site = self.transcoder.config.output_site
        self._steering = Steering(
            model,
            stack,
            self.transcoder,
            points,
            lambda j: resolve_site_in_layer(model, output_site, j),
            top_k=top_k,
            activation_threshold=activation_threshold,
        )
        self._decoder_layers = decoder_layers
        self._handles: list[RemovableHandle] = []
        self._attached = True
        try:
            self._handles = self._recorder.register()
            _forget_compiled_code(model)
            if hasattr(model, "generate"):
                GenerateTap.join(model, self)
            CopyGuard.join(model, self)
        except BaseException:
            self._detach()
            raise

    # ------------------------------------------------------------------ public API
    @contextmanager
    def _exclusive(self, what: str) -> Iterator[None]:
        """Hold the state lock; refuse ``what`` from a thread other than the one running generate()."""
        with self._lock:
            rec = self._recorder
            if rec.in_call and threading.get_ident() != rec._call_thread:
                raise AlignmentError(
                    f"{what} from another thread while generate() runs on this attached model is refused "
                    "(like a second generate): it would race the hooks of the running call. Call it from the "
                    "generating thread (e.g. in on_step) or after generate() returns"
                )
            yield

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
        with self._exclusive("reading features"):
            return [r.materialise() for r in self._recorder.all_records()]

    @property
    def stats(self) -> CaptureStats:
        """Encode work so far: encode calls, rows, seconds, decode-buffer flushes (``stats.clear()`` resets)."""
        return self._recorder.stats

    def generate(self, *args: Any, **kwargs: Any) -> tuple[Any, Features]:
        """``model.generate(...)`` and the features of this call only."""
        before = self._recorder.record_count()
        out = self.model.generate(*args, **kwargs)
        new = self._recorder.all_records(check=False)[before:]  # the call's end checked (one host read)
        if not new:
            raise AlignmentError("generate() ran no forward pass, so it recorded no features")
        return out, Features.concat([r.materialise() for r in new])

    def attribute(self, prompt: Any, **kwargs: Any) -> Any:
        """:func:`sparse_clt_hf.attribute` with this transcoder and layers (recording paused meanwhile)."""
        from .attribution import attribute

        return self._paused(lambda: attribute(self.model, self, prompt, **kwargs))

    def attribute_generated(self, sequences: Any, *, row: int = 0, position: int = -1, **kwargs: Any) -> Any:
        """Why the model generated ``sequences[row, position]`` (prompt: the row before it, left padding dropped)."""
        from .attribution import attribute_generated

        return self._paused(lambda: attribute_generated(self.model, self, sequences, row=row, position=position, **kwargs))

    def _paused(self, work: Any) -> Any:
        self._check_attached()
        if self._steering.handles:
            raise ValueError("clear_steering() before attributing: attribution explains the unsteered model")
        for handle in self._handles:
            handle.remove()
        try:
            return work()
        finally:
            self._handles = self._recorder.register()

    def flush(self) -> None:
        """Encode the decode-step buffer now (called automatically; cheap when empty)."""
        with self._exclusive("flush()"):
            self._recorder.flush()

    def reset(self) -> None:
        """Forget every recorded feature (hooks stay)."""
        with self._exclusive("reset()"):
            self._recorder.reset()

    def detach(self) -> None:
        """Remove every hook and the generate wrapper. Idempotent."""
        with self._exclusive("detach()"):
            self._detach()

    def _detach(self) -> None:
        had_hooks = bool(self._handles)
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self._steering.handles:
            had_hooks = True
            self._recorder.flush()  # buffered positions of steered layers are recorded as steered
        self._steering.remove()
        self._recorder.layer_encoders = self._steering.layer_encoders
        if had_hooks:
            _forget_compiled_code(self.model)
        if self._attached:
            GenerateTap.leave(self.model, self)
            CopyGuard.leave(self.model, self)
            self._attached = False
            self._recorder._pass = None
            self._recorder.flush()

    def _all_handles(self) -> list[RemovableHandle]:
        return [*self._handles, *self._steering.handles]

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

    # ------------------------------------------------------------------ steering
    def steer(
        self, layer: int, feature: int, value: float, mode: str = "clamp", positions: str | slice = "all"
    ) -> SteeringHandle:
        """Steer ``feature`` of source ``layer`` at every forward pass (generate: prefill and every decode step).

        ``mode``: ``"clamp"`` (a' = value; 0 ablates), ``"add"`` (a + value), ``"scale"`` (a * value);
        ``positions``: ``"all"``, ``"prompt"``, ``"generated"`` or a slice of absolute positions. Semantics,
        memory and modes: :mod:`sparse_clt_hf.capture.steering` and the README. Everything is checked (and
        the feature's decoder rows read) before anything changes. Returns a handle (``remove()``, ``set()``).
        """
        with self._exclusive("steer()"):
            return self._steer(layer, feature, value, mode, positions)

    def _steer(self, layer: int, feature: int, value: float, mode: str, positions: str | slice) -> SteeringHandle:
        self._check_attached()
        widths = dict(zip(self.layers, self.widths))
        new = check_steer(layer, feature, value, mode, positions, widths, self._steering.steers, self._value_dtypes())
        layer, feature = new.layer, new.feature
        rows = load_decoder_rows(self._source["source"], layer, [feature], format=self._source.get("format"),
                                 variant=self._source.get("variant"))[0]  # [n_out, d]
        n_out = 1 if self.transcoder.config.is_plt else rows.shape[0]
        depth = len(self._decoder_layers)
        targets = {layer + i: rows[i] for i in range(min(n_out, depth - layer))}
        for j in targets:
            self._steering.output_point(j)  # resolve every output site before anything changes
        dtype = _model_dtype(self.model)
        new.rows = {j: r.to(_layer_device(self._decoder_layers[j]), dtype) for j, r in targets.items()}
        if not all(bool(r.isfinite().all()) for r in new.rows.values()):
            raise ValueError(f"feature {feature} of layer {layer}: its decoder rows do not fit {dtype} (the model's "
                             "dtype): some entries become inf or nan")
        self._apply_steers([*self._steering.steers, new])
        return SteeringHandle(self, new)

    def clear_steering(self) -> None:
        """Remove every steer (the model runs bitwise as without steering again)."""
        with self._exclusive("clear_steering()"):
            if self._steering.steers:
                self._apply_steers([])

    @property
    def steering(self) -> list[dict[str, Any]]:
        """The active steers: layer, feature, value, mode, positions, target layers."""
        return [s.to_dict() for s in self._steering.steers]

    def _value_dtypes(self) -> dict[int, torch.dtype]:
        """Layer -> the dtype a steer's value is stored and applied in (the encoder's compute dtype)."""
        return {x: self.transcoder.encoder(x).W_enc.dtype for x in self.layers}

    def _apply_steers(self, steers: list[Steer]) -> None:
        """Swap in a new set of steers: complete, or (on any error) the previous set exactly as it was."""
        if self._recorder.in_call:
            raise RuntimeError("steers cannot be added or removed while generate() runs; use handle.set(value)")
        self._recorder.flush()  # what is buffered was recorded under the previous steers
        _forget_compiled_code(self.model)  # (harmless if what follows fails: compiled code is made again)
        self._steering.set_steers(steers)  # built aside: on error the old steers and hooks stay
        self._recorder.layer_encoders = self._steering.layer_encoders

    def _remove_steer(self, steer: Steer) -> None:
        with self._exclusive("handle.remove()"):
            if any(s is steer for s in self._steering.steers):
                self._apply_steers([s for s in self._steering.steers if s is not steer])

    def _set_steer_value(self, steer: Steer, value: float) -> None:
        with self._exclusive("handle.set()"):
            value = check_value(value, self._value_dtypes()[steer.layer])
            if not any(s is steer for s in self._steering.steers):
                raise ValueError("this steer was removed; call steer() again")
            self._recorder.flush()
            self._steering.set_value(steer, value)

    def _check_attached(self) -> None:
        if not self._attached:
            raise RuntimeError("this attachment was detached; attach the transcoder again to steer")

    # ------------------------------------------------------------------ generate tap listener
    def begin_call(self, info: CallInfo) -> None:
        with self._lock:  # waits for a state change another thread is making
            self._recorder.begin_call(info)
            if self._steering.active:
                self._steering.begin_call(info)

    def on_step_end(self, sequences: torch.Tensor) -> None:
        self._recorder.on_step_end(sequences)

    def end_call(self, expected: int | None, what: str) -> None:
        with self._lock:
            try:
                self._recorder.end_call(expected, what)
            finally:
                self._steering.end_call()

    def abort_call(self) -> None:
        with self._lock:
            self._recorder.abort_call()
            self._steering.end_call()


# ---------------------------------------------------------------------------- validation
def _is_int(x: object) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _check_options(
    top_k: object,
    activation_threshold: object,
    chunk_size: object,
    window: object,
    dtype: object,
    site: object,
    on_step: object,
) -> None:
    """Every option's type and range, with the accepted values in the message (before any hook)."""
    if not _is_int(top_k) or top_k <= 0:  # type: ignore[operator]
        raise ValueError(f"top_k must be a positive integer, got {top_k!r}")
    if activation_threshold is not None and (
        isinstance(activation_threshold, bool)
        or not isinstance(activation_threshold, numbers.Real)
        or not math.isfinite(float(activation_threshold))
    ):
        raise ValueError(f"activation_threshold must be a finite number or None, got {activation_threshold!r}")
    if chunk_size is not None and (not _is_int(chunk_size) or chunk_size <= 0):  # type: ignore[operator]
        raise ValueError(f"chunk_size must be a positive integer (or None: automatic), got {chunk_size!r}")
    if window is not None and (not _is_int(window) or window <= 0):  # type: ignore[operator]
        raise ValueError(f"window must be a positive integer number of decode steps (or None), got {window!r}")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(
            f"dtype must be a floating torch.dtype (torch.float32, torch.bfloat16, torch.float16) or None, got {dtype!r}"
        )
    if site is not None and (not isinstance(site, str) or not site):
        raise ValueError(f"site must be a site name (e.g. 'resid_mid') or 'module.path:input|output', got {site!r}")
    if on_step is not None and not callable(on_step):
        raise ValueError(f"on_step must be a callable taking Features (or None), got {on_step!r}")


def settle_transcoder(
    model: nn.Module,
    transcoder: CrossLayerTranscoder,
    layers: Iterable[int] | None = None,
    *,
    dtype: torch.dtype | None = None,
    site: str | None = None,
) -> tuple[CrossLayerTranscoder, dict[int, HookPoint]]:
    """The transcoder as :func:`attach_clt` runs it on ``model``, and the hook point of each layer's input
    site: the selected layers' encoders on their decoder layer's device in the compute dtype (``dtype``,
    default the model's), the input transform settled for this model (a copy of the config). Checks
    the model's dimensions, the layers and the site first; registers nothing. For code that reads the
    sites itself with the features an attachment would compute (e.g. exact feature frequencies)."""
    _, decoder_layers = find_decoder_layers(model)
    check_compatible(transcoder.config, *model_dims(model))
    wanted = _check_layers(layers, transcoder, len(decoder_layers))
    site = site or transcoder.config.input_site
    points = {layer: resolve_site_in_layer(model, site, layer) for layer in wanted}
    compute_dtype = dtype or _model_dtype(model)
    encoders = {
        layer: transcoder.encoder(layer).converted(_layer_device(decoder_layers[layer]), compute_dtype, decoder=False)
        for layer in wanted
    }
    config = choose_input_transform(transcoder.select_layers(wanted).config, model)
    return CrossLayerTranscoder(config, encoders), points


def _check_layers(layers: Iterable[int] | None, transcoder: CrossLayerTranscoder, depth: int) -> list[int]:
    if layers is None:
        wanted = list(transcoder.layers)
    else:
        if isinstance(layers, (str, bytes)) or not isinstance(layers, Iterable):
            raise ValueError(f"layers must be an iterable of layer indices, got {layers!r}")
        items = list(layers)
        bad = [x for x in items if not _is_int(x)]
        if bad:
            raise ValueError(f"layers must be integers, got {bad!r} in {items!r}")
        wanted = sorted({int(x) for x in items})
    if not wanted:
        raise ValueError(f"layers is empty: choose some of the transcoder's layers {transcoder.layers}")
    out_of_range = [x for x in wanted if not 0 <= x < depth]
    if out_of_range:
        raise IncompatibleTranscoderError(f"layers {out_of_range} are out of range: the model has {depth} layers")
    missing = [x for x in wanted if x not in transcoder.layers]
    if missing:
        raise IncompatibleTranscoderError(
            f"the transcoder has no encoder for layers {missing}; it has layers {transcoder.layers}"
        )
    return wanted


# ---------------------------------------------------------------------------- helpers
def _forget_compiled_code(model: nn.Module) -> None:
    """Drop code dynamo compiled for ``model`` before our hooks came (or went).

    Dynamo does not guard on module hooks (``skip_nnmodule_hook_guards``): a decode step compiled
    before attaching would keep running without our hooks (and one compiled while attached would
    keep running them after detaching). Dynamo has no per-model reset, so this resets its caches:
    the next compiled call compiles again.
    """
    fwd = model.__dict__.get("forward")
    compiled = (
        "_compiled_call" in model.__dict__
        or getattr(model, "_compiled_call_impl", None) is not None
        or (fwd is not None and getattr(fwd, "_torchdynamo_orig_callable", None) is not None)
    )
    if compiled:
        model.__dict__.pop("_compiled_call", None)
        torch._dynamo.reset()


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
    _check_options(top_k, activation_threshold, chunk_size, window, dtype, site, on_step)
    source = None
    if not isinstance(transcoder, CrossLayerTranscoder):
        variant = hub_kwargs.pop("variant", None)
        ref = resolve(transcoder, **hub_kwargs)  # steer() reads decoder rows from the same reference
        source = {"source": ref, "format": format, "variant": variant}
        transcoder = load_for_model(ref, model, layers=layers, format=format, variant=variant)
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
        source=source,
    )
