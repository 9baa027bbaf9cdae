"""The request bodies the server accepts, checked field by field into a :class:`GenerationRequest`.

Every bad input becomes an :class:`APIError` in OpenAI's error format (``{"error": {"message", "type",
"param", "code"}}``) naming the field and what was expected, before anything is queued. Nothing in a
request can name a file or a module: fields are numbers, strings fed to the tokenizer, and names checked
against fixed tables.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..capture.steering import MODES, POSITION_NAMES

#: HTTP status -> OpenAI error type
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
}

#: OpenAI fields this server does not implement; a request that sets them is refused, not half-served
UNSUPPORTED = {
    "logprobs": lambda v: v not in (None, False, 0),
    "top_logprobs": lambda v: v not in (None, 0),
    "echo": lambda v: v not in (None, False),
    "best_of": lambda v: v not in (None, 1),
    "suffix": lambda v: v is not None,
    "tools": lambda v: bool(v),
    "functions": lambda v: bool(v),
    "logit_bias": lambda v: bool(v),
    "response_format": lambda v: v not in (None, {"type": "text"}),
}
CHAT_ROLES = ("system", "developer", "user", "assistant")
MAX_N = 16
MAX_STOPS = 4


class APIError(Exception):
    """An error answered in OpenAI's format with HTTP ``status``."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": ERROR_TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


def bad(param: str, message: str, code: str = "invalid_value") -> APIError:
    return APIError(400, f"{param}: {message}", param=param, code=code)


@dataclass(frozen=True)
class FeatureOptions:
    """What the ``features`` payload holds: the ``top_k`` strongest features per token across ``layers``,
    and the prompt's tokens too when ``prompt``. ``enabled`` False: no payload."""

    enabled: bool
    top_k: int
    layers: tuple[int, ...]
    prompt: bool = True


@dataclass(frozen=True)
class SteerSpec:
    """One steer of a request, as :meth:`CLTAttachment.steer` takes it (``positions``: a name, or
    ``(start, stop)`` absolute positions of the request's own sequence)."""

    layer: int
    feature: int
    value: float
    mode: str = "clamp"
    positions: str | tuple[int, int | None] = "all"

    def as_kwargs(self) -> dict[str, Any]:
        pos = self.positions if isinstance(self.positions, str) else slice(*self.positions)
        return {"layer": self.layer, "feature": self.feature, "value": self.value, "mode": self.mode, "positions": pos}


@dataclass
class GenerationRequest:
    """One checked request: the prompt of every row (``n`` rows per prompt) and how to generate."""

    kind: str  # "chat" | "completion"
    model: str
    prompts: list[list[int]]  # token ids of each prompt
    n: int
    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stop: list[str]
    stream: bool
    include_usage: bool
    features: FeatureOptions
    steer: tuple[SteerSpec, ...] = ()
    compare: bool = False
    prompt_texts: list[str] = field(default_factory=list)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def batch_key(self, steer: tuple[SteerSpec, ...], unique: object) -> tuple:
        """Requests share a batch only when they generate alike: the same steers and sampling settings.
        A seed or a steer at absolute positions makes a request its own batch (``unique``): a shared
        random stream, or left padding, would change its answer."""
        alone = self.seed is not None or any(not isinstance(s.positions, str) for s in steer)
        return (steer, self.greedy, None if self.greedy else (self.temperature, self.top_p), unique if alone else None)


@dataclass(frozen=True)
class Limits:
    """What the server allows: its model name, transcoder layers and widths, recorded k, context."""

    model: str
    layers: tuple[int, ...]  # empty: no transcoder
    widths: Mapping[int, int]
    top_k: int
    context: int
    max_new_tokens: int
    max_batch: int
    vocab: int


