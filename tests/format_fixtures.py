"""Builders of tiny random transcoders in each published format's exact file names, tensor names,
shapes and dtypes. Each returns ``{layer: {tensor name: torch tensor}}`` as written (for references).

Used by tests/test_formats.py and the Hub tests (which upload the written folders).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

Tensors = dict[str, torch.Tensor]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(g: torch.Generator, *shape: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=g) * scale


def write_gemma_scope(
    root: Path, layers: list[int], d: int, m: int, *, l0: int = 50, width: str = "16k", seed: int = 0
) -> dict[int, dict[str, np.ndarray]]:
    """google/gemma-scope-2b-pt-transcoders: ``layer_{L}/width_{W}/average_l0_{X}/params.npz`` (fp32)."""
    g, out = _gen(seed), {}
    for layer in layers:
        arrays = {
            "W_enc": _randn(g, d, m, scale=d**-0.5).numpy(),
            "W_dec": _randn(g, m, d, scale=0.1).numpy(),
            "b_enc": _randn(g, m, scale=0.1).numpy(),
            "b_dec": _randn(g, d, scale=0.1).numpy(),
            "threshold": torch.rand(m, generator=g).mul(0.3).numpy(),
        }
        folder = Path(root) / f"layer_{layer}" / f"width_{width}" / f"average_l0_{l0}"
        folder.mkdir(parents=True, exist_ok=True)
        np.savez(folder / "params.npz", **{k: v.astype(np.float32) for k, v in arrays.items()})
        out[layer] = arrays
    return out


def _gs2_params(g: torch.Generator, d: int, m: int, dec_shape: tuple[int, ...], affine: bool) -> Tensors:
    t = {
        "w_enc": _randn(g, d, m, scale=d**-0.5),
        "w_dec": _randn(g, *dec_shape, scale=0.1),
        "b_enc": _randn(g, m, scale=0.1),
        "b_dec": _randn(g, d, scale=0.1),
        "threshold": torch.rand(m, generator=g) * 0.3,
    }
    if affine:
        t["affine_skip_connection"] = _randn(g, d, d, scale=0.05)
    return t


def write_gemma_scope2_plt(
    root: Path,
    layers: list[int],
    d: int,
    m: int,
    *,
    folder: str = "transcoder_all",
    variant: str = "width_16k_l0_small",
    hook_in: str = "model.layers.{layer}.pre_feedforward_layernorm.output",
    hook_out: str = "model.layers.{layer}.post_feedforward_layernorm.output",
    affine: bool = False,
    model_name: str = "google/gemma-3-270m-pt",
    seed: int = 0,
) -> dict[int, Tensors]:
    """google/gemma-scope-2-*: ``{folder}/layer_{L}_{variant}/config.json + params.safetensors``."""
    g, out = _gen(seed), {}
    for layer in layers:
        t = _gs2_params(g, d, m, (m, d), affine)
        sub = Path(root) / folder / f"layer_{layer}_{variant}"
        sub.mkdir(parents=True, exist_ok=True)
        save_file(t, str(sub / "params.safetensors"))
        cfg = {
            "hf_hook_point_in": hook_in.format(layer=layer),
            "hf_hook_point_out": hook_out.format(layer=layer),
            "width": m,
            "model_name": model_name,
            "architecture": "jump_relu",
            "l0": 60,
            "affine_connection": affine,
            "type": "transcoder",
        }
        (sub / "config.json").write_text(json.dumps(cfg))
        out[layer] = t
    return out


def write_gemma_scope2_clt(
    root: Path, n_layers: int, d: int, m: int, *, variant: str = "width_262k_l0_medium", affine: bool = False,
    model_name: str = "google/gemma-3-270m-pt", seed: int = 0,
) -> dict[int, Tensors]:
    """``clt/{variant}/config.json`` + ``params_layer_{i}.safetensors`` with ``w_dec`` [m, n_layers, d]."""
    g, out = _gen(seed), {}
    folder = Path(root) / "clt" / variant
    folder.mkdir(parents=True, exist_ok=True)
    for layer in range(n_layers):
        t = _gs2_params(g, d, m, (m, n_layers, d), affine)
        save_file(t, str(folder / f"params_layer_{layer}.safetensors"))
        out[layer] = t
    cfg = {
        "hf_hook_point_in": "model.layers.{all}.pre_feedforward_layernorm.output",
        "hf_hook_point_out": "model.layers.{all}.post_feedforward_layernorm.output",
        "width": m,
        "model_name": model_name,
        "architecture": "jump_relu",
        "l0": 150,
        "affine_connection": affine,
        "type": "clt",
    }
    (folder / "config.json").write_text(json.dumps(cfg))
    return out


def write_sparsify(
    root: Path,
    hookpoints: list[str],
    d: int,
    m: int,
    *,
    k: int = 4,
    transcode: bool = False,
    skip: bool = False,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> dict[str, Tensors]:
    """EleutherAI sparsify: ``{hookpoint}/cfg.json`` + ``sae.safetensors`` (keyed by hookpoint)."""
    g, out = _gen(seed), {}
    for hp in hookpoints:
        t = {
            "encoder.weight": _randn(g, m, d, scale=d**-0.5),
            "encoder.bias": _randn(g, m, scale=0.1),
            "W_dec": _randn(g, m, d, scale=0.1),
            "b_dec": _randn(g, d, scale=0.3),
        }
        if skip:
            t["W_skip"] = _randn(g, d, d, scale=0.05)
        t = {key: v.to(dtype) for key, v in t.items()}
        sub = Path(root) / hp
        sub.mkdir(parents=True, exist_ok=True)
        save_file(t, str(sub / "sae.safetensors"))
        cfg = {
            "activation": "topk", "expansion_factor": m // d, "normalize_decoder": True, "num_latents": m,
            "k": k, "multi_topk": False, "skip_connection": skip, "transcode": transcode, "d_in": d,
        }
        (sub / "cfg.json").write_text(json.dumps(cfg))
        out[hp] = t
    return out


def write_clt_training(
    root: Path, layers: list[int], d: int, m: int, *, n_targets: int = 2, k: int = 4, in_norm: float = 3.0,
    activation: str = "batchtopk", seed: int = 0,
) -> dict[int, Tensors]:
    """EleutherAI clt-training: ``layers.{L}.mlp/`` with W_decs.{i}, b_decs.{i}, post_encs.{i}, in_norm."""
    g, out = _gen(seed), {}
    for layer in layers:
        t = {
            "encoder.weight": _randn(g, m, d, scale=d**-0.5),
            "encoder.bias": _randn(g, m, scale=0.1),
            "in_norm": torch.tensor([in_norm]),
            "out_norm": torch.tensor([2.0]),
        }
        for i in range(n_targets):
            t[f"W_decs.{i}"] = _randn(g, m, d, scale=0.1)
            t[f"b_decs.{i}"] = _randn(g, d, scale=0.1)
            t[f"post_encs.{i}"] = torch.zeros(m)
            t[f"post_enc_scales.{i}"] = torch.rand(m, generator=g) + 0.5
        sub = Path(root) / f"layers.{layer}.mlp"
        sub.mkdir(parents=True, exist_ok=True)
        save_file(t, str(sub / "sae.safetensors"))
        cfg = {
            "activation": activation, "expansion_factor": m // d, "normalize_decoder": True, "num_latents": m,
            "k": k, "multi_topk": False, "skip_connection": False, "transcode": True, "n_targets": n_targets,
            "n_sources": 0, "normalize_io": True, "train_post_encoder": True, "post_encoder_scale": True,
            "coalesce_topk": "none", "d_in": d,
        }
        (sub / "cfg.json").write_text(json.dumps(cfg))
        out[layer] = t
    return out


def write_saelens(
    root: Path,
    layer: int,
    d: int,
    m: int,
    *,
    architecture: str = "standard",
    hook: str = "blocks.{layer}.hook_resid_pre",
    hook_out: str | None = None,
    k: int = 4,
    apply_b_dec_to_input: bool | None = None,
    normalize_activations: str = "none",
    rescale_acts_by_decoder_norm: bool = False,
    d_out: int | None = None,
    pre6: bool = False,
    hf_hook_name: str | None = None,
    model_name: str = "gpt2",
    folder: str = "",
    seed: int = 0,
) -> Tensors:
    """SAELens 6.x (``metadata``) or pre-6.0 (``hook_point``, ``activation_fn_str``) cfg.json + weights."""
    g = _gen(seed + layer)
    d_out = d_out or d
    t = {
        "W_enc": _randn(g, d, m, scale=d**-0.5),
        "b_enc": _randn(g, m, scale=0.1),
        "W_dec": _randn(g, m, d_out, scale=0.3),
        "b_dec": _randn(g, d_out, scale=0.3),
    }
    if "jumprelu" in architecture:
        t["threshold"] = torch.rand(m, generator=g) * 0.3
    if "skip" in architecture:
        t["W_skip"] = _randn(g, d_out, d, scale=0.05)
    sub = Path(root) / folder
    sub.mkdir(parents=True, exist_ok=True)
    save_file(t, str(sub / "sae_weights.safetensors"))
    hook_name = hook.format(layer=layer)
    if pre6:
        cfg = {
            "d_in": d, "d_sae": m, "dtype": "float32", "model_name": model_name, "hook_point": hook_name,
            "hook_point_layer": layer, "activation_fn_str": "topk" if architecture == "topk" else "relu",
            "activation_fn_kwargs": {"k": k} if architecture == "topk" else {},
            "normalize_activations": normalize_activations,
        }
        if apply_b_dec_to_input is not None:
            cfg["apply_b_dec_to_input"] = apply_b_dec_to_input
    else:
        metadata = {"model_name": model_name, "hook_name": hook_name, "sae_lens_version": "6.5.0"}
        if hook_out:
            metadata["hook_name_out"] = hook_out.format(layer=layer)
        if hf_hook_name:
            metadata["hf_hook_name"] = hf_hook_name.format(layer=layer)
        cfg = {
            "architecture": architecture, "d_in": d, "d_sae": m, "dtype": "float32", "device": "cpu",
            "apply_b_dec_to_input": bool(apply_b_dec_to_input) if apply_b_dec_to_input is not None
            else "transcoder" not in architecture,
            "normalize_activations": normalize_activations, "reshape_activations": "none", "metadata": metadata,
        }
        if architecture == "topk":
            cfg["k"] = k
            cfg["rescale_acts_by_decoder_norm"] = rescale_acts_by_decoder_norm
        if "transcoder" in architecture:
            cfg["d_out"] = d_out
    (sub / "cfg.json").write_text(json.dumps(cfg))
    return t


def write_vlm_clt(
    root: Path, layers: list[int], d: int, m: int, *, n_targets: int = 1, dtype: torch.dtype = torch.bfloat16,
    compiled: bool = True, seed: int = 0,
) -> dict[int, Tensors]:
    """vlm-clt-training ``transcoder_L{L}.pt`` pickles (plain dicts and tensors, ``_orig_mod.`` keys)."""
    g, out = _gen(seed), {}
    prefix = "_orig_mod." if compiled else ""
    Path(root).mkdir(parents=True, exist_ok=True)
    for layer in layers:
        t = {
            "enc.0.weight": 1 + _randn(g, d, scale=0.1),
            "enc.0.bias": _randn(g, d, scale=0.1),
            "enc.1.weight": _randn(g, m, d, scale=d**-0.5),
            "enc.1.bias": _randn(g, m, scale=0.1),
            "dec.weight": _randn(g, d * n_targets, m, scale=0.1),
            "dec.bias": _randn(g, d * n_targets, scale=0.1),
        }
        t = {k: v.to(dtype) for k, v in t.items()}
        ckpt = {
            "layer": layer,
            "hidden_dim": d,
            "feature_dim": m,
            "state_dict": {prefix + k: v for k, v in t.items()},
            "training_metadata": {"model_name": "llava-hf/llava-1.5-7b-hf", "epochs": 1, "lr": 1e-4},
        }
        torch.save(ckpt, Path(root) / f"transcoder_L{layer}.pt")
        out[layer] = t
    return out


def one_layer_writers(d: int, m: int) -> dict:
    """format name -> writer of a one-layer (layer 0) transcoder in that format's published layout, d x m."""
    return {
        "gemma_scope": lambda p: write_gemma_scope(p, [0], d, m),
        "gemma_scope2": lambda p: write_gemma_scope2_plt(p, [0], d, m),
        "sparsify": lambda p: write_sparsify(p, ["layers.0"], d, m),
        "saelens": lambda p: write_saelens(p, 0, d, m),
        "vlm_clt": lambda p: write_vlm_clt(p, [0], d, m),
    }
