"""The transcoder module: encode math against the textbook formula, native save/load, errors."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import yaml
from conftest import assert_features_match, random_transcoder, textbook_dense
from safetensors.torch import load_file, save_file

from sparse_clt_hf import (
    CrossLayerTranscoder,
    LayerEncoder,
    TranscoderConfig,
    TranscoderFormatError,
    transcoder,
)
from sparse_clt_hf.errors import IncompatibleTranscoderError

ACTS = [("relu", None), ("jumprelu", None), ("topk", 5)]


@pytest.mark.parametrize("activation,k", ACTS)
@pytest.mark.parametrize("transform", ["none", "layernorm"])
def test_encode_matches_textbook(activation, k, transform):
    tc = random_transcoder(activation=activation, k=k, input_transform=transform)
    x = torch.randn(7, 32)
    for layer in tc.layers:
        dense = tc.encode(x, layer)
        assert dense.shape == (7, 64)
        assert torch.allclose(dense.double(), textbook_dense(tc, x, layer), atol=1e-5)


@pytest.mark.parametrize("activation,k", ACTS)
@pytest.mark.parametrize("chunk_size", [1, 3, 512])
def test_encode_sparse_is_sorted_dense_topk(activation, k, chunk_size):
    tc = random_transcoder(activation=activation, k=k)
    x = torch.randn(10, 32) * 2
    values, indices, l0 = tc.encode_sparse(x, 1, 8, chunk_size=chunk_size)
    assert values.shape == (10, 8) and indices.dtype == torch.int32 and l0.dtype == torch.int32
    assert torch.all(values[:, :-1] >= values[:, 1:]), "rows sorted descending"
    assert torch.all(values[indices < 0] == 0)
    assert_features_match(values, indices, l0, textbook_dense(tc, x, 1), 8)


@pytest.mark.parametrize("activation,k", [("relu", None), ("jumprelu", None), ("topk", 40)])
@pytest.mark.parametrize("threshold", [None, 0.5])
@pytest.mark.parametrize("rows", [None, 5])
def test_feature_blocks_give_the_dense_topk(monkeypatch, activation, k, threshold, rows):
    """A small block budget splits m=1000 into 256-feature blocks: the merged top-k and l0 stay exact."""
    cpu_tuning = transcoder.ENCODE_TUNING["cpu"]
    monkeypatch.setitem(transcoder.ENCODE_TUNING, "cpu", dataclasses.replace(cpu_tuning, block_bytes=256 * 4 * 4))
    assert transcoder.block_shape(16, 1000, 4, torch.device("cpu")) == (16, 256)
    tc = random_transcoder(widths=[1000, 1000, 1000], activation=activation, k=k)
    x = torch.randn(16, 32) * 2
    values, indices, l0 = tc.encode_sparse(x, 1, 24, activation_threshold=threshold, chunk_size=rows)
    dense = textbook_dense(tc, x, 1)
    if threshold is not None:
        dense = torch.where(dense >= threshold, dense, torch.zeros_like(dense))
    assert torch.all(values[:, :-1] >= values[:, 1:])
    assert int(indices.max()) >= 256, "features beyond the first block are found"
    assert_features_match(values, indices, l0, dense, 24)


def test_block_shape_bounds():
    cpu = torch.device("cpu")
    rows, cols = transcoder.block_shape(4096, 8192, 4, cpu)
    tune = transcoder.ENCODE_TUNING["cpu"]
    assert rows == tune.block_rows and rows * cols * 4 <= tune.block_bytes
    assert transcoder.block_shape(8, 8192, 4, cpu) == (8, 8192), "a decode step is one block"
    assert transcoder.block_shape(100, 8192, 4, cpu, rows=7) == (7, 8192)
    assert transcoder.block_shape(0, 64, 4, cpu) == (1, 64)


def test_topk_activation_caps_l0_and_slots():
    tc = random_transcoder(activation="topk", k=3)
    x = torch.randn(20, 32) * 3
    values, indices, l0 = tc.encode_sparse(x, 0, 8)
    assert int(l0.max()) <= 3
    assert torch.all(indices[:, 3:] == -1) and torch.all(values[:, 3:] == 0)


def test_activation_threshold_keeps_only_large():
    tc = random_transcoder()
    x = torch.randn(16, 32) * 2
    values, indices, l0 = tc.encode_sparse(x, 0, 64, activation_threshold=0.3)
    dense = textbook_dense(tc, x, 0)
    dense = torch.where(dense >= 0.3, dense, torch.zeros_like(dense))
    assert torch.all((values == 0) | (values >= 0.3))
    assert_features_match(values, indices, l0, dense, 64)


def test_top_k_larger_than_width_pads():
    tc = random_transcoder(widths=[4, 4, 4])
    values, indices, _ = tc.encode_sparse(torch.randn(3, 32), 2, 10)
    assert values.shape == (3, 10) and torch.all(indices[:, 4:] == -1)


@pytest.mark.parametrize("span", [None, 1])
def test_native_round_trip(tmp_path, span):
    tc = random_transcoder(activation="jumprelu", decoders=True, span=span)
    tc.config.metrics = {"fvu": {0: 0.3}}
    tc.save_pretrained(tmp_path)
    cfg = yaml.safe_load((tmp_path / "config.yaml").read_text())
    expected_kind = "transcoder_set" if span == 1 else "cross_layer_transcoder"
    assert cfg["model_kind"] == expected_kind and cfg["feature_input_hook"] == "hook_resid_mid"
    files = sorted(p.name for p in tmp_path.iterdir())
    if span == 1:
        assert "layer_0.safetensors" in files
    else:
        assert "W_enc_0.safetensors" in files and "W_dec_0.safetensors" in files
    enc_only = CrossLayerTranscoder.from_pretrained(tmp_path, layers=[1])
    assert enc_only.layers == [1] and enc_only.encoder(1).W_dec is None
    assert enc_only.config.activation == "jumprelu"
    full = CrossLayerTranscoder.from_pretrained(tmp_path, decoders=True)
    for layer in tc.layers:
        a, b = tc.encoder(layer), full.encoder(layer)
        assert torch.equal(a.W_enc, b.W_enc) and torch.equal(a.threshold, b.threshold)
        assert torch.equal(a.W_dec, b.W_dec)
    assert full.config.metrics["fvu"][0] == 0.3


def test_circuit_tracer_clt_written_by_hand(tmp_path):
    """A folder in circuit-tracer's own layout (no keys of ours) loads with the right semantics."""
    d, m = 32, 16
    (tmp_path / "config.yaml").write_text(
        yaml.safe_dump(
            {
                "model_name": "google/gemma-2-2b",
                "model_kind": "cross_layer_transcoder",
                "feature_input_hook": "hook_resid_mid",
                "feature_output_hook": "hook_mlp_out",
            }
        )
    )
    g = torch.Generator().manual_seed(1)
    for i in range(2):
        save_file(
            {
                f"W_enc_{i}": torch.randn(m, d, generator=g).bfloat16(),
                f"b_enc_{i}": torch.randn(m, generator=g).bfloat16(),
                f"b_dec_{i}": torch.zeros(d).bfloat16(),
                f"threshold_{i}": (torch.randn(m, generator=g) * 0.1).bfloat16(),  # some negative
            },
            str(tmp_path / f"W_enc_{i}.safetensors"),
        )
        save_file({f"W_dec_{i}": torch.zeros(m, 2 - i, d).bfloat16()}, str(tmp_path / f"W_dec_{i}.safetensors"))
    tc = CrossLayerTranscoder.from_pretrained(tmp_path)
    assert tc.config.activation == "jumprelu" and tc.config.dtype == "bfloat16"
    assert tc.config.input_site == "resid_mid" and tc.config.model_name == "google/gemma-2-2b"
    x = torch.randn(4, d).bfloat16()
    w = load_file(str(tmp_path / "W_enc_1.safetensors"))
    z = (x.float() @ w["W_enc_1"].float().T + w["b_enc_1"].float())
    ref = z * (z > w["threshold_1"].float())  # circuit-tracer: no ReLU, negative thresholds pass negatives
    assert torch.allclose(tc.to(torch.float32).encode(x.float(), 1), ref, atol=1e-4)


