"""Published-format loaders: detection, format override, lazy per-layer reads, features equal to the
authors' formula (an independent dense reference written here), and clear errors on bad files."""

from __future__ import annotations

import json
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from format_fixtures import (
    one_layer_writers,
    write_clt_training,
    write_gemma_scope,
    write_gemma_scope2_clt,
    write_gemma_scope2_plt,
    write_saelens,
    write_sparsify,
    write_vlm_clt,
)
from safetensors.torch import save_file

from sparse_clt_hf.errors import TranscoderFormatError
from sparse_clt_hf.formats import detect_format, format_module
from sparse_clt_hf.hub import LocalSource
from sparse_clt_hf.loading import load_transcoder

D, M = 16, 48


class RecordingSource(LocalSource):
    """A LocalSource that records which files were fetched (i.e. would have been downloaded)."""

    def __init__(self, root, **kwargs) -> None:
        super().__init__(root, **kwargs)
        self.fetched: list[str] = []

    def fetch(self, path: str) -> Path:
        self.fetched.append(path)
        return super().fetch(path)

    def sub(self, folder: str) -> RecordingSource:
        return RecordingSource(self.root / folder, allowed=self.allowed)


def x_input(n: int = 12, d: int = D, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed)) * 2


def t(a) -> torch.Tensor:
    return torch.as_tensor(np.asarray(a) if not isinstance(a, torch.Tensor) else a).float()


# ---------------------------------------------------------------------- the authors' formulas
def ref_jumprelu_dm(x, W_enc_dm, b_enc, thr):
    """Gemma Scope / SAELens JumpReLU: z = x @ W_enc[d, m] + b; relu(z) * (z > threshold)."""
    z = x @ t(W_enc_dm) + t(b_enc)
    return torch.relu(z) * (z > t(thr))


def ref_gemma_rms(x, eps=1e-6):
    """TransformerLens ln2.hook_normalized for Gemma 2: x / sqrt(mean(x^2) + eps), no gain."""
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)


def ref_sparsify(x, W_md, b, k, b_dec=None, in_norm=None):
    """sparsify: optional sqrt(d)/in_norm scale, minus b_dec for SAEs, relu(linear), keep the top k."""
    if in_norm is not None:
        x = x * (x.shape[-1] ** 0.5 / in_norm)
    if b_dec is not None:
        x = x - t(b_dec)
    pre = torch.relu(x @ t(W_md).T + t(b))
    vals, idx = pre.topk(k, dim=-1)
    return torch.zeros_like(pre).scatter(-1, idx, vals)


def ref_saelens_topk(z, k):
    """SAELens TopK: top-k of the raw z, then ReLU of the kept values."""
    vals, idx = z.topk(k, dim=-1)
    return torch.zeros_like(z).scatter(-1, idx, torch.relu(vals))


def ref_saelens_layer_norm(x, eps=1e-5):
    mu = x.mean(-1, keepdim=True)
    x = x - mu
    return x / (x.std(-1, keepdim=True) + eps)


def ref_vlm(x, sd):
    """vlm-clt-training: relu(Linear(LayerNorm(x))) with LayerNorm eps 1e-5, computed in fp32."""
    ln = F.layer_norm(x, (x.shape[-1],), sd["enc.0.weight"].float(), sd["enc.0.bias"].float(), 1e-5)
    return torch.relu(ln @ sd["enc.1.weight"].float().T + sd["enc.1.bias"].float())


def encode(tc, x, layer):
    return tc.encode(x, layer).float()


# ---------------------------------------------------------------------- Gemma Scope 1
def test_gemma_scope_detect_features_and_lazy_layers(tmp_path):
    ref = write_gemma_scope(tmp_path, [0, 1, 2], D, M)
    src = RecordingSource(tmp_path)
    assert detect_format(src) == "gemma_scope"
    tc = load_transcoder(src, layers=[1])
    assert src.fetched == ["layer_1/width_16k/average_l0_50/params.npz"]
    c = tc.config
    assert (c.input_site, c.input_transform, c.input_norm_eps, c.activation, c.span) == (
        "resid_mid", "rmsnorm", 1e-6, "jumprelu", 1)
    assert c.source_format == "gemma_scope" and tc.encoder(1).W_dec is None
    x = x_input()
    p = ref[1]
    expected = ref_jumprelu_dm(ref_gemma_rms(x), p["W_enc"], p["b_enc"], p["threshold"])
    assert (expected > 0).any()
    torch.testing.assert_close(encode(tc, x, 1), expected, rtol=1e-4, atol=1e-5)
    tc_dec = load_transcoder(src, layers=[2], decoders=True)
    torch.testing.assert_close(tc_dec.encoder(2).W_dec[:, 0, :], t(ref[2]["W_dec"]))