# ---------------------------------------------------------------------------- typed readers
def _is_int(v: object) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _int(body: Mapping[str, Any], name: str, default: Any, lo: int, hi: int | None = None, param: str = "") -> Any:
    v = body.get(name, default)
    if v is None:
        return default
    p = param or name
    if not _is_int(v):
        raise bad(p, f"expected an integer, got {type(v).__name__} {v!r}"[:200])
    if v < lo or (hi is not None and v > hi):
        raise bad(p, f"{v} is out of range: expected {lo} <= {p} <= {hi}" if hi is not None
                  else f"{v} is out of range: expected {p} >= {lo}")
    return int(v)


def _number(body: Mapping[str, Any], name: str, default: float, lo: float, hi: float, param: str = "") -> float:
    v = body.get(name, default)
    if v is None:
        return default
    p = param or name
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise bad(p, f"expected a number, got {type(v).__name__} {v!r}"[:200])
    if not math.isfinite(float(v)):
        raise bad(p, f"expected a finite number, got {v!r}")
    if not lo <= float(v) <= hi:
        raise bad(p, f"{v} is out of range: expected {lo} <= {p} <= {hi}")
    return float(v)


def _bool(body: Mapping[str, Any], name: str, default: bool, param: str = "") -> bool:
    v = body.get(name, default)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise bad(param or name, f"expected true or false, got {v!r}"[:200])
    return v


def _stop(body: Mapping[str, Any]) -> list[str]:
    v = body.get("stop")
    if v is None:
        return []
    items = [v] if isinstance(v, str) else v
    if not isinstance(items, list) or not all(isinstance(s, str) and s for s in items) or len(items) > MAX_STOPS:
        raise bad("stop", f"expected a non-empty string or a list of up to {MAX_STOPS} non-empty strings, got {v!r}"[:200])
    return list(items)


# ---------------------------------------------------------------------------- features and steering
def feature_options(body: Mapping[str, Any], limits: Limits) -> FeatureOptions:
    """``"features": {"top_k", "layers", "prompt"}`` (or ``false``: no payload)."""
    v = body.get("features", True)
    if not limits.layers:
        if v not in (None, False, True):
            raise bad("features", "this server runs without a transcoder: it has no features to return")
        return FeatureOptions(False, 0, ())
    if v is None or v is True:
        v = {}
    if v is False:
        return FeatureOptions(False, limits.top_k, limits.layers)
    if not isinstance(v, dict):
        raise bad("features", f"expected an object {{top_k, layers, prompt}} or false, got {v!r}"[:200])
    unknown = sorted(set(v) - {"top_k", "layers", "prompt"})
    if unknown:
        raise bad("features", f"unknown option(s) {unknown}; expected top_k, layers, prompt")
    layers = v.get("layers")
    if layers is None:
        chosen = limits.layers
    else:
        if not isinstance(layers, list) or not layers or not all(_is_int(x) for x in layers):
            raise bad("features.layers", f"expected a non-empty list of layer numbers, got {layers!r}"[:200])
        missing = sorted({x for x in layers if x not in limits.layers})
        if missing:
            raise bad("features.layers", f"unknown layer(s) {missing}: the transcoder has layers {list(limits.layers)}",
                      code="unknown_layer")
        chosen = tuple(sorted(set(layers)))
    widest = max(limits.widths[x] for x in chosen)
    top_k = _int(v, "top_k", limits.top_k, 1, None, "features.top_k")
    if top_k > min(limits.top_k, widest):
        raise bad("features.top_k", f"{top_k} is above what is recorded: at most {min(limits.top_k, widest)} "
                  f"(the server records the {limits.top_k} strongest per layer; layers {list(chosen)} have "
                  f"at most {widest} features)")
    return FeatureOptions(True, top_k, chosen, _bool(v, "prompt", True, "features.prompt"))


