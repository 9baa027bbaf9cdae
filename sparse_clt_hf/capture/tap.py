"""The generate tap: wraps ``model.generate`` once per model and tells every listener where calls begin,
where each decoding step ends, and where calls end.

It refuses what cannot be aligned before anything runs (beam search, from any source: a keyword, a
``GenerationConfig`` passed by keyword or position, the model's default), adds one logits processor
whose call after every step lets listeners account for compiled decode steps (Python runs there,
outside any compiled region), and checks at the end that every row has one recorded position per
input token: ``sequences.shape[1] - 1``. One generate call at a time per model: a second one started
from another thread while the first runs is refused at once.
"""

from __future__ import annotations

import functools
import inspect
import threading
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

from ..errors import AlignmentError
from .per_model import PerModel


@dataclass(frozen=True)
class CallInfo:
    """What is known about a generate call before it runs."""

    batch: int | None  # rows of the output (input rows x num_return_sequences)
    prompt: int | None  # prompt length, in tokens or embeddings
    compiled_call: bool  # the whole model call is compiled (``model.compile()``): prefill runs compiled too
    mask: torch.Tensor | None = None  # the prompt's attention mask [batch, prompt], rows repeated as generate does
    #: positions before what generate returns: the prompt when only embeddings were passed (generate then
    #: returns the new tokens alone), else 0
    offset: int = 0
    use_cache: bool = True  # False: every step recomputes the whole sequence


class CallListener(Protocol):
    def begin_call(self, info: CallInfo) -> None: ...

    def on_step_end(self, sequences: torch.Tensor) -> None: ...

    def end_call(self, expected: int | None, what: str) -> None: ...

    def abort_call(self) -> None: ...


class _StepEnd(LogitsProcessor):
    """Called by generate after every forward pass, with the sequences so far; changes nothing."""

    def __init__(self, tap: GenerateTap) -> None:
        self.tap = tap

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        for listener in self.tap.active:
            listener.on_step_end(input_ids)
        return scores


class GenerateTap(PerModel):
    """Wraps ``model.generate`` (once per model, shared by all attachments) and calls the listeners
    (its :attr:`members`)."""

    ATTR = "_sparse_clt_generate_tap"

    #: generation entry points that cannot be recorded: continuous batching packs the tokens of many
    #: requests into one row and schedules them in a background thread, so no row is one sequence
    REFUSED = ("generate_batch", "init_continuous_batching", "continuous_batching_context_manager")

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.active: list[CallListener] = []
        self.lock = threading.Lock()
        self.original = model.generate  # bound method (class attribute)
        self.signature = inspect.signature(self.original)
        #: the model attributes this tap replaces, and the instance attributes they had before (if any)
        self.names = ("generate", *(n for n in self.REFUSED if hasattr(model, n)))
        self.saved = {n: model.__dict__[n] for n in self.names if n in model.__dict__}

    def install(self) -> None:
        @functools.wraps(self.original)
        def generate(*args: Any, **kwargs: Any) -> Any:
            return self.run(args, kwargs)

        self.model.generate = generate  # type: ignore[method-assign]
        for name in self.names[1:]:
            setattr(self.model, name, functools.partial(_refuse_continuous_batching, name))

    def uninstall(self) -> None:
        for name in self.names:
            if name in self.saved:
                setattr(self.model, name, self.saved[name])
            else:
                self.model.__dict__.pop(name, None)

    def run(self, args: tuple, kwargs: dict[str, Any]) -> Any:
        try:
            bound = self.signature.bind(*args, **kwargs)
        except TypeError:
            return self.original(*args, **kwargs)  # let generate report its own argument error
        arguments = dict(bound.arguments)
        extra = arguments.pop(_var_keyword(self.signature), {}) or {}
        arguments.update(extra)
        _refuse_beams(self.model, arguments)
        if not self.lock.acquire(blocking=False):
            raise AlignmentError(
                "this model is already running generate() in another thread; an attached model records one "
                "call at a time (use one model per thread, or serialise the calls)"
            )
        try:
            listeners = self.active = list(self.members)
            info = _call_info(self.model, arguments)
            if not _assisted(self.model, arguments):
                # (assisted decoding hands the processors to the assistant's generate too, and it runs
                # eagerly: its passes account for themselves)
                processors = LogitsProcessorList(arguments.get("logits_processor") or [])
                processors.append(_StepEnd(self))
                arguments["logits_processor"] = processors
            started: list[CallListener] = []
            try:
                for listener in listeners:
                    listener.begin_call(info)
                    started.append(listener)
                out = self.original(**arguments)
            except BaseException:
                for listener in started:
                    listener.abort_call()
                raise
            sequences = out if torch.is_tensor(out) else getattr(out, "sequences", None)
            expected = None
            if info.prompt is not None and torch.is_tensor(sequences):
                expected = info.offset + sequences.shape[1] - 1
            errors = []
            for listener in listeners:
                try:
                    listener.end_call(expected, "generate()")
                except AlignmentError as exc:
                    errors.append(exc)
            if errors:
                raise errors[0]
            return out
        finally:
            self.active = []
            self.lock.release()


