"""Hook sites of architectures: where ``resid_mid``, ``mlp_in``, ... live in each model family.

Everything architecture-specific is data: :data:`DECODER_LAYER_PATHS` says where the decoder layers
are, :data:`ARCH_SITES` says which sub-module (and its input or output) each site is, keyed by the
text config's ``model_type``. A site can also be given as an explicit module path relative to the
model, e.g. ``"model.layers.{layer}.pre_feedforward_layernorm:output"``.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .errors import HookSiteError

# Site name -> (sub-module path relative to a decoder layer, "input" | "output"); "" is the layer itself.
SiteTable = dict[str, tuple[str, str]]

LAYER_SITES: SiteTable = {"resid_pre": ("", "input"), "resid_post": ("", "output")}

LLAMA_LIKE: SiteTable = {
    "resid_mid": ("post_attention_layernorm", "input"),
    "mlp_in": ("mlp", "input"),
    "mlp_out": ("mlp", "output"),
}
GEMMA2_LIKE: SiteTable = {  # sandwich norms: the MLP's contribution is the post-feedforward norm's output
    "resid_mid": ("pre_feedforward_layernorm", "input"),
    "mlp_in": ("mlp", "input"),
    "mlp_out": ("post_feedforward_layernorm", "output"),
}
OLMO2_LIKE: SiteTable = {  # post-norm: the MLP reads the residual stream directly
    "resid_mid": ("mlp", "input"),
    "mlp_in": ("mlp", "input"),
    "mlp_out": ("post_feedforward_layernorm", "output"),
}
GPT2_LIKE: SiteTable = {"resid_mid": ("ln_2", "input"), "mlp_in": ("mlp", "input"), "mlp_out": ("mlp", "output")}
OPT_LIKE: SiteTable = {
    "resid_mid": ("final_layer_norm", "input"),
    "mlp_in": ("fc1", "input"),
    "mlp_out": ("fc2", "output"),
}
PARALLEL_NEOX: SiteTable = {"mlp_in": ("mlp", "input"), "mlp_out": ("mlp", "output")}
PARALLEL_PHI: SiteTable = {"mlp_in": ("mlp", "input"), "mlp_out": ("mlp", "output")}

# model_type of the *text* config -> site table. Families not listed use LLAMA_LIKE when their
# layers have the Llama sub-module names, and otherwise get a clear error.
ARCH_SITES: dict[str, SiteTable] = {
    **dict.fromkeys(
        [
            "llama", "mistral", "mixtral", "qwen2", "qwen3", "qwen2_vl_text", "qwen2_5_vl_text", "qwen3_vl_text",
            "gemma", "phi3", "granite", "starcoder2", "smollm3", "cohere", "olmo", "qwen2_moe", "qwen3_moe",
        ],
        LLAMA_LIKE,
    ),
    **dict.fromkeys(["gemma2", "gemma3", "gemma3_text", "cohere2"], GEMMA2_LIKE),
    **dict.fromkeys(["olmo2", "olmo3"], OLMO2_LIKE),
    **dict.fromkeys(["gpt2", "gpt_neo", "gpt_bigcode"], GPT2_LIKE),
    "opt": OPT_LIKE,
    "phi": PARALLEL_PHI,
}

# (model_type, config attribute) pairs whose truth selects a parallel block, and the table then used.
CONFIG_DEPENDENT_SITES: dict[str, tuple[str, SiteTable, SiteTable]] = {
    "gpt_neox": ("use_parallel_residual", PARALLEL_NEOX, {**LLAMA_LIKE}),
}

# Where the decoder layers live, tried in order (relative to the model passed to attach_clt).
DECODER_LAYER_PATHS: tuple[str, ...] = (
    "model.language_model.layers",
    "language_model.model.layers",
    "model.text_model.layers",
    "model.layers",
    "model.model.layers",
    "model.decoder.layers",
    "decoder.layers",
    "transformer.h",
    "transformer.blocks",
    "gpt_neox.layers",
    "layers",
    "h",
)

# TransformerLens hook names (relative to blocks.{L}) -> (our site, input transform they imply).
TRANSFORMERLENS_HOOKS: dict[str, tuple[str, str]] = {
    "hook_resid_pre": ("resid_pre", "none"),
    "hook_resid_mid": ("resid_mid", "none"),
    "hook_resid_post": ("resid_post", "none"),
    "ln2.hook_normalized": ("resid_mid", "rmsnorm"),
    "mlp.hook_in": ("mlp_in", "none"),
    "hook_mlp_in": ("mlp_in", "none"),
    "mlp.hook_out": ("mlp_out", "none"),
    "hook_mlp_out": ("mlp_out", "none"),
}

# TransformerLens hooks whose transform depends on the model's norm: ``ln2.hook_normalized`` is the pre-MLP
# norm's output without its affine, RMS-normalised on RMSNorm models (the table's value) but
# ``(x - mean) / sqrt(var + eps)`` on LayerNorm models (GPT-2, Pythia, OPT, ...). A loader that reads one
# marks its transform provisional (``TranscoderConfig.extra[NORM_DEPENDENT_KEY]``); loading for a model
# (``loading.load_for_model``) replaces it with the model's norm type.
NORM_DEPENDENT_HOOKS = frozenset({"ln2.hook_normalized"})
NORM_DEPENDENT_KEY = "input_transform_depends_on_model_norm"


def transformerlens_hook_name(hook: str) -> str:
    """``blocks.3.ln2.hook_normalized`` -> ``ln2.hook_normalized`` (names without ``blocks.N.`` unchanged)."""
    return hook.split(".", 2)[2] if hook.startswith("blocks.") and hook.count(".") >= 2 else hook


# Our site -> the TransformerLens hook name circuit-tracer configs use for it.
SITES_TO_TRANSFORMERLENS: dict[str, str] = {
    "resid_pre": "hook_resid_pre",
    "resid_mid": "hook_resid_mid",
    "resid_post": "hook_resid_post",
    "mlp_in": "mlp.hook_in",
    "mlp_out": "hook_mlp_out",
}


def site_from_transformerlens(hook: str) -> tuple[str, str]:
    """Map a TransformerLens hook name (``blocks.3.hook_resid_mid`` or ``hook_resid_mid``) to our site."""
    name = transformerlens_hook_name(hook) if isinstance(hook, str) else hook
    if name not in TRANSFORMERLENS_HOOKS:
        raise HookSiteError(
            f"unknown TransformerLens hook {hook!r}; known: {', '.join(TRANSFORMERLENS_HOOKS)}"
        )
    return TRANSFORMERLENS_HOOKS[name]


@dataclass(frozen=True)
class HookPoint:
    """One resolved hook: the module to hook and whether its input or output is the site."""

    module: nn.Module
    path: str
    which: str  # "input" | "output"


def get_submodule(root: nn.Module, path: str) -> nn.Module | None:
    if not path:
        return root
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


def text_config(model: nn.Module):
    """The decoder (text) config of a model, also for multimodal models."""
    config = model.config
    getter = getattr(config, "get_text_config", None)
    if getter is None:
        return config
    try:
        return getter(decoder=True)
    except TypeError:
        return getter()


def model_type(model: nn.Module) -> str:
    return getattr(text_config(model), "model_type", type(model).__name__)


def hidden_size(model: nn.Module) -> int:
    cfg = text_config(model)
    for attr in ("hidden_size", "n_embd", "d_model", "word_embed_proj_dim"):
        if getattr(cfg, attr, None):
            return int(getattr(cfg, attr))
    raise HookSiteError(f"cannot read the hidden size from the config of {type(model).__name__}")


def model_dims(model: nn.Module) -> tuple[int, int, str | None]:
    """(hidden size, number of decoder layers, name or path) of a model."""
    _, layers = find_decoder_layers(model)
    name = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
    return hidden_size(model), len(layers), name or None


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Path and ModuleList of the decoder layers (text stack) of ``model``."""
    cfg = text_config(model)
    depth = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", None)
    for path in DECODER_LAYER_PATHS:
        mod = get_submodule(model, path)
        if isinstance(mod, nn.ModuleList) and (depth is None or len(mod) == depth):
            return path, mod
    # Fallback for unknown wrappers: the ModuleList whose length is the config's depth.
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and depth is not None and len(mod) == depth and "vision" not in name:
            return name, mod
    raise HookSiteError(
        f"cannot find the decoder layers of {type(model).__name__}; tried {', '.join(DECODER_LAYER_PATHS)}"
    )