def steer_specs(body: Mapping[str, Any], limits: Limits) -> tuple[SteerSpec, ...]:
    """``"steer": [{"layer", "feature", "value", "mode", "positions"}, ...]`` checked against the
    transcoder's layers and widths (positions: "all", "prompt", "generated" or [start, stop])."""
    v = body.get("steer")
    if v is None or v == []:
        return ()
    if not limits.layers:
        raise bad("steer", "this server runs without a transcoder: there is nothing to steer")
    if not isinstance(v, list) or len(v) > 64:
        raise bad("steer", f"expected a list of up to 64 steers, got {type(v).__name__}")
    out: list[SteerSpec] = []
    for i, s in enumerate(v):
        p = f"steer[{i}]"
        if not isinstance(s, dict):
            raise bad(p, f"expected an object {{layer, feature, value, mode, positions}}, got {s!r}"[:200])
        unknown = sorted(set(s) - {"layer", "feature", "value", "mode", "positions"})
        if unknown:
            raise bad(p, f"unknown field(s) {unknown}; expected layer, feature, value, mode, positions")
        for key in ("layer", "feature", "value"):
            if key not in s:
                raise bad(f"{p}.{key}", "is required")
        layer = s["layer"]
        if not _is_int(layer) or layer not in limits.layers:
            raise bad(f"{p}.layer", f"unknown layer {layer!r}: the transcoder has layers {list(limits.layers)}",
                      code="unknown_layer")
        width = limits.widths[layer]
        feature = _int(s, "feature", None, 0, width - 1, f"{p}.feature")
        value = _number(s, "value", 0.0, -1e6, 1e6, f"{p}.value")
        mode = s.get("mode", "clamp")
        if mode not in MODES:
            raise bad(f"{p}.mode", f"expected one of {list(MODES)}, got {mode!r}"[:200])
        out.append(SteerSpec(int(layer), feature, value, mode, _positions(s.get("positions", "all"), f"{p}.positions")))
    seen = [(s.layer, s.feature) for s in out]
    dup = sorted({x for x in seen if seen.count(x) > 1})
    if dup:
        raise bad("steer", f"feature(s) steered twice (layer, feature): {dup}")
    return tuple(sorted(out, key=lambda s: (s.layer, s.feature)))


def _positions(v: object, param: str) -> str | tuple[int, int | None]:
    if isinstance(v, str) and v in POSITION_NAMES:
        return v
    if isinstance(v, list) and len(v) == 2 and _is_int(v[0]) and (v[1] is None or _is_int(v[1])):
        start, stop = int(v[0]), v[1]
        if start >= 0 and (stop is None or stop > start):
            return (start, None if stop is None else int(stop))
    raise bad(param, f"expected one of {list(POSITION_NAMES)} or [start, stop] absolute positions "
              f"(0 <= start < stop, stop may be null), got {v!r}"[:200])


# ---------------------------------------------------------------------------- prompts
def chat_messages(body: Mapping[str, Any]) -> list[dict[str, str]]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise bad("messages", "expected a non-empty list of {role, content} messages", "missing_required_parameter"
                  if msgs is None else "invalid_value")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in CHAT_ROLES:
            raise bad(f"messages[{i}].role", f"expected one of {list(CHAT_ROLES)}, got {m!r}"[:200])
        content = m.get("content")
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(c, dict) and c.get("type") == "text" and isinstance(c.get("text"), str)
                       for c in content):
                raise bad(f"messages[{i}].content", "only text content parts ({type: text, text}) are supported")
            content = "".join(c["text"] for c in content)
        if not isinstance(content, str):
            raise bad(f"messages[{i}].content", f"expected a string, got {type(content).__name__}")
        out.append({"role": "system" if m["role"] == "developer" else m["role"], "content": content})
    return out


