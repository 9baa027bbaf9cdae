"""Loading a transcoder for a model, in one direction:
resolve the reference -> describe it once (configs and headers of the requested layers) -> check it
fits the model once -> load only the requested encoders (format already known) -> build the transcoder.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import IncompatibleTranscoderError, TranscoderFormatError
from .formats import Description, describe, detect_format, format_module, read_encoders
from .formats.circuit_tracer import CLT_KIND, read_config
from .io.refs import Reference, RefLike, resolve
from .io.sources import FileSource
from .layer_encoder import TranscoderConfig, check_compatible
from .sites import NORM_DEPENDENT_KEY, model_dims, norm_eps, norm_kind, pre_mlp_norm
from .transcoder import CrossLayerTranscoder

__all__ = [
    "check_before_download",
    "check_description",
    "choose_input_transform",
    "describe",
    "DecoderParts",
    "load_decoder_parts",
    "load_decoder_rows",
    "load_for_model",
    "load_transcoder",
]


def load_transcoder(
    source: RefLike,
    *,
    layers: Iterable[int] | None = None,
    format: str | None = None,
    decoders: bool = False,
    variant: str | None = None,
) -> CrossLayerTranscoder:
    """Load the encoders of ``layers`` (all when None) from ``source``; decoders only when asked.

    ``variant`` picks one of several transcoders per layer (e.g. a Gemma Scope L0 folder)."""
    loaded = read_encoders(source, layers=layers, format=format, decoders=decoders, variant=variant)
    return CrossLayerTranscoder(loaded.config, loaded.encoders)


def check_description(
    desc: Description, model: Any, layers: Iterable[int] | None = None, warn_model_name: bool = True
) -> None:
    """Raise IncompatibleTranscoderError unless ``desc`` fits ``model`` (width, layer ids); warn on a
    model-name mismatch when ``warn_model_name``."""
    d_model, depth, model_name = model_dims(model)
    chosen = list(desc.layers)
    if layers is not None:
        missing = sorted(set(int(x) for x in layers) - set(desc.layers))
        if missing:
            raise IncompatibleTranscoderError(
                f"{desc.name}: no encoders for layers {missing}; the transcoder has layers {desc.layers}"
            )
        chosen = sorted(set(int(x) for x in layers))
    widths = dict(zip(desc.layers, desc.n_features))
    cfg = TranscoderConfig(
        d_model=int(desc.d_model or d_model),
        layers=chosen,
        n_features=[widths[i] for i in chosen],
        model_name=desc.model_name,
    )
    check_compatible(cfg, d_model, depth, model_name if warn_model_name else None)


def check_before_download(
    source: FileSource | Reference,
    model: Any,
    layers: list[int] | None = None,
    format: str | None = None,
    warn_model_name: bool = True,
) -> Description:
    """Check that ``source`` fits ``model`` (width, layer ids, model name) before downloading weights.

    Raises IncompatibleTranscoderError for a width or layer mismatch and warns on a model-name mismatch.
    """
    desc = describe(source, format=format)
    check_description(desc, model, layers, warn_model_name)
    return desc


def load_for_model(
    transcoder: str | Path | FileSource | Reference,
    model: Any,
    *,
    layers: Iterable[int] | None = None,
    format: str | None = None,
    variant: str | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | Path | None = None,
    local_files_only: bool = False,
) -> CrossLayerTranscoder:
    """The encoders of ``layers`` of a reference, checked against ``model`` before any weight is read.

    Resolve -> describe once (headers of the requested layers only) -> check width and layer ids once
    (the attachment warns on a model-name mismatch) -> load those encoders in the described format.
    """
    ref = resolve(
        transcoder, revision=revision, token=token, cache_dir=cache_dir, local_files_only=local_files_only
    )
    wanted = None if layers is None else sorted({int(x) for x in layers})
    desc = describe(ref, format=format, variant=variant, layers=wanted)
    check_description(desc, model, wanted, warn_model_name=False)
    loaded = read_encoders(ref, layers=wanted, format=desc.format, variant=variant, check_format=False)
    choose_input_transform(loaded.config, model)
    return CrossLayerTranscoder(loaded.config, loaded.encoders)


def load_decoder_rows(
    source: CrossLayerTranscoder | RefLike,
    layer: int,
    features: Iterable[int],
    *,
    format: str | None = None,
    variant: str | None = None,
) -> torch.Tensor:
    """The decoder rows ``W_dec[features]`` of source ``layer``: ``[n_features, n_out, d]`` (``n_out`` 1 for
    a PLT), in the stored dtype, on the CPU (or where an in-memory transcoder keeps them).

    Reads as little as the layout allows: an in-memory transcoder is sliced; the native circuit-tracer
    layout (``W_dec_{i}.safetensors`` of a CLT, ``layer_{i}.safetensors`` of a PLT) is read row by row
    with safetensors slices (a Hub file is downloaded once into the cache, but only the rows are read
    into memory); any other format loads that one layer with its decoder (``load(..., decoders=True)``)
    and keeps the rows, so its peak memory is that layer's whole decoder. A transcoder without decoders
    raises :class:`TranscoderFormatError` naming the layer.
    """
    return load_decoder_parts(source, layer, features, format=format, variant=variant).rows


@dataclass
class DecoderParts:
    """What a source layer writes: the decoder rows asked for and the layer's output bias and skip matrix."""

    rows: torch.Tensor  #: [n_features, n_out, d]
    b_dec: torch.Tensor | None  #: [d] bias of the layer's output
    W_skip: torch.Tensor | None  #: [d, d]