def test_decode_sums_cross_layer_contributions():
    tc = random_transcoder(decoders=True)
    acts = {layer: torch.rand(2, 64) for layer in tc.layers}
    out = tc.decode(acts)
    e0, e1, e2 = (tc.encoder(i) for i in range(3))
    ref2 = acts[0] @ e0.W_dec[:, 2] + acts[1] @ e1.W_dec[:, 1] + acts[2] @ e2.W_dec[:, 0] + e2.b_dec
    assert torch.allclose(out[2], ref2, atol=1e-5)


def test_bad_inputs(tmp_path):
    tc = random_transcoder()
    with pytest.raises(IncompatibleTranscoderError, match="width 16.*d_model=32"):
        tc.encode(torch.randn(2, 16), 0)
    with pytest.raises(IncompatibleTranscoderError, match="no encoder for layer 7"):
        tc.encode(torch.randn(2, 32), 7)
    with pytest.raises(TranscoderFormatError, match="b_enc"):
        LayerEncoder(torch.randn(4, 8), torch.randn(5))
    with pytest.raises(TranscoderFormatError, match="activation"):
        TranscoderConfig(d_model=8, layers=[0], n_features=[4], activation="gelu")
    with pytest.raises(TranscoderFormatError, match="positive k"):
        TranscoderConfig(d_model=8, layers=[0], n_features=[4], activation="topk")
    tc.save_pretrained(tmp_path / "tc")
    # a missing tensor
    path = tmp_path / "tc" / "W_enc_1.safetensors"
    tensors = load_file(str(path))
    save_file({k: v for k, v in tensors.items() if not k.startswith("b_enc")}, str(path))
    with pytest.raises(TranscoderFormatError, match="W_enc_1.safetensors: missing tensor 'b_enc_1'"):
        CrossLayerTranscoder.from_pretrained(tmp_path / "tc")
    # a wrong shape
    save_file({**tensors, "b_enc_1": torch.zeros(3)}, str(path))
    with pytest.raises(TranscoderFormatError, match=r"'b_enc_1' has shape \[3\]; expected \[64\]"):
        CrossLayerTranscoder.from_pretrained(tmp_path / "tc")
    # a truncated file
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(TranscoderFormatError, match="not a readable safetensors file"):
        CrossLayerTranscoder.from_pretrained(tmp_path / "tc")
    # a layer that is not there
    with pytest.raises(TranscoderFormatError, match=r"no weights for layers \[5\]"):
        CrossLayerTranscoder.from_pretrained(tmp_path / "tc", layers=[5])
    # no recognisable files
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("hi")
    with pytest.raises(TranscoderFormatError, match="could not recognise.*notes.txt"):
        CrossLayerTranscoder.from_pretrained(tmp_path / "empty")


