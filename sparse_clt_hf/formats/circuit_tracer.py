"""circuit-tracer layouts, also our native format.

CLT: ``config.yaml`` (``model_kind: cross_layer_transcoder``) + ``W_enc_{i}.safetensors`` holding
``W_enc_{i}`` [m, d], ``b_enc_{i}`` [m], ``b_dec_{i}`` [d], optional ``threshold_{i}`` [m], and
``W_dec_{i}.safetensors`` holding ``W_dec_{i}`` [m, n_layers - i, d].

PLT: ``config.yaml`` (``model_kind: transcoder_set``) + ``layer_{i}.safetensors`` holding ``W_enc``
[m, d], ``b_enc``, ``W_dec`` [m, d], ``b_dec``, optional ``W_skip`` [d, d] and
``activation_function.threshold`` [m]; or a ``transcoders:`` list of per-layer file URIs.

Our own extra keys in ``config.yaml`` (ignored by circuit-tracer): ``format_version``, ``hook_site``,
``input_transform``, ``input_norm_eps``, ``d_model``, ``n_layers``, ``span``, ``metrics``, and the
optional input tensors ``norm_weight``/``norm_bias``/``pre_bias`` (suffixed ``_{i}`` in CLT files).
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import save_file

from ..errors import HookSiteError, TranscoderFormatError
from ..io.sources import FileSource
from ..io.structured import load_yaml
from ..layer_encoder import FORMAT_VERSION, INPUT_TRANSFORMS, LayerEncoder, TranscoderConfig
from ..sites import (
    NORM_DEPENDENT_HOOKS,
    NORM_DEPENDENT_KEY,
    SITES_TO_TRANSFORMERLENS,
    site_from_transformerlens,
    transformerlens_hook_name,
)
from . import gemma_scope, gemma_scope2
from .base import Loaded, Summary
from .checks import ConfigValues, decode_text
from .common import PROVISIONAL_NOTE, SafetensorsReader, choose_layers, dtype_of, header_info, summary

NAME = "circuit_tracer"
DESCRIPTION = "circuit-tracer CLT (W_enc_{i}.safetensors) or PLT set (layer_{i}.safetensors); native format"

CLT_KIND = "cross_layer_transcoder"
PLT_KIND = "transcoder_set"
_CLT_FILE = re.compile(r"^W_enc_(\d+)\.safetensors$")
_CLT_DEC_FILE = re.compile(r"^W_dec_\d+\.safetensors$")
_PLT_FILE = re.compile(r"^layer_(\d+)\.safetensors$")


def _no_variant(source: FileSource, variant: str | None) -> None:
    if variant is not None:
        raise TranscoderFormatError(f"{source.name}: circuit-tracer transcoders have one transcoder per layer (variant={variant!r})")


def read_config(source: FileSource) -> dict[str, Any] | None:
    if not source.exists("config.yaml"):
        return None
    label = f"{source.name}/config.yaml"
    text = decode_text(source.fetch("config.yaml").read_bytes(), label)
    data = load_yaml(text, label, error=TranscoderFormatError)
    return data if isinstance(data, dict) else None


def _values(source: FileSource, cfg: dict[str, Any]) -> ConfigValues:
    return ConfigValues(cfg, f"{source.name}/config.yaml")


def detect(source: FileSource) -> bool:
    cfg = read_config(source)
    return bool(cfg) and cfg.get("model_kind") in (CLT_KIND, PLT_KIND)


def _tl_site(v: ConfigValues, key: str) -> tuple[str, str]:
    hook = v.str(key)
    try:
        return site_from_transformerlens(hook)
    except HookSiteError as exc:
        raise TranscoderFormatError(f"{v.label}: {key}: {exc}") from exc


def _site(v: ConfigValues) -> tuple[str, str, bool]:
    """Our site, input transform and whether that transform depends on the model's norm (config's
    ``hook_site``/``input_transform`` first, then circuit-tracer's hook)."""
    explicit = v.choice("input_transform", (None, *INPUT_TRANSFORMS))
    if v.has("hook_site"):
        return v.str("hook_site"), explicit or "none", False
    if not v.has("feature_input_hook"):
        return "resid_mid", explicit or "none", False
    site, transform = _tl_site(v, "feature_input_hook")
    if explicit is not None:
        return site, explicit, False
    return site, transform, transformerlens_hook_name(v.str("feature_input_hook")) in NORM_DEPENDENT_HOOKS


