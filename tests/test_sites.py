"""Hook sites resolve to the right tensors on every supported architecture.

The checks use identities of the residual stream that hold whatever the module names are:
resid_pre is ``output_hidden_states[l]``; resid_mid = resid_pre + the attention block's contribution;
resid_post = resid_mid + mlp_out. The attention contribution is captured with the test's own table.
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import TINY_MODELS, tiny_model

from sparse_clt_hf.errors import HookSiteError
from sparse_clt_hf.sites import find_decoder_layers, resolve_site

# Attention contribution to the residual: (attention module, norm applied to its output or None).
ATTN = {
    "gemma2": ("self_attn", "post_attention_layernorm"),
    "gemma3_text": ("self_attn", "post_attention_layernorm"),
    "gemma3": ("self_attn", "post_attention_layernorm"),
    "olmo2": ("self_attn", "post_attention_layernorm"),
    "gpt2": ("attn", None),
    "gpt_neox_sequential": ("attention", None),
}
PARALLEL = {"gpt_neox"}
ALL = list(TINY_MODELS)


def capture(model, sites_and_layers, ids):
    """Run the model once; return {(site, layer): tensor} captured by plain hooks on resolved modules."""
    got, handles = {}, []
    for site, layer in sites_and_layers:
        point = resolve_site(model, site, layer)
        if point.which == "input":
            handles.append(
                point.module.register_forward_pre_hook(
                    lambda m, a, kw, key=(site, layer): got.__setitem__(key, (a[0] if a else next(iter(kw.values())))),
                    with_kwargs=True,
                )
            )
        else:
            handles.append(
                point.module.register_forward_hook(
                    lambda m, a, o, key=(site, layer): got.__setitem__(key, o if torch.is_tensor(o) else o[0])
                )
            )
    try:
        with torch.no_grad():
            out = model(input_ids=ids, output_hidden_states=True)
    finally:
        for h in handles:
            h.remove()
    return got, out


@pytest.mark.parametrize("arch", ALL)
def test_sites_follow_the_residual_stream(arch):
    model = tiny_model(arch)
    ids = torch.randint(3, 100, (2, 6))
    _, layers = find_decoder_layers(model)
    layer = 1
    sites = ["resid_pre", "mlp_in", "mlp_out", "resid_post"] + ([] if arch in PARALLEL else ["resid_mid"])
    got, out = capture(model, [(s, layer) for s in sites], ids)
    got = {key: t.reshape(2, 6, -1) for key, t in got.items()}  # OPT's fc1/fc2 see [B*T, d]
    hidden = out.hidden_states
    assert torch.allclose(got[("resid_pre", layer)], hidden[layer], atol=1e-6)
    assert torch.allclose(got[("resid_post", layer)], hidden[layer + 1], atol=1e-6)
    for s in sites:
        assert got[(s, layer)].shape == (2, 6, 32), s
    if arch in PARALLEL:
        return
    # attention contribution, captured independently
    attn_name, norm_name = ATTN.get(arch, ("self_attn", None))
    block = layers[layer]
    cap = {}
    mod = block.get_submodule(norm_name or attn_name)
    h = mod.register_forward_hook(lambda m, a, o: cap.__setitem__("attn", o if torch.is_tensor(o) else o[0]))
    with torch.no_grad():
        model(input_ids=ids)
    h.remove()
    resid_mid = got[("resid_mid", layer)]
    assert torch.allclose(resid_mid, got[("resid_pre", layer)] + cap["attn"], atol=1e-5)
    assert torch.allclose(got[("resid_post", layer)], resid_mid + got[("mlp_out", layer)], atol=1e-5)


def test_explicit_module_path_override():
    model = tiny_model("gemma2")
    point = resolve_site(model, "model.layers.{layer}.pre_feedforward_layernorm:output", 2)
    assert point.module is model.model.layers[2].pre_feedforward_layernorm and point.which == "output"
    with pytest.raises(HookSiteError, match="does not exist"):
        resolve_site(model, "model.layers.{layer}.nope:input", 0)
    with pytest.raises(HookSiteError, match="'input' or 'output'"):
        resolve_site(model, "model.layers.{layer}.mlp:middle", 0)


def test_missing_site_names_architecture_and_available_sites():
    model = tiny_model("gpt_neox")  # parallel attention + MLP: no resid_mid
    with pytest.raises(HookSiteError, match=r"'resid_mid' does not exist for architecture 'gpt_neox'.*mlp_in"):
        resolve_site(model, "resid_mid", 0)
    with pytest.raises(HookSiteError, match="layer 3 is out of range"):
        resolve_site(model, "mlp_in", 3)


def test_vlm_text_stack_is_found():
    for arch, path in [("llava", "model.language_model.layers"), ("qwen2_vl", "model.language_model.layers"),
                       ("gemma3", "model.language_model.layers")]:
        found, _ = find_decoder_layers(tiny_model(arch))
        assert found == path
