"""The transcoder's data: its config and per-layer encoder tensors (no encode math, no file IO).

Formats build these; :mod:`sparse_clt_hf.transcoder` runs them. :func:`check_shape` is the one shape
check every reader uses.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
from torch import nn

from .activations import get_activation
from .errors import IncompatibleTranscoderError, TranscoderFormatError

INPUT_TRANSFORMS = ("none", "layernorm", "rmsnorm", "norm_rescale", "standardize")
SITES = ("resid_pre", "resid_mid", "mlp_in", "mlp_out", "resid_post")
FORMAT_VERSION = 1


def check_shape(
    name: str, tensor: torch.Tensor, shape: Iterable[int | None], label: str | None = None
) -> torch.Tensor:
    """Raise unless ``tensor`` has ``shape`` (None matches any size); ``label`` names the file."""
    expected = list(shape)
    ok = tensor.ndim == len(expected) and all(e is None or e == s for e, s in zip(expected, tensor.shape))
    if not ok:
        want = ", ".join("?" if e is None else str(e) for e in expected)
        prefix = f"{label}: " if label else ""
        raise TranscoderFormatError(f"{prefix}tensor {name!r} has shape {list(tensor.shape)}; expected [{want}]")
    return tensor


def dtype_name(dtype: torch.dtype) -> str:
    """How configs write a dtype: ``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


@dataclass
class TranscoderConfig:
    """Everything needed to run a transcoder's encoders, serialisable to JSON/YAML.

    ``layers`` are the source layers that have an encoder; ``n_features[i]`` is the width of layer
    ``layers[i]``. ``input_site`` is a site name from :data:`SITES` or an explicit module path such as
    ``"model.layers.{layer}.pre_feedforward_layernorm:output"``.
    """

    d_model: int
    layers: list[int]
    n_features: list[int]
    activation: str = "relu"
    k: int | None = None
    input_site: str = "resid_mid"
    output_site: str = "mlp_out"
    input_transform: str = "none"
    input_norm_eps: float = 1e-5
    span: int | None = None
    n_layers: int | None = None
    model_name: str | None = None
    source_format: str = "native"
    dtype: str = "float32"
    metrics: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.layers = [int(x) for x in self.layers]
        self.n_features = [int(x) for x in self.n_features]
        if len(self.layers) != len(self.n_features):
            raise TranscoderFormatError(
                f"config lists {len(self.layers)} layers but {len(self.n_features)} feature counts"
            )
        if len(set(self.layers)) != len(self.layers):
            raise TranscoderFormatError(f"config lists a layer twice: {self.layers}")
        if get_activation(self.activation).takes_k and (self.k is None or int(self.k) <= 0):
            raise TranscoderFormatError(f"activation {self.activation!r} needs a positive k, got k={self.k!r}")
        if self.input_transform not in INPUT_TRANSFORMS:
            raise TranscoderFormatError(
                f"unknown input_transform {self.input_transform!r}; expected one of {', '.join(INPUT_TRANSFORMS)}"
            )

    @classmethod
    def for_encoders(cls, encoders: Mapping[int, LayerEncoder], layers: list[int], **fields: Any) -> TranscoderConfig:
        """A config whose sizes and dtype come from the encoders themselves (what every loader needs)."""
        first = encoders[layers[0]].W_enc
        return cls(
            d_model=first.shape[1],
            layers=list(layers),
            n_features=[encoders[i].n_features for i in layers],
            dtype=dtype_name(first.dtype),
            **fields,
        )

    @property
    def is_plt(self) -> bool:
        """True when each layer writes only to itself (per-layer transcoder)."""
        return self.span == 1

    def width(self, layer: int) -> int:
        """Number of features of one source layer."""
        return self.n_features[self.layers.index(layer)]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TranscoderConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