def test_gemma_scope_single_folder_takes_the_layer_from_the_path(tmp_path):
    write_gemma_scope(tmp_path, [7], D, M)
    tc = load_transcoder(LocalSource(tmp_path / "layer_7/width_16k/average_l0_50"))
    assert tc.layers == [7]


def test_gemma_scope_several_variants_per_layer_is_an_error_naming_them(tmp_path):
    write_gemma_scope(tmp_path, [0], D, M, l0=50)
    write_gemma_scope(tmp_path, [0], D, M, l0=80)
    with pytest.raises(TranscoderFormatError, match="average_l0_80"):
        load_transcoder(LocalSource(tmp_path))
    tc = format_module("gemma_scope").load(LocalSource(tmp_path), None, False, variant="width_16k/average_l0_80")
    assert tc.layers == [0]


def test_gemma_scope_npz_in_a_transcoders_list(tmp_path):
    ref = write_gemma_scope(tmp_path / "gs", [0, 1], D, M)
    cfg = {
        "model_kind": "transcoder_set",
        "feature_input_hook": "ln2.hook_normalized",
        "feature_output_hook": "hook_mlp_out",
        "transcoders": [str(tmp_path / f"gs/layer_{i}/width_16k/average_l0_50/params.npz") for i in (0, 1)],
    }
    (tmp_path / "ct").mkdir()
    (tmp_path / "ct/config.yaml").write_text(json.dumps(cfg))
    # the files lie outside the config's folder: read only when the caller names that folder
    with pytest.raises(TranscoderFormatError, match="outside this folder.*allowed="):
        load_transcoder(LocalSource(tmp_path / "ct"), layers=[1])
    tc = load_transcoder(LocalSource(tmp_path / "ct", allowed=[tmp_path / "gs"]), layers=[1])
    assert tc.config.activation == "jumprelu" and tc.config.input_transform == "rmsnorm"
    x = x_input()
    p = ref[1]
    torch.testing.assert_close(
        encode(tc, x, 1), ref_jumprelu_dm(ref_gemma_rms(x), p["W_enc"], p["b_enc"], p["threshold"]),
        rtol=1e-4, atol=1e-5,
    )


def test_gemma_scope_describe_reads_headers(tmp_path):
    write_gemma_scope(tmp_path, [0, 3], D, M)
    info = format_module("gemma_scope").describe(LocalSource(tmp_path))
    assert (info["layers"], info["d_model"], info["n_features"], info["dtype"]) == ([0, 3], D, M, "float32")


# ---------------------------------------------------------------------- Gemma Scope 2
def test_gemma_scope2_plt_features_sites_and_lazy_reads(tmp_path):
    ref = write_gemma_scope2_plt(tmp_path, [0, 1, 2], D, M, affine=True)
    src = RecordingSource(tmp_path)
    assert detect_format(src) == "gemma_scope2"
    tc = load_transcoder(src, layers=[2])
    assert sorted(src.fetched) == [
        "transcoder_all/layer_2_width_16k_l0_small/config.json",
        "transcoder_all/layer_2_width_16k_l0_small/params.safetensors",
    ]
    c = tc.config
    assert (c.input_site, c.output_site, c.model_name, c.span) == ("mlp_in", "mlp_out", "google/gemma-3-270m-pt", 1)
    x = x_input()
    p = ref[2]
    torch.testing.assert_close(
        encode(tc, x, 2), ref_jumprelu_dm(x, p["w_enc"], p["b_enc"], p["threshold"]), rtol=1e-4, atol=1e-5
    )
    tc = load_transcoder(src, layers=[0], decoders=True)
    enc = tc.encoder(0)
    torch.testing.assert_close(enc.W_dec[:, 0, :], ref[0]["w_dec"])
    # affine_skip_connection is applied as x @ affine; ours as x @ W_skip.T
    torch.testing.assert_close(x @ enc.W_skip.T, x @ ref[0]["affine_skip_connection"])