def test_block_shape_per_device():
    """CUDA tiles features into blocks of at most 4096 (each takes its own top-k), rows fill the budget."""
    cuda = torch.device("cuda")
    tune = transcoder.ENCODE_TUNING["cuda"]
    rows, cols = transcoder.block_shape(32768, 16384, 2, cuda)
    assert cols == tune.max_cols == 4096 and rows * cols * 2 <= tune.block_bytes and rows >= 4096
    assert transcoder.block_shape(8, 16384, 2, cuda) == (8, 4096)
    assert transcoder.block_shape(8, 1000, 2, torch.device("mps")) == (8, 1000), "other devices: one block"


@pytest.mark.parametrize("activation", ["jumprelu", "relu"])
def test_fp32_accumulation_selects_the_active_set_of_fp32(monkeypatch, activation):
    """bf16 inputs with fp32 pre-activations pick exactly the features a float64 encode of the same
    (bf16-rounded) numbers picks; rounding z to bf16 first does not (thresholds near z flip)."""
    tc = random_transcoder(d=256, widths=[4096], layers=(0,), activation=activation)
    tc16 = CrossLayerTranscoder(tc.config, {0: tc.encoder(0).converted(torch.device("cpu"), torch.bfloat16)})
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(64, 256, generator=g) * 3).to(torch.bfloat16)
    ref = textbook_dense(tc16, x, 0)  # float64 of the bf16 numbers
    threshold = 0.3 if activation == "relu" else None
    if threshold is not None:
        ref = torch.where(ref >= threshold, ref, torch.zeros_like(ref))

    def active_sets(fp32: bool) -> float:
        tune = dataclasses.replace(transcoder.ENCODE_TUNING["cpu"], fp32_accumulate=fp32)
        monkeypatch.setitem(transcoder.ENCODE_TUNING, "cpu", tune)
        _, idx, l0 = tc16.encode_sparse(x, 0, 4096, activation_threshold=threshold)
        got = torch.zeros(64, 4097, dtype=torch.bool).scatter_(1, torch.where(idx < 0, 4096, idx.long()), True)[:, :4096]
        return (got == (ref > 0)).all(-1).float().mean().item()

    assert active_sets(True) == 1.0
    assert active_sets(False) < 1.0
