"""On-disk transcoder formats: detection and loading, one module per format.

Every format module exposes ``NAME``, ``DESCRIPTION``, ``detect(source) -> bool`` and
``load(source, layers, decoders) -> CrossLayerTranscoder``. A *source* (see :mod:`sparse_clt_hf.hub`)
lists files and fetches single files on demand, so a loader downloads only what it reads.
"""

from __future__ import annotations

import dataclasses
import importlib
import warnings
from collections.abc import Iterable
from types import ModuleType
from typing import TYPE_CHECKING, Any

from ..errors import TranscoderFormatError

if TYPE_CHECKING:
    from ..hub import FileSource
    from ..transcoder import CrossLayerTranscoder

# Detection order matters: the first format whose detect() accepts the files wins.
FORMAT_MODULES: dict[str, str] = {
    "circuit_tracer": "sparse_clt_hf.formats.circuit_tracer",
    "gemma_scope2": "sparse_clt_hf.formats.gemma_scope2",
    "gemma_scope": "sparse_clt_hf.formats.gemma_scope",
    "vlm_clt": "sparse_clt_hf.formats.vlm_clt",
    "saelens": "sparse_clt_hf.formats.saelens",
    "sparsify": "sparse_clt_hf.formats.sparsify",
}


def format_module(name: str) -> ModuleType:
    """The module implementing format ``name``."""
    try:
        return importlib.import_module(FORMAT_MODULES[name])
    except KeyError:
        raise TranscoderFormatError(
            f"unknown format {name!r}; known formats: {', '.join(FORMAT_MODULES)}"
        ) from None


def detect_format(source: FileSource) -> str:
    """Name of the format of ``source``, decided from its file names and config files."""
    for name in FORMAT_MODULES:
        if format_module(name).detect(source):
            return name
    files = source.list_files()
    shown = ", ".join(files[:20]) + (" ..." if len(files) > 20 else "")
    raise TranscoderFormatError(
        f"could not recognise the transcoder format of {source.name}: found files [{shown}]; "
        f"known formats: {', '.join(FORMAT_MODULES)} (pass format=... to choose one)"
    )


def load_transcoder(
    source: FileSource,
    *,
    layers: Iterable[int] | None = None,
    format: str | None = None,
    decoders: bool = False,
    variant: str | None = None,
) -> CrossLayerTranscoder:
    """Load the encoders of ``layers`` (all when None) from ``source``; decoders only when asked.

    ``variant`` picks one of several transcoders per layer (e.g. a Gemma Scope L0 folder)."""
    name = format or getattr(source, "format_hint", None) or detect_format(source)
    layer_list = None if layers is None else sorted({int(x) for x in layers})
    extra = {"variant": variant} if variant is not None else {}
    tc = format_module(name).load(source, layer_list, decoders, **extra)
    tc.config.source_format = name
    hint = getattr(source, "activation_hint", None)
    if hint:
        apply_activation_hint(tc, hint, source.name)
    return tc


def hinted_activation(hint: dict[str, Any], activation: str, k: int | None) -> tuple[str, int | None]:
    """``(activation, k)`` with the registry's values (``hint``) in place of the files' where it gives them."""
    return hint.get("activation", activation), hint.get("k", k)


def apply_activation_hint(tc: CrossLayerTranscoder, hint: dict[str, Any], name: str) -> None:
    """Use the activation (and k) the registry records for a release whose files do not say it.

    Some releases rely on their authors' code for it (circuit-tracer runs facebook/crv-8b-instruct-transcoders
    as TopK with k 128 whatever its config.yaml says), so the registry's values win; a value the files stated
    differently is named in a warning. JumpReLU is only applied where every layer has thresholds.
    """
    config = tc.config
    activation, k = hinted_activation(hint, config.activation, config.k)
    if activation == "jumprelu" and any(tc.encoder(layer).threshold is None for layer in tc.layers):
        raise TranscoderFormatError(
            f"{name}: the registry says activation 'jumprelu' but the files have no threshold tensor for every "
            "layer; pass format= or load the folder directly to read it as stored"
        )
    if activation != config.activation or (config.k is not None and k != config.k):
        warnings.warn(
            f"{name}: using the registry's activation {activation!r} (k={k}), what the authors' code runs, "
            f"instead of what the files give or imply (activation {config.activation!r}, k={config.k})",
            stacklevel=3,
        )
    tc.config = dataclasses.replace(config, activation=activation, k=k)