@pytest.mark.parametrize(
    "hook, site",
    [
        ("model.layers.{layer}.pre_feedforward_layernorm.input", "resid_mid"),
        ("model.layers.{layer}.input", "resid_pre"),
        ("model.layers.{layer}.output", "resid_post"),
        ("model.layers.{layer}.self_attn.o_proj.input", "model.layers.{layer}.self_attn.o_proj:input"),
    ],
)
def test_gemma_scope2_hook_points_map_to_sites(tmp_path, hook, site):
    write_gemma_scope2_plt(tmp_path, [3], D, M, hook_in=hook, folder="resid_post", variant="width_16k_l0_big")
    tc = load_transcoder(LocalSource(tmp_path / "resid_post/layer_3_width_16k_l0_big"))
    assert tc.layers == [3] and tc.config.input_site == site


def test_gemma_scope2_clt_slices_decoders_from_the_source_layer(tmp_path):
    ref = write_gemma_scope2_clt(tmp_path, 3, D, M)
    src = RecordingSource(tmp_path / "clt/width_262k_l0_medium")
    assert detect_format(src) == "gemma_scope2"
    tc = load_transcoder(src, layers=[1], decoders=True)
    assert sorted(src.fetched) == ["config.json", "params_layer_1.safetensors"]
    assert tc.config.n_layers == 3 and tc.config.span is None
    torch.testing.assert_close(tc.encoder(1).W_dec, ref[1]["w_dec"][:, 1:, :])
    x = x_input()
    p = ref[1]
    torch.testing.assert_close(
        encode(tc, x, 1), ref_jumprelu_dm(x, p["w_enc"], p["b_enc"], p["threshold"]), rtol=1e-4, atol=1e-5
    )


def test_circuit_tracer_clt_wrapper_listing_gemma_scope2_files(tmp_path):
    """A circuit-tracer CLT config whose ``transcoders:`` list points at Gemma Scope 2 CLT files."""
    ref = write_gemma_scope2_clt(tmp_path / "gs2", 3, D, M)
    wrapper = tmp_path / "wrapper"
    wrapper.mkdir()
    listed = [str(tmp_path / f"gs2/clt/width_262k_l0_medium/params_layer_{i}.safetensors") for i in range(3)]
    (wrapper / "config.yaml").write_text(yaml.safe_dump({
        "model_kind": "cross_layer_transcoder", "feature_input_hook": "mlp.hook_in",
        "feature_output_hook": "hook_mlp_out", "transcoders": listed,
    }))
    src = RecordingSource(wrapper, allowed=[tmp_path / "gs2"])
    tc = load_transcoder(src, layers=[2], decoders=True)
    assert tc.layers == [2] and tc.config.input_site == "mlp_in" and tc.config.n_layers == 3
    torch.testing.assert_close(tc.encoder(2).W_dec, ref[2]["w_dec"][:, 2:, :])
    x = x_input()
    p = ref[2]
    torch.testing.assert_close(
        encode(tc, x, 2), ref_jumprelu_dm(x, p["w_enc"], p["b_enc"], p["threshold"]), rtol=1e-4, atol=1e-5
    )


def test_gemma_scope2_two_variants_need_a_choice(tmp_path):
    write_gemma_scope2_plt(tmp_path, [0], D, M, variant="width_16k_l0_small")
    write_gemma_scope2_plt(tmp_path, [0], D, M, variant="width_16k_l0_big")
    with pytest.raises(TranscoderFormatError, match="variant"):
        load_transcoder(LocalSource(tmp_path))
    tc = format_module("gemma_scope2").load(
        LocalSource(tmp_path), None, False, variant="transcoder_all/width_16k_l0_big"
    )
    assert tc.layers == [0]


# ---------------------------------------------------------------------- sparsify / clt-training
def test_sparsify_sae_subtracts_b_dec_and_reads_the_module_output(tmp_path):
    ref = write_sparsify(tmp_path, ["layers.0", "layers.1"], D, M, k=5)
    src = RecordingSource(tmp_path)
    assert detect_format(src) == "sparsify"
    tc = load_transcoder(src, layers=[1])
    assert sorted(src.fetched) == ["layers.1/cfg.json", "layers.1/sae.safetensors"]
    assert (tc.config.input_site, tc.config.activation, tc.config.k) == ("resid_post", "topk", 5)
    x = x_input()
    p = ref["layers.1"]
    expected = ref_sparsify(x, p["encoder.weight"], p["encoder.bias"], 5, b_dec=p["b_dec"])
    torch.testing.assert_close(encode(tc, x, 1), expected, rtol=1e-4, atol=1e-5)