def _output_site(v: ConfigValues, default: str | None) -> str | None:
    if v.has("output_site"):
        return v.str("output_site")
    return _tl_site(v, "feature_output_hook")[0] if v.has("feature_output_hook") else default


def _activation(v: ConfigValues, thresholds: bool) -> str:
    """circuit-tracer's rule: the config's activation, else JumpReLU when every layer has thresholds."""
    activation = v.str("activation") or "relu"
    if activation == "relu" and thresholds:
        activation = "jumprelu"
    return activation


def _input_scale(v: ConfigValues, layer: int) -> float | None:
    scales = v.sub("input_scale")
    value = scales.data.get(layer, scales.data.get(str(layer)))
    return None if value is None else ConfigValues({"v": value}, f"{scales.label} layer {layer}").float("v")


def _base_config(v: ConfigValues, encoders: dict[int, LayerEncoder], layers: list[int]) -> TranscoderConfig:
    """Our config from config.yaml and the loaded encoders (JumpReLU when every layer has thresholds)."""
    site, transform, provisional = _site(v)
    activation = _activation(v, all(encoders[i].threshold is not None for i in layers))
    return TranscoderConfig.for_encoders(
        encoders,
        layers,
        activation=activation,
        k=v.int("k", minimum=1),
        input_site=site,
        output_site=_output_site(v, "mlp_out"),
        input_transform=transform,
        input_norm_eps=v.float("input_norm_eps", 1e-5 if transform != "rmsnorm" else 1e-6, minimum=0),
        model_name=v.str("model_name"),
        metrics=v.dict("metrics"),
        extra={NORM_DEPENDENT_KEY: True} if provisional else {},
    )


def _expected_layers(source: FileSource, v: ConfigValues, available: list[int], clt: bool,
                     wanted: list[int] | None) -> list[int] | None:
    """Layers the config promises: its ``layers`` list, else ``0..n_layers-1`` when it declares ``n_layers``,
    else a CLT's ``0..`` its last file (a missing file among them is an error in :func:`choose_layers`).
    A PLT that declares neither and has a gap between its layer files (``layer_0``, ``layer_2``) loads
    the files it has, with a warning naming the missing layers, when all layers are asked for."""
    listed = v.int_list("layers")
    if listed is not None:
        return listed
    n = v.int("n_layers", minimum=1)
    if n is not None:
        return list(range(n))
    if clt:
        return list(range(max(available, default=-1) + 1))
    gaps = sorted(set(range(available[0], available[-1] + 1)) - set(available)) if available else []
    if gaps and wanted is None:
        warnings.warn(f"{source.name}: no layer file for layers {gaps} between layers {available[0]} and "
                      f"{available[-1]}, and config.yaml lists no layers (nor n_layers): using layers {available}",
                      UserWarning, stacklevel=4)
    return None


def load(
    source: FileSource, layers: list[int] | None, decoders: bool, *, variant: str | None = None
) -> Loaded:
    _no_variant(source, variant)
    cfg = read_config(source)
    if not cfg:
        raise TranscoderFormatError(f"{source.name}: no circuit-tracer config.yaml")
    v = _values(source, cfg)
    kind = v.choice("model_kind", (CLT_KIND, PLT_KIND))
    if kind == CLT_KIND:
        return _load_clt(source, v, layers, decoders)
    return _load_plt(source, v, layers, decoders)


def _listed_files(source: FileSource, v: ConfigValues) -> dict[int, tuple[FileSource, str]] | None:
    """Layer -> (source, file) of a ``transcoders:`` list (position = layer), or None without one."""
    listed = v.str_list("transcoders")
    if not listed:
        return None
    return {i: source.resolve_uri(uri) for i, uri in enumerate(listed)}