def site_table(model: nn.Module) -> SiteTable:
    """Sites available on each decoder layer of ``model`` -> (sub-module, input|output)."""
    mtype = model_type(model)
    if mtype in CONFIG_DEPENDENT_SITES:
        attr, when_true, when_false = CONFIG_DEPENDENT_SITES[mtype]
        table = when_true if getattr(text_config(model), attr, False) else when_false
    elif mtype in ARCH_SITES:
        table = ARCH_SITES[mtype]
    else:
        _, layers = find_decoder_layers(model)
        layer = layers[0]
        table = {s: spec for s, spec in LLAMA_LIKE.items() if get_submodule(layer, spec[0]) is not None}
    return {**LAYER_SITES, **table}


def resolve_site(model: nn.Module, site: str, layer: int) -> HookPoint:
    """Resolve a site name or explicit ``path:input|output`` for one decoder layer."""
    layers_path, layers = find_decoder_layers(model)
    if not 0 <= layer < len(layers):
        raise HookSiteError(
            f"layer {layer} is out of range: {type(model).__name__} has {len(layers)} decoder layers"
        )
    if ":" in site or "{layer}" in site:
        path, _, which = site.partition(":")
        which = which or "output"
        if which not in ("input", "output"):
            raise HookSiteError(f"site {site!r}: the part after ':' must be 'input' or 'output'")
        path = path.format(layer=layer)
        mod = get_submodule(model, path)
        if mod is None:
            raise HookSiteError(f"site {site!r}: module {path!r} does not exist in {type(model).__name__}")
        return HookPoint(mod, path, which)
    table = site_table(model)
    if site not in table:
        raise HookSiteError(
            f"site {site!r} does not exist for architecture {model_type(model)!r} "
            f"({type(model).__name__}); it has sites: {', '.join(table)}"
        )
    sub, which = table[site]
    mod = get_submodule(layers[layer], sub)
    if mod is None:
        raise HookSiteError(
            f"site {site!r} expects module {sub!r} in layer {layer} of {type(model).__name__}, which has none"
        )
    path = f"{layers_path}.{layer}" + (f".{sub}" if sub else "")
    return HookPoint(mod, path, which)