def test_sparsify_transcoder_reads_the_mlp_input_without_b_dec(tmp_path):
    ref = write_sparsify(tmp_path, ["layers.2.mlp", "layers.3.mlp"], D, M, k=4, transcode=True, skip=True)
    tc = load_transcoder(LocalSource(tmp_path), decoders=True)
    assert tc.layers == [2, 3]
    assert (tc.config.input_site, tc.config.output_site) == ("mlp_in", "mlp_out")
    x = x_input()
    p = ref["layers.3.mlp"]
    torch.testing.assert_close(
        encode(tc, x, 3), ref_sparsify(x, p["encoder.weight"], p["encoder.bias"], 4), rtol=1e-4, atol=1e-5
    )
    torch.testing.assert_close(tc.encoder(3).W_skip, p["W_skip"])


def test_sparsify_gpt2_names_and_several_templates(tmp_path):
    write_sparsify(tmp_path, ["h.0.mlp", "h.1.mlp", "h.0", "h.1"], D, M, transcode=True)
    with pytest.raises(TranscoderFormatError, match="h.{layer}.mlp"):
        load_transcoder(LocalSource(tmp_path))
    tc = format_module("sparsify").load(LocalSource(tmp_path), [1], False, variant="h.{layer}")
    assert tc.layers == [1] and tc.config.input_site == "resid_pre"


def test_clt_training_normalize_io_batchtopk_and_multi_target_decoders(tmp_path):
    ref = write_clt_training(tmp_path, [0, 1], D, M, n_targets=2, k=4, in_norm=3.0)
    tc = load_transcoder(LocalSource(tmp_path), layers=[0], decoders=True)
    assert (tc.config.activation, tc.config.k, tc.config.span) == ("topk", 4, 2)
    x = x_input()
    p = ref[0]
    expected = ref_sparsify(x, p["encoder.weight"], p["encoder.bias"], 4, in_norm=3.0)
    torch.testing.assert_close(encode(tc, x, 0), expected, rtol=1e-4, atol=1e-5)
    W = tc.encoder(0).W_dec
    assert W.shape == (M, 2, D)
    torch.testing.assert_close(W[:, 1, :], p["W_decs.1"] * p["post_enc_scales.1"][:, None])


def test_sparsify_coalesced_topk_and_groupmax_are_refused(tmp_path):
    write_clt_training(tmp_path, [0], D, M)
    cfg_path = tmp_path / "layers.0.mlp/cfg.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "coalesce_topk": "concat"}))
    with pytest.raises(TranscoderFormatError, match="coalesce_topk"):
        load_transcoder(LocalSource(tmp_path))
    cfg_path.write_text(json.dumps({**cfg, "activation": "groupmax"}))
    with pytest.raises(TranscoderFormatError, match="groupmax"):
        load_transcoder(LocalSource(tmp_path))


# ---------------------------------------------------------------------- SAELens
@pytest.mark.parametrize("architecture", ["standard", "jumprelu", "topk", "transcoder", "jumprelu_skip_transcoder"])
def test_saelens_architectures_match_the_saelens_formula(tmp_path, architecture):
    hook_out = "blocks.{layer}.hook_mlp_out" if "transcoder" in architecture else None
    hook = "blocks.{layer}.ln2.hook_normalized" if "transcoder" in architecture else "blocks.{layer}.hook_resid_pre"
    p = write_saelens(tmp_path, 4, D, M, architecture=architecture, hook=hook, hook_out=hook_out, k=5)
    src = LocalSource(tmp_path)
    assert detect_format(src) == "saelens"
    tc = load_transcoder(src, decoders=True)
    assert tc.layers == [4] and tc.config.model_name == "gpt2"
    x = x_input()
    if "transcoder" in architecture:
        assert (tc.config.input_site, tc.config.input_transform, tc.config.output_site) == (
            "resid_mid", "rmsnorm", "mlp_out")
        sae_in = ref_gemma_rms(x)
    else:
        assert tc.config.input_site == "resid_pre"
        sae_in = x - p["b_dec"]  # apply_b_dec_to_input defaults to true for SAEs
    z = sae_in @ p["W_enc"] + p["b_enc"]
    if architecture == "topk":
        expected = ref_saelens_topk(z, 5)
    elif "jumprelu" in architecture:
        expected = torch.relu(z) * (z > p["threshold"])
    else:
        expected = torch.relu(z)
    torch.testing.assert_close(encode(tc, x, 4), expected, rtol=1e-4, atol=1e-5)
    if "skip" in architecture:
        torch.testing.assert_close(tc.encoder(4).W_skip, p["W_skip"])


