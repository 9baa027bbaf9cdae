"""Training: a tiny transcoder on a tiny random Llama learns (held-out FVU well below 1), respects k,
builds cross-layer decoders, is deterministic for a seed and round-trips through the native format."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import tiny_model

from sparse_clt_hf import CrossLayerTranscoder
from sparse_clt_hf.training import (
    ActivationCollector,
    TrainingConfig,
    file_texts,
    parse_layers,
    python_texts,
    token_sequences,
    train_transcoder,
)


class CharTokenizer:
    """A tokenizer for tiny models: one id per character (vocab 128)."""

    eos_token_id = 1

    def __call__(self, text, add_special_tokens=False, verbose=False):
        return {"input_ids": [3 + ord(c) % 120 for c in text]}


def texts(n: int = 6, length: int = 2500, seed: int = 0) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    letters = "abcdefghij klmnop"
    return ["".join(letters[i] for i in torch.randint(len(letters), (length,), generator=g).tolist()) for _ in range(n)]


def small_config(**kw) -> TrainingConfig:
    base = dict(layers=[0, 1, 2], n_features=96, k=6, span=1, tokens=5000, eval_tokens=600, seq_len=64,
                batch_size=256, epochs=2, aux_k=8, dead_tokens=1500, progress=False, model_batch=8)
    return TrainingConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def trained(model):
    return train_transcoder(model, CharTokenizer(), texts(), small_config(span=0))


def dense_reference(tc: CrossLayerTranscoder, x: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    """TopK encode and cross-layer decode written out from the textbook formula."""
    acts = {}
    for s, xs in x.items():
        enc = tc.encoder(s)
        z = xs.double() @ enc.W_enc.double().T + enc.b_enc.double()
        kth = z.topk(tc.config.k, dim=-1).values[:, -1:]
        acts[s] = torch.where((z >= kth) & (z > 0), z, torch.zeros_like(z))
    out = {}
    for t in tc.layers:
        y = tc.encoder(t).b_dec.double().expand(next(iter(x.values())).shape[0], -1)
        for s in tc.layers:
            W = tc.encoder(s).W_dec.double()
            if s <= t < s + W.shape[1]:
                y = y + acts[s] @ W[:, t - s]
        out[t] = y
    return out


def test_clt_learns_and_reports(trained, model):
    tc, metrics = trained
    assert set(metrics["fvu"]) == {0, 1, 2}
    assert all(v < 0.5 for v in metrics["fvu"].values()), metrics["fvu"]
    assert all(0 < v <= 6 for v in metrics["l0"].values()), metrics["l0"]
    assert metrics["tokens"] >= 4900 and metrics["steps"] > 0 and metrics["train_seconds"] > 0
    assert set(metrics["dead"]) == {0, 1, 2}
    # span 0 = every later trained layer: layer 0 writes 3 targets, layer 2 one
    assert [tuple(tc.encoder(x).W_dec.shape) for x in (0, 1, 2)] == [(96, 3, 32), (96, 2, 32), (96, 1, 32)]
    assert tc.config.span == 3 and tc.config.n_layers == 3 and tc.config.activation == "topk"


def test_reported_fvu_matches_independent_reconstruction(trained, model):
    """Recompute the held-out-style FVU on fresh tokens with a dense textbook decode."""
    tc, metrics = trained
    collector = ActivationCollector(model, [0, 1, 2], [0, 1, 2], "mlp_in", "mlp_out")
    ids = token_sequences(CharTokenizer(), texts(2, seed=7), 64, 8)
    x, y = collector(ids, 1)
    recon = dense_reference(tc, {s: x[:, i] for i, s in enumerate([0, 1, 2])})
    for i, t in enumerate([0, 1, 2]):
        yt = y[:, i].double()
        fvu = float((recon[t] - yt).pow(2).sum() / (yt - yt.mean(0)).pow(2).sum())
        assert fvu < 0.6
        assert abs(fvu - metrics["fvu"][t]) < 0.15, (t, fvu, metrics["fvu"][t])


def test_plt_decoders_and_determinism(model):
    cfg = small_config(layers=[0, 2], tokens=2500, epochs=1)
    tc1, m1 = train_transcoder(model, CharTokenizer(), texts(), cfg)
    tc2, m2 = train_transcoder(model, CharTokenizer(), texts(), cfg)
    assert tc1.config.span == 1 and tc1.config.is_plt
    assert tuple(tc1.encoder(2).W_dec.shape) == (96, 1, 32)
    for layer in (0, 2):
        assert torch.equal(tc1.encoder(layer).W_enc, tc2.encoder(layer).W_enc)
        assert torch.equal(tc1.encoder(layer).W_dec, tc2.encoder(layer).W_dec)
    assert m1["fvu"] == m2["fvu"]
    tc3, _ = train_transcoder(model, CharTokenizer(), texts(), small_config(layers=[0, 2], tokens=2500, epochs=1, seed=1))
    assert not torch.equal(tc1.encoder(0).W_enc, tc3.encoder(0).W_enc)


def test_save_load_round_trip(trained, tmp_path):
    tc, metrics = trained
    tc.save_pretrained(tmp_path / "clt")
    back = CrossLayerTranscoder.from_pretrained(tmp_path / "clt", decoders=True)
    assert back.config.metrics["fvu"] == metrics["fvu"]
    assert back.config.metrics["tokens"] == metrics["tokens"]
    assert back.config.span == 3 and back.config.k == 6 and back.config.input_site == "mlp_in"
    x = torch.randn(5, 32)
    for layer in tc.layers:
        assert torch.equal(back.encode(x, layer), tc.encode(x, layer))
        assert torch.equal(back.encoder(layer).W_dec, tc.encoder(layer).W_dec)


def test_jumprelu_thresholds(model):
    tc, metrics = train_transcoder(model, CharTokenizer(), texts(), small_config(layers=[1], activation="jumprelu",
                                                                                 tokens=2500, epochs=1))
    assert tc.config.activation == "jumprelu" and tc.encoder(1).threshold is not None
    assert float(tc.encoder(1).threshold[0]) >= 0
    assert 0 < metrics["l0"][1] < 30 and metrics["fvu"][1] < 1


def test_config_errors_and_helpers(tmp_path):
    with pytest.raises(ValueError, match="contiguous"):
        TrainingConfig(layers=[0, 2], span=2)
    with pytest.raises(ValueError, match="k="):
        TrainingConfig(layers=[0], n_features=8, k=9)
    assert parse_layers("2-4,7") == [2, 3, 4, 7]
    with pytest.raises(ValueError, match="layers"):
        parse_layers("a-b")
    (tmp_path / "a.txt").write_text("hello")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two"}) + "\n")
    assert list(file_texts(tmp_path)) == ["hello", "one", "two"]
    (tmp_path / "c.jsonl").write_text('{"nope": 1}\n')
    with pytest.raises(ValueError, match="c.jsonl:1"):
        list(file_texts(tmp_path / "c.jsonl"))
    with pytest.raises(FileNotFoundError):
        list(file_texts(tmp_path / "missing"))
    first = next(python_texts())
    assert isinstance(first, str) and len(first) > 100


def test_collector_stops_early_and_matches_full_forward(model):
    """Captured mlp_in/mlp_out equal those of a full forward; layers after the last one never run."""
    ran = []
    handle = model.model.layers[2].register_forward_pre_hook(lambda *a: ran.append(1))
    ids = torch.randint(3, 100, (2, 10))
    try:
        x, y = ActivationCollector(model, [0, 1], [0, 1], "mlp_in", "mlp_out")(ids, 1)
    finally:
        handle.remove()
    assert not ran
    seen = {}
    hooks = [model.model.layers[i].mlp.register_forward_hook(
        lambda m, a, o, i=i: seen.update({i: (a[0].detach(), o.detach())})) for i in (0, 1)]
    with torch.no_grad():
        model(input_ids=ids)
    for h in hooks:
        h.remove()
    for i in (0, 1):
        assert torch.allclose(x[:, i], seen[i][0][:, 1:].reshape(-1, 32))
        assert torch.allclose(y[:, i], seen[i][1][:, 1:].reshape(-1, 32))
