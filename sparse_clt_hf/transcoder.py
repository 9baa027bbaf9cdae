"""The transcoder module: per-layer encoders (and optional decoders) and the encode math.

A cross-layer transcoder (CLT) has one encoder per source layer; source layer ``i`` writes into
layers ``i .. i + span - 1``. A per-layer transcoder (PLT) is the case ``span == 1``. Every format
that this library reads is mapped onto this one module, so the encode formula lives here only:

    x' = transform(x) - pre_bias          (transform: none | layernorm | rmsnorm | norm_rescale | standardize)
    z  = x' @ W_enc.T + b_enc
    a  = act(z)                           (relu | jumprelu: z * (z > threshold) | topk: k largest z, relu'd)
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import IncompatibleTranscoderError, TranscoderFormatError

ACTIVATIONS = ("relu", "jumprelu", "topk")
INPUT_TRANSFORMS = ("none", "layernorm", "rmsnorm", "norm_rescale", "standardize")
SITES = ("resid_pre", "resid_mid", "mlp_in", "mlp_out", "resid_post")
FORMAT_VERSION = 1


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
        if self.activation not in ACTIVATIONS:
            raise TranscoderFormatError(
                f"unknown activation {self.activation!r}; expected one of {', '.join(ACTIVATIONS)}"
            )
        if self.activation == "topk" and (self.k is None or int(self.k) <= 0):
            raise TranscoderFormatError(f"activation 'topk' needs a positive k, got k={self.k!r}")
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
        _check_shape("b_enc", b_enc, (m,))
        self.b_enc = nn.Parameter(b_enc.detach().to(W_enc.dtype), requires_grad=False)
        for name, tensor, shape in (
            ("threshold", threshold, (m,)),
            ("pre_bias", pre_bias, (d,)),
            ("norm_weight", norm_weight, (d,)),
            ("norm_bias", norm_bias, (d,)),
        ):
            if tensor is not None:
                _check_shape(name, tensor, shape)
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
            _check_shape("b_dec", b_dec, (d,))
            self.b_dec = nn.Parameter(b_dec.detach(), requires_grad=False)
        if W_skip is not None:
            _check_shape("W_skip", W_skip, (d, d))
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


def _check_shape(name: str, tensor: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(tensor.shape) != tuple(shape):
        raise TranscoderFormatError(f"tensor {name!r} has shape {tuple(tensor.shape)}; expected {list(shape)}")


class CrossLayerTranscoder(nn.Module):
    """A cross-layer (or per-layer) transcoder: encoders for a set of source layers, decoders optional.

    Build one from tensors (``CrossLayerTranscoder(config, {layer: LayerEncoder})``), from a folder or
    a Hub reference (:meth:`from_pretrained`), and write it with :meth:`save_pretrained`.
    """

    def __init__(self, config: TranscoderConfig, encoders: Mapping[int, LayerEncoder]) -> None:
        super().__init__()
        self.config = config
        missing = [layer for layer in config.layers if layer not in encoders]
        if missing:
            raise TranscoderFormatError(f"no encoder given for layers {missing}")
        self.encoders = nn.ModuleDict({str(layer): encoders[layer] for layer in config.layers})
        for layer, width in zip(config.layers, config.n_features):
            enc = encoders[layer]
            if enc.d_model != config.d_model:
                raise TranscoderFormatError(
                    f"layer {layer}: W_enc has width {enc.d_model}, config says d_model={config.d_model}"
                )
            if enc.n_features != width:
                raise TranscoderFormatError(
                    f"layer {layer}: W_enc has {enc.n_features} features, config says {width}"
                )
            if config.activation == "jumprelu" and enc.threshold is None:
                raise TranscoderFormatError(f"layer {layer}: activation 'jumprelu' needs a threshold tensor")

    # ------------------------------------------------------------------ access
    @property
    def layers(self) -> list[int]:
        return list(self.config.layers)

    def encoder(self, layer: int) -> LayerEncoder:
        """The encoder of one source layer, with a clear error for a layer this transcoder lacks."""
        try:
            return self.encoders[str(layer)]  # type: ignore[return-value]
        except KeyError:
            raise IncompatibleTranscoderError(
                f"this transcoder has no encoder for layer {layer}; it has layers {self.config.layers}"
            ) from None

    def select_layers(self, layers: Iterable[int]) -> CrossLayerTranscoder:
        """A transcoder that shares this one's tensors but keeps only ``layers``."""
        layers = [int(x) for x in layers]
        encoders = {layer: self.encoder(layer) for layer in layers}
        cfg = TranscoderConfig.from_dict(
            {**self.config.to_dict(), "layers": layers, "n_features": [encoders[x].n_features for x in layers]}
        )
        return CrossLayerTranscoder(cfg, encoders)

    # ------------------------------------------------------------------ encode math
    def preprocess(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        """Input transform and pre-bias: what the encoder matmul sees."""
        enc = self.encoder(layer)
        x = x.to(enc.W_enc.dtype)
        transform = self.config.input_transform
        eps = self.config.input_norm_eps
        if transform == "layernorm":
            x = F.layer_norm(x, (x.shape[-1],), enc.norm_weight, enc.norm_bias, eps)
        elif transform == "rmsnorm":
            x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        elif transform == "standardize":  # SAELens' layer_norm: (x - mean) / (unbiased std + eps)
            centred = x - x.mean(-1, keepdim=True)
            x = centred / (centred.std(-1, keepdim=True) + eps)
        elif transform == "norm_rescale":
            x = x * (math.sqrt(x.shape[-1]) / x.norm(dim=-1, keepdim=True).clamp_min(eps))
        if enc.input_scale is not None:
            x = x * enc.input_scale
        if enc.pre_bias is not None:
            x = x - enc.pre_bias
        return x

    def pre_activations(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        """``z = transform(x) @ W_enc.T + b_enc`` (dense, before the activation)."""
        enc = self.encoder(layer)
        return F.linear(self.preprocess(x, layer), enc.W_enc, enc.b_enc)

    def activate(self, z: torch.Tensor, layer: int) -> torch.Tensor:
        """Apply this transcoder's activation function to dense pre-activations."""
        act = self.config.activation
        if act == "relu":
            return torch.relu(z)
        if act == "jumprelu":
            thr = self.encoder(layer).threshold
            return z * (z > thr)
        k = min(int(self.config.k), z.shape[-1])  # type: ignore[arg-type]
        vals, idx = z.topk(k, dim=-1)
        return torch.zeros_like(z).scatter_(-1, idx, torch.relu(vals))

    def encode(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        """Dense feature activations [..., m] of ``x`` [..., d] at ``layer`` (after the activation)."""
        self._check_input(x, layer)
        return self.activate(self.pre_activations(x, layer), layer)

    @torch.no_grad()
    def encode_sparse(
        self,
        x: torch.Tensor,
        layer: int,
        top_k: int,
        *,
        activation_threshold: float | None = None,
        chunk_size: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Top-k features of ``x`` [N, d] at ``layer``, without a dense [N, m] beyond one block.

        Returns ``values`` [N, k] (sorted descending, 0 in empty slots), ``indices`` [N, k] int32
        (-1 in empty slots) and ``l0`` [N] int32, the number of active features before truncation.

        The work is tiled into blocks of ``rows x cols`` pre-activations (see :func:`block_shape`;
        ``chunk_size`` fixes the rows): each block is activated, counted and reduced to its own top-k
        while it is still in cache, and a row chunk's result is the top-k of its blocks' candidates,
        which is exact because the global top-k lies within the per-block top-k's. Rows are tiled so
        that an encoder larger than the cache is streamed only ``N / rows`` times.
        """
        self._check_input(x, layer)
        enc = self.encoder(layer)
        n = x.shape[0]
        m = enc.n_features
        W = enc.W_enc
        act_k = min(int(self.config.k), m) if self.config.activation == "topk" else None  # type: ignore[arg-type]
        k = min(top_k, m, act_k) if act_k else min(top_k, m)
        values = torch.empty(n, top_k, dtype=W.dtype, device=W.device)
        indices = torch.empty(n, top_k, dtype=torch.int32, device=W.device)
        l0 = torch.empty(n, dtype=torch.int32, device=W.device)
        if k < top_k:
            values[:, k:] = 0
            indices[:, k:] = -1
        rows, cols = block_shape(n, m, W.element_size(), W.device, chunk_size)
        for start in range(0, n, rows):
            stop = min(start + rows, n)
            top_z, top_i, count = self._encode_rows(
                self.preprocess(x[start:stop], layer), enc, cols, k, act_k, activation_threshold
            )
            values[start:stop, :k] = top_z
            indices[start:stop, :k] = top_i.masked_fill_(top_z == 0, -1)
            l0[start:stop] = count
        return values, indices, l0

    def _encode_rows(
        self,
        xp: torch.Tensor,
        enc: LayerEncoder,
        cols: int,
        k: int,
        act_k: int | None,
        activation_threshold: float | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Top-k (values, feature indices, active count) of preprocessed rows ``xp``, ``cols`` features at a time."""
        m = enc.n_features
        relu = self.config.activation == "relu"
        # relu (and the TopK activation) keep the order of z: the top-k of the activations is the
        # activated top-k of z, so they take the top-k of raw z and activate only those k. relu with a
        # positive threshold t is "zero what is < t"; without one, "zero what is <= 0".
        cut = activation_threshold if relu and activation_threshold is not None and activation_threshold > 0 else None
        # The TopK activation keeps the act_k largest pre-activations: its candidates are raw z.
        keep = act_k if act_k is not None else k
        cand_z: list[torch.Tensor] = []
        cand_i: list[torch.Tensor] = []
        count: torch.Tensor | int = 0
        for c0 in range(0, m, cols):
            c1 = min(c0 + cols, m)
            z = F.linear(xp, enc.W_enc[c0:c1], enc.b_enc[c0:c1])
            if act_k is None and not relu:  # jumprelu
                z = z.mul_(z > enc.threshold[c0:c1])
                if activation_threshold is not None:
                    z = z.masked_fill_(z < activation_threshold, 0)
            top_z, top_i = z.topk(min(keep, c1 - c0), dim=-1)
            if act_k is None:
                # Count the active features with an in-place comparison and a float sum: vectorised,
                # unlike a sum over a bool mask (exact: fp32 sums 0/1 up to 2**24 features).
                active = z.ne_(0) if not relu else z.gt_(0) if cut is None else z.ge_(cut)
                count = count + active.sum(-1, dtype=torch.float32)
            del z
            cand_z.append(top_z)
            cand_i.append(top_i.add_(c0) if c0 else top_i)
        if len(cand_z) > 1:
            top_z, pos = torch.cat(cand_z, dim=-1).topk(keep, dim=-1)
            top_i = torch.cat(cand_i, dim=-1).gather(-1, pos)
        if relu:
            top_z = top_z.clamp_min_(0) if cut is None else top_z.masked_fill_(top_z < cut, 0)
        elif act_k is not None:
            # TopK activation: the positives among the act_k largest z; keep the k largest of those.
            top_z = top_z.clamp_min_(0)
            if activation_threshold is not None:
                top_z = top_z.masked_fill_(top_z < activation_threshold, 0)
            count = (top_z != 0).sum(-1)
            top_z, top_i = top_z[:, :k], top_i[:, :k]
        return top_z, top_i, count  # type: ignore[return-value]

    def _check_input(self, x: torch.Tensor, layer: int) -> None:
        d = self.encoder(layer).d_model
        if x.shape[-1] != d:
            raise IncompatibleTranscoderError(
                f"layer {layer}: input has width {x.shape[-1]} but the transcoder expects d_model={d}"
            )

    # ------------------------------------------------------------------ decode
    def has_decoders(self) -> bool:
        return all(self.encoder(layer).W_dec is not None for layer in self.layers)

    def decode(self, activations: Mapping[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """Reconstruct each target layer's output from dense activations {source layer: [..., m]}.

        Target ``t`` gets ``b_dec[t] + sum_{s <= t} a_s @ W_dec_s[:, t - s, :]``.
        """
        out: dict[int, torch.Tensor] = {}
        for src, acts in activations.items():
            enc = self.encoder(src)
            if enc.W_dec is None:
                raise TranscoderFormatError(f"layer {src} has no decoder; load with decoders=True")
            for offset in range(enc.W_dec.shape[1]):
                target = src + offset
                contrib = acts.to(enc.W_dec.dtype) @ enc.W_dec[:, offset, :]
                out[target] = contrib if target not in out else out[target] + contrib
        for target in list(out):
            key = str(target)
            if key in self.encoders and self.encoders[key].b_dec is not None:
                out[target] = out[target] + self.encoders[key].b_dec
        return out

    # ------------------------------------------------------------------ IO
    @classmethod
    def from_pretrained(
        cls,
        ref: str | Path,
        *,
        layers: Iterable[int] | None = None,
        format: str | None = None,
        variant: str | None = None,
        decoders: bool = False,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        revision: str | None = None,
        token: str | bool | None = None,
        cache_dir: str | Path | None = None,
        local_files_only: bool = False,
    ) -> CrossLayerTranscoder:
        """Load a transcoder from a local folder, a Hub reference or a registry name.

        Only the files holding the requested ``layers`` are read (and downloaded); decoders are
        read only with ``decoders=True``. ``format`` overrides the automatic detection; ``variant``
        picks one of several transcoders per layer where a repo holds more (e.g. Gemma Scope L0s).
        """
        from .formats import load_transcoder
        from .hub import open_source

        source = ref if hasattr(ref, "list_files") else open_source(
            ref, revision=revision, token=token, cache_dir=cache_dir, local_files_only=local_files_only
        )
        tc = load_transcoder(source, layers=layers, format=format, decoders=decoders, variant=variant)
        if dtype is not None or device is not None:
            tc = tc.to(device=device, dtype=dtype)
            if dtype is not None:
                tc.config.dtype = dtype_name(dtype)
        return tc

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write the native (circuit-tracer compatible) layout into ``directory``."""
        from .formats.circuit_tracer import save_native

        return save_native(self, Path(directory))

    def push_to_hub(self, repo_id: str, **kwargs: Any) -> str:
        """Save in the native layout with a model card and upload it (see :func:`sparse_clt_hf.hub.push_to_hub`)."""
        from .hub import push_to_hub

        return push_to_hub(self, repo_id, **kwargs)

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"layers={c.layers}, d_model={c.d_model}, n_features={sorted(set(c.n_features))}, "
            f"activation={c.activation}, site={c.input_site}"
        )


#: Bytes of one block of pre-activations in ``encode_sparse``: small enough to stay in a CPU's cache
#: for the activation, count and top-k passes; large on accelerators, where each block is a launch.
BLOCK_BYTES = {"cpu": 16 << 20}
DEFAULT_BLOCK_BYTES = 256 << 20
#: Rows per block on CPU when there are more: the encoder is streamed once per this many rows.
BLOCK_ROWS = 1024


def block_shape(
    n: int, m: int, element_size: int, device: torch.device, rows: int | None = None
) -> tuple[int, int]:
    """``(rows, cols)`` of the pre-activation blocks ``encode_sparse`` uses for ``n`` rows and ``m`` features.

    Rows: ``rows`` if given, else all ``n`` up to :data:`BLOCK_ROWS` (on CPU) or as many as fit the
    block budget (elsewhere); columns: whatever else fits the budget (at least 256, at most ``m``).
    """
    budget = BLOCK_BYTES.get(device.type, DEFAULT_BLOCK_BYTES)
    if rows is None:
        limit = BLOCK_ROWS if device.type == "cpu" else max(1, budget // (m * element_size))
        rows = min(max(n, 1), limit)
    cols = min(m, max(256, budget // (rows * element_size)))
    return rows, cols


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
        import warnings

        warnings.warn(
            f"transcoder was trained on {config.model_name!r} but is attached to {model_name!r}",
            stacklevel=3,
        )


def _same_model(a: str, b: str) -> bool:
    norm = [s.rstrip("/").split("/")[-1].lower() for s in (a, b)]
    return norm[0] == norm[1] or norm[0] in norm[1] or norm[1] in norm[0]
