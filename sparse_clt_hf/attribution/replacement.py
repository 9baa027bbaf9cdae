"""The local replacement model: the real model with its gradients made linear in the residual stream.

Forward values stay those of the real model, bit for bit; only gradients change ("the value of the real module,
the gradient of its frozen linear map": ``out = real.detach() + (lin - lin.detach())``):

- attention patterns are frozen: the model is switched, for the duration, to an attention function registered in
  transformers' attention interface that returns the real implementation's output but whose gradient flows through
  the values only (the pattern of the model's own eager attention, computed from detached queries and keys);
- every normalization's scale is frozen (RMSNorm / LayerNorm denominators, QK-norms and the final norm included;
  LayerNorm's centering stays linear): :data:`NORM_KINDS` says how each kind maps its input;
- each MLP output site becomes a leaf tensor (gradients are read there; the MLP itself gets no gradient); a
  transcoder with a skip connection adds its linear skip path, as circuit-tracer does;
- the token embedding's output is a leaf.

:class:`LocalReplacement` installs all of this, records the tensors of one pass and removes everything on exit
(also after an exception or a KeyboardInterrupt): the model is left exactly as it was.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ..errors import HookSiteError
from ..sites import find_decoder_layers, norm_eps, norm_kind, resolve_site_in_layer, site_table
from ..transcoder import CrossLayerTranscoder

FROZEN_PREFIX = "sparse_clt_frozen_"

#: RMSNorm classes whose gain is ``1 + weight`` (Gemma's convention); every other RMSNorm uses ``weight``.
ONE_PLUS_WEIGHT_NORMS = frozenset(
    {"GemmaRMSNorm", "Gemma2RMSNorm", "Gemma3RMSNorm", "Gemma3nRMSNorm", "Qwen3NextRMSNorm", "RecurrentGemmaRMSNorm"}
)


def _param(module: nn.Module, name: str) -> torch.Tensor | None:
    """A module's parameter, also where accelerate offloads it (meta tensor; the value in the hook's weights map)."""
    value = getattr(module, name, None)
    if isinstance(value, torch.Tensor) and value.device.type == "meta":
        weights = getattr(getattr(module, "_hf_hook", None), "weights_map", None)
        if weights is not None:
            return weights[name]
    return value if isinstance(value, torch.Tensor) else None


def _gain(module: nn.Module) -> torch.Tensor | float:
    w = _param(module, "weight")
    if not isinstance(w, torch.Tensor):
        return 1.0
    w = w.float()
    return 1.0 + w if type(module).__name__ in ONE_PLUS_WEIGHT_NORMS else w


def _rms_linear(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    xf = x.float()
    scale = torch.rsqrt(xf.detach().pow(2).mean(-1, keepdim=True) + (norm_eps(module) or 1e-6))
    gain = _gain(module)
    return xf * scale * (gain.to(xf.device) if isinstance(gain, torch.Tensor) else gain)


def _layernorm_linear(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    xf = x.float()
    centred = xf - xf.mean(-1, keepdim=True)
    scale = torch.rsqrt(centred.detach().pow(2).mean(-1, keepdim=True) + (norm_eps(module) or 1e-5))
    gain = _gain(module)
    out = centred * scale * (gain.to(xf.device) if isinstance(gain, torch.Tensor) else gain)
    b = _param(module, "bias")
    return out + b.float().to(out.device) if b is not None else out


#: norm kind (see :func:`sparse_clt_hf.sites.norm_kind`) -> the norm as a linear map of its input, scale frozen.
NORM_KINDS: dict[str, Callable[[nn.Module, torch.Tensor], torch.Tensor]] = {
    "rmsnorm": _rms_linear,
    "layernorm": _layernorm_linear,
}


@dataclass(frozen=True)
class InputTransform:
    """A transcoder input transform as a frozen linear map: ``centre?(x) * scale(x) * gain``."""

    centred: bool
    scale: Callable[[torch.Tensor, float], torch.Tensor]  # [.., d] -> [.., 1], computed on values (frozen)
    uses_norm_weight: bool = False


def _ones(x: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.ones_like(x[..., :1])


#: the transcoder's ``input_transform`` names (:data:`sparse_clt_hf.layer_encoder.INPUT_TRANSFORMS`) as frozen maps
INPUT_TRANSFORMS: dict[str, InputTransform] = {
    "none": InputTransform(False, _ones),
    "rmsnorm": InputTransform(False, lambda x, eps: torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)),
    "layernorm": InputTransform(
        True, lambda x, eps: torch.rsqrt((x - x.mean(-1, keepdim=True)).pow(2).mean(-1, keepdim=True) + eps), True
    ),
    "standardize": InputTransform(
        True, lambda x, eps: 1.0 / ((x - x.mean(-1, keepdim=True)).std(-1, keepdim=True) + eps)
    ),
    "norm_rescale": InputTransform(
        False, lambda x, eps: math.sqrt(x.shape[-1]) / x.norm(dim=-1, keepdim=True).clamp_min(eps)
    ),
}


def transform_backward(tc: CrossLayerTranscoder, layer: int, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``J^T w`` for the frozen input transform of ``layer`` at inputs ``x`` [n, d]: the vector to inject at the
    input site so that the gradient equals ``w`` [n, d] at the encoder's input (the transform's scale frozen)."""
    enc = tc.encoder(layer)
    spec = INPUT_TRANSFORMS[tc.config.input_transform]
    v = w.float() * spec.scale(x.float(), tc.config.input_norm_eps)
    if spec.uses_norm_weight and enc.norm_weight is not None:
        v = v * enc.norm_weight.float()
    if enc.input_scale is not None:
        v = v * enc.input_scale
    return v - v.mean(-1, keepdim=True) if spec.centred else v


