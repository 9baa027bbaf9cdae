"""Gemma Scope 2 (Gemma 3) transcoders, per-layer (PLT) and cross-layer (CLT).

PLT: one folder per layer and variant, e.g. ``transcoder_all/layer_5_width_16k_l0_big_affine/`` with
``config.json`` (``hf_hook_point_in``, ``hf_hook_point_out``, ``model_name``, ``architecture: jump_relu``,
``width``, ``l0``, ``affine_connection``, ``type``) and ``params.safetensors``: ``w_enc`` [d, m],
``w_dec`` [m, d], ``b_enc``, ``b_dec``, ``threshold``, optional ``affine_skip_connection`` [d, d]
(applied as ``x @ affine``, so our ``W_skip`` is its transpose).
CLT: ``clt/width_262k_l0_medium_affine/config.json`` (``hf_hook_point_in`` with a ``{all}`` layer) and
``params_layer_{i}.safetensors`` with ``w_dec`` [m, n_layers, d]; source layer i writes slices ``i:``.
Hook points are module paths of ``Gemma3ForCausalLM``; ``common.site_from_hf_hook`` maps them to our sites.
"""

from __future__ import annotations

import re

from ..errors import TranscoderFormatError
from ..io.sources import FileSource
from ..layer_encoder import LayerEncoder, TranscoderConfig
from .base import Loaded, Summary
from .checks import ConfigValues
from .common import (
    SafetensorsReader,
    choose_layers,
    dtype_of,
    folder_of,
    header_tensor,
    join,
    jump_threshold,
    pick_variant,
    read_json,
    site_from_hf_hook,
    summary,
)

NAME = "gemma_scope2"
DESCRIPTION = "Gemma Scope 2 (Gemma 3) PLT folders (config.json + params.safetensors) and CLTs (params_layer_{i})"

CONFIG = "config.json"
PLT_PARAMS = "params.safetensors"
_CLT_FILE = re.compile(r"^params_layer_(\d+)\.safetensors$")
_PLT_FOLDER = re.compile(r"^(?:(.*)/)?layer_(\d+)_([^/]+)$")

# ---------------------------------------------------------------------- layout
def _is_clt(files: list[str]) -> bool:
    return CONFIG in files and any(_CLT_FILE.match(f) for f in files)


def _plt_folders(source: FileSource) -> dict[str, dict[int, str]]:
    """Variant -> {layer: folder} of PLT folders (``.../layer_{L}_{variant}/``) or the root itself."""
    files = set(source.list_files())
    if CONFIG in files and PLT_PARAMS in files:
        return {"": {-1: ""}}
    out: dict[str, dict[int, str]] = {}
    for f in files:
        if not f.endswith("/" + PLT_PARAMS):
            continue
        folder = folder_of(f)
        m = _PLT_FOLDER.match(folder)
        if m and join(folder, CONFIG) in files:
            variant = join(m.group(1) or "", m.group(3))
            out.setdefault(variant, {})[int(m.group(2))] = folder
    return out


def detect(source: FileSource) -> bool:
    files = source.list_files()
    return _is_clt(files) or bool(_plt_folders(source))


def _encoder(r: SafetensorsReader, decoders: bool, source_layer: int | None = None) -> LayerEncoder:
    W = r.get("w_enc", (None, None))
    d, m = W.shape
    enc = LayerEncoder(W.T.contiguous(), r.get("b_enc", (m,)), threshold=jump_threshold(r.get("threshold", (m,))))
    W_dec = W_skip = None
    if decoders:
        if source_layer is None:
            W_dec = r.get("w_dec", (m, d))
        else:
            W_dec = r.get("w_dec", (m, None, d))[:, source_layer:, :]
        skip = r.get("affine_skip_connection", (d, d), required=False)
        W_skip = None if skip is None else skip.T.contiguous()
    enc.set_decoder(W_dec, r.get("b_dec", (d,), required=False), W_skip)
    return enc


def load_layer_file(source: FileSource, name: str, decoders: bool) -> LayerEncoder:
    """One PLT layer from a GS2 ``params.safetensors`` (for circuit-tracer ``transcoders:`` lists)."""
    return _encoder(SafetensorsReader(source.fetch(name), f"{source.name}/{name}"), decoders)


def load_clt_layer_file(source: FileSource, name: str, layer: int, decoders: bool) -> LayerEncoder:
    """Source layer ``layer`` of a GS2 CLT from its ``params_layer_{i}.safetensors`` (decoder slices ``layer:``)."""
    return _encoder(SafetensorsReader(source.fetch(name), f"{source.name}/{name}"), decoders, source_layer=layer)


def _hook_layer(v: ConfigValues) -> int | None:
    """The layer in a config's ``hf_hook_point_in`` (None for ``{all}``)."""
    hook = v.str("hf_hook_point_in")
    if not hook:
        raise TranscoderFormatError(f"{v.label}: no 'hf_hook_point_in'")
    return site_from_hf_hook(hook)[1]