def test_saelens_topk_rescale_by_decoder_norm_is_folded(tmp_path):
    p = write_saelens(tmp_path, 2, D, M, architecture="topk", k=6, rescale_acts_by_decoder_norm=True,
                      apply_b_dec_to_input=False)
    tc = load_transcoder(LocalSource(tmp_path))
    x = x_input()
    z = (x @ p["W_enc"] + p["b_enc"]) * p["W_dec"].norm(dim=-1)
    torch.testing.assert_close(encode(tc, x, 2), ref_saelens_topk(z, 6), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("norm", ["constant_norm_rescale", "layer_norm", "expected_average_only_in"])
def test_saelens_normalize_activations(tmp_path, norm):
    p = write_saelens(tmp_path, 1, D, M, normalize_activations=norm)
    if norm == "expected_average_only_in":
        (tmp_path / "activation_scaler.json").write_text(json.dumps({"scaling_factor": 0.25}))
    tc = load_transcoder(LocalSource(tmp_path))
    x = x_input() + 0.5
    if norm == "constant_norm_rescale":
        sae_in = x * (D**0.5 / x.norm(dim=-1, keepdim=True))
    elif norm == "layer_norm":
        sae_in = ref_saelens_layer_norm(x)
    else:
        sae_in = x * 0.25
    expected = torch.relu((sae_in - p["b_dec"]) @ p["W_enc"] + p["b_enc"])
    torch.testing.assert_close(encode(tc, x, 1), expected, rtol=1e-4, atol=1e-4)


def test_saelens_pre6_config_and_a_folder_of_saes(tmp_path):
    refs = {
        layer: write_saelens(tmp_path, layer, D, M, architecture="topk", pre6=True, k=3,
                             folder=f"blocks.{layer}.hook_resid_post", hook="blocks.{layer}.hook_resid_post")
        for layer in (0, 5)
    }
    src = RecordingSource(tmp_path)
    tc = load_transcoder(src, layers=[5])
    weights = [f for f in src.fetched if f.endswith(".safetensors")]
    assert weights == ["blocks.5.hook_resid_post/sae_weights.safetensors"]
    assert (tc.config.activation, tc.config.k, tc.config.input_site) == ("topk", 3, "resid_post")
    x = x_input()
    p = refs[5]
    z = (x - p["b_dec"]) @ p["W_enc"] + p["b_enc"]  # pre-6.0 default: apply_b_dec_to_input true
    torch.testing.assert_close(encode(tc, x, 5), ref_saelens_topk(z, 3), rtol=1e-4, atol=1e-5)


def test_saelens_hf_hook_name_wins(tmp_path):
    write_saelens(tmp_path, 3, D, M, hf_hook_name="model.layers.{layer}.pre_feedforward_layernorm.output")
    assert load_transcoder(LocalSource(tmp_path)).config.input_site == "mlp_in"


def test_saelens_gated_is_refused(tmp_path):
    write_saelens(tmp_path, 0, D, M)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    (tmp_path / "cfg.json").write_text(json.dumps({**cfg, "architecture": "gated"}))
    with pytest.raises(TranscoderFormatError, match="gated"):
        load_transcoder(LocalSource(tmp_path))


# ---------------------------------------------------------------------- vlm-clt-training
def test_vlm_clt_layernorm_encoder_bf16_and_orig_mod_prefix(tmp_path):
    ref = write_vlm_clt(tmp_path, [0, 1, 2], D, M, n_targets=2)
    src = RecordingSource(tmp_path)
    assert detect_format(src) == "vlm_clt"
    tc = load_transcoder(src, layers=[2], decoders=True)
    assert src.fetched == ["transcoder_L2.pt"]
    c = tc.config
    assert (c.input_site, c.input_transform, c.dtype, c.span) == ("mlp_in", "layernorm", "bfloat16", 2)
    assert tc.encoder(2).W_enc.dtype == torch.bfloat16
    torch.testing.assert_close(tc.encoder(2).W_dec[:, 1, :], ref[2]["dec.weight"][D:, :].T)
    tc = tc.to(torch.float32)
    x = x_input()
    torch.testing.assert_close(encode(tc, x, 2), ref_vlm(x, ref[2]), rtol=1e-4, atol=1e-4)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_vlm_clt_pickle_that_needs_code_is_refused(tmp_path, capsys):
    class Evil:
        def __reduce__(self):
            return (print, ("this must never run",))

    with open(tmp_path / "transcoder_L0.pt", "wb") as fh:
        pickle.dump({"state_dict": {}, "payload": Evil()}, fh)
    torch.save({"state_dict": {}, "payload": Evil()}, tmp_path / "transcoder_L1.pt")
    for layer in (0, 1):
        with pytest.raises(TranscoderFormatError, match=rf"transcoder_L{layer}.pt: refused by torch.load"):
            load_transcoder(LocalSource(tmp_path), layers=[layer])
    assert "must never run" not in capsys.readouterr().out


# ---------------------------------------------------------------------- override and bad files
WRITERS = one_layer_writers(D, M)


@pytest.mark.parametrize("fmt", sorted(WRITERS))
def test_explicit_format_override_and_wrong_override(tmp_path, fmt):
    WRITERS[fmt](tmp_path)
    src = LocalSource(tmp_path)
    assert detect_format(src) == fmt
    assert load_transcoder(src, format=fmt).config.source_format == fmt
    other = "saelens" if fmt != "saelens" else "sparsify"
    with pytest.raises(TranscoderFormatError):
        load_transcoder(src, format=other)


def _weights_file(root: Path) -> Path:
    return next(p for p in sorted(root.rglob("*")) if p.suffix in (".npz", ".safetensors", ".pt"))


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("fmt", sorted(WRITERS))
def test_truncated_file_is_a_format_error(tmp_path, fmt):
    WRITERS[fmt](tmp_path)
    f = _weights_file(tmp_path)
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(TranscoderFormatError, match=f.name):
        load_transcoder(LocalSource(tmp_path))


# (format, tensor to drop or reshape, file writer of the modified tensors)
ENCODER_TENSOR = {"gemma_scope": "W_enc", "gemma_scope2": "w_enc", "sparsify": "encoder.weight",
                  "saelens": "W_enc", "vlm_clt": "enc.1.weight"}


def _rewrite(path: Path, fmt: str, edit) -> None:
    if fmt == "gemma_scope":
        arrays = dict(np.load(path))
        edit(arrays)
        np.savez(path, **arrays)
    elif fmt == "vlm_clt":
        ckpt = torch.load(path, weights_only=True)
        sd = {k.removeprefix("_orig_mod."): v for k, v in ckpt["state_dict"].items()}
        edit(sd)
        torch.save({**ckpt, "state_dict": sd}, path)
    else:
        from safetensors.torch import load_file

        tensors = load_file(str(path))
        edit(tensors)
        save_file(tensors, str(path))


@pytest.mark.parametrize("fmt", sorted(WRITERS))
def test_missing_tensor_names_the_tensor(tmp_path, fmt):
    WRITERS[fmt](tmp_path)
    name = ENCODER_TENSOR[fmt]
    _rewrite(_weights_file(tmp_path), fmt, lambda d: d.pop(name))
    with pytest.raises(TranscoderFormatError, match=f"missing (tensor|array) '{name}'"):
        load_transcoder(LocalSource(tmp_path))


@pytest.mark.parametrize("fmt", sorted(WRITERS))
def test_wrong_shape_names_tensor_and_shape(tmp_path, fmt):
    WRITERS[fmt](tmp_path)
    bias = {"gemma_scope": "b_enc", "gemma_scope2": "b_enc", "sparsify": "encoder.bias",
            "saelens": "b_enc", "vlm_clt": "enc.1.bias"}[fmt]

    def edit(d):
        d[bias] = d[bias][: M - 1]

    _rewrite(_weights_file(tmp_path), fmt, edit)
    with pytest.raises(TranscoderFormatError, match=rf"'{bias}' has shape \[{M - 1}\]"):
        load_transcoder(LocalSource(tmp_path))


def test_describe_of_every_format_reads_sizes(tmp_path):
    for fmt, write in WRITERS.items():
        write(tmp_path / fmt)
        info = format_module(fmt).describe(LocalSource(tmp_path / fmt))
        assert (info["format"], info["layers"], info["d_model"], info["n_features"]) == (fmt, [0], D, M), info


def test_requested_layer_that_is_absent_names_the_available_ones(tmp_path):
    write_sparsify(tmp_path, ["layers.0.mlp", "layers.1.mlp"], D, M, transcode=True)
    with pytest.raises(TranscoderFormatError, match=r"layers \[5\].*\[0, 1\]"):
        load_transcoder(LocalSource(tmp_path), layers=[5])


def test_math_helpers_agree():
    # sanity: the layer_norm reference differs from torch's LayerNorm only by the sqrt((d-1)/d) factor
    x = x_input()
    ratio = ref_saelens_layer_norm(x, 0) / F.layer_norm(x, (D,), eps=0)
    torch.testing.assert_close(ratio, torch.full_like(ratio, math.sqrt((D - 1) / D)))


def _write_circuit_tracer_plt(root: Path, n_layers: int = 2, m: int = 40, seed: int = 3) -> dict[int, dict]:
    """A circuit-tracer transcoder_set whose config.yaml says nothing about the activation (like crv-8b)."""
    g = torch.Generator().manual_seed(seed)
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.yaml").write_text(yaml.safe_dump({
        "model_kind": "transcoder_set", "feature_input_hook": "mlp.hook_in", "feature_output_hook": "mlp.hook_out",
    }))
    params = {}
    for layer in range(n_layers):
        params[layer] = {
            "W_enc": torch.randn(m, D, generator=g) / math.sqrt(D), "b_enc": torch.randn(m, generator=g) * 0.1,
            "W_dec": torch.randn(m, D, generator=g), "b_dec": torch.zeros(D),
        }
        save_file(params[layer], str(root / f"layer_{layer}.safetensors"))
    return params


