"""SAELens SAEs and transcoders: ``cfg.json`` + ``sae_weights.safetensors``, one layer per folder.

Weights: ``W_enc`` [d, m] (transposed vs ours), ``b_enc``, ``W_dec`` [m, d_out], ``b_dec``, ``threshold``
(jumprelu), ``W_skip`` [d_out, d] (skip transcoders, ``x @ W_skip.T``). SAELens ``encode``:
``x' = norm_in(x) - b_dec * apply_b_dec_to_input``; ``z = x' @ W_enc + b_enc``; then relu (standard,
transcoder), ``relu(z) * (z > threshold)`` (jumprelu*), or top-k of raw z then relu (topk; with
``rescale_acts_by_decoder_norm`` z is first multiplied by the decoder row norms, folded here into
W_enc/b_enc). ``normalize_activations`` maps by :data:`NORMALIZATIONS`. Pre-6.0 configs use
``hook_point`` / ``activation_fn_str`` and default to ``architecture: standard``, ``apply_b_dec_to_input: true``.
A source may be one SAE folder or a folder of SAE folders; then each sub-folder's cfg gives its layer.
"""

from __future__ import annotations

import re
from typing import Any

from ..activations import ACTIVATIONS
from ..errors import HookSiteError, TranscoderFormatError
from ..io.sources import FileSource
from ..layer_encoder import LayerEncoder, TranscoderConfig
from ..sites import (
    NORM_DEPENDENT_HOOKS,
    NORM_DEPENDENT_KEY,
    site_from_transformerlens,
    transformerlens_hook_name,
)
from .base import Loaded, Summary
from .checks import ConfigValues
from .common import (
    PROVISIONAL_NOTE,
    SafetensorsReader,
    choose_layers,
    dtype_of,
    folder_of,
    header_tensor,
    join,
    jump_threshold,
    read_json,
    site_from_hf_hook,
    summary,
)

NAME = "saelens"
DESCRIPTION = "SAELens SAE / transcoder folders: cfg.json + sae_weights.safetensors"

CFG, WEIGHTS, SCALER = "cfg.json", "sae_weights.safetensors", "activation_scaler.json"

# architecture -> (our activation, reads a threshold, is a transcoder, has W_skip)
ARCHITECTURES: dict[str, tuple[str, bool, bool, bool]] = {
    "standard": ("relu", False, False, False),
    "topk": ("topk", False, False, False),
    "jumprelu": ("jumprelu", True, False, False),
    "transcoder": ("relu", False, True, False),
    "skip_transcoder": ("relu", False, True, True),
    "jumprelu_transcoder": ("jumprelu", True, True, False),
    "jumprelu_skip_transcoder": ("jumprelu", True, True, True),
}
# normalize_activations -> our input_transform. layer_norm is SAELens' (x - mean) / (std_unbiased + 1e-5),
# our "standardize" transform (eps 1e-5).
NORMALIZATIONS = {
    None: "none",
    "none": "none",
    "expected_average_only_in": "none",
    "constant_norm_rescale": "norm_rescale",
    "layer_norm": "standardize",
}
_LAYER_OF_HOOK = re.compile(r"^blocks\.(\d+)\.")


def _folders(source: FileSource) -> list[str]:
    files = set(source.list_files())
    return sorted(folder_of(f) for f in files if f.rsplit("/", 1)[-1] == WEIGHTS and join(folder_of(f), CFG) in files)


def detect(source: FileSource) -> bool:
    return bool(_folders(source))


