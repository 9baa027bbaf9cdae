"""The format contract: what every format module implements, and the values it returns.

A format module (one per on-disk layout) satisfies :class:`Format`:

- ``NAME``, ``DESCRIPTION``
- ``detect(source) -> bool``: from file names and small config files only
- ``describe(source, layers=None, *, variant=None) -> Summary``: weight-free (configs and tensor headers),
  reading only the files of ``layers`` (all layers' names, and one layer's header, when None)
- ``load(source, layers, decoders, *, variant=None) -> Loaded``: config + encoders of ``layers`` (all when
  None), decoders only when ``decoders``

It is listed once in :data:`sparse_clt_hf.formats.FORMATS`. Shared helpers live in
:mod:`sparse_clt_hf.formats.common`; a format never imports another format's private names.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, TypedDict

from ..io.sources import FileSource
from ..layer_encoder import LayerEncoder, TranscoderConfig


class Summary(TypedDict, total=False):
    """What a format's ``describe`` returns (``n_features`` is one width or one per layer)."""

    format: str
    layers: list[int]
    d_model: int | None
    n_features: int | list[int] | None
    site: str | None
    activation: str | None
    dtype: str | None
    k: int | None
    kind: str
    input_transform: str
    output_site: str | None
    model_name: str | None
    n_layers: int | None
    encoder_bytes: int | None
    decoder_bytes: int | None
    total_bytes: int | None
    has_decoders: bool
    has_skip: bool
    metrics: dict[str, Any]
    notes: list[str]
    # format-specific extras (architecture, folder, hookpoint_template, ...) are allowed too


@dataclass
class Loaded:
    """A format's ``load`` result: the config and the encoders of the chosen layers."""

    config: TranscoderConfig
    encoders: dict[int, LayerEncoder]

    @property
    def layers(self) -> list[int]:
        return list(self.config.layers)

    def encoder(self, layer: int) -> LayerEncoder:
        return self.encoders[layer]


class Format(Protocol):
    """One on-disk layout (format modules satisfy this protocol)."""

    NAME: str
    DESCRIPTION: str

    def detect(self, source: FileSource) -> bool: ...

    def describe(
        self, source: FileSource, layers: list[int] | None = None, *, variant: str | None = None
    ) -> Summary: ...

    def load(
        self, source: FileSource, layers: list[int] | None, decoders: bool, *, variant: str | None = None
    ) -> Loaded: ...


@dataclass
class Description:
    """What a transcoder is, read from configs and safetensors headers only (no weights)."""

    name: str
    format: str
    kind: str
    layers: list[int]
    n_features: list[int]
    d_model: int | None
    activation: str
    input_site: str
    output_site: str | None = None
    input_transform: str = "none"
    k: int | None = None
    model_name: str | None = None
    n_layers: int | None = None
    dtype: str | None = None
    encoder_bytes: int | None = None
    decoder_bytes: int | None = None
    total_bytes: int | None = None
    has_decoders: bool = False
    has_skip: bool = False
    metrics: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_summary(cls, name: str, fmt: str, summary: Summary) -> Description:
        """Adapt the :class:`Summary` a format's ``describe`` returns."""
        data: dict[str, Any] = dict(summary)
        layers = [int(x) for x in data.pop("layers", [])]
        widths = data.pop("n_features", None)
        if not isinstance(widths, list):
            widths = [widths] * len(layers) if widths is not None else []
        known = {f for f in cls.__dataclass_fields__} - {"name", "format", "layers", "n_features", "extra"}
        kwargs = {k: data.pop(k) for k in list(data) if k in known}
        kwargs.setdefault("input_site", data.pop("site", None) or "?")
        kwargs["activation"] = kwargs.get("activation") or "?"
        kwargs.setdefault("kind", "clt" if (data.get("span") or 1) != 1 else "plt")
        kwargs.setdefault("d_model", None)
        data.pop("format", None)
        return cls(name=name, format=fmt, layers=layers, n_features=widths, extra=data, **kwargs)
