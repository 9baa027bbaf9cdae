"""EleutherAI sparsify SAEs / transcoders and clt-training checkpoints.

One folder per hookpoint, named by the module path relative to ``model.base_model`` (``layers.10``,
``layers.5.mlp``, ``h.0.mlp``), each with ``cfg.json`` and ``sae.safetensors``: ``encoder.weight`` [m, d],
``encoder.bias`` [m], ``W_dec`` [m, d], ``b_dec`` [d], optional ``W_skip`` [d, d] (``x @ W_skip.T``).
Encoder (``SparseCoder.encode``): ``x = x * sqrt(d) / in_norm`` when ``normalize_io`` (clt-training),
``x = x - b_dec`` for SAEs only (``transcode: false``), then top-k of ``relu(x @ W.T + b)``.
A transcoder reads the module's INPUT, an SAE its OUTPUT; :data:`HOOKPOINT_SITES` maps names to sites.
clt-training extras: ``W_decs.{i}`` / ``b_decs.{i}`` / ``W_skips.{i}`` per target (offset i from the
source layer), ``post_encs.{i}`` / ``post_enc_scales.{i}`` applied to the latents before decoding target i.
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch

from ..errors import TranscoderFormatError
from ..io.sources import FileSource
from ..layer_encoder import LayerEncoder, TranscoderConfig
from .base import Loaded, Summary
from .checks import ConfigValues
from .common import (
    SafetensorsReader,
    choose_layers,
    dtype_of,
    header_tensor,
    join,
    pick_variant,
    read_json,
    summary,
)

NAME = "sparsify"
DESCRIPTION = "EleutherAI sparsify / clt-training: <hookpoint>/cfg.json + sae.safetensors"

CFG, WEIGHTS = "cfg.json", "sae.safetensors"
_LAYER_PREFIXES = r"(?:layers|h|blocks|layer|decoder\.layers)"

# (hookpoint regex with the layer as group 1, our site for a transcoder, our site for an SAE).
HOOKPOINT_SITES: list[tuple[re.Pattern[str], str, str]] = [
    (re.compile(rf"^(?:.*\.)?{_LAYER_PREFIXES}\.(\d+)$"), "resid_pre", "resid_post"),
    (re.compile(rf"^(?:.*\.)?{_LAYER_PREFIXES}\.(\d+)\.(?:mlp|feed_forward|ffn)$"), "mlp_in", "mlp_out"),
]
# Where sparsify's base_model-relative names live in the full model, for explicit (unknown) hookpoints.
BASE_MODEL_PREFIX = {"layers": "model.", "h": "transformer."}
_ANY_LAYER = re.compile(rf"^(?P<stem>(?:.*\.)?{_LAYER_PREFIXES})\.(?P<layer>\d+)(?:\.(?P<rest>.+))?$")
# Activation of cfg.json -> ours. batchtopk keeps a batch-wide threshold in training; per token at inference.
ACTIVATION_NAMES = {"topk": "topk", "batchtopk": "topk"}


def hookpoint_site(hookpoint: str, transcode: bool) -> tuple[str, str, int]:
    """(input site, output site, layer) of a sparsify hookpoint name."""
    for pattern, tc_site, sae_site in HOOKPOINT_SITES:
        if m := pattern.match(hookpoint):
            layer = int(m.group(1))
            if transcode:
                return tc_site, ("resid_post" if tc_site == "resid_pre" else "mlp_out"), layer
            return sae_site, sae_site, layer
    m = _ANY_LAYER.match(hookpoint)
    if not m:
        raise TranscoderFormatError(f"sparsify hookpoint {hookpoint!r} names no decoder layer (expected layers.N...)")
    stem = m.group("stem")
    prefix = BASE_MODEL_PREFIX.get(stem.split(".")[0], "")
    path = f"{prefix}{stem}.{{layer}}" + (f".{m.group('rest')}" if m.group("rest") else "")
    return f"{path}:{'input' if transcode else 'output'}", f"{path}:output", int(m.group("layer"))


def _hookpoints(source: FileSource) -> dict[str, str]:
    """Hookpoint name -> folder ('' when the source itself is one hookpoint's folder)."""
    files = set(source.list_files())
    if CFG in files and WEIGHTS in files:
        return {source.name.rstrip("/").rsplit("/", 1)[-1]: ""}
    return {
        f[: -len(WEIGHTS) - 1]: f[: -len(WEIGHTS) - 1]
        for f in files
        if f.endswith("/" + WEIGHTS) and "/" not in f[: -len(WEIGHTS) - 1] and f"{f[: -len(WEIGHTS)]}{CFG}" in files
    }


def _templates(hookpoints: dict[str, str]) -> dict[str, dict[int, str]]:
    """Hookpoint template (layer number -> ``{layer}``) -> {layer: hookpoint}."""
    out: dict[str, dict[int, str]] = {}
    for hp in hookpoints:
        if m := _ANY_LAYER.match(hp):
            template = f"{m.group('stem')}.{{layer}}" + (f".{m.group('rest')}" if m.group("rest") else "")
            out.setdefault(template, {})[int(m.group("layer"))] = hp
    return out


def detect(source: FileSource) -> bool:
    return bool(_hookpoints(source))


def _check_cfg(label: str, cfg: dict[str, Any]) -> ConfigValues:
    v = ConfigValues(cfg, label)
    v.choice("activation", list(ACTIVATION_NAMES), "topk")
    if v.raw("coalesce_topk", "none") != "none":
        raise TranscoderFormatError(
            f"{label}: coalesce_topk={cfg['coalesce_topk']!r} selects the top-k across layers, so one layer's "
            f"features cannot be computed alone; not supported"
        )
    return v


def _decoder(r: SafetensorsReader, v: ConfigValues, m: int, d: int):
    """(W_dec [m, n_targets, d], b_dec, W_skip) of a sparsify / clt-training file."""
    n = v.int("n_targets", 0, minimum=0)
    if not (v.bool("transcode") and n > 0 and "W_decs.0" in r.keys):
        return r.get("W_dec", (m, d)), r.get("b_dec", (d,)), r.get("W_skip", (d, d), required=False)
    W = []
    for i in range(n):
        w = r.get(f"W_decs.{i}", (m, d))
        post = r.get(f"post_encs.{i}", (m,), required=False)
        if post is not None and bool(post.any()):
            raise TranscoderFormatError(
                f"{r.label}: post_encs.{i} is non-zero; its offset of active latents cannot be folded into a "
                f"linear decoder (features load fine with decoders=False)"
            )
        scale = r.get(f"post_enc_scales.{i}", (m,), required=False) if v.bool("post_encoder_scale") else None
        W.append(w if scale is None else w * scale[:, None])
    b = r.get("b_decs.0", (d,), required=False)
    skip = r.get("W_skips.0", (d, d), required=False)
    return torch.stack(W, dim=1), b, skip


def _load_one(source: FileSource, folder: str, decoders: bool) -> tuple[LayerEncoder, ConfigValues]:
    cfg = read_json(source, join(folder, CFG))
    label = f"{source.name}/{join(folder, WEIGHTS)}"
    v = _check_cfg(f"{source.name}/{join(folder, CFG)}", cfg)
    r = SafetensorsReader(source.fetch(join(folder, WEIGHTS)), label)
    W = r.get("encoder.weight", (None, v.int("d_in", minimum=1)))
    m, d = W.shape
    latents = v.int("num_latents", minimum=1)
    if latents is not None and latents != m:
        raise TranscoderFormatError(f"{label}: encoder.weight has {m} latents, cfg.json says {latents}")
    transcode = v.bool("transcode")
    pre_bias = None if transcode else r.get("b_dec", (d,))
    scale = None
    if v.bool("normalize_io"):
        in_norm = float(r.get("in_norm", (1,)).float().item())
        if not in_norm > 0:
            raise TranscoderFormatError(f"{label}: in_norm is {in_norm}; expected a positive norm")
        scale = math.sqrt(d) / in_norm
    enc = LayerEncoder(W, r.get("encoder.bias", (m,)), pre_bias=pre_bias, input_scale=scale)
    if decoders:
        enc.set_decoder(*_decoder(r, v, m, d))
    return enc, v


def _run_config(source: FileSource) -> dict[str, Any]:
    """sparsify's run config (``model``, ``hookpoints``) written as config.json at the run root ({} if none)."""
    if not source.exists("config.json"):
        return {}
    try:
        return read_json(source, "config.json")
    except TranscoderFormatError:
        return {}


def _model_name(source: FileSource) -> str | None:
    model = _run_config(source).get("model")
    return model if isinstance(model, str) else None


def _expected_layers(source: FileSource, template: str) -> list[int]:
    """Layers of ``template`` among the hookpoints the run config lists (patterns with wildcards skipped)."""
    listed = _run_config(source).get("hookpoints")
    if not isinstance(listed, list):
        return []
    out = []
    for hp in listed:
        if isinstance(hp, str) and not any(c in hp for c in "*?[") and (m := _ANY_LAYER.match(hp)):
            name = f"{m.group('stem')}.{{layer}}" + (f".{m.group('rest')}" if m.group("rest") else "")
            if name == template:
                out.append(int(m.group("layer")))
    return out


def _select(source: FileSource, variant: str | None) -> tuple[str, dict[int, str], dict[str, str]]:
    hookpoints = _hookpoints(source)
    if not hookpoints:
        raise TranscoderFormatError(f"{source.name}: no sparsify <hookpoint>/cfg.json + sae.safetensors found")
    templates = _templates(hookpoints)
    if not templates:
        raise TranscoderFormatError(f"{source.name}: no hookpoint names a decoder layer: {sorted(hookpoints)}")
    template = pick_variant(source, templates, variant, "hookpoint template")
    return template, templates[template], hookpoints


def load(
    source: FileSource, layers: list[int] | None, decoders: bool, *, variant: str | None = None
) -> Loaded:
    """``variant`` picks a hookpoint template such as ``"layers.{layer}.mlp"`` when a repo has several."""
    template, by_layer, hookpoints = _select(source, variant)
    expected = _expected_layers(source, template)
    chosen = choose_layers(source, by_layer, layers, f"sparsify hookpoint {template!r} folders", expected)
    encoders, cfgs = {}, {}
    for i in chosen:
        encoders[i], cfgs[i] = _load_one(source, hookpoints[by_layer[i]], decoders)
    cfg0 = cfgs[chosen[0]]
    transcode = cfg0.bool("transcode")
    in_site, out_site, _ = hookpoint_site(by_layer[chosen[0]], transcode)
    ks = {c.int("k", 32, minimum=1) for c in cfgs.values()}
    if len(ks) != 1:
        raise TranscoderFormatError(f"{source.name}: layers use different k {sorted(ks)}; load them separately")
    n_targets = cfg0.int("n_targets", 0, minimum=0)
    keep = ("activation", "k", "transcode", "skip_connection", "normalize_io", "n_targets", "n_sources", "multi_topk")
    cfg = TranscoderConfig.for_encoders(
        encoders,
        chosen,
        activation="topk",
        k=ks.pop(),
        input_site=in_site,
        output_site=out_site,
        span=n_targets if transcode and n_targets > 0 else 1,
        model_name=_model_name(source),
        extra={"hookpoint_template": template, **{k: cfg0.data[k] for k in keep if k in cfg0.data}},
    )
    return Loaded(cfg, encoders)


def describe(source: FileSource, layers: list[int] | None = None, *, variant: str | None = None) -> Summary:
    """Layers, sizes, site and k from one requested layer's cfg.json and safetensors header (no weights)."""
    template, by_layer, hookpoints = _select(source, variant)
    expected = _expected_layers(source, template)
    chosen = choose_layers(source, by_layer, layers, f"sparsify hookpoint {template!r} folders", expected)
    folder = hookpoints[by_layer[chosen[0]]]
    v = _check_cfg(f"{source.name}/{join(folder, CFG)}", read_json(source, join(folder, CFG)))
    info, _ = header_tensor(source, join(folder, WEIGHTS), "encoder.weight")
    m, d = info.shape
    site = hookpoint_site(by_layer[chosen[0]], v.bool("transcode"))[0]
    return summary(
        NAME, chosen, d, m, site, ACTIVATION_NAMES[v.raw("activation", "topk")], dtype_of(info),
        k=v.int("k", 32, minimum=1), hookpoint_template=template,
    )