def _load_clt(source: FileSource, v: ConfigValues, layers: list[int] | None, decoders: bool):
    listed = _listed_files(source, v)
    if listed:  # per-layer files elsewhere (Gemma Scope 2 CLTs wrapped by mwhanna/gemma-scope-2-* configs)
        available = sorted(listed)
    else:
        available = sorted(int(m.group(1)) for f in source.list_files() if (m := _CLT_FILE.match(f)))
    n_layers = v.int("n_layers", minimum=1) or len(available)
    chosen = choose_layers(source, available, layers, "weights", _expected_layers(source, v, available, True, layers))
    encoders: dict[int, LayerEncoder] = {}
    for i in chosen:
        if listed:
            src, name = listed[i]
            r = SafetensorsReader(src.fetch(name), f"{src.name}/{name}")
            if "w_enc" not in r.keys:
                raise TranscoderFormatError(
                    f"{src.name}/{name}: a CLT 'transcoders:' entry must be a Gemma Scope 2 params file "
                    f"(tensors w_enc, w_dec, ...); found {sorted(r.keys)}"
                )
            encoders[i] = gemma_scope2.load_clt_layer_file(src, name, i, decoders)
            continue
        name = f"W_enc_{i}.safetensors"
        r = SafetensorsReader(source.fetch(name), f"{source.name}/{name}")
        W = r.get(f"W_enc_{i}", (None, None))
        m, d = W.shape
        enc = LayerEncoder(
            W,
            r.get(f"b_enc_{i}", (m,)),
            threshold=r.get(f"threshold_{i}", (m,), required=False),
            pre_bias=r.get(f"pre_bias_{i}", (d,), required=False),
            norm_weight=r.get(f"norm_weight_{i}", (d,), required=False),
            norm_bias=r.get(f"norm_bias_{i}", (d,), required=False),
            input_scale=_input_scale(v, i),
        )
        b_dec = r.get(f"b_dec_{i}", (d,), required=False)
        if decoders:
            dname = f"W_dec_{i}.safetensors"
            if not source.exists(dname):
                raise TranscoderFormatError(f"{source.name}: decoders asked for but {dname} is missing")
            dr = SafetensorsReader(source.fetch(dname), f"{source.name}/{dname}")
            enc.set_decoder(dr.get(f"W_dec_{i}", (m, None, d)), b_dec)
        elif b_dec is not None:
            enc.set_decoder(None, b_dec)
        encoders[i] = enc
    tc_cfg = _base_config(v, encoders, chosen)
    tc_cfg.n_layers = n_layers
    tc_cfg.span = v.int("span", minimum=1)
    return Loaded(tc_cfg, encoders)


def _plt_files(source: FileSource, v: ConfigValues) -> dict[int, tuple[FileSource, str]]:
    """Layer -> (source, file) for a PLT, following a ``transcoders:`` list when present."""
    listed = _listed_files(source, v)
    if listed:
        return listed
    return {int(m.group(1)): (source, f) for f in source.list_files() if (m := _PLT_FILE.match(f))}


def _load_plt(source: FileSource, v: ConfigValues, layers: list[int] | None, decoders: bool):
    files = _plt_files(source, v)
    chosen = choose_layers(source, sorted(files), layers, "weights", _expected_layers(source, v, sorted(files), False, layers))
    encoders: dict[int, LayerEncoder] = {}
    for i in chosen:
        src, name = files[i]
        if not name.endswith(".safetensors"):
            # e.g. Gemma Scope params.npz referenced from a transcoders: list
            encoders[i] = gemma_scope.load_layer_file(src, name, decoders)
            continue
        r = SafetensorsReader(src.fetch(name), f"{src.name}/{name}")
        if "w_enc" in r.keys:  # Gemma Scope 2 params.safetensors (mwhanna/gemma-scope-2-* configs)
            encoders[i] = gemma_scope2.load_layer_file(src, name, decoders)
            continue
        W = r.get("W_enc", (None, None))
        m, d = W.shape
        enc = LayerEncoder(
            W,
            r.get("b_enc", (m,)),
            threshold=r.get("activation_function.threshold", (m,), required=False),
            pre_bias=r.get("pre_bias", (d,), required=False),
            norm_weight=r.get("norm_weight", (d,), required=False),
            norm_bias=r.get("norm_bias", (d,), required=False),
            input_scale=_input_scale(v, i),
        )
        if decoders:
            enc.set_decoder(r.get("W_dec", (m, d)), r.get("b_dec", (d,)), r.get("W_skip", (d, d), required=False))
        encoders[i] = enc
    tc_cfg = _base_config(v, encoders, chosen)
    tc_cfg.span = 1
    tc_cfg.n_layers = v.int("n_layers", minimum=1)
    return Loaded(tc_cfg, encoders)