def transform_linear(tc: CrossLayerTranscoder, layer: int, x: torch.Tensor) -> torch.Tensor:
    """The transcoder's input transform of ``x`` with its scale frozen (no pre-bias): what a skip path reads."""
    enc = tc.encoder(layer)
    spec = INPUT_TRANSFORMS[tc.config.input_transform]
    xf = x.float()
    y = (xf - xf.mean(-1, keepdim=True)) if spec.centred else xf
    y = y * spec.scale(xf.detach(), tc.config.input_norm_eps)
    if spec.uses_norm_weight and enc.norm_weight is not None:
        y = y * enc.norm_weight.float() + (enc.norm_bias.float() if enc.norm_bias is not None else 0.0)
    return y * enc.input_scale if enc.input_scale is not None else y


# ---------------------------------------------------------------------------------------------- attention
def _additive_mask(mask: torch.Tensor | None, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """The mask as eager attention adds it: boolean (True = attend) or None (causal) -> 0 / -inf floats."""
    if mask is not None and mask.dtype != torch.bool:
        return mask
    q, k = query.shape[-2], key.shape[-2]
    if mask is None:
        mask = torch.ones(q, k, dtype=torch.bool, device=query.device).tril(k - q)[None, None]
    return torch.zeros(mask.shape, dtype=query.dtype, device=query.device).masked_fill(
        ~mask, torch.finfo(query.dtype).min
    )


def _eager_of(module: nn.Module) -> Callable[..., Any]:
    fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if fn is None:
        raise HookSiteError(
            f"cannot freeze the attention of {type(module).__name__}: its modeling file has no eager_attention_forward"
        )
    return fn


def _frozen_attention(original: str) -> Callable[..., Any]:
    """An attention function: the output of implementation ``original``, the gradient of its pattern frozen."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    def frozen(module: nn.Module, query, key, value, attention_mask, **kwargs: Any):
        eager = _eager_of(module)
        real_fn = eager if original == "eager" else ALL_ATTENTION_FUNCTIONS[original]
        if not (torch.is_grad_enabled() and value.requires_grad):
            return real_fn(module, query, key, value, attention_mask, **kwargs)
        # An attribution pass holds one prompt replicated over the batch: row 0's output and pattern (from the
        # model's own eager attention) serve every row; the batch is folded into one [heads, q, k] matmul.
        q1, k1 = query[:1].detach(), key[:1].detach()
        m1 = attention_mask[:1] if attention_mask is not None else None
        with torch.no_grad():
            out1, weights = real_fn(module, q1, k1, value[:1], m1, **kwargs)
            _, pattern = eager(module, q1, k1, value[:1], _additive_mask(m1, q1, k1), **kwargs)
        if pattern is None:
            raise HookSiteError(f"cannot freeze the attention of {type(module).__name__}: its eager attention returns no pattern")
        p = pattern[0].to(value.dtype)  # [heads, q, k]
        heads, q_len = p.shape[0], p.shape[1]
        b, kv, k_len, hd = value.shape
        v = value.repeat_interleave(heads // kv, dim=1) if kv != heads else value
        lin = torch.bmm(p, v.permute(1, 2, 0, 3).reshape(heads, k_len, b * hd))
        lin = lin.reshape(heads, q_len, b, hd).permute(2, 1, 0, 3).to(out1.dtype)  # [b, q, heads, hd]
        out = out1.expand(b, *out1.shape[1:])
        return out + (lin - lin.detach()), weights

    return frozen


def _register_frozen(original: str) -> str:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    name = FROZEN_PREFIX + original
    if name not in AttentionInterface._global_mapping:
        AttentionInterface.register(name, _frozen_attention(original))
    if name not in AttentionMaskInterface._global_mapping and original in ALL_MASK_ATTENTION_FUNCTIONS:
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[original])
    return name


def _configs(model: nn.Module) -> list[Any]:
    seen: dict[int, Any] = {}
    for mod in model.modules():
        cfg = getattr(mod, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation_internal"):
            seen.setdefault(id(cfg), cfg)
    return list(seen.values())


# ---------------------------------------------------------------------------------------------- the context
def _hidden(args: tuple, kwargs: dict[str, Any]) -> tuple[int | str, torch.Tensor]:
    if args and torch.is_tensor(args[0]):
        return 0, args[0]
    for key, value in kwargs.items():
        if torch.is_tensor(value) and value.is_floating_point():
            return key, value
    raise HookSiteError("could not find the hidden states among a hooked module's inputs")


def _out_tensor(out: Any) -> torch.Tensor:
    return out if torch.is_tensor(out) else out[0]


def _replace_out(out: Any, new: torch.Tensor) -> Any:
    return new if torch.is_tensor(out) else (new, *out[1:])


class LocalReplacement:
    """Context manager: the model as circuit-tracer's local replacement model, and the tensors of each pass.

    ``inputs[l]``: the transcoder's input site of layer ``l`` (with its graph, for injections); ``outputs[l]``:
    the leaf at layer ``l``'s MLP output site (every model layer); ``embed``: the token embedding's output leaf;
    ``final``: the unembedding's input (the final norm's output). Each pass overwrites them.
    """

    def __init__(self, model: nn.Module, transcoder: CrossLayerTranscoder) -> None:
        self.model = model
        self.tc = transcoder
        _, layers = find_decoder_layers(model)
        self.n_layers = len(layers)
        self.in_points = {i: resolve_site_in_layer(model, transcoder.config.input_site, i) for i in transcoder.layers}
        self.out_points = {i: resolve_site_in_layer(model, transcoder.config.output_site, i) for i in range(self.n_layers)}
        bad = [p.path for p in self.out_points.values() if p.which != "output"]
        if bad:
            raise HookSiteError(f"attribution reads MLP outputs at a module's output; {bad[0]} is an input site")
        table = site_table(model)
        self.mlp_modules = []
        if "mlp_in" in table and table["mlp_in"][1] == "input":
            self.mlp_modules = [resolve_site_in_layer(model, "mlp_in", i).module for i in range(self.n_layers)]
        self.embedding = model.get_input_embeddings()
        self.unembedding = model.get_output_embeddings()
        if self.embedding is None or self.unembedding is None:
            raise HookSiteError(f"{type(model).__name__} has no input or output embedding to attribute through")
        self.norms = [m for m in model.modules() if norm_kind(m) in NORM_KINDS]
        self.inputs: dict[int, torch.Tensor] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.embed: torch.Tensor | None = None
        self.final: torch.Tensor | None = None
        self._handles: list[RemovableHandle] = []
        self._saved_attn: list[tuple[Any, Any]] = []
        self._saved_grad: list[tuple[nn.Parameter, bool]] = []
        self._checked: set[int] = set()

    # ------------------------------------------------------------------ hooks
    def _norm_hook(self, mod: nn.Module, args: tuple, kwargs: dict[str, Any], out: Any) -> Any:
        _, x = _hidden(args, kwargs)
        real = _out_tensor(out)
        if not (torch.is_grad_enabled() and x.requires_grad) and id(mod) in self._checked:
            return None
        lin = NORM_KINDS[norm_kind(mod)](mod, x)  # type: ignore[index]
        if id(mod) not in self._checked:
            err = (lin.detach() - real.detach().float()).abs().max()
            if not bool(err <= 1e-2 * (real.detach().float().abs().max() + 1e-6)):
                raise HookSiteError(
                    f"cannot freeze norm {type(mod).__name__}: its output is not the "
                    f"{norm_kind(mod)} of its input (max difference {float(err):.3g}); add it to NORM_KINDS"
                )
            self._checked.add(id(mod))
        if not (torch.is_grad_enabled() and x.requires_grad):
            return None
        lin = lin.to(real.dtype)
        return _replace_out(out, real.detach() + (lin - lin.detach()))

    def _input_hook(self, layer: int, which: str) -> Callable[..., Any]:
        def pre(mod: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
            self.inputs[layer] = self._btd(_hidden(args, kwargs)[1])

        def post(mod: nn.Module, args: tuple, out: Any) -> None:
            self.inputs[layer] = self._btd(_out_tensor(out))

        return pre if which == "input" else post

    def _output_hook(self, layer: int) -> Callable[..., Any]:
        enc = self.tc.encoders[str(layer)] if str(layer) in self.tc.encoders else None
        skip = None if enc is None else enc.W_skip

        def post(mod: nn.Module, args: tuple, out: Any) -> Any:
            real = _out_tensor(out)
            leaf = self._btd(real.detach()).requires_grad_(torch.is_grad_enabled())
            self.outputs[layer] = leaf
            new = leaf
            if skip is not None and torch.is_grad_enabled() and layer in self.inputs:
                s = transform_linear(self.tc, layer, self.inputs[layer]) @ skip.float().T
                new = leaf + (s - s.detach()).to(leaf.dtype)
            return _replace_out(out, new.reshape(real.shape))

        return post

    def _btd(self, t: torch.Tensor) -> torch.Tensor:
        """``[batch, positions, d]`` view of a site tensor (some models, e.g. OPT, flatten to ``[rows, d]``)."""
        return t.view(*self.embed.shape[:2], t.shape[-1]) if t.ndim == 2 and self.embed is not None else t

    def _detach_input(self, mod: nn.Module, args: tuple, kwargs: dict[str, Any]) -> Any:
        where, x = _hidden(args, kwargs)
        if isinstance(where, int):
            return (x.detach(), *args[1:]), kwargs
        return args, {**kwargs, where: x.detach()}

    def _embed_hook(self, mod: nn.Module, args: tuple, out: Any) -> Any:
        leaf = _out_tensor(out).detach().requires_grad_(torch.is_grad_enabled())
        self.embed = leaf
        return _replace_out(out, leaf)

    def _final_hook(self, mod: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        self.final = _hidden(args, kwargs)[1]

    # ------------------------------------------------------------------ enter / exit
    def __enter__(self) -> LocalReplacement:
        try:
            self._install()
        except BaseException:
            self._uninstall()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._uninstall()

    def _install(self) -> None:
        for p in self.model.parameters():
            self._saved_grad.append((p, p.requires_grad))
        for p, _ in self._saved_grad:
            p.requires_grad_(False)
        for cfg in _configs(self.model):
            original = cfg._attn_implementation_internal or "eager"
            self._saved_attn.append((cfg, cfg._attn_implementation_internal))
            if not str(original).startswith(FROZEN_PREFIX):
                cfg._attn_implementation_internal = _register_frozen(str(original))
        h = self._handles
        for mod in self.norms:  # norms first: the output-site leaf hook must run after a norm's own hook
            h.append(mod.register_forward_hook(self._norm_hook, with_kwargs=True))
        for layer, point in self.in_points.items():
            if point.which == "input":
                h.append(point.module.register_forward_pre_hook(self._input_hook(layer, "input"), with_kwargs=True))
            else:
                h.append(point.module.register_forward_hook(self._input_hook(layer, "output")))
        for mod in self.mlp_modules:
            h.append(mod.register_forward_pre_hook(self._detach_input, with_kwargs=True))
        for layer, point in self.out_points.items():
            h.append(point.module.register_forward_hook(self._output_hook(layer)))
        h.append(self.embedding.register_forward_hook(self._embed_hook))
        h.append(self.unembedding.register_forward_pre_hook(self._final_hook, with_kwargs=True))

    def _uninstall(self) -> None:
        while self._handles:
            self._handles.pop().remove()
        while self._saved_attn:
            cfg, value = self._saved_attn.pop()
            cfg._attn_implementation_internal = value
        while self._saved_grad:
            p, flag = self._saved_grad.pop()
            p.requires_grad_(flag)
