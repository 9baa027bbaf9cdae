"""On-disk transcoder formats: one module per format, listed once in :data:`FORMATS`.

Every format module satisfies :class:`~sparse_clt_hf.formats.base.Format` (``detect``, a weight-free
``describe`` and ``load``; see :mod:`~sparse_clt_hf.formats.base`). A *source* (see
:mod:`sparse_clt_hf.io.sources`) lists files and fetches single files on demand, so a format reads
(and downloads) exactly the files it needs. This module adds what every format shares: detection,
the registry's activation hint, and the entry points :func:`describe` and :func:`read_encoders`.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterable
from pathlib import Path

from ..activations import get_activation
from ..errors import TranscoderFormatError
from ..io.refs import RefLike, resolve
from ..io.sources import ActivationHint, FileSource
from . import circuit_tracer, gemma_scope, gemma_scope2, saelens, sparsify, vlm_clt
from .base import Description, Format, Loaded, Summary
from .circuit_tracer import save_native

__all__ = [
    "FORMATS",
    "Description",
    "Format",
    "Loaded",
    "Summary",
    "apply_activation_hint",
    "describe",
    "detect_format",
    "format_module",
    "read_encoders",
    "save_native",
]

#: name -> format. Detection order matters: the first format whose detect() accepts the files wins.
FORMATS: dict[str, Format] = {
    "circuit_tracer": circuit_tracer,
    "gemma_scope2": gemma_scope2,
    "gemma_scope": gemma_scope,
    "vlm_clt": vlm_clt,
    "saelens": saelens,
    "sparsify": sparsify,
}


def format_module(name: str) -> Format:
    """The format called ``name``."""
    try:
        return FORMATS[name]
    except KeyError:
        raise TranscoderFormatError(f"unknown format {name!r}; known formats: {', '.join(FORMATS)}") from None


def detect_format(source: FileSource) -> str:
    """Name of the format of ``source``, decided from its file names and config files."""
    for name, fmt in FORMATS.items():
        if fmt.detect(source):
            return name
    files = source.list_files()
    shown = ", ".join(files[:20]) + (" ..." if len(files) > 20 else "")
    raise TranscoderFormatError(
        f"could not recognise the transcoder format of {source.name}: found files [{shown}]; "
        f"known formats: {', '.join(FORMATS)} (pass format=... to choose one)"
    )


def _layer_list(layers: Iterable[int] | None) -> list[int] | None:
    return None if layers is None else sorted({int(x) for x in layers})


def describe(
    ref: RefLike,
    format: str | None = None,
    variant: str | None = None,
    *,
    layers: Iterable[int] | None = None,
) -> Description:
    """Describe a transcoder from its configs and tensor headers only (of ``layers`` when given).

    ``variant`` picks one of several transcoders per layer (e.g. a Gemma Scope L0 folder)."""
    resolved = resolve(ref)
    source = resolved.source
    name = format or resolved.format_hint or detect_format(source)
    summary = format_module(name).describe(source, _layer_list(layers), variant=variant)
    desc = Description.from_summary(source.name, name, summary)
    if resolved.activation_hint:
        hinted = hinted_activation(resolved.activation_hint, desc.activation, desc.k)
        if hinted != (desc.activation, desc.k):
            desc.activation, desc.k = hinted
            desc.notes.append("activation and k from the registry (what the authors' code runs)")
    return desc


def read_encoders(
    ref: RefLike,
    *,
    layers: Iterable[int] | None = None,
    format: str | None = None,
    variant: str | None = None,
    decoders: bool = False,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | Path | None = None,
    local_files_only: bool = False,
) -> Loaded:
    """Config and encoders of ``layers`` (all when None) of a reference; decoders only when asked.

    The format is ``format``, else the registry's, else detected; the registry's activation hint is
    applied (see :func:`apply_activation_hint`)."""
    resolved = resolve(
        ref, revision=revision, token=token, cache_dir=cache_dir, local_files_only=local_files_only
    )
    name = format or resolved.format_hint or detect_format(resolved.source)
    loaded = format_module(name).load(resolved.source, _layer_list(layers), decoders, variant=variant)
    loaded.config.source_format = name
    if resolved.activation_hint:
        apply_activation_hint(loaded, resolved.activation_hint, resolved.name)
    return loaded


def hinted_activation(hint: ActivationHint, activation: str, k: int | None) -> tuple[str, int | None]:
    """``(activation, k)`` with the registry's values (``hint``) in place of the files' where it gives them."""
    return hint.get("activation", activation), hint.get("k", k)


def apply_activation_hint(loaded: Loaded, hint: ActivationHint, name: str) -> None:
    """Use the activation (and k) the registry records for a release whose files do not say it.

    Some releases rely on their authors' code for it (circuit-tracer runs facebook/crv-8b-instruct-transcoders
    as TopK with k 128 whatever its config.yaml says), so the registry's values win; a value the files stated
    differently is named in a warning. A threshold activation is only applied where every layer has thresholds.
    """
    config = loaded.config
    activation, k = hinted_activation(hint, config.activation, config.k)
    if get_activation(activation).needs_threshold and any(
        loaded.encoder(layer).threshold is None for layer in loaded.layers
    ):
        raise TranscoderFormatError(
            f"{name}: the registry says activation {activation!r} but the files have no threshold tensor for every "
            "layer; pass format= or load the folder directly to read it as stored"
        )
    if activation != config.activation or (config.k is not None and k != config.k):
        warnings.warn(
            f"{name}: using the registry's activation {activation!r} (k={k}), what the authors' code runs, "
            f"instead of what the files give or imply (activation {config.activation!r}, k={config.k})",
            stacklevel=4,
        )
    loaded.config = dataclasses.replace(config, activation=activation, k=k)
