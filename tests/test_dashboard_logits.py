"""Logit effects of decoder directions against a dense matmul and a per-feature sort."""

from __future__ import annotations

import pytest
import torch
from conftest import random_transcoder
from tiny_models import tiny_model

from sparse_clt_hf.dashboard.logits import LogitEffectsError, logit_effects, unembedding_of


@pytest.mark.parametrize("which", ["sum", "last"])
def test_blocks_match_dense_matmul(which):
    tc = random_transcoder(d=16, layers=(0, 1, 3), widths=[21, 9, 14], decoders=True, seed=3)
    U = torch.randn(50, 16, generator=torch.Generator().manual_seed(1))
    effects, notes = logit_effects(tc, U, k=4, which=which, block=5)
    assert notes == [] and sorted(effects) == [0, 1, 3]
    for layer, eff in effects.items():
        W = tc.encoder(layer).W_dec
        rows = W.sum(1) if which == "sum" else W[:, -1, :]
        dense = rows.double() @ U.double().T  # [m, vocab], all at once
        for f in range(rows.shape[0]):
            order = sorted(range(50), key=lambda v: -float(dense[f, v]))
            assert eff.top_ids[f].tolist() == order[:4]
            assert eff.bottom_ids[f].tolist() == order[::-1][:4]
            assert eff.top_values[f].tolist() == pytest.approx(dense[f, order[:4]].tolist(), rel=1e-4, abs=1e-5)


def test_layer_without_decoder_is_skipped_with_a_note():
    tc = random_transcoder(d=8, layers=(0, 1), widths=[5, 5], decoders=True)
    tc.encoder(1).W_dec = None
    effects, notes = logit_effects(tc, torch.randn(12, 8), k=3)
    assert sorted(effects) == [0] and "layer 1" in notes[0]


def test_bad_input():
    tc = random_transcoder(d=8, layers=(0,), widths=[5], decoders=True)
    with pytest.raises(LogitEffectsError, match="d_model"):
        logit_effects(tc, torch.randn(12, 9))
    with pytest.raises(LogitEffectsError, match="which"):
        logit_effects(tc, torch.randn(12, 8), which="first")


def test_unembedding_of_a_causal_lm():
    model = tiny_model("llama")
    assert unembedding_of(model).shape == (model.config.vocab_size, model.config.hidden_size)
