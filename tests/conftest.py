"""Shared test helpers: random transcoders and an independent dense reference for features."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from sparse_clt_hf import CrossLayerTranscoder, LayerEncoder, TranscoderConfig  # noqa: E402

warnings.filterwarnings("ignore", message=".*generation flags.*")


def random_transcoder(
    d: int = 32,
    layers=(0, 1, 2),
    widths=None,
    *,
    activation: str = "relu",
    k: int | None = None,
    site: str = "resid_mid",
    seed: int = 0,
    decoders: bool = False,
    span: int | None = None,
    input_transform: str = "none",
) -> CrossLayerTranscoder:
    """Random encoders; biases shifted negative so that only part of the features fire."""
    g = torch.Generator().manual_seed(seed)
    layers = list(layers)
    widths = list(widths or [64] * len(layers))
    encoders = {}
    for layer, m in zip(layers, widths):
        W = torch.randn(m, d, generator=g) / d**0.5
        b = torch.randn(m, generator=g) * 0.1 - 0.05
        thr = torch.rand(m, generator=g) * 0.2 if activation == "jumprelu" else None
        kw = {}
        if input_transform == "layernorm":
            kw = dict(norm_weight=1 + 0.1 * torch.randn(d, generator=g), norm_bias=0.1 * torch.randn(d, generator=g))
        enc = LayerEncoder(W, b, threshold=thr, **kw)
        if decoders:
            n_out = 1 if span == 1 else max(layers) + 1 - layer
            enc.set_decoder(torch.randn(m, n_out, d, generator=g) * 0.1, torch.randn(d, generator=g) * 0.01)
        encoders[layer] = enc
    cfg = TranscoderConfig(
        d_model=d,
        layers=layers,
        n_features=widths,
        activation=activation,
        k=k,
        input_site=site,
        input_transform=input_transform,
        span=span,
        n_layers=max(layers) + 1,
        model_name="tiny",
    )
    return CrossLayerTranscoder(cfg, encoders)


def textbook_dense(tc: CrossLayerTranscoder, x: torch.Tensor, layer: int) -> torch.Tensor:
    """Dense activations by the published formula, written independently of the library's encode."""
    enc = tc.encoder(layer)
    x = x.double()
    if tc.config.input_transform == "layernorm":
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        x = (x - mu) / torch.sqrt(var + tc.config.input_norm_eps) * enc.norm_weight.double() + enc.norm_bias.double()
    z = x @ enc.W_enc.double().T + enc.b_enc.double()
    if tc.config.activation == "relu":
        return torch.clamp(z, min=0)
    if tc.config.activation == "jumprelu":
        return torch.where(z > enc.threshold.double(), z, torch.zeros_like(z))
    kth = z.sort(-1, descending=True).values[..., tc.config.k - 1 : tc.config.k]
    return torch.where((z >= kth) & (z > 0), z, torch.zeros_like(z))


def assert_features_match(values, indices, l0, dense_ref, top_k, atol=1e-4):
    """Compare recorded top-k (values/indices/l0 of shape [..., k]) with a dense reference [..., m].

    Robust to near-ties: recorded values must equal the sorted reference values, and the reference
    at each recorded index must equal the recorded value.
    """
    dense_ref = dense_ref.double()
    ref_vals = dense_ref.sort(-1, descending=True).values[..., :top_k]
    ref_vals = torch.where(ref_vals > 0, ref_vals, torch.zeros_like(ref_vals))
    kk = ref_vals.shape[-1]
    assert torch.allclose(values[..., :kk].double(), ref_vals, atol=atol), (values, ref_vals)
    valid = indices >= 0
    assert torch.equal(valid[..., :kk], ref_vals > 0)
    gathered = dense_ref.gather(-1, indices.clamp_min(0).long())
    assert torch.allclose(torch.where(valid, gathered, 0).double(), torch.where(valid, values.double(), 0), atol=atol)
    ref_l0 = (dense_ref > 0).sum(-1)
    # l0 may differ only where a value sits within rounding of zero / the threshold
    assert (l0.long() - ref_l0).abs().max() <= 1


@pytest.fixture
def tiny_tc():
    return random_transcoder()