def _var_keyword(sig: inspect.Signature) -> str:
    for p in sig.parameters.values():
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            return p.name
    return "kwargs"


def _generation_config(model: nn.Module, arguments: dict[str, Any]) -> GenerationConfig | None:
    config = arguments.get("generation_config")
    if isinstance(config, GenerationConfig):
        return config
    return getattr(model, "generation_config", None)


def _setting(model: nn.Module, arguments: dict[str, Any], name: str, default: Any) -> Any:
    """A generation setting as generate resolves it: keyword, then the config passed, then the model's."""
    if arguments.get(name) is not None:
        return arguments[name]
    config = _generation_config(model, arguments)
    value = getattr(config, name, None) if config is not None else None
    return default if value is None else value


def _refuse_continuous_batching(name: str, *args: Any, **kwargs: Any) -> Any:
    raise AlignmentError(
        f"{name}(): continuous batching packs the tokens of many requests into one row (and runs them in a "
        "background thread), so features could not be aligned with any request; use model.generate(...) "
        "on a padded batch, or detach the transcoder"
    )


def _refuse_beams(model: nn.Module, arguments: dict[str, Any]) -> None:
    beams = _setting(model, arguments, "num_beams", 1)
    if isinstance(beams, int) and beams > 1:
        raise AlignmentError(
            f"beam search (num_beams={beams}) reorders rows at every step, so features could not be "
            "aligned with the returned sequences; use greedy or sampling, or detach the transcoder"
        )


def _assisted(model: nn.Module, arguments: dict[str, Any]) -> bool:
    """Whether a candidate generator (an assistant model, prompt lookup, early exit) drafts tokens."""
    if arguments.get("assistant_model") is not None:
        return True
    return any(_setting(model, arguments, name, None) for name in ("prompt_lookup_num_tokens", "assistant_early_exit"))


def _call_info(model: nn.Module, arguments: dict[str, Any]) -> CallInfo:
    ids = arguments.get("input_ids")
    if ids is None and torch.is_tensor(arguments.get("inputs")) and not arguments["inputs"].is_floating_point():
        ids = arguments["inputs"]
    embeds = arguments.get("inputs_embeds")
    offset = 0
    if ids is None and torch.is_tensor(embeds) and embeds.ndim == 3:
        shape = embeds.shape[:2]  # a prompt of embeddings only: generate returns the new tokens alone
        offset = shape[1]
    elif torch.is_tensor(ids) and ids.ndim == 2:
        shape = ids.shape
    else:
        return CallInfo(None, None, _call_is_compiled(model), use_cache=_uses_cache(model, arguments))
    repeats = int(_setting(model, arguments, "num_return_sequences", 1) or 1)
    mask = arguments.get("attention_mask")
    if mask is None and offset == 0:
        mask = _inferred_mask(model, arguments, ids)
    if torch.is_tensor(mask) and mask.shape == shape:
        mask = mask.repeat_interleave(repeats, dim=0) if repeats > 1 else mask
    else:
        mask = None
    return CallInfo(shape[0] * repeats, shape[1], _call_is_compiled(model), mask, offset, _uses_cache(model, arguments))


def _uses_cache(model: nn.Module, arguments: dict[str, Any]) -> bool:
    return _setting(model, arguments, "use_cache", True) is not False


def _inferred_mask(model: nn.Module, arguments: dict[str, Any], ids: torch.Tensor) -> torch.Tensor | None:
    """The attention mask generate infers when none is passed (its rule: ``ids != pad_token_id`` where the
    prompt holds the pad token and the pad token is not an end-of-sequence token; else all ones, here
    None). Needed where the stack sees only a 4-D mask (static caches), which would hide the padding."""
    pad = _setting(model, arguments, "pad_token_id", None)
    if not isinstance(pad, int) or isinstance(pad, bool):
        return None
    eos = _setting(model, arguments, "eos_token_id", None)
    eos_ids = eos if isinstance(eos, (list, tuple)) else [eos]
    if pad in eos_ids or not bool((ids == pad).any()):  # one host read, before generating
        return None
    return ids.ne(pad).long()


def _call_is_compiled(model: nn.Module) -> bool:
    return getattr(model, "_compiled_call_impl", None) is not None