def load_decoder_parts(
    source: CrossLayerTranscoder | RefLike,
    layer: int,
    features: Iterable[int],
    *,
    format: str | None = None,
    variant: str | None = None,
) -> DecoderParts:
    """:func:`load_decoder_rows` with the layer's ``b_dec`` and ``W_skip``; with no ``features`` it checks that
    the layer has a decoder and reads only those small tensors (the native layout: no decoder row at all)."""
    feats = [int(f) for f in features]
    if isinstance(source, CrossLayerTranscoder):
        enc = source.encoder(layer)
        if enc.W_dec is None:
            raise TranscoderFormatError(f"layer {layer}: the transcoder has no decoder (W_dec); load it with decoders")
        return DecoderParts(enc.W_dec.detach()[feats].clone(), enc.b_dec, enc.W_skip)
    ref = resolve(source)
    name = format or ref.format_hint or detect_format(ref.source)
    if name == "circuit_tracer":
        parts = _native_parts(ref.source, layer, feats)
        if parts is not None:
            return parts
    enc = format_module(name).load(ref.source, [int(layer)], True, variant=variant).encoder(int(layer))
    if enc.W_dec is None:
        raise TranscoderFormatError(f"{ref.name}: layer {layer} has no decoder (W_dec), which its decoder rows need")
    return DecoderParts(enc.W_dec[feats].clone(), enc.b_dec, enc.W_skip)


def _native_parts(source: FileSource, layer: int, feats: list[int]) -> DecoderParts | None:
    """Rows from the native layout's safetensors file by slices, and the small tensors by name; None for a
    layout this does not cover (a ``transcoders:`` list pointing at other formats' files)."""
    from safetensors import safe_open

    cfg = read_config(source) or {}
    if cfg.get("transcoders"):
        return None
    clt = cfg.get("model_kind") == CLT_KIND
    fname, key = (f"W_dec_{layer}.safetensors", f"W_dec_{layer}") if clt else (f"layer_{layer}.safetensors", "W_dec")
    if not source.exists(fname):
        what = "its decoder file" if clt else "its layer file"
        raise TranscoderFormatError(f"{source.name}: layer {layer} has no decoder ({what} {fname} is missing)")
    with safe_open(str(source.fetch(fname)), framework="pt") as f:
        if key not in f.keys():
            raise TranscoderFormatError(f"{source.name}/{fname}: layer {layer} has no decoder tensor {key!r}")
        sl = f.get_slice(key)
        shape = sl.get_shape()
        bad = [x for x in feats if not 0 <= x < shape[0]]
        if bad:
            raise TranscoderFormatError(f"{source.name}/{fname}: features {bad} out of range ({shape[0]} rows)")
        rows = torch.cat([sl[x : x + 1] for x in feats]) if feats else torch.empty(0, *shape[1:])
        small = {k: f.get_tensor(k) for k in ("b_dec", "W_skip") if not clt and k in f.keys()}
    if clt:  # the CLT's output bias sits with its encoder
        enc_name = f"W_enc_{layer}.safetensors"
        with safe_open(str(source.fetch(enc_name)), framework="pt") as f:
            small = {"b_dec": f.get_tensor(f"b_dec_{layer}")} if f"b_dec_{layer}" in f.keys() else {}
    return DecoderParts(rows if rows.ndim == 3 else rows.unsqueeze(1), small.get("b_dec"), small.get("W_skip"))


def choose_input_transform(config: TranscoderConfig, model: Any) -> TranscoderConfig:
    """Settle a transform that depends on the model's norm (in place; returns ``config``).

    TransformerLens' ``ln2.hook_normalized`` is the pre-MLP norm's output without its affine: RMS-normalised
    on RMSNorm models, ``(x - mean) / sqrt(var + eps)`` on LayerNorm models (GPT-2, Pythia, OPT, ...). A
    loader reading that hook without a model records the RMSNorm reading as provisional
    (``config.extra[NORM_DEPENDENT_KEY]``); here the model's norm class at that site decides (``rmsnorm`` or
    ``layernorm`` without affine) and its epsilon is used. Other configs are left unchanged. Where the
    model's norm cannot be told, the provisional reading stays and a warning says so.
    """
    if not config.extra.get(NORM_DEPENDENT_KEY):
        return config
    found = pre_mlp_norm(model, config.layers[0]) if config.layers else None
    if found is None:
        warnings.warn(
            f"the transcoder reads ln2.hook_normalized, whose normalisation depends on the model's norm, but "
            f"no pre-MLP norm was found in {type(model).__name__}; keeping input_transform "
            f"{config.input_transform!r}",
            stacklevel=3,
        )
        return config
    path, module = found
    config.input_transform = norm_kind(module) or config.input_transform
    eps = norm_eps(module)
    if eps is not None:
        config.input_norm_eps = eps
    config.extra.pop(NORM_DEPENDENT_KEY)
    config.extra["input_transform_from_model"] = f"{path} ({type(module).__name__})"
    return config
