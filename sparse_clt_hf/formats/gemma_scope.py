"""Gemma Scope (Gemma 2) transcoders: ``layer_{L}/width_{W}/average_l0_{X}/params.npz``.

Each ``params.npz`` (fp32) holds ``W_enc`` [d, m] (transposed vs ours), ``W_dec`` [m, d], ``b_enc``,
``b_dec`` and ``threshold``. The input is TransformerLens' ``ln2.hook_normalized``: the residual after
attention RMS-normalised without the (1 + w) gain, i.e. site ``resid_mid`` with input transform
``rmsnorm`` at Gemma 2's ``rms_norm_eps`` 1e-6. Activation ``relu(z) * (z > threshold)``, run here as
``jumprelu`` with the threshold clamped at 0 (identical result). The layer comes from the path.
"""

from __future__ import annotations

import re

from ..errors import TranscoderFormatError
from ..io.sources import FileSource
from ..layer_encoder import LayerEncoder, TranscoderConfig
from .base import Loaded, Summary
from .common import (
    NpzReader,
    choose_layers,
    folder_of,
    jump_threshold,
    layer_from_name,
    source_npz_headers,
    summary,
)

NAME = "gemma_scope"
DESCRIPTION = "Gemma Scope (Gemma 2) transcoders: layer_{L}/width_*/average_l0_*/params.npz"

PARAMS = "params.npz"
RMS_NORM_EPS = 1e-6  # Gemma 2 config rms_norm_eps
_LAYOUT = re.compile(r"^(?:.*/)?layer_(\d+)/(width_[^/]+/average_l0_[^/]+)/params\.npz$")

# Repo-name fragment -> the model its transcoders were trained on (the npz files record no model).
MODEL_BY_REPO = {
    "gemma-scope-2b-pt": "google/gemma-2-2b",
    "gemma-scope-9b-pt": "google/gemma-2-9b",
    "gemma-scope-9b-it": "google/gemma-2-9b-it",
    "gemma-scope-27b-pt": "google/gemma-2-27b",
}


def _model_name(source: FileSource) -> str | None:
    return next((model for key, model in MODEL_BY_REPO.items() if key in source.name), None)


def _layer_files(source: FileSource, variant: str | None = None) -> dict[int, str]:
    """Layer -> params.npz path: the folder itself (layer from its name) or a ``layer_{L}/...`` tree."""
    files = source.list_files()
    if PARAMS in files:
        layer = layer_from_name(source.name)
        if layer is None:
            raise TranscoderFormatError(
                f"{source.name}: params.npz found but the layer is not in the path (expected .../layer_N/...)"
            )
        return {layer: PARAMS}
    by_variant: dict[str, dict[int, str]] = {}
    for f in files:
        if m := _LAYOUT.match(f):
            by_variant.setdefault(m.group(2), {})[int(m.group(1))] = f
    if variant is not None:
        if variant not in by_variant:
            raise TranscoderFormatError(f"{source.name}: no variant {variant!r}; found {sorted(by_variant)}")
        return by_variant[variant]
    per_layer: dict[int, list[str]] = {}
    for layer_files in by_variant.values():
        for layer, f in layer_files.items():
            per_layer.setdefault(layer, []).append(f)
    clashes = {layer: sorted(fs) for layer, fs in per_layer.items() if len(fs) > 1}
    if clashes:
        layer, fs = next(iter(sorted(clashes.items())))
        raise TranscoderFormatError(
            f"{source.name}: several Gemma Scope transcoders per layer (layer {layer}: {fs}); "
            f"point at one layer's folder, pass variant='width_16k/average_l0_X', or use a circuit-tracer "
            f"config.yaml that lists one file per layer (e.g. mntss/gemma-scope-transcoders)"
        )
    return {layer: fs[0] for layer, fs in per_layer.items()}


def detect(source: FileSource) -> bool:
    files = source.list_files()
    return PARAMS in files or any(_LAYOUT.match(f) for f in files)


def load_layer_file(source: FileSource, name: str, decoders: bool) -> LayerEncoder:
    """One layer's encoder from a Gemma Scope ``params.npz`` (used by circuit-tracer ``transcoders:`` lists)."""
    r = NpzReader(source.fetch(name), f"{source.name}/{name}")
    W = r.get("W_enc", (None, None))
    d, m = W.shape
    enc = LayerEncoder(W.T.contiguous(), r.get("b_enc", (m,)), threshold=jump_threshold(r.get("threshold", (m,))))
    b_dec = r.get("b_dec", (d,), required=False)
    enc.set_decoder(r.get("W_dec", (m, d)) if decoders else None, b_dec)
    return enc


def layer_file_info(source: FileSource, name: str) -> tuple[int, int, str, bool]:
    """(d_model, n_features, dtype, has threshold) of one ``params.npz`` from its array headers (on the
    Hub: range requests for the zip directory and the ``.npy`` headers, the file is not downloaded)."""
    heads = source_npz_headers(source, name)
    if "W_enc" not in heads:
        raise TranscoderFormatError(f"{source.name}/{name}: no W_enc array; found {sorted(heads)}")
    d, m = heads["W_enc"].shape
    return d, m, heads["W_enc"].dtype, "threshold" in heads


def load(
    source: FileSource, layers: list[int] | None, decoders: bool, *, variant: str | None = None
) -> Loaded:
    files = _layer_files(source, variant)
    chosen = choose_layers(source, files, layers, "Gemma Scope params.npz")
    encoders = {i: load_layer_file(source, files[i], decoders) for i in chosen}
    cfg = TranscoderConfig.for_encoders(
        encoders,
        chosen,
        activation="jumprelu",
        input_site="resid_mid",
        output_site="mlp_out",
        input_transform="rmsnorm",
        input_norm_eps=RMS_NORM_EPS,
        span=1,
        model_name=_model_name(source),
        extra={"files": {i: files[i] for i in chosen}},
    )
    return Loaded(cfg, encoders)


def describe(source: FileSource, layers: list[int] | None = None, *, variant: str | None = None) -> Summary:
    """Layers, sizes and site from the npz array headers of one requested layer (no weights read or
    downloaded: on the Hub the zip directory and array headers are read by range requests)."""
    files = _layer_files(source, variant)
    chosen = choose_layers(source, files, layers, "Gemma Scope params.npz")
    first = files[chosen[0]]
    d, m, dtype, _ = layer_file_info(source, first)
    return summary(
        NAME, chosen, d, m, "resid_mid", "jumprelu", dtype, input_transform="rmsnorm",
        model_name=_model_name(source), folder=folder_of(first),
    )
