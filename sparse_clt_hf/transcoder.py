"""The transcoder module: per-layer encoders (and optional decoders) and the encode math.

A cross-layer transcoder (CLT) has one encoder per source layer; source layer ``i`` writes into
layers ``i .. i + span - 1``. A per-layer transcoder (PLT) is the case ``span == 1``. Every format
that this library reads is mapped onto this one module, so the encode formula lives here only:

    x' = transform(x) - pre_bias          (transform: none | layernorm | rmsnorm | norm_rescale | standardize)
    z  = x' @ W_enc.T + b_enc
    a  = act(z)                           (relu | jumprelu: z * (z > threshold) | topk: k largest z, relu'd)
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .activations import Activation, get_activation
from .errors import IncompatibleTranscoderError, TranscoderFormatError
from .formats import read_encoders, save_native
from .io.push import push_to_hub
from .io.refs import RefLike
from .layer_encoder import (  # noqa: F401  (re-exported: the transcoder's public data types)
    FORMAT_VERSION,
    INPUT_TRANSFORMS,
    SITES,
    LayerEncoder,
    TranscoderConfig,
    check_compatible,
    dtype_name,
)


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
            if get_activation(config.activation).needs_threshold and enc.threshold is None:
                raise TranscoderFormatError(
                    f"layer {layer}: activation {config.activation!r} needs a threshold tensor"
                )

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
    @property
    def activation(self) -> Activation:
        """The activation object of this transcoder (see :mod:`sparse_clt_hf.activations`)."""
        return get_activation(self.config.activation)

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
        return self.activation.dense(z, self.encoder(layer).threshold, self.config.k)

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
        act_k = min(int(self.config.k), m) if self.activation.takes_k else None  # type: ignore[arg-type]
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

    @torch.no_grad()
    def feature_activity(
        self, x: torch.Tensor, layer: int, features: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Pre-activations ``z`` [N, F] and activity [N, F] (bool) of the features ``features`` [F] at
        ``layer`` for rows ``x`` [N, d], with :meth:`encode_sparse`'s arithmetic (input transform,
        fp32 accumulation of half inputs) and no top-k cut: a feature is active where its activation
        is non-zero. An elementwise activation (ReLU, JumpReLU) encodes only those columns; a TopK one
        encodes the whole layer, since membership in the top k depends on every feature."""
        self._check_input(x, layer)
        enc = self.encoder(layer)
        xp = self.preprocess(x, layer)
        fp32 = _fp32_accumulate(xp)
        cols = features.to(device=enc.W_enc.device, dtype=torch.long)
        z = _pre_activations(xp, enc.W_enc[cols], enc.b_enc[cols], fp32)
        if self.activation.takes_k:
            _, idx, _ = self.encode_sparse(x, layer, min(int(self.config.k), enc.n_features))  # type: ignore[arg-type]
            column = torch.full((enc.n_features + 1,), -1, dtype=torch.long, device=z.device)
            column[cols] = torch.arange(cols.numel(), device=z.device)  # feature -> its column in z, else -1
            j = column[idx.long()]  # empty slots (-1) read the extra last entry: -1
            row = torch.arange(idx.shape[0], device=z.device)[:, None].expand_as(j)
            active = torch.zeros(z.shape, dtype=torch.bool, device=z.device)
            active[row[j >= 0], j[j >= 0]] = True
            return z, active
        thr = None if enc.threshold is None else enc.threshold[cols].to(z.dtype)
        return z, self.activation.dense(z, thr, self.config.k) != 0

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
        act = self.activation
        keep = act.candidates(k, act_k)
        fp32 = _fp32_accumulate(xp)
        cand_z: list[torch.Tensor] = []
        cand_i: list[torch.Tensor] = []
        count: torch.Tensor | int = 0
        for c0 in range(0, m, cols):
            c1 = min(c0 + cols, m)
            z = _pre_activations(xp, enc.W_enc[c0:c1], enc.b_enc[c0:c1], fp32)
            thr = None if enc.threshold is None else enc.threshold[c0:c1]
            if fp32 and thr is not None:
                thr = thr.float()
            z = act.prepare_block(z, thr, activation_threshold)
            top_z, top_i = z.topk(min(keep, c1 - c0), dim=-1)
            block_count = act.count_block(z, activation_threshold)
            if block_count is not None:
                count = count + block_count
            del z
            cand_z.append(top_z)
            cand_i.append(top_i.add_(c0) if c0 else top_i)
        if len(cand_z) > 1:
            top_z, pos = torch.cat(cand_z, dim=-1).topk(keep, dim=-1)
            top_i = torch.cat(cand_i, dim=-1).gather(-1, pos)
        top_z, top_i, count = act.finish(top_z, top_i, count, k, activation_threshold)
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
        ref: RefLike,
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
        loaded = read_encoders(
            ref,
            layers=layers,
            format=format,
            variant=variant,
            decoders=decoders,
            revision=revision,
            token=token,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
        )
        tc = cls(loaded.config, loaded.encoders)
        if dtype is not None or device is not None:
            tc = tc.to(device=device, dtype=dtype)
            if dtype is not None:
                tc.config.dtype = dtype_name(dtype)
        return tc

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write the native (circuit-tracer compatible) layout into ``directory``."""
        return save_native(self.config, self._encoder_map(), Path(directory))

    def push_to_hub(self, repo_id: str, **kwargs: Any) -> str:
        """Save in the native layout with a model card and upload it (see :func:`sparse_clt_hf.io.push.push_to_hub`)."""
        return push_to_hub(self, repo_id, **kwargs)

    def _encoder_map(self) -> dict[int, LayerEncoder]:
        return {layer: self.encoder(layer) for layer in self.layers}

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"layers={c.layers}, d_model={c.d_model}, n_features={sorted(set(c.n_features))}, "
            f"activation={c.activation}, site={c.input_site}"
        )


#: Bytes of one block of pre-activations in ``encode_sparse``: small enough to stay in a CPU's cache
#: for the activation, count and top-k passes; large on accelerators, where each block is a launch.
@dataclass(frozen=True)
class EncodeTuning:
    """How :meth:`CrossLayerTranscoder.encode_sparse` tiles its work on one kind of device.

    ``block_bytes``: budget for one block of pre-activations; ``block_rows``: most rows per block
    (``None``: as many as fit the budget); ``max_cols``: most features per block, each block taking
    its own top-k (``None``: as many as fit the budget); ``fp32_accumulate``: half-precision inputs
    get fp32 pre-activations (the matmul's fp32 accumulator is not rounded to bf16 before the bias,
    the threshold and the top-k: activations near a threshold are selected as in fp32)."""

    block_bytes: int
    block_rows: int | None
    max_cols: int | None
    fp32_accumulate: bool


#: Per device type. CPU (2-core AMD EPYC, measured): 1024-row x 16 MiB blocks stay in cache and stream the
#: encoder once per 1024 rows. CUDA: one matmul per 4096 features for a large row block (torch.topk over
#: all m features dominated the encode on an H200: 3.8x a bare matmul); bf16 pre-activations in fp32.
ENCODE_TUNING: dict[str, EncodeTuning] = {
    "cpu": EncodeTuning(block_bytes=16 << 20, block_rows=1024, max_cols=None, fp32_accumulate=False),
    "cuda": EncodeTuning(block_bytes=256 << 20, block_rows=None, max_cols=4096, fp32_accumulate=True),
}
DEFAULT_TUNING = EncodeTuning(block_bytes=256 << 20, block_rows=None, max_cols=None, fp32_accumulate=False)


def tuning_for(device: torch.device) -> EncodeTuning:
    return ENCODE_TUNING.get(device.type, DEFAULT_TUNING)


def block_shape(
    n: int, m: int, element_size: int, device: torch.device, rows: int | None = None
) -> tuple[int, int]:
    """``(rows, cols)`` of the pre-activation blocks ``encode_sparse`` uses for ``n`` rows and ``m`` features.

    Rows: ``rows`` if given, else all ``n`` up to the device's ``block_rows`` or as many as fit its
    block budget; columns: whatever else fits the budget (at least 256, at most ``m`` and the
    device's ``max_cols``). See :data:`ENCODE_TUNING`.
    """
    tune = tuning_for(device)
    budget = tune.block_bytes
    if rows is None:
        limit = tune.block_rows or max(1, budget // (min(m, tune.max_cols or m) * element_size))
        rows = min(max(n, 1), limit)
    cols = min(m, max(256, budget // (rows * element_size)))
    if tune.max_cols is not None:
        cols = min(cols, tune.max_cols)
    return rows, cols



def _fp32_accumulate(x: torch.Tensor) -> bool:
    """Whether half-precision ``x`` gets fp32 pre-activations on its device (see :class:`EncodeTuning`)."""
    return x.dtype in (torch.float16, torch.bfloat16) and tuning_for(x.device).fp32_accumulate


def _pre_activations(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor, fp32: bool) -> torch.Tensor:
    """``x @ W.T + b``; with ``fp32``, half-precision inputs give fp32 pre-activations (CUDA's
    ``mm(out_dtype=float32)`` keeps the accumulator; elsewhere the inputs are upcast)."""
    if not fp32:
        return F.linear(x, W, b)
    try:
        z = torch.mm(x, W.t(), out_dtype=torch.float32)
    except (TypeError, RuntimeError, NotImplementedError):  # torch without out_dtype, or a backend without it
        z = x.float() @ W.float().t()
    return z.add_(b.float())
