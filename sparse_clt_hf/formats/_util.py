"""Helpers shared by the format loaders: safe tensor reads with clear errors."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import TranscoderFormatError


class SafetensorsReader:
    """Memory-mapped, per-tensor reads from one safetensors file, with errors naming file and tensor."""

    def __init__(self, path: Path, label: str | None = None) -> None:
        self.path = Path(path)
        self.label = label or self.path.name
        try:
            self._handle = safe_open(str(self.path), framework="pt")
            self.keys = set(self._handle.keys())
        except Exception as exc:  # safetensors raises its own error types for corrupt headers
            raise TranscoderFormatError(
                f"{self.label}: not a readable safetensors file ({type(exc).__name__}: {exc})"
            ) from exc

    def metadata(self) -> dict[str, str]:
        return self._handle.metadata() or {}

    def get(self, name: str, shape: Iterable[int | None] | None = None, required: bool = True) -> torch.Tensor | None:
        """Read tensor ``name``; check its shape (None entries match any size)."""
        if name not in self.keys:
            if required:
                raise TranscoderFormatError(
                    f"{self.label}: missing tensor {name!r}; found {sorted(self.keys)}"
                )
            return None
        try:
            tensor = self._handle.get_tensor(name)
        except Exception as exc:
            raise TranscoderFormatError(
                f"{self.label}: tensor {name!r} could not be read (truncated or corrupt file?): {exc}"
            ) from exc
        if shape is not None:
            expected = list(shape)
            ok = tensor.ndim == len(expected) and all(e is None or e == s for e, s in zip(expected, tensor.shape))
            if not ok:
                want = ", ".join("?" if e is None else str(e) for e in expected)
                raise TranscoderFormatError(
                    f"{self.label}: tensor {name!r} has shape {list(tensor.shape)}; expected [{want}]"
                )
        return tensor

