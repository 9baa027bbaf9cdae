"""Helpers shared by the published-format loaders: JSON configs, layer choice, npz reads, headers.

Everything here reads without executing code (json, npz with ``allow_pickle=False``, safetensors
headers) and turns library errors into :class:`TranscoderFormatError` naming the file.
"""

from __future__ import annotations

import json
import re
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors import safe_open

from ..errors import TranscoderFormatError

if TYPE_CHECKING:
    from ..hub import FileSource

LAYER_IN_NAME = re.compile(r"(?:^|[/._-])layers?[._-]?(\d+)(?=$|[/._-])")


def read_json(source: FileSource, path: str) -> dict[str, Any]:
    """Parse a JSON object file of ``source`` with an error naming the file."""
    try:
        data = json.loads(source.fetch(path).read_text())
    except json.JSONDecodeError as exc:
        raise TranscoderFormatError(f"{source.name}/{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise TranscoderFormatError(f"{source.name}/{path}: expected a JSON object, got {type(data).__name__}")
    return data


def choose_layers(source: FileSource, available: Iterable[int], wanted: list[int] | None, what: str) -> list[int]:
    """The requested layers (all when None), checked against those ``source`` has."""
    have = sorted(set(available))
    if not have:
        raise TranscoderFormatError(f"{source.name}: no {what} found")
    if wanted is None:
        return have
    missing = [x for x in wanted if x not in have]
    if missing:
        raise TranscoderFormatError(f"{source.name}: no {what} for layers {missing}; it has layers {have}")
    return list(wanted)


def folder_of(path: str) -> str:
    """The folder part of a relative POSIX path ('' at the root)."""
    return path.rsplit("/", 1)[0] if "/" in path else ""


def join(folder: str, name: str) -> str:
    return f"{folder}/{name}" if folder else name


def layer_from_name(name: str) -> int | None:
    """The last ``layer_N`` / ``layers.N`` number in a path or repo name, if any."""
    found = LAYER_IN_NAME.findall(name)
    return int(found[-1]) if found else None


def pick_variant(source: FileSource, variants: dict[str, Any], variant: str | None, what: str) -> str:
    """One key of ``variants``: the only one, or the one asked for, else a clear error listing them."""
    if variant is not None:
        if variant not in variants:
            raise TranscoderFormatError(f"{source.name}: no {what} {variant!r}; found {sorted(variants)}")
        return variant
    if len(variants) != 1:
        raise TranscoderFormatError(
            f"{source.name} holds several {what}s {sorted(variants)}; pass variant=... to choose one "
            f"or point at a folder that holds one"
        )
    return next(iter(variants))


def check_shape(label: str, name: str, tensor: torch.Tensor, shape: Iterable[int | None]) -> torch.Tensor:
    """Raise unless ``tensor`` has ``shape`` (None matches any size)."""
    expected = list(shape)
    ok = tensor.ndim == len(expected) and all(e is None or e == s for e, s in zip(expected, tensor.shape))
    if not ok:
        want = ", ".join("?" if e is None else str(e) for e in expected)
        raise TranscoderFormatError(f"{label}: tensor {name!r} has shape {list(tensor.shape)}; expected [{want}]")
    return tensor


class NpzReader:
    """Per-array reads from one ``.npz`` file (never unpickles), with errors naming file and array."""

    def __init__(self, path: Path, label: str) -> None:
        self.label = label
        try:
            self._npz = np.load(path, allow_pickle=False)
            self.keys = set(self._npz.files)
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
            raise TranscoderFormatError(f"{label}: not a readable .npz file ({type(exc).__name__}: {exc})") from exc

    def get(self, name: str, shape: Iterable[int | None] | None = None, required: bool = True) -> torch.Tensor | None:
        if name not in self.keys:
            if required:
                raise TranscoderFormatError(f"{self.label}: missing array {name!r}; found {sorted(self.keys)}")
            return None
        try:
            array = self._npz[name]
        except (OSError, ValueError, zipfile.BadZipFile, EOFError, KeyError) as exc:
            raise TranscoderFormatError(
                f"{self.label}: array {name!r} could not be read (truncated or corrupt file?): {exc}"
            ) from exc
        tensor = torch.from_numpy(np.ascontiguousarray(array))
        return tensor if shape is None else check_shape(self.label, name, tensor, shape)


_NPY_HEADER_READERS = {
    (1, 0): np.lib.format.read_array_header_1_0,
    (2, 0): np.lib.format.read_array_header_2_0,
}


def npz_headers(path: Path, label: str) -> dict[str, tuple[list[int], str]]:
    """{array: (shape, dtype)} of an ``.npz`` from the ``.npy`` headers only (no data read)."""
    out: dict[str, tuple[list[int], str]] = {}
    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                if not info.filename.endswith(".npy"):
                    continue
                with zf.open(info) as fh:
                    version = np.lib.format.read_magic(fh)
                    reader = _NPY_HEADER_READERS.get(version)
                    if reader is None:
                        raise ValueError(f"unsupported .npy format version {version}")
                    shape, _, dtype = reader(fh)
                out[info.filename[:-4]] = ([int(s) for s in shape], str(dtype))
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise TranscoderFormatError(f"{label}: not a readable .npz file ({type(exc).__name__}: {exc})") from exc
    return out


def safetensors_headers(path: Path, label: str) -> dict[str, tuple[list[int], str]]:
    """{tensor: (shape, dtype)} of a safetensors file from its header only."""
    try:
        with safe_open(str(path), framework="pt") as fh:
            return {
                k: ([int(s) for s in fh.get_slice(k).get_shape()], str(fh.get_slice(k).get_dtype()))
                for k in fh.keys()
            }
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise TranscoderFormatError(f"{label}: not a readable safetensors file ({type(exc).__name__}: {exc})") from exc


def jump_threshold(threshold: torch.Tensor | None) -> torch.Tensor | None:
    """Threshold for ``relu(z) * (z > t)`` (SAELens, Gemma Scope) run as ``z * (z > t)``: clamp t at 0."""
    return None if threshold is None else threshold.clamp_min(0)


def describe_dict(
    fmt: str,
    layers: list[int],
    d_model: int | None,
    n_features: list[int] | int | None,
    site: str | None,
    activation: str | None,
    dtype: str | None,
    **extra: Any,
) -> dict[str, Any]:
    """The summary returned by each format's ``describe``."""
    out = {
        "format": fmt,
        "layers": layers,
        "d_model": d_model,
        "n_features": n_features,
        "site": site,
        "activation": activation,
        "dtype": dtype,
    }
    out.update({k: v for k, v in extra.items() if v is not None})
    return out