def test_registry_activation_hint_gives_the_authors_topk(tmp_path):
    """crv-8b style: the files imply ReLU, the registry (like circuit-tracer) says TopK k; the registry wins."""
    params = _write_circuit_tracer_plt(tmp_path / "plt")
    src = LocalSource(tmp_path / "plt")
    assert load_transcoder(src).config.activation == "relu"
    src.activation_hint = {"activation": "topk", "k": 5}
    with pytest.warns(UserWarning, match="registry's activation 'topk'"):
        tc = load_transcoder(src)
    assert (tc.config.activation, tc.config.k) == ("topk", 5)
    x = x_input()
    z = x.double() @ params[1]["W_enc"].double().T + params[1]["b_enc"].double()
    kth = z.sort(-1, descending=True).values[:, 4:5]
    ref = torch.where((z >= kth) & (z > 0), z, torch.zeros_like(z))
    values, indices, l0 = tc.encode_sparse(x, 1, 8)
    assert torch.equal(l0, (ref > 0).sum(-1).int())
    torch.testing.assert_close(values[:, :5].double(), ref.sort(-1, descending=True).values[:, :5], atol=1e-5, rtol=0)
    assert torch.all(indices[:, 5:] == -1)


def test_registry_jumprelu_hint_without_thresholds_is_named(tmp_path):
    _write_circuit_tracer_plt(tmp_path / "plt")
    src = LocalSource(tmp_path / "plt")
    src.activation_hint = {"activation": "jumprelu"}
    with pytest.raises(TranscoderFormatError, match="registry says activation 'jumprelu'.*no threshold"):
        load_transcoder(src)


def test_registry_entries_carry_their_activation_hint():
    from sparse_clt_hf.hub import open_source

    assert open_source("crv-8b-instruct-transcoders").activation_hint == {"activation": "topk", "k": 128}
    assert open_source("clt-llama-3.2-1b-524k").activation_hint == {"activation": "jumprelu"}


def test_describe_reports_the_registry_activation(tmp_path):
    from sparse_clt_hf.hub import describe

    _write_circuit_tracer_plt(tmp_path / "plt")
    src = LocalSource(tmp_path / "plt")
    assert describe(src).activation == "relu"
    src.activation_hint = {"activation": "topk", "k": 128}
    desc = describe(src)
    assert (desc.activation, desc.k) == ("topk", 128) and any("registry" in n for n in desc.notes)