class LayerEncoder(nn.Module):
    """Encoder (and optional decoder) of one source layer.

    Tensors: ``W_enc`` [m, d], ``b_enc`` [m], optional ``threshold`` [m], ``pre_bias`` [d] (subtracted
    from the input before encoding), ``norm_weight``/``norm_bias`` [d] (input LayerNorm affine),
    ``W_dec`` [m, n_out, d], ``b_dec`` [d] (bias of this layer's *output*), ``W_skip`` [d, d].
    """

    def __init__(
        self,
        W_enc: torch.Tensor,
        b_enc: torch.Tensor | None = None,
        *,
        threshold: torch.Tensor | None = None,
        pre_bias: torch.Tensor | None = None,
        norm_weight: torch.Tensor | None = None,
        norm_bias: torch.Tensor | None = None,
        input_scale: float | None = None,
        W_dec: torch.Tensor | None = None,
        b_dec: torch.Tensor | None = None,
        W_skip: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        if W_enc.ndim != 2:
            raise TranscoderFormatError(f"W_enc must be 2-D [n_features, d_model], got shape {tuple(W_enc.shape)}")
        m, d = W_enc.shape
        self.W_enc = nn.Parameter(W_enc.detach(), requires_grad=False)
        b_enc = torch.zeros(m, dtype=W_enc.dtype) if b_enc is None else b_enc
        check_shape("b_enc", b_enc, (m,))
        self.b_enc = nn.Parameter(b_enc.detach().to(W_enc.dtype), requires_grad=False)
        for name, tensor, shape in (
            ("threshold", threshold, (m,)),
            ("pre_bias", pre_bias, (d,)),
            ("norm_weight", norm_weight, (d,)),
            ("norm_bias", norm_bias, (d,)),
        ):
            if tensor is not None:
                check_shape(name, tensor, shape)
                tensor = tensor.detach().to(W_enc.dtype)
            self.register_buffer(name, tensor)
        self.input_scale = None if input_scale is None else float(input_scale)
        self.W_dec: nn.Parameter | None = None
        self.b_dec: nn.Parameter | None = None
        self.W_skip: nn.Parameter | None = None
        self.set_decoder(W_dec, b_dec, W_skip)

    def set_decoder(
        self, W_dec: torch.Tensor | None, b_dec: torch.Tensor | None = None, W_skip: torch.Tensor | None = None
    ) -> None:
        """Attach decoder tensors; ``W_dec`` [m, d] is read as [m, 1, d] (per-layer decoder)."""
        m, d = self.W_enc.shape
        if W_dec is not None:
            if W_dec.ndim == 2:
                W_dec = W_dec.unsqueeze(1)
            if W_dec.ndim != 3 or W_dec.shape[0] != m or W_dec.shape[2] != d:
                raise TranscoderFormatError(
                    f"W_dec has shape {tuple(W_dec.shape)}; expected [{m}, n_out, {d}] to match W_enc [{m}, {d}]"
                )
            self.W_dec = nn.Parameter(W_dec.detach(), requires_grad=False)
        if b_dec is not None:
            check_shape("b_dec", b_dec, (d,))
            self.b_dec = nn.Parameter(b_dec.detach(), requires_grad=False)
        if W_skip is not None:
            check_shape("W_skip", W_skip, (d, d))
            self.W_skip = nn.Parameter(W_skip.detach(), requires_grad=False)

    @property
    def n_features(self) -> int:
        return self.W_enc.shape[0]

    def converted(
        self, device: torch.device | str | None, dtype: torch.dtype | None, *, decoder: bool = True
    ) -> LayerEncoder:
        """A new encoder with tensors on ``device`` in ``dtype`` (shares storage where nothing changes);
        ``decoder=False`` leaves the decoder tensors out (capture never needs them)."""

        def conv(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.detach().to(device=device, dtype=dtype or t.dtype)

        return LayerEncoder(
            conv(self.W_enc),
            conv(self.b_enc),
            threshold=conv(self.threshold),
            pre_bias=conv(self.pre_bias),
            norm_weight=conv(self.norm_weight),
            norm_bias=conv(self.norm_bias),
            input_scale=self.input_scale,
            W_dec=conv(self.W_dec) if decoder else None,
            b_dec=conv(self.b_dec) if decoder else None,
            W_skip=conv(self.W_skip) if decoder else None,
        )

    @property
    def d_model(self) -> int:
        return self.W_enc.shape[1]


def check_compatible(config: TranscoderConfig, d_model: int, n_layers: int, model_name: str | None = None) -> None:
    """Raise if a transcoder cannot serve a model of this width and depth (warn on a model-name mismatch)."""
    if config.d_model != d_model:
        raise IncompatibleTranscoderError(
            f"transcoder width d_model={config.d_model} does not match the model's hidden size {d_model}"
        )
    bad = [layer for layer in config.layers if not 0 <= layer < n_layers]
    if bad:
        raise IncompatibleTranscoderError(
            f"transcoder layers {bad} are out of range: the model has {n_layers} layers (0..{n_layers - 1})"
        )
    if model_name and config.model_name and not _same_model(config.model_name, model_name):
        warnings.warn(
            f"transcoder was trained on {config.model_name!r} but is attached to {model_name!r}",
            stacklevel=3,
        )


def _same_model(a: str, b: str) -> bool:
    norm = [s.rstrip("/").split("/")[-1].lower() for s in (a, b)]
    return norm[0] == norm[1] or norm[0] in norm[1] or norm[1] in norm[0]
