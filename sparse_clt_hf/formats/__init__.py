"""On-disk transcoder formats: one module per format, listed once in :data:`FORMATS`.

Every format module satisfies :class:`~sparse_clt_hf.formats.base.Format` (``detect``, a weight-free
``describe`` and ``load``; see :mod:`~sparse_clt_hf.formats.base`). A *source* (see
:mod:`sparse_clt_hf.io.sources`) lists files and fetches single files on demand, so a format reads
(and downloads) exactly the files it needs. This module adds what every format shares: detection,
the registry's activation hint, and the entry points :func:`describe` and :func:`read_encoders`.
"""

from __future__ import annotations

import dataclasses
import struct
import warnings
import zipfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ..activations import get_activation
from ..errors import SparseCLTError, TranscoderFormatError
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
        with _reading(source, name):
            found = fmt.detect(source)
        if found:
            return name
    files = source.list_files()
    shown = ", ".join(files[:20]) + (" ..." if len(files) > 20 else "")
    raise TranscoderFormatError(
        f"could not recognise the transcoder format of {source.name}: found files [{shown}]; "
        f"known formats: {', '.join(FORMATS)} (pass format=... to choose one)"
    )


def _layer_list(layers: Iterable[int] | None) -> list[int] | None:
    if layers is None:
        return None
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Iterable):
        raise TranscoderFormatError(f"layers must be a list of layer numbers, got {layers!r}")
    bad = [x for x in layers if isinstance(x, bool) or not isinstance(x, int) or x < 0]
    if bad:
        raise TranscoderFormatError(f"layers must be non-negative integers; got {bad} in {list(layers)}")
    return sorted({int(x) for x in layers})


#: What a format's code may raise on malformed input that a check did not anticipate; turned into a
#: TranscoderFormatError naming the source and format (the checks in each format name the file and value).
_PARSE_ERRORS = (
    IndexError, KeyError, AttributeError, TypeError, ValueError, UnicodeDecodeError, OverflowError,
    ZeroDivisionError, RecursionError, struct.error, zipfile.BadZipFile, EOFError, NotImplementedError,
)


@contextmanager
def _reading(source: FileSource, name: str) -> Iterator[None]:
    """Run a format's describe/load: library errors pass through, parsing errors are named."""
    try:
        yield
    except SparseCLTError:
        raise
    except _PARSE_ERRORS as exc:
        raise TranscoderFormatError(
            f"{source.name}: cannot be read as format {name!r}: {type(exc).__name__}: {exc}"
        ) from exc


def _format_for(source: FileSource, format: str | None, hint: str | None) -> tuple[str, Format]:
    """The format to read ``source`` with: ``format`` (checked against the files), the registry's, or detected."""
    if format is None and hint is None:
        name = detect_format(source)
        return name, format_module(name)
    name = format or hint  # type: ignore[assignment]
    if not isinstance(name, str):
        raise TranscoderFormatError(f"format must be a format name ({', '.join(FORMATS)}), got {name!r}")
    fmt = format_module(name)
    with _reading(source, name):
        matches = fmt.detect(source)
    if not matches:
        files = source.list_files()
        shown = ", ".join(files[:20]) + (" ..." if len(files) > 20 else "")
        try:
            detected = f"the files look like format {detect_format(source)!r}"
        except SparseCLTError:
            detected = "no known format matches them"
        raise TranscoderFormatError(
            f"{source.name}: format={name!r} ({fmt.DESCRIPTION}) does not match its files [{shown}]; {detected}"
        )
    return name, fmt


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
    wanted = _layer_list(layers)
    name, fmt = _format_for(source, format, resolved.format_hint)
    with _reading(source, name):
        summary = fmt.describe(source, wanted, variant=variant)
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
    check_format: bool = True,
) -> Loaded:
    """Config and encoders of ``layers`` (all when None) of a reference; decoders only when asked.

    The format is ``format``, else the registry's, else detected; the registry's activation hint is
    applied (see :func:`apply_activation_hint`). ``check_format=False`` skips checking an explicit ``format``
    against the files (for a caller that just described them in that format)."""
    resolved = resolve(
        ref, revision=revision, token=token, cache_dir=cache_dir, local_files_only=local_files_only
    )
    wanted = _layer_list(layers)
    if format is not None and not check_format:
        name, fmt = format, format_module(format)
    else:
        name, fmt = _format_for(resolved.source, format, resolved.format_hint)
    with _reading(resolved.source, name):
        loaded = fmt.load(resolved.source, wanted, decoders, variant=variant)
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
