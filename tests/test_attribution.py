"""Attribution graphs against an independent reference: the frozen model written out in the test.

The reference runs the real model (float64) with every attention pattern and norm scale *replayed* from a cached
plain pass (its own attention function and norm forwards, written here), every MLP output replaced by its cached
value, and a perturbation added at a source (a feature's activation x decoder vectors, an error vector, a token
embedding). In that model everything downstream of the perturbation is linear, so the change of a target (a
feature's pre-activation from its encoder, a logit minus the mean logit) is the direct effect. One batch row per
source. Activations come from the textbook dense encode of conftest.
"""

from __future__ import annotations

import pytest
import torch
from conftest import random_transcoder, textbook_dense
from tiny_models import tiny_model
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

from sparse_clt_hf import attribute
from sparse_clt_hf.sites import find_decoder_layers, resolve_site_in_layer

PROMPT = torch.tensor([2, 17, 5, 99, 43, 8, 61, 23])


def _gain(mod):
    w = getattr(mod, "weight", None)
    if w is None:
        return 1.0
    return 1.0 + w if "Gemma" in type(mod).__name__ else w


class Replay:
    """A plain pass of a float64 model that records attention patterns, norm inputs, sites; then replays it frozen."""

    def __init__(self, model, tc):
        self.model, self.tc = model, tc
        self.mode = "record"
        self.patterns, self.norm_x, self.mlp_out, self.inputs = {}, {}, {}, {}
        self.delta_out, self.delta_emb = {}, None
        self.embed = None
        _, layers = find_decoder_layers(model)
        self.n_layers = len(layers)
        self.handles = []

    def attention(self, module, query, key, value, attention_mask, scaling=None, **kwargs):
        key_id = id(module)
        if self.mode == "record":
            scores = query @ key.repeat_interleave(query.shape[1] // key.shape[1], 1).transpose(-1, -2)
            scores = scores * (scaling if scaling is not None else query.shape[-1] ** -0.5)
            softcap = kwargs.get("softcap")
            if softcap:
                scores = torch.tanh(scores / softcap) * softcap
            q, k = query.shape[-2], key.shape[-2]
            causal = torch.ones(q, k, dtype=torch.bool).tril(k - q)
            if attention_mask is not None:
                m = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
                causal = causal & m
            self.patterns[key_id] = torch.softmax(scores.masked_fill(~causal, float("-inf")), -1)
        p = self.patterns[key_id]
        if p.shape[0] != value.shape[0]:
            p = p[:1].expand(value.shape[0], -1, -1, -1)
        v = value.repeat_interleave(p.shape[1] // value.shape[1], 1)
        return (p @ v).transpose(1, 2).contiguous(), None

    def norm_hook(self, mod, args, out):
        shape = args[0].shape
        x = self._btd(args[0])
        key_id = id(mod)
        if self.mode == "record":
            self.norm_x[key_id] = x[:1]
            return None
        x0 = self.norm_x[key_id]
        if isinstance(mod, torch.nn.LayerNorm):
            mu = x0.mean(-1, keepdim=True)
            s = torch.rsqrt(((x0 - mu) ** 2).mean(-1, keepdim=True) + mod.eps)
            y = (x - x.mean(-1, keepdim=True)) * s * mod.weight + mod.bias
        else:
            eps = getattr(mod, "variance_epsilon", None) or getattr(mod, "eps", 1e-6)
            s = torch.rsqrt(x0.pow(2).mean(-1, keepdim=True) + eps)
            y = x * s * _gain(mod)
        y = y.reshape(shape)
        return y if torch.is_tensor(out) else (y, *out[1:])

    def install(self):
        AttentionInterface.register("test_replay", self.attention)
        AttentionMaskInterface.register("test_replay", ALL_MASK_ATTENTION_FUNCTIONS["eager"])
        self.model.set_attn_implementation("test_replay")
        for mod in self.model.modules():
            name = type(mod).__name__
            if "RMSNorm" in name or isinstance(mod, torch.nn.LayerNorm):
                self.handles.append(mod.register_forward_hook(self.norm_hook))
        for layer in range(self.n_layers):
            point = resolve_site_in_layer(self.model, self.tc.config.output_site, layer)
            self.handles.append(point.module.register_forward_hook(self._out(layer)))
        for layer in self.tc.layers:
            point = resolve_site_in_layer(self.model, self.tc.config.input_site, layer)
            self.handles.append(point.module.register_forward_pre_hook(self._inp(layer)))
        self.handles.append(self.model.get_input_embeddings().register_forward_hook(self._emb))
        self.handles.append(self.model.get_output_embeddings().register_forward_pre_hook(self._final))

    def _btd(self, t):  # OPT flattens its MLP's tensors to [rows, d]
        return t.view(self.batch, -1, t.shape[-1]) if t.ndim == 2 else t

    def _out(self, layer):
        def hook(mod, args, out):
            real = out if torch.is_tensor(out) else out[0]
            if self.mode == "record":
                self.mlp_out[layer] = self._btd(real)[:1]
                return None
            y = (self.mlp_out[layer] + self.delta_out.get(layer, 0)).reshape(real.shape)
            return y if torch.is_tensor(out) else (y, *out[1:])

        return hook

    def _inp(self, layer):
        def hook(mod, args):
            self.inputs[layer] = self._btd(args[0])

        return hook

    def _emb(self, mod, args, out):
        if self.mode == "record":
            self.embed = out[:1]
            return None
        return self.embed + self.delta_emb

    def _final(self, mod, args):
        self.final = args[0]

    def run(self, tokens, batch=1):
        self.batch = batch
        with torch.no_grad():
            self.model(input_ids=tokens[None].expand(batch, -1), use_cache=False)


def reference_rows(model, tc, tokens, graph, target_vectors=None, zero=1):
    """Dense direct effects [targets, sources] of the frozen model by replay; target rows as graph.row_nodes.
    ``target_vectors`` [K, d]: the logit targets' directions (default: the unembedding rows of
    graph.logit_ids less the mean row). ``zero``: leading positions without features or errors."""
    rep = Replay(model, tc)
    rep.install()
    rep.run(tokens)
    T = len(tokens)
    L = rep.n_layers
    lay = graph.layout
    d = rep.embed.shape[-1]
    # sources: features, errors, tokens
    recon = torch.zeros(L, T, d, dtype=torch.float64)
    acts = {}
    for layer in tc.layers:
        x = rep.inputs[layer][0]
        if tc.config.input_transform == "rmsnorm":  # (conftest's textbook covers layernorm itself)
            x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + tc.config.input_norm_eps)
        a = textbook_dense(tc, x, layer)
        a[:zero] = 0
        acts[layer] = a
        enc = tc.encoder(layer)
        for j in range(enc.W_dec.shape[1]):
            recon[layer + j] += a @ enc.W_dec[:, j].double()
        recon[layer] += enc.b_dec.double()
    deltas = []  # (out deltas per layer [L, T, d], emb delta [T, d])
    for layer, pos, feat in graph.features.tolist():
        dl = torch.zeros(L, T, d, dtype=torch.float64)
        enc = tc.encoder(layer)
        for j in range(enc.W_dec.shape[1]):
            dl[layer + j, pos] = acts[layer][pos, feat] * enc.W_dec[feat, j].double()
        deltas.append((dl, torch.zeros(T, d, dtype=torch.float64)))
    for layer in range(L):
        for pos in range(T):
            dl = torch.zeros(L, T, d, dtype=torch.float64)
            if pos >= zero:
                dl[layer, pos] = rep.mlp_out[layer][0] [pos] - recon[layer, pos]
            deltas.append((dl, torch.zeros(T, d, dtype=torch.float64)))
    for pos in range(T):
        de = torch.zeros(T, d, dtype=torch.float64)
        de[pos] = rep.embed[0, pos]
        deltas.append((torch.zeros(L, T, d, dtype=torch.float64), de))
    n_src = len(deltas)
    assert n_src == lay.logit_start
    rep.mode = "replay"
    x_base = {layer: rep.inputs[layer][0] for layer in tc.layers}

    def frozen_transform_at(layer, pos, x):
        kind, eps = tc.config.input_transform, tc.config.input_norm_eps
        x0 = x_base[layer][pos]
        if kind == "rmsnorm":
            return x * torch.rsqrt(x0.pow(2).mean() + eps)
        if kind == "layernorm":
            enc = tc.encoder(layer)
            s0 = torch.rsqrt(((x0 - x0.mean()) ** 2).mean() + eps)
            return (x - x.mean(-1, keepdim=True)) * s0 * enc.norm_weight.double()
        return x

    def targets():
        vals = []
        W_u = model.get_output_embeddings().weight.double()
        u = target_vectors.double() if target_vectors is not None else W_u[graph.logit_ids] - W_u.mean(0, keepdim=True)
        out = []
        for node in graph.row_nodes.tolist():
            if node >= lay.logit_start:
                out.append(rep.final[:, -1] @ u[node - lay.logit_start])
            else:
                layer, pos, feat = graph.features[node].tolist()
                x = frozen_transform_at(layer, pos, rep.inputs[layer][:, pos])
                out.append(x @ tc.encoder(layer).W_enc[feat].double())
        vals = torch.stack(out, 1)  # [batch, rows]
        return vals

    rep.delta_out = {t: torch.zeros(1, T, d, dtype=torch.float64) for t in range(L)}
    rep.delta_emb = torch.zeros(1, T, d, dtype=torch.float64)
    rep.run(tokens)
    base = targets()[0]
    rep.delta_out = {t: torch.stack([dl[t] for dl, _ in deltas]) for t in range(L)}
    rep.delta_emb = torch.stack([de for _, de in deltas])
    rep.run(tokens, batch=n_src)
    moved = targets()  # [n_src, rows]
    for h in rep.handles:
        h.remove()
    return (moved - base).T, acts  # [rows, sources]


CASES = [
    ("llama", "relu", None),
    ("llama", "jumprelu", 1),
    ("gemma2", "jumprelu", None),
    ("gemma2", "relu", 1),
    ("qwen3", "relu", None),
    ("qwen3", "jumprelu", 1),
    ("gpt2", "relu", None),
    ("gpt2", "jumprelu", 1),
    ("mistral", "relu", None),
    ("phi3", "jumprelu", None),
    ("olmo2", "relu", 1),
    ("gemma", "relu", None),
    ("qwen2", "jumprelu", 1),
    ("gemma3_text", "jumprelu", None),
    ("opt", "relu", None),
    ("gpt_neox", "relu", None),  # parallel attention and MLP; the transcoder reads mlp_in
    ("mistral", "jumprelu", None, "layernorm"),  # the transcoder's own input transforms, frozen
    ("qwen3", "relu", 1, "rmsnorm"),
]
SITE = {"gpt_neox": "mlp_in"}


def _case_id(case):
    arch, act, span, *transform = case
    return "-".join([arch, act, "plt" if span else "clt", *transform])


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_adjacency_equals_frozen_model_replay(case):
    arch, activation, span, *rest = case
    transform = rest[0] if rest else "none"
    model = tiny_model(arch)
    site = SITE.get(arch, "resid_mid")
    kw = dict(activation=activation, span=span, decoders=True, seed=3, site=site, input_transform=transform)
    tc = random_transcoder(**kw)
    graph = attribute(model, tc, PROMPT, batch_size=32)
    model64 = tiny_model(arch).double()
    tc64 = random_transcoder(**kw).double()
    ref, acts = reference_rows(model64, tc64, PROMPT, graph)
    # active features: every nonzero of the textbook encode at positions >= 1, in (layer, position, feature) order
    want = [[layer, p, f] for layer in tc.layers for p, f in torch.nonzero(acts[layer]).tolist()]
    assert graph.features.tolist() == want
    ref_acts = torch.tensor([float(acts[layer][p, f]) for layer, p, f in want])
    torch.testing.assert_close(graph.activations.double(), ref_acts.double(), rtol=1e-4, atol=1e-5)
    assert graph.features[:, 1].min() >= 1  # position 0 has no features
    got = graph.adjacency[:, : graph.layout.logit_start].double()
    scale = ref.abs().max()
    assert (got - ref).abs().max() <= 2e-4 * scale, float((got - ref).abs().max() / scale)
    # position-0 error nodes are in the node order but have no edges
    lay = graph.layout
    for layer in range(lay.n_layers):
        assert not graph.adjacency[:, lay.error_node(layer, 0)].any()
