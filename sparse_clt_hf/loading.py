"""Loading a transcoder for a model, in one direction:
resolve the reference -> describe it once (configs and headers of the requested layers) -> check it
fits the model once -> load only the requested encoders (format already known) -> build the transcoder.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .errors import IncompatibleTranscoderError
from .formats import Description, describe, read_encoders
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