def parse_cfg(cfg: dict[str, Any], label: str) -> dict[str, Any]:
    """Normalise a SAELens cfg.json (6.x or older) to the fields we need."""
    v = ConfigValues(cfg, label)
    meta = v.sub("metadata")
    pre6 = "sae_lens_version" not in meta.data
    arch = v.str("architecture") or ("topk" if v.raw("activation_fn_str") == "topk" else "standard")
    if arch not in ARCHITECTURES:
        raise TranscoderFormatError(
            f"{label}: SAELens architecture {arch!r} is not supported; supported: {', '.join(ARCHITECTURES)}"
        )
    k = v.int("k", minimum=1)
    if k is None:
        k = v.sub("activation_fn_kwargs").int("k", minimum=1)
    is_tc = ARCHITECTURES[arch][2]
    apply_b_dec = v.bool("apply_b_dec_to_input", not is_tc)
    if is_tc and apply_b_dec:
        raise TranscoderFormatError(f"{label}: a transcoder cannot have apply_b_dec_to_input=true (SAELens refuses it)")
    norm = v.choice("normalize_activations", list(NORMALIZATIONS))
    layer = meta.int("hook_layer")
    for key in ("hook_layer", "hook_point_layer"):
        layer = v.int(key) if layer is None else layer
    return {
        "architecture": arch,
        "k": k,
        "apply_b_dec_to_input": apply_b_dec,
        "normalize_activations": norm or "none",
        "rescale_acts_by_decoder_norm": v.bool("rescale_acts_by_decoder_norm"),
        "hook_name": meta.str("hook_name") or v.str("hook_name") or v.str("hook_point"),
        "hook_name_out": meta.str("hook_name_out") or v.str("hook_name_out"),
        "hf_hook_name": meta.str("hf_hook_name") or v.str("hf_hook_name"),
        "hf_hook_name_out": meta.str("hf_hook_name_out") or v.str("hf_hook_name_out"),
        "layer": layer,
        "model_name": meta.str("model_name") or v.str("model_name"),
        "d_in": v.int("d_in", minimum=1),
        "d_sae": v.int("d_sae", minimum=1),
        "scaling_factor": v.float("scaling_factor"),
        "pre6": pre6,
    }


def site_and_layer(p: dict[str, Any], label: str) -> tuple[str, str, str, int]:
    """(input site, transform, output site, layer) from the hook names (hf_hook_name first)."""
    if p["hf_hook_name"]:
        site, layer = site_from_hf_hook(p["hf_hook_name"])
        transform = "none"
        out = site_from_hf_hook(p["hf_hook_name_out"])[0] if p["hf_hook_name_out"] else site
    elif p["hook_name"]:
        try:
            site, transform = site_from_transformerlens(p["hook_name"])
            out = site_from_transformerlens(p["hook_name_out"])[0] if p["hook_name_out"] else site
        except HookSiteError as exc:
            raise TranscoderFormatError(f"{label}: {exc}") from exc
        p["norm_dependent"] = transformerlens_hook_name(p["hook_name"]) in NORM_DEPENDENT_HOOKS
        m = _LAYER_OF_HOOK.match(p["hook_name"])
        layer = int(m.group(1)) if m else None
    else:
        raise TranscoderFormatError(f"{label}: no hook name (metadata.hook_name, hook_name or hook_point)")
    layer = layer if layer is not None else p["layer"]
    if layer is None or isinstance(layer, bool):
        raise TranscoderFormatError(f"{label}: cannot tell the layer from hook {p['hook_name'] or p['hf_hook_name']!r}")
    return site, transform, out, int(layer)


def _scaling_factor(source: FileSource, folder: str, p: dict[str, Any]) -> float | None:
    if p["normalize_activations"] != "expected_average_only_in":
        return None
    if p["scaling_factor"] is not None:
        return float(p["scaling_factor"])
    path = join(folder, SCALER)
    if source.exists(path):
        return ConfigValues(read_json(source, path), f"{source.name}/{path}").float("scaling_factor")
    return None  # SAELens' SAE.encode applies no scaling either when none was saved


def _load_one(source: FileSource, folder: str, p: dict[str, Any], decoders: bool) -> LayerEncoder:
    label = f"{source.name}/{join(folder, WEIGHTS)}"
    act_name, has_thr, _, has_skip = ARCHITECTURES[p["architecture"]]
    rescale = ACTIVATIONS[act_name].takes_k and p["rescale_acts_by_decoder_norm"]
    r = SafetensorsReader(source.fetch(join(folder, WEIGHTS)), label)
    W = r.get("W_enc", (p["d_in"], p["d_sae"]))
    d, m = W.shape
    W, b = W.T.contiguous(), r.get("b_enc", (m,))
    W_dec = r.get("W_dec", (m, None)) if decoders or rescale else None
    if rescale:
        norms = W_dec.norm(dim=-1).to(W.dtype)
        W, b = W * norms[:, None], b * norms
    b_dec = r.get("b_dec", (None,)) if (decoders or p["apply_b_dec_to_input"]) else None
    scale = _scaling_factor(source, folder, p)
    enc = LayerEncoder(
        W,
        b,
        threshold=jump_threshold(r.get("threshold", (m,))) if has_thr else None,
        pre_bias=b_dec if p["apply_b_dec_to_input"] else None,
        input_scale=scale,
    )
    if decoders:
        if W_dec.shape[1] != d:
            raise TranscoderFormatError(
                f"{label}: W_dec writes width {W_dec.shape[1]} but reads width {d}; such decoders are not supported"
            )
        skip = r.get("W_skip", (d, d), required=has_skip) if has_skip else None
        enc.set_decoder(W_dec, b_dec, skip)
    return enc


