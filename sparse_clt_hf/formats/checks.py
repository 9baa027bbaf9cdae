"""Checks every format applies to what it reads: typed config values and the tensors themselves.

- :class:`ConfigValues` reads one parsed config file (``config.yaml``, ``cfg.json``, ``config.json``, a
  checkpoint's metadata) with typed getters, so a value of the wrong type is a
  :class:`~sparse_clt_hf.errors.TranscoderFormatError` naming the file, the key, the value and what was
  expected (never a ``TypeError``/``KeyError``/``ValueError`` from deep inside a loader).
- :func:`check_tensor`: a tensor read from a file is floating point and finite (an integer, boolean or
  non-finite tensor is refused with the file and tensor named), checked in bounded chunks.
- :func:`decode_text`: a config file's bytes as UTF-8 text, or an error naming the file.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from ..errors import TranscoderFormatError

_MISSING = object()
#: elements per chunk of the finiteness check (bounds the temporary boolean tensor to 16 MiB)
CHUNK = 1 << 24


def decode_text(data: bytes, label: str) -> str:
    """``data`` decoded as UTF-8 (a BOM is dropped), or an error naming ``label``."""
    if b"\0" in data:
        raise TranscoderFormatError(f"{label}: a binary file where a text config was expected")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise TranscoderFormatError(f"{label}: not UTF-8 text ({exc})") from exc


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


class ConfigValues:
    """Typed reads of one parsed config mapping; ``label`` names the file in every error."""

    def __init__(self, data: Mapping[str, Any], label: str) -> None:
        if not isinstance(data, Mapping):
            raise TranscoderFormatError(f"{label}: expected a mapping of keys to values, got {type(data).__name__}")
        self.data = data
        self.label = label

    def _error(self, key: str, value: Any, expected: str) -> TranscoderFormatError:
        return TranscoderFormatError(f"{self.label}: {key!r} is {_show(value)}; expected {expected}")

    def has(self, key: str) -> bool:
        return self.data.get(key) is not None

    def raw(self, key: str, default: Any = None) -> Any:
        value = self.data.get(key, default)
        return default if value is None else value

    def str(self, key: str, default: str | None = None) -> str | None:
        value = self.data.get(key)
        if value is None:
            return default
        if not isinstance(value, str):
            raise self._error(key, value, "a string")
        return value

    def int(self, key: str, default: int | None = None, *, minimum: int | None = None) -> int | None:
        value = self.data.get(key)
        if value is None:
            return default
        return as_int(value, f"{self.label}: {key!r}", minimum=minimum)

    def float(self, key: str, default: float | None = None, *, minimum: float | None = None) -> float | None:
        value = self.data.get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise self._error(key, value, "a finite number")
        if minimum is not None and value < minimum:
            raise self._error(key, value, f"a number >= {minimum}")
        return float(value)

    def bool(self, key: str, default: bool = False) -> bool:
        value = self.data.get(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self._error(key, value, "true or false")
        return value

    def list(self, key: str) -> list[Any] | None:
        value = self.data.get(key)
        if value is None:
            return None
        if not isinstance(value, list):
            raise self._error(key, value, "a list")
        return value

    def dict(self, key: str) -> dict[Any, Any]:
        value = self.data.get(key)
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise self._error(key, value, "a mapping")
        return dict(value)

    def choice(self, key: str, choices: Iterable[Any], default: Any = None) -> Any:
        value = self.data.get(key, default)
        options = list(choices)
        if not any(value is c or (type(value) is type(c) and value == c) for c in options):
            raise self._error(key, value, f"one of {', '.join(_show(c) for c in options)}")
        return value

    def int_list(self, key: str, *, minimum: int | None = 0) -> list[int] | None:
        value = self.list(key)
        if value is None:
            return None
        return [as_int(v, f"{self.label}: {key!r}[{i}]", minimum=minimum) for i, v in enumerate(value)]

    def str_list(self, key: str) -> list[str] | None:
        value = self.list(key)
        if value is None:
            return None
        bad = [v for v in value if not isinstance(v, str) or not v]
        if bad:
            raise self._error(key, value, "a list of non-empty strings")
        return value

    def sub(self, key: str) -> ConfigValues:
        """The mapping under ``key`` (empty when absent) as its own :class:`ConfigValues`."""
        return ConfigValues(self.dict(key), f"{self.label} [{key}]")


def as_int(value: Any, what: str, *, minimum: int | None = None) -> int:
    """``value`` as an int (ints, and floats/strings that hold one exactly), or an error naming ``what``."""
    out: int | None = None
    if isinstance(value, bool):
        out = None
    elif isinstance(value, int):
        out = value
    elif isinstance(value, float) and math.isfinite(value) and value.is_integer():
        out = int(value)
    elif isinstance(value, str) and value.strip().lstrip("+-").isdigit() and len(value) < 20:
        out = int(value)
    if out is None:
        raise TranscoderFormatError(f"{what} is {_show(value)}; expected an integer")
    if minimum is not None and out < minimum:
        raise TranscoderFormatError(f"{what} is {out}; expected an integer >= {minimum}")
    return out


def check_tensor(name: str, tensor: torch.Tensor, label: str) -> torch.Tensor:
    """Raise unless ``tensor`` (read as ``name`` from ``label``) is floating point with finite values."""
    if not tensor.is_floating_point():
        raise TranscoderFormatError(
            f"{label}: tensor {name!r} has dtype {str(tensor.dtype).removeprefix('torch.')}; "
            "expected a floating-point tensor"
        )
    flat = tensor.reshape(-1)
    for start in range(0, flat.numel(), CHUNK):
        chunk = flat[start : start + CHUNK]
        finite = torch.isfinite(chunk)
        if not bool(finite.all()):
            bad = int((~finite).sum()) if chunk.numel() == flat.numel() else None
            first = start + int((~finite).nonzero()[0, 0])
            where = list(torch.unravel_index(torch.tensor(first), tuple(tensor.shape))) if tensor.ndim else []
            count = f"{bad} non-finite values" if bad is not None else "non-finite values"
            raise TranscoderFormatError(
                f"{label}: tensor {name!r} holds {count} (first {float(flat[first])} at "
                f"{[int(i) for i in where]}); expected finite weights"
            )
    return tensor
