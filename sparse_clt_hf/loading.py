"""Loading a transcoder for a model, in one direction:
resolve the reference -> describe it once (configs and headers of the requested layers) -> check it
fits the model once -> load only the requested encoders (format already known) -> build the transcoder.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .errors import IncompatibleTranscoderError
from .formats import Description, describe, read_encoders
from .io.refs import Reference, RefLike, resolve
from .io.sources import FileSource
from .layer_encoder import TranscoderConfig, check_compatible
from .sites import model_dims
from .transcoder import CrossLayerTranscoder

__all__ = ["check_before_download", "check_description", "describe", "load_for_model", "load_transcoder"]


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
    loaded = read_encoders(ref, layers=wanted, format=desc.format, variant=variant)
    return CrossLayerTranscoder(loaded.config, loaded.encoders)