def resolve_site_in_layer(model: nn.Module, site: str, layer: int) -> HookPoint:
    """:func:`resolve_site`, checked to lie inside decoder layer ``layer`` (a transcoder site must)."""
    point = resolve_site(model, site, layer)
    path, layers = find_decoder_layers(model)
    if not any(m is point.module for m in layers[layer].modules()):
        raise HookSiteError(
            f"site {site!r} resolves to {point.path!r}, which is not inside decoder layer {layer} "
            f"({path}.{layer}): a transcoder site must be in the layer it serves"
        )
    return point


# Pre-MLP norm modules (TransformerLens' ``ln2``) by name, for architectures whose ``resid_mid`` is not
# the input of a norm (post-norm, parallel blocks): the first that exists in the layer is used.
PRE_MLP_NORMS = ("post_attention_layernorm", "pre_feedforward_layernorm", "ln_2", "final_layer_norm",
                 "input_layernorm", "ln_1")


def norm_kind(module: nn.Module) -> str | None:
    """``"rmsnorm"`` for an RMSNorm, ``"layernorm"`` for a LayerNorm (mean subtracted), else None."""
    name = type(module).__name__.lower()
    if isinstance(module, getattr(nn, "RMSNorm", ())) or "rmsnorm" in name:
        return "rmsnorm"
    if isinstance(module, nn.LayerNorm) or name.endswith("layernorm"):
        return "layernorm"
    return None


def norm_eps(module: nn.Module) -> float | None:
    """The epsilon of a norm module (``eps``, ``variance_epsilon`` or ``epsilon``), when it has one."""
    for attr in ("eps", "variance_epsilon", "epsilon"):
        value = getattr(module, attr, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


def pre_mlp_norm(model: nn.Module, layer: int) -> tuple[str, nn.Module] | None:
    """(path, module) of the norm in front of layer ``layer``'s MLP (TransformerLens' ``ln2``), or None."""
    try:
        point = resolve_site(model, "resid_mid", layer)
        if point.which == "input" and norm_kind(point.module) is not None:
            return point.path, point.module
    except HookSiteError:
        pass
    layers_path, layers = find_decoder_layers(model)
    for name in PRE_MLP_NORMS:
        mod = get_submodule(layers[layer], name)
        if mod is not None and norm_kind(mod) is not None:
            return f"{layers_path}.{layer}.{name}", mod
    return None