# ---------------------------------------------------------------------- writing
def config_yaml(c: TranscoderConfig, encoders: dict[int, LayerEncoder]) -> dict[str, Any]:
    """The config.yaml we write: circuit-tracer's keys plus ours."""
    out_hook = SITES_TO_TRANSFORMERLENS.get(c.output_site, c.output_site)
    in_hook = SITES_TO_TRANSFORMERLENS.get(c.input_site, c.input_site)
    if c.input_site == "resid_mid" and c.input_transform == "rmsnorm":
        in_hook = "ln2.hook_normalized"
    data: dict[str, Any] = {
        "model_name": c.model_name,
        "model_kind": PLT_KIND if c.is_plt else CLT_KIND,
        "feature_input_hook": in_hook,
        "feature_output_hook": out_hook,
        "activation": c.activation,
        "k": c.k,
        "format_version": FORMAT_VERSION,
        "hook_site": c.input_site,
        "output_site": c.output_site,
        "input_transform": c.input_transform,
        "input_norm_eps": c.input_norm_eps,
        "d_model": c.d_model,
        "n_layers": c.n_layers,
        "span": c.span,
        "layers": list(c.layers),
        "n_features": list(c.n_features),
        "dtype": c.dtype,
        "library": "sparse-clt-hf",
    }
    scales = {i: encoders[i].input_scale for i in c.layers if encoders[i].input_scale is not None}
    if scales:
        data["input_scale"] = scales
    if c.metrics:
        data["metrics"] = _plain(c.metrics)
    return {k: v for k, v in data.items() if v is not None}


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {(int(k) if isinstance(k, str) and k.isdigit() else k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    return obj


def _t(x: torch.Tensor) -> torch.Tensor:
    return x.detach().cpu().contiguous()


def save_native(config: TranscoderConfig, encoders: dict[int, LayerEncoder], directory: Path) -> Path:
    """Write a transcoder in the circuit-tracer layout (PLT set when span == 1, else CLT)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.yaml").write_text(yaml.safe_dump(config_yaml(config, encoders), sort_keys=False))
    for i in config.layers:
        enc = encoders[i]
        optional = {"norm_weight": enc.norm_weight, "norm_bias": enc.norm_bias, "pre_bias": enc.pre_bias}
        if config.is_plt:
            tensors = {"W_enc": enc.W_enc, "b_enc": enc.b_enc}
            if enc.threshold is not None:
                tensors["activation_function.threshold"] = enc.threshold
            if enc.W_dec is not None:
                tensors["W_dec"] = enc.W_dec[:, 0, :]
            if enc.b_dec is not None:
                tensors["b_dec"] = enc.b_dec
            if enc.W_skip is not None:
                tensors["W_skip"] = enc.W_skip
            tensors.update({k: v for k, v in optional.items() if v is not None})
            save_file({k: _t(v) for k, v in tensors.items()}, str(directory / f"layer_{i}.safetensors"))
            continue
        tensors = {f"W_enc_{i}": enc.W_enc, f"b_enc_{i}": enc.b_enc}
        if enc.b_dec is not None:
            tensors[f"b_dec_{i}"] = enc.b_dec
        if enc.threshold is not None:
            tensors[f"threshold_{i}"] = enc.threshold
        tensors.update({f"{k}_{i}": v for k, v in optional.items() if v is not None})
        save_file({k: _t(v) for k, v in tensors.items()}, str(directory / f"W_enc_{i}.safetensors"))
        if enc.W_dec is not None:
            save_file({f"W_dec_{i}": _t(enc.W_dec)}, str(directory / f"W_dec_{i}.safetensors"))
    return directory


# ---------------------------------------------------------------------- describe
def _sum_sizes(source: FileSource, files: list[str]) -> int | None:
    sizes = [source.size(f) for f in files]
    return None if any(s is None for s in sizes) else sum(sizes)  # type: ignore[misc]


def describe(source: FileSource, layers: list[int] | None = None, *, variant: str | None = None) -> Summary:
    """A CLT/PLT from config.yaml and the encoder files' headers only (those of ``layers`` when given)."""
    _no_variant(source, variant)
    v = _values(source, read_config(source) or {})
    kind = v.choice("model_kind", (CLT_KIND, PLT_KIND))
    files = source.list_files()
    if kind == CLT_KIND:
        listed = _listed_files(source, v)
        if listed:
            available = sorted(listed)
            targets = {i: (*listed[i], "w_enc", "threshold") for i in available}
        else:
            available = sorted(int(m.group(1)) for f in files if (m := _CLT_FILE.match(f)))
            targets = {i: (source, f"W_enc_{i}.safetensors", f"W_enc_{i}", f"threshold_{i}") for i in available}
        dec_files = [f for f in files if _CLT_DEC_FILE.match(f)]
    else:
        resolved = _plt_files(source, v)
        available = sorted(resolved)
        targets = {i: (*resolved[i], "W_enc", "activation_function.threshold") for i in available}
        dec_files = []
    if not available:
        raise TranscoderFormatError(f"{source.name}: config.yaml found but no per-layer weight files")
    chosen = choose_layers(source, available, layers, "weights", _expected_layers(source, v, available, kind == CLT_KIND, layers))
    widths, d_model, dtype, thresholds, notes, skip = [], None, None, [], [], False
    for i in chosen:
        src, fname, w_name, thr_name = targets[i]
        if not fname.endswith(".safetensors"):
            notes.append(f"layer files are {Path(fname).suffix} (widths read from the first file)")
            d_model, m, dtype, has_threshold = gemma_scope.layer_file_info(src, fname)
            widths += [m] * (len(chosen) - len(widths))
            thresholds.append(has_threshold)
            break
        header = src.header(fname)
        if w_name not in header and "w_enc" in header:  # Gemma Scope 2 params file in a transcoders: list
            w_name, thr_name = "w_enc", "threshold"
        info = header_info(header, f"{src.name}/{fname}", w_name)
        gs2 = w_name == "w_enc"
        widths.append(info.shape[1] if gs2 else info.shape[0])
        d_model, dtype = info.shape[0] if gs2 else info.shape[1], dtype_of(info)
        thresholds.append(thr_name in header)
        skip = skip or "W_skip" in header
        if kind != CLT_KIND and "W_dec" in header:
            dec_files.append(fname)
    site, transform, provisional = _site(v)
    if provisional:
        notes.append(PROVISIONAL_NOTE.format(transform=transform))
    enc_files = [targets[i][1] for i in chosen if targets[i][0] is source]
    return summary(
        NAME,
        chosen,
        d_model,
        widths,
        site,
        _activation(v, bool(thresholds) and all(thresholds)),
        dtype,
        kind="clt" if kind == CLT_KIND else "plt",
        k=v.int("k", minimum=1),
        output_site=_output_site(v, None),
        input_transform=transform,
        model_name=v.str("model_name"),
        n_layers=v.int("n_layers", minimum=1) or (len(available) if kind == CLT_KIND else None),
        encoder_bytes=_sum_sizes(source, enc_files) if enc_files else None,
        decoder_bytes=_sum_sizes(source, dec_files) if kind == CLT_KIND else None,
        total_bytes=_sum_sizes(source, files),
        has_decoders=bool(dec_files),
        has_skip=skip,
        metrics=v.dict("metrics"),
        notes=notes,
    )