def completion_prompts(body: Mapping[str, Any], vocab: int) -> list[str | list[int]]:
    """``prompt``: a string, a list of strings, a list of token ids, or a list of such lists."""
    v = body.get("prompt")
    if v is None:
        raise bad("prompt", "is required", "missing_required_parameter")
    if isinstance(v, str):
        items: list[Any] = [v]
    elif isinstance(v, list) and v and all(_is_int(x) for x in v):
        items = [v]
    elif isinstance(v, list) and v and all(isinstance(x, str) or isinstance(x, list) for x in v):
        items = list(v)
    else:
        raise bad("prompt", "expected a string, a list of strings, a list of token ids or a list of token-id lists")
    for i, item in enumerate(items):
        if isinstance(item, list):
            if not item or not all(_is_int(x) and 0 <= x < vocab for x in item):
                raise bad(f"prompt[{i}]", f"token ids must be integers in [0, {vocab})")
        elif not item:
            raise bad(f"prompt[{i}]", "is empty")
    return items


def parse_request(body: object, kind: str, limits: Limits, tokenize: Callable[[Any], list[int]]) -> GenerationRequest:
    """Check ``body`` (decoded JSON) of a ``chat`` or ``completion`` request; ``tokenize`` turns a chat
    message list or a prompt string into token ids."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    model = body.get("model", limits.model)
    if not isinstance(model, str):
        raise bad("model", f"expected a string, got {type(model).__name__}")
    if model != limits.model:
        raise APIError(404, f"The model '{model[:200]}' does not exist; this server serves '{limits.model}'",
                       param="model", code="model_not_found")
    for name, is_set in UNSUPPORTED.items():
        if is_set(body.get(name)):
            raise bad(name, "is not supported by this server", "unsupported_parameter")
    n = _int(body, "n", 1, 1, MAX_N)
    if kind == "chat":
        items: list[Any] = [chat_messages(body)]
        cap_name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    else:
        items = completion_prompts(body, limits.vocab)
        cap_name = "max_tokens"
    if len(items) * n > limits.max_batch:  # (checked before tokenizing anything)
        raise bad("n", f"{len(items)} prompt(s) x n={n} rows exceed the server's batch size {limits.max_batch}")
    prompts = [list(x) if isinstance(x, list) and all(_is_int(t) for t in x) else tokenize(x) for x in items]
    longest = max(len(p) for p in prompts)
    if longest == 0:
        raise bad("prompt", "the prompt has no tokens")
    room = limits.context - longest
    if room <= 0:
        raise APIError(400, f"This model's maximum context length is {limits.context} tokens; the prompt has "
                       f"{longest}.", param="messages" if kind == "chat" else "prompt", code="context_length_exceeded")
    max_new = _int(body, cap_name, None, 1, limits.max_new_tokens)
    if max_new is None:
        max_new = min(limits.max_new_tokens, room)
    elif max_new > room:
        raise APIError(400, f"This model's maximum context length is {limits.context} tokens; you requested "
                       f"{longest + max_new} ({longest} in the prompt, {max_new} for the completion).",
                       param=cap_name, code="context_length_exceeded")
    stream = _bool(body, "stream", False)
    opts = body.get("stream_options")
    if opts is not None and not (isinstance(opts, dict) and set(opts) <= {"include_usage"}):
        raise bad("stream_options", f"expected {{include_usage: bool}}, got {opts!r}"[:200])
    steer = steer_specs(body, limits)
    compare = _bool(body, "compare", False)
    if compare and not steer:
        raise bad("compare", "compare returns the unsteered completion beside the steered one: it needs steer")
    if compare and stream:
        raise bad("compare", "compare is not available with stream: true")
    return GenerationRequest(
        kind=kind,
        model=model,
        prompts=prompts,
        n=n,
        max_new_tokens=max_new,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 1e-6, 1.0),
        seed=_int(body, "seed", None, -(2**63), 2**63 - 1),
        stop=_stop(body),
        stream=stream,
        include_usage=_bool(opts or {}, "include_usage", False, "stream_options.include_usage"),
        features=feature_options(body, limits),
        steer=steer,
        compare=compare,
        prompt_texts=[x if isinstance(x, str) else repr(x) for x in items],
    )