def _read_all(source: FileSource) -> dict[int, tuple[str, dict[str, Any]]]:
    """Layer -> (folder, parsed cfg) for every SAE folder (reads only the small cfg.json files)."""
    out: dict[int, tuple[str, dict[str, Any]]] = {}
    for folder in _folders(source):
        label = f"{source.name}/{join(folder, CFG)}"
        p = parse_cfg(read_json(source, join(folder, CFG)), label)
        p["site"], p["transform"], p["output_site"], layer = site_and_layer(p, label)
        if layer in out:
            raise TranscoderFormatError(
                f"{source.name}: folders {out[layer][0]!r} and {folder!r} both hold layer {layer}; "
                f"point at a folder that holds one SAE per layer"
            )
        out[layer] = (folder, p)
    return out


def _no_variant(source: FileSource, variant: str | None) -> None:
    if variant is not None:
        raise TranscoderFormatError(f"{source.name}: SAELens folders hold one SAE per layer (variant={variant!r})")


def load(
    source: FileSource, layers: list[int] | None, decoders: bool, *, variant: str | None = None
) -> Loaded:
    _no_variant(source, variant)
    found = _read_all(source)
    chosen = choose_layers(source, found, layers, "SAELens cfg.json + sae_weights.safetensors")
    ps = {i: found[i][1] for i in chosen}
    p0 = ps[chosen[0]]
    keys = ("architecture", "k", "site", "transform", "normalize_activations")
    for i in chosen[1:]:
        diff = [key for key in keys if ps[i][key] != p0[key]]
        if diff:
            raise TranscoderFormatError(
                f"{source.name}: layers {chosen[0]} and {i} differ in {diff}; load them separately"
            )
    encoders = {i: _load_one(source, found[i][0], ps[i], decoders) for i in chosen}
    act = ARCHITECTURES[p0["architecture"]][0]
    transform = p0["transform"] if p0["transform"] != "none" else NORMALIZATIONS[p0["normalize_activations"]]
    provisional = p0.get("norm_dependent") and p0["normalize_activations"] == "none"
    cfg = TranscoderConfig.for_encoders(
        encoders,
        chosen,
        activation=act,
        k=p0["k"] if ACTIVATIONS[act].takes_k else None,
        input_site=p0["site"],
        output_site=p0["output_site"],
        input_transform=transform,
        input_norm_eps=1e-6 if transform == "rmsnorm" else 1e-5,
        span=1,
        model_name=p0["model_name"],
        extra={
            "architecture": p0["architecture"],
            "normalize_activations": p0["normalize_activations"],
            "folders": {i: found[i][0] for i in chosen},
            **({NORM_DEPENDENT_KEY: True} if provisional else {}),
        },
    )
    return Loaded(cfg, encoders)


def describe(source: FileSource, layers: list[int] | None = None, *, variant: str | None = None) -> Summary:
    """Layers, sizes, site and activation from the cfg.json files and one requested layer's
    safetensors header (no weights read)."""
    _no_variant(source, variant)
    found = _read_all(source)
    chosen = choose_layers(source, found, layers, "SAELens cfg.json + sae_weights.safetensors")
    folder, p = found[chosen[0]]
    info, _ = header_tensor(source, join(folder, WEIGHTS), "W_enc")
    d, m = info.shape
    transform = p["transform"] if p["transform"] != "none" else NORMALIZATIONS[p["normalize_activations"]]
    notes = [PROVISIONAL_NOTE.format(transform=transform)] if p.get("norm_dependent") else []
    return summary(
        NAME, chosen, d, m, p["site"], ARCHITECTURES[p["architecture"]][0], dtype_of(info),
        architecture=p["architecture"], k=p["k"], model_name=p["model_name"], input_transform=transform, notes=notes,
    )
