"""vlm-clt-training checkpoints: ``transcoder_L{L}.pt`` torch pickles, one per language-model layer.

Each file is ``{layer, hidden_dim, feature_dim, state_dict, training_metadata, ...}``; the state_dict holds
``enc.0.weight`` / ``enc.0.bias`` (a LayerNorm over d, eps 1e-5), ``enc.1.weight`` [m, d], ``enc.1.bias`` [m],
``dec.weight`` [d * n_targets, m], ``dec.bias`` [d * n_targets]; keys may carry ``_orig_mod.`` (saved after
torch.compile). Encoder: ``relu(Linear(LayerNorm(x)))`` on the MLP input (site ``mlp_in``).
Files are read with ``torch.load(weights_only=True)`` only: a pickle that needs more is refused, never run.
"""

from __future__ import annotations

import pickle
import re
from typing import Any

import torch

from ..errors import TranscoderFormatError
from ..io.sources import FileSource
from ..layer_encoder import LayerEncoder, TranscoderConfig, check_shape, dtype_name
from .base import Loaded, Summary
from .checks import ConfigValues, check_tensor
from .common import choose_layers, summary

NAME = "vlm_clt"
DESCRIPTION = "vlm-clt-training transcoder_L{L}.pt checkpoints (read with torch.load weights_only=True)"

_FILE = re.compile(r"^(?:.*/)?transcoder_L(\d+)\.pt$")
_PREFIX = "_orig_mod."
LAYERNORM_EPS = 1e-5


def _files(source: FileSource) -> dict[int, str]:
    return {int(m.group(1)): f for f in source.list_files() if (m := _FILE.match(f))}


def detect(source: FileSource) -> bool:
    return bool(_files(source))


def read_checkpoint(source: FileSource, name: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(checkpoint dict, state_dict without ``_orig_mod.``), loaded with ``weights_only=True``."""
    label = f"{source.name}/{name}"
    path = source.fetch(name)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise TranscoderFormatError(
            f"{label}: refused by torch.load(weights_only=True) - the pickle holds objects other than "
            f"tensors and plain containers, and this library never runs pickled code ({exc})"
        ) from exc
    except MemoryError:
        raise
    except Exception as exc:  # torch.load raises many types for truncated or corrupt files
        raise TranscoderFormatError(
            f"{label}: not a readable torch checkpoint (truncated or corrupt?): {type(exc).__name__}: {exc}"
        ) from exc
    if not isinstance(obj, dict):
        raise TranscoderFormatError(f"{label}: expected a dict checkpoint, got {type(obj).__name__}")
    state = obj.get("state_dict", obj)
    if not isinstance(state, dict):
        raise TranscoderFormatError(f"{label}: 'state_dict' is a {type(state).__name__}, expected a dict")
    state = {
        k.removeprefix(_PREFIX): v for k, v in state.items() if isinstance(k, str) and isinstance(v, torch.Tensor)
    }
    return obj, state


def _get(state: dict[str, torch.Tensor], label: str, name: str, shape: list[int | None]) -> torch.Tensor:
    if name not in state:
        raise TranscoderFormatError(f"{label}: missing tensor {name!r}; found {sorted(state)}")
    return check_shape(name, check_tensor(name, state[name], label), shape, label)


def _load_one(source: FileSource, name: str, layer: int, decoders: bool) -> tuple[LayerEncoder, dict[str, Any]]:
    label = f"{source.name}/{name}"
    obj, state = read_checkpoint(source, name)
    v = ConfigValues({k: val for k, val in obj.items() if isinstance(k, str)}, label)
    if v.has("layer") and v.int("layer") != layer:
        raise TranscoderFormatError(f"{label}: checkpoint says layer {obj['layer']}, the file name says {layer}")
    W = _get(state, label, "enc.1.weight", [v.int("feature_dim", minimum=1), v.int("hidden_dim", minimum=1)])
    m, d = W.shape
    enc = LayerEncoder(
        W,
        _get(state, label, "enc.1.bias", [m]),
        norm_weight=_get(state, label, "enc.0.weight", [d]),
        norm_bias=_get(state, label, "enc.0.bias", [d]),
    )
    n_targets = 1
    if "dec.weight" in state:
        dec = _get(state, label, "dec.weight", [None, m])
        if dec.shape[0] % d:
            raise TranscoderFormatError(f"{label}: dec.weight has {dec.shape[0]} rows, not a multiple of d={d}")
        n_targets = dec.shape[0] // d
        if decoders:
            bias = state.get("dec.bias")
            b_dec = None if bias is None else check_shape("dec.bias", bias, [d * n_targets], label)[:d]
            enc.set_decoder(dec.T.reshape(m, n_targets, d).contiguous(), b_dec)
    elif decoders:
        raise TranscoderFormatError(f"{label}: decoders asked for but the checkpoint has no 'dec.weight'")
    meta = obj.get("training_metadata") if isinstance(obj.get("training_metadata"), dict) else {}
    model = obj.get("model_name") or meta.get("model_name")
    return enc, {"n_targets": n_targets, "model_name": model if isinstance(model, str) else None}


def load(
    source: FileSource, layers: list[int] | None, decoders: bool, *, variant: str | None = None
) -> Loaded:
    _no_variant(source, variant)
    files = _files(source)
    chosen = choose_layers(source, files, layers, "transcoder_L{L}.pt checkpoints")
    encoders, info = {}, {}
    for i in chosen:
        encoders[i], info[i] = _load_one(source, files[i], i, decoders)
    n_targets = info[chosen[0]]["n_targets"]
    cfg = TranscoderConfig.for_encoders(
        encoders,
        chosen,
        activation="relu",
        input_site="mlp_in",
        output_site="mlp_out",
        input_transform="layernorm",
        input_norm_eps=LAYERNORM_EPS,
        span=n_targets,
        model_name=info[chosen[0]]["model_name"],
        extra={"n_targets": n_targets},
    )
    return Loaded(cfg, encoders)


def _no_variant(source: FileSource, variant: str | None) -> None:
    if variant is not None:
        raise TranscoderFormatError(f"{source.name}: vlm-clt checkpoints have one transcoder per layer (variant={variant!r})")


def describe(source: FileSource, layers: list[int] | None = None, *, variant: str | None = None) -> Summary:
    """Layers from file names; sizes need one requested checkpoint (a pickle has no separate header)."""
    _no_variant(source, variant)
    files = _files(source)
    chosen = choose_layers(source, files, layers, "transcoder_L{L}.pt checkpoints")
    label = f"{source.name}/{files[chosen[0]]}"
    obj, state = read_checkpoint(source, files[chosen[0]])
    W = _get(state, label, "enc.1.weight", [None, None])
    m, d = W.shape
    return summary(NAME, chosen, d, m, "mlp_in", "relu", dtype_name(W.dtype), input_transform="layernorm")