def _config(source: FileSource, v: ConfigValues, encoders: dict[int, LayerEncoder], chosen: list[int]):
    hook_in = v.str("hf_hook_point_in")
    if not hook_in:
        raise TranscoderFormatError(f"{v.label}: no 'hf_hook_point_in'")
    site, _ = site_from_hf_hook(hook_in)
    hook_out = v.str("hf_hook_point_out")
    out_site = site_from_hf_hook(hook_out)[0] if hook_out else "mlp_out"
    v.choice("architecture", ("jump_relu",), "jump_relu")
    keep = ("width", "l0", "affine_connection", "type", "hf_hook_point_in", "hf_hook_point_out")
    return TranscoderConfig.for_encoders(
        encoders,
        chosen,
        activation="jumprelu",
        input_site=site,
        output_site=out_site,
        model_name=v.str("model_name"),
        extra={k: v.data[k] for k in keep if k in v.data},
    )


def _values(source: FileSource, path: str) -> ConfigValues:
    return ConfigValues(read_json(source, path), f"{source.name}/{path}")


def load(
    source: FileSource, layers: list[int] | None, decoders: bool, *, variant: str | None = None
) -> Loaded:
    files = source.list_files()
    if _is_clt(files):
        return _load_clt(source, files, layers, decoders)
    by_layer = _plt_layers(source, variant)
    chosen = choose_layers(source, by_layer, layers, "Gemma Scope 2 transcoder")
    encoders, cfgs = {}, {}
    for i in chosen:
        folder = by_layer[i]
        cfgs[i] = _values(source, join(folder, CONFIG))
        hook_layer = _hook_layer(cfgs[i])
        if hook_layer is not None and hook_layer != i:
            raise TranscoderFormatError(
                f"{cfgs[i].label}: hook point {cfgs[i].data['hf_hook_point_in']!r} "
                f"is layer {hook_layer}, but the folder says layer {i}"
            )
        encoders[i] = load_layer_file(source, join(folder, PLT_PARAMS), decoders)
    cfg = _config(source, cfgs[chosen[0]], encoders, chosen)
    cfg.span = 1
    return Loaded(cfg, encoders)


def _plt_layers(source: FileSource, variant: str | None) -> dict[int, str]:
    """Layer -> folder of a per-layer release (one variant); a single layer's folder names its layer in config.json."""
    folders = _plt_folders(source)
    if not folders:
        raise TranscoderFormatError(f"{source.name}: no Gemma Scope 2 config.json + params.safetensors found")
    by_layer = folders[pick_variant(source, folders, variant, "Gemma Scope 2 variant")]
    if -1 in by_layer:  # a single layer's folder: the layer is in its config
        layer = _hook_layer(_values(source, CONFIG))
        if layer is None:
            raise TranscoderFormatError(f"{source.name}/config.json: no layer number in 'hf_hook_point_in'")
        by_layer = {layer: ""}
    return by_layer


def _clt_files(source: FileSource, files: list[str], layers: list[int] | None) -> tuple[dict[int, str], list[int]]:
    """Layer -> params_layer file of a CLT and the chosen layers (a CLT's layers are 0..n-1: a gap is an error)."""
    available = {int(m.group(1)): f for f in files if (m := _CLT_FILE.match(f))}
    expected = range(max(available, default=-1) + 1)
    return available, choose_layers(source, available, layers, "Gemma Scope 2 CLT params_layer_{i}.safetensors", expected)


def _load_clt(source: FileSource, files: list[str], layers: list[int] | None, decoders: bool):
    v = _values(source, CONFIG)
    available, chosen = _clt_files(source, files, layers)
    encoders = {}
    for i in chosen:
        encoders[i] = load_clt_layer_file(source, available[i], i, decoders)
    tc_cfg = _config(source, v, encoders, chosen)
    tc_cfg.n_layers = max(available) + 1
    return Loaded(tc_cfg, encoders)


def describe(source: FileSource, layers: list[int] | None = None, *, variant: str | None = None) -> Summary:
    """Layers, sizes and sites from config.json and one requested layer's safetensors header (no weights)."""
    files = source.list_files()
    if _is_clt(files):
        available, chosen = _clt_files(source, files, layers)
        v, first = _values(source, CONFIG), available[chosen[0]]
        kind = "clt"
    else:
        by_layer = _plt_layers(source, variant)
        chosen = choose_layers(source, by_layer, layers, "Gemma Scope 2 transcoder")
        folder = by_layer[chosen[0]]
        v, first = _values(source, join(folder, CONFIG)), join(folder, PLT_PARAMS)
        kind = "plt"
    info, _ = header_tensor(source, first, "w_enc")
    d, m = info.shape
    hook = v.str("hf_hook_point_in")
    site = site_from_hf_hook(hook)[0] if hook else None
    return summary(NAME, chosen, d, m, site, "jumprelu", dtype_of(info), kind=kind, model_name=v.str("model_name"))
