"""Loading reliability: what a reference, a config or a weight file may not do, and the error each gives.

Config paths stay inside their folder or repo; ``format=`` is checked against the files; integer, boolean
and non-finite tensors, missing listed layers and lying npz headers are refused naming file and tensor;
references are checked before the filesystem is touched; features files are checked on load; loading
never runs pickled code; ``ln2.hook_normalized`` follows the model's norm.
"""

from __future__ import annotations

import json
import pickle
import time
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import random_transcoder
from format_fixtures import (
    write_gemma_scope,
    write_gemma_scope2_clt,
    write_gemma_scope2_plt,
    write_saelens,
    write_sparsify,
    write_vlm_clt,
)
from safetensors.torch import load_file, save_file

from sparse_clt_hf import Features, FeaturesFileError, TranscoderFormatError
from sparse_clt_hf.formats import describe, read_encoders
from sparse_clt_hf.io import sources
from sparse_clt_hf.io.refs import resolve
from sparse_clt_hf.io.sources import HubSource, LocalSource
from sparse_clt_hf.loading import load_for_model, load_transcoder

D, M = 16, 24

WRITERS = {
    "circuit_tracer": lambda p: random_transcoder(d=D, layers=(0,), widths=[M], span=1).save_pretrained(p),
    "gemma_scope": lambda p: write_gemma_scope(p, [0], D, M),
    "gemma_scope2": lambda p: write_gemma_scope2_plt(p, [0], D, M),
    "sparsify": lambda p: write_sparsify(p, ["layers.0"], D, M),
    "saelens": lambda p: write_saelens(p, 0, D, M),
    "vlm_clt": lambda p: write_vlm_clt(p, [0], D, M),
}


def weights_file(root: Path) -> Path:
    return next(p for p in sorted(root.rglob("*")) if p.suffix in (".npz", ".safetensors", ".pt"))


# ---------------------------------------------------------------------- config paths stay inside
def _plt_pointing_at(folder: Path, uris: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(yaml.safe_dump({
        "model_kind": "transcoder_set", "feature_input_hook": "hook_resid_mid",
        "feature_output_hook": "hook_mlp_out", "transcoders": uris,
    }))


def test_local_config_may_not_leave_its_folder_unless_the_caller_allows_it(tmp_path):
    random_transcoder(d=D, layers=(0,), widths=[M], span=1).save_pretrained(tmp_path / "outside")
    target = tmp_path / "outside/layer_0.safetensors"
    for uri in (str(target), "../outside/layer_0.safetensors", "sub/../../outside/layer_0.safetensors"):
        _plt_pointing_at(tmp_path / "ct", [uri])
        with pytest.raises(TranscoderFormatError, match=r"ct: the config names .*outside this folder"):
            load_transcoder(LocalSource(tmp_path / "ct"))
        with pytest.raises(TranscoderFormatError, match="outside this folder"):
            describe(LocalSource(tmp_path / "ct"))
        tc = load_transcoder(LocalSource(tmp_path / "ct", allowed=[tmp_path / "outside"]))
        assert tc.encoder(0).W_enc.shape == (M, D)
    # a sibling folder that merely shares the allowed prefix is still outside
    random_transcoder(d=D, layers=(0,), widths=[M], span=1).save_pretrained(tmp_path / "outside2")
    _plt_pointing_at(tmp_path / "ct", [str(tmp_path / "outside2/layer_0.safetensors")])
    with pytest.raises(TranscoderFormatError, match="outside this folder"):
        load_transcoder(LocalSource(tmp_path / "ct", allowed=[tmp_path / "outside"]))


def test_local_config_paths_inside_the_folder_load(tmp_path):
    ref = random_transcoder(d=D, layers=(0, 1), widths=[M, M], span=1, seed=4)
    ref.save_pretrained(tmp_path / "ct/files")
    _plt_pointing_at(tmp_path / "ct", ["files/layer_0.safetensors", "./files/../files/layer_1.safetensors"])
    tc = load_transcoder(LocalSource(tmp_path / "ct"))
    for layer in (0, 1):
        assert torch.equal(tc.encoder(layer).W_enc, ref.encoder(layer).W_enc)


@pytest.mark.parametrize("uri", ["/etc/passwd", "../../x.safetensors", "a/../../../x.safetensors",
                                 "file:///etc/passwd", "https://example.com/x", "a\\..\\..\\x", "a/\x00b"])
def test_hub_config_may_name_only_files_of_its_repo(uri):
    src = HubSource("org/repo", "tc")
    with pytest.raises(TranscoderFormatError, match="may only name files of the same repo or hf:// URIs"):
        src.resolve_uri(uri)


def test_hub_config_relative_paths_resolve_inside_the_repo():
    src = HubSource("org/repo", "tc/plt")
    other, name = src.resolve_uri("../other/./layer_0.safetensors")
    assert (other.repo.repo_id, other.subfolder, name) == ("org/repo", "tc/other", "layer_0.safetensors")
    same, name = src.resolve_uri("layer_1.safetensors")
    assert (same.subfolder, name) == ("tc/plt", "layer_1.safetensors") and same.repo is src.repo
    linked, name = src.resolve_uri("hf://other/repo/a/b.safetensors?revision=abc")
    assert (linked.repo.repo_id, linked.repo.revision, linked.subfolder, name) == (
        "other/repo", "abc", "a", "b.safetensors")


# ---------------------------------------------------------------------- format= that does not match
@pytest.mark.parametrize("written", sorted(WRITERS))
def test_format_that_does_not_match_the_files_names_both(tmp_path, written):
    WRITERS[written](tmp_path)
    for fmt in sorted(set(WRITERS) - {written}):
        pattern = rf"format='{fmt}' .* does not match its files \[.*\]; the files look like format '{written}'"
        with pytest.raises(TranscoderFormatError, match=pattern):
            load_transcoder(LocalSource(tmp_path), format=fmt)
        with pytest.raises(TranscoderFormatError, match=pattern):
            describe(LocalSource(tmp_path), format=fmt)
    with pytest.raises(TranscoderFormatError, match="unknown format 'nope'"):
        load_transcoder(LocalSource(tmp_path), format="nope")


# ---------------------------------------------------------------------- tensors: dtype and values
def _edit_tensors(path: Path, edit) -> None:
    if path.suffix == ".npz":
        arrays = dict(np.load(path))
        edit(arrays)
        np.savez(path, **arrays)
    elif path.suffix == ".pt":
        ckpt = torch.load(path, weights_only=True)
        sd = dict(ckpt["state_dict"])
        edit(sd)
        torch.save({**ckpt, "state_dict": sd}, path)
    else:
        tensors = load_file(str(path))
        edit(tensors)
        save_file(tensors, str(path))


BIAS = {"circuit_tracer": "b_enc", "gemma_scope": "b_enc", "gemma_scope2": "b_enc", "sparsify": "encoder.bias",
        "saelens": "b_enc", "vlm_clt": "_orig_mod.enc.1.bias"}


@pytest.mark.parametrize("fmt", sorted(WRITERS))
@pytest.mark.parametrize("bad", ["int32", "bool", "nan", "inf"])
def test_integer_boolean_and_non_finite_tensors_are_refused(tmp_path, fmt, bad):
    WRITERS[fmt](tmp_path)
    path, name = weights_file(tmp_path), BIAS[fmt]

    def edit(d):
        v = d[name]
        if bad in ("int32", "bool"):
            d[name] = v.astype(bad) if isinstance(v, np.ndarray) else v.to(getattr(torch, bad))
        else:
            v = v.copy() if isinstance(v, np.ndarray) else v.clone()
            v[3] = float(bad)
            d[name] = v

    _edit_tensors(path, edit)
    short = name.removeprefix("_orig_mod.")
    expected = "holds 1 non-finite values" if bad in ("nan", "inf") else f"dtype {bad}.*floating-point"
    with pytest.raises(TranscoderFormatError, match=rf"{path.name}: (tensor|array) '{short}' .*{expected}"):
        load_transcoder(LocalSource(tmp_path))


def test_nan_in_a_large_encoder_is_found_in_any_chunk(tmp_path, monkeypatch):
    from sparse_clt_hf.formats import checks

    monkeypatch.setattr(checks, "CHUNK", 100)  # many chunks; the NaN sits in a late one
    tc = random_transcoder(d=D, layers=(0,), widths=[M], span=1)
    tc.encoder(0).W_enc.data[M - 1, D - 2] = float("nan")
    tc.save_pretrained(tmp_path)
    with pytest.raises(TranscoderFormatError, match=rf"'W_enc' holds non-finite values \(first nan at \[{M - 1}, "):
        load_transcoder(tmp_path)


# ---------------------------------------------------------------------- layers the config lists
def test_missing_layer_listed_by_the_config_is_an_error_unless_excluded(tmp_path):
    for span, stem in ((1, "layer_{}"), (None, "W_enc_{}")):
        folder = tmp_path / f"span{span}"
        random_transcoder(d=D, layers=(0, 1, 2), span=span).save_pretrained(folder)
        (folder / (stem.format(1) + ".safetensors")).unlink()
        with pytest.raises(TranscoderFormatError, match=r"layers \[1\] are listed by the config .*missing.*layers="):
            load_transcoder(folder)
        with pytest.raises(TranscoderFormatError, match=r"layers \[1\] are listed"):
            describe(folder)
        assert load_transcoder(folder, layers=[0, 2]).layers == [0, 2]
        with pytest.raises(TranscoderFormatError, match=r"no weights for layers \[1\]"):
            load_transcoder(folder, layers=[1])


def test_circuit_tracer_clt_without_a_layer_list_may_not_skip_a_layer(tmp_path):
    random_transcoder(d=D, layers=(0, 1, 2)).save_pretrained(tmp_path)
    cfg = yaml.safe_load((tmp_path / "config.yaml").read_text())
    keep = ("model_name", "model_kind", "feature_input_hook", "feature_output_hook")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({k: cfg[k] for k in keep}))  # as circuit-tracer writes
    (tmp_path / "W_enc_1.safetensors").unlink()
    with pytest.raises(TranscoderFormatError, match=r"layers \[1\] are listed"):
        load_transcoder(tmp_path)


def test_gemma_scope2_clt_with_a_missing_layer_file(tmp_path):
    write_gemma_scope2_clt(tmp_path, 3, D, M)
    (tmp_path / "clt/width_262k_l0_medium/params_layer_1.safetensors").unlink()
    src = LocalSource(tmp_path / "clt/width_262k_l0_medium")
    with pytest.raises(TranscoderFormatError, match=r"layers \[1\] are listed"):
        load_transcoder(src)
    assert load_transcoder(src, layers=[2]).config.n_layers == 3


def test_sparsify_hookpoint_listed_by_the_run_config_without_its_folder(tmp_path):
    write_sparsify(tmp_path, ["layers.0.mlp", "layers.2.mlp"], D, M, transcode=True)
    (tmp_path / "config.json").write_text(json.dumps({"model": "m", "hookpoints": [
        "layers.0.mlp", "layers.1.mlp", "layers.2.mlp", "layers.*.attn"]}))
    with pytest.raises(TranscoderFormatError, match=r"layers \[1\] are listed by the config"):
        load_transcoder(tmp_path)
    assert load_transcoder(tmp_path, layers=[0, 2]).layers == [0, 2]


# ---------------------------------------------------------------------- npz files
def _npz_with_header(path: Path, name: str, shape: tuple[int, ...], data: bytes, dtype: str = "<f4") -> None:
    header = {"descr": dtype, "fortran_order": False, "shape": shape}
    with zipfile.ZipFile(path, "w") as zf, zf.open(f"{name}.npy", "w") as fh:
        np.lib.format.write_array_header_1_0(fh, header)
        fh.write(data)


def test_npz_header_claiming_a_huge_shape_is_refused_before_allocating(tmp_path):
    folder = tmp_path / "layer_0/width_16k/average_l0_50"
    write_gemma_scope(tmp_path, [0], D, M)
    _npz_with_header(folder / "params.npz", "W_enc", (1 << 20, 1 << 20), b"\0" * 64)
    tracemalloc.start()
    start = time.perf_counter()
    with pytest.raises(TranscoderFormatError, match=r"params.npz: array 'W_enc' claims shape \[1048576, 1048576\]"):
        load_transcoder(LocalSource(tmp_path))
    with pytest.raises(TranscoderFormatError, match="claims shape"):
        describe(LocalSource(tmp_path))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 20 << 20 and time.perf_counter() - start < 5


def test_npz_with_pickled_objects_never_runs_them(tmp_path, capsys):
    class Evil:
        def __reduce__(self):
            return (print, ("this must never run",))

    write_gemma_scope(tmp_path, [0], D, M)
    path = tmp_path / "layer_0/width_16k/average_l0_50/params.npz"
    arrays = dict(np.load(path))
    arrays["W_enc"] = np.array([Evil()], dtype=object)
    np.savez(path, **arrays)
    with pytest.raises(TranscoderFormatError, match="array 'W_enc' holds Python objects .*never unpickles"):
        load_transcoder(LocalSource(tmp_path))
    assert "must never run" not in capsys.readouterr().out


def test_npz_fortran_order_and_big_endian_arrays_load_as_written(tmp_path):
    ref = write_gemma_scope(tmp_path, [0], D, M)
    path = tmp_path / "layer_0/width_16k/average_l0_50/params.npz"
    arrays = {k: v.astype(np.float32) for k, v in ref[0].items()}
    np.savez(path, **{**arrays, "W_enc": np.asfortranarray(arrays["W_enc"]), "b_enc": arrays["b_enc"].astype(">f4")})
    tc = load_transcoder(LocalSource(tmp_path))
    assert torch.equal(tc.encoder(0).W_enc, torch.from_numpy(arrays["W_enc"].T.copy()))
    assert torch.equal(tc.encoder(0).b_enc, torch.from_numpy(arrays["b_enc"]))


# ---------------------------------------------------------------------- references
@pytest.mark.parametrize("ref,message", [
    ("", "empty transcoder reference"),
    ("   ", "empty transcoder reference"),
    ("/", "filesystem root"),
    ("a" * 5000, "5000 characters"),
    ("org/repo\x00x", "control character"),
    ("bad\nref", "control character"),
    ("/" + "a" * 300 + "/b", "cannot be read as a folder|is not a folder"),
    ("org/" + "r" * 200, "at most 96 characters"),
])
def test_bad_references_are_refused_at_once(ref, message):
    start = time.perf_counter()
    for call in (resolve, load_transcoder, describe):
        with pytest.raises(TranscoderFormatError, match=message):
            call(ref)
    assert time.perf_counter() - start < 2


def test_unreadable_path_is_a_library_error(tmp_path, monkeypatch):
    real = Path.is_dir

    def is_dir(self):
        if "locked" in str(self):
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "is_dir", is_dir)
    with pytest.raises(TranscoderFormatError, match="cannot be read as a folder .*PermissionError"):
        load_transcoder(str(tmp_path / "locked/tc"))


def test_folder_with_too_many_files_is_refused_after_a_bounded_scan(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "MAX_LOCAL_FILES", 50)
    for i in range(60):
        (tmp_path / f"f{i}.txt").write_text("x")
    with pytest.raises(TranscoderFormatError, match="more than 50 files: not a transcoder folder"):
        load_transcoder(tmp_path)


# ---------------------------------------------------------------------- binary and malformed configs
@pytest.mark.parametrize("fmt,config", [("circuit_tracer", "config.yaml"), ("sparsify", "layers.0/cfg.json"),
                                        ("saelens", "cfg.json"), ("gemma_scope2", None)])
@pytest.mark.parametrize("content", [b"\xff\xfe\x00\x01binary", b"\x89PNG\r\n\x1a\n\0\0", b"k: [1, 2"])
def test_binary_or_broken_config_names_the_file(tmp_path, fmt, config, content):
    WRITERS[fmt](tmp_path)
    path = tmp_path / config if config else next(tmp_path.rglob("config.json"))
    path.write_bytes(content)
    name = path.relative_to(tmp_path).as_posix()
    with pytest.raises(TranscoderFormatError, match=rf"{name}"):
        load_transcoder(LocalSource(tmp_path), format=fmt)


@pytest.mark.parametrize("key,value,message", [
    ("k", "many", r"'k' is 'many'; expected an integer"),
    ("k", -3, r"'k' is -3; expected an integer >= 1"),
    ("transcoders", 5, r"'transcoders' is 5; expected a list"),
    ("input_scale", [1, 2], r"'input_scale' is \[1, 2\]; expected a mapping"),
    ("metrics", "none", r"'metrics' is 'none'; expected a mapping"),
    ("input_norm_eps", -1.0, r"'input_norm_eps' is -1.0; expected a number >= 0"),
    ("feature_input_hook", ["a"], r"'feature_input_hook' is \['a'\]; expected a string"),
    ("feature_input_hook", "blocks.0.nowhere", r"feature_input_hook: unknown TransformerLens hook"),
    ("model_kind", "other", r"format='circuit_tracer' .* does not match its files"),
    ("layers", ["x"], r"'layers'\[0\] is 'x'; expected an integer"),
])
def test_malformed_config_values_name_file_key_and_value(tmp_path, key, value, message):
    random_transcoder(d=D, layers=(0, 1), span=1).save_pretrained(tmp_path)
    cfg = yaml.safe_load((tmp_path / "config.yaml").read_text())
    cfg.pop("hook_site") if key == "feature_input_hook" else None
    cfg.pop("input_transform") if key == "feature_input_hook" else None
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({**cfg, key: value}))
    with pytest.raises(TranscoderFormatError, match=rf"{tmp_path}.*{message}"):
        load_transcoder(LocalSource(tmp_path), format="circuit_tracer")


# ---------------------------------------------------------------------- features files
def _features(tmp_path: Path) -> tuple[Features, Path]:
    g = torch.Generator().manual_seed(0)
    f = Features(
        torch.randint(0, 10, (2, 3, 2, 4), generator=g, dtype=torch.int32), torch.rand(2, 3, 2, 4, generator=g),
        torch.randint(0, 9, (2, 3, 2), generator=g, dtype=torch.int32), torch.ones(2, 3, dtype=torch.bool),
        [0, 5], torch.randint(0, 50, (2, 3), generator=g), [10, 12],
    )
    f.save(tmp_path / "f.safetensors")
    return f, tmp_path / "f.safetensors"


def _resave(path: Path, tensors: dict | None = None, **meta: str) -> None:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        old_meta, old = fh.metadata(), {k: fh.get_tensor(k) for k in fh.keys()}
    save_file(tensors if tensors is not None else old, str(path), metadata={**old_meta, **meta})


def test_features_round_trip(tmp_path):
    f, path = _features(tmp_path)
    g = Features.load(path)
    assert torch.equal(g.indices, f.indices) and torch.equal(g.values, f.values) and g.layers == [0, 5]
    assert g.n_features == [10, 12] and torch.equal(g.token_ids, f.token_ids)


@pytest.mark.parametrize("damage,message", [
    ("missing", "not a readable features file"),
    ("truncated", "not a readable features file"),
    ("garbage", "not a readable features file"),
    ("layers_json", "metadata is not valid JSON"),
    ("layers_type", "metadata 'layers' is"),
    ("layers_count", r"'indices' has shape \[2, 3, 2, 4\]; expected \[batch, positions, 3, k\]"),
    ("widths", "metadata 'n_features'"),
    ("no_values", r"missing tensors \['values'\]"),
    ("values_int", r"'values' is torch.int32 of shape"),
    ("mask_shape", r"'mask' is bool of shape \[2, 2\]; expected bool of shape \[2, 3\]"),
    ("ids_past_width", "feature ids reach past the widths"),
    ("ids_below", "'indices' holds -7"),
])
def test_bad_features_files_are_refused_naming_the_file(tmp_path, damage, message):
    f, path = _features(tmp_path)
    t = {"indices": f.indices, "values": f.values, "l0": f.l0, "mask": f.mask}
    if damage == "missing":
        path = tmp_path / "nope.safetensors"
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:-20])
    elif damage == "garbage":
        path.write_bytes(b"\xff" * 100)
    elif damage == "layers_json":
        _resave(path, layers="[0,")
    elif damage == "layers_type":
        _resave(path, layers='{"a": 1}')
    elif damage == "layers_count":
        _resave(path, layers="[0, 5, 6]", n_features="null")
    elif damage == "widths":
        _resave(path, n_features="[10]")
    elif damage == "no_values":
        _resave(path, {k: v for k, v in t.items() if k != "values"})
    elif damage == "values_int":
        _resave(path, {**t, "values": f.indices.clone()})
    elif damage == "mask_shape":
        _resave(path, {**t, "mask": f.mask[:, :2].contiguous()})
    elif damage == "ids_past_width":
        _resave(path, {**t, "indices": f.indices + 20})
    elif damage == "ids_below":
        _resave(path, {**t, "indices": f.indices - 7 - f.indices})
    with pytest.raises(FeaturesFileError, match=message) as info:
        Features.load(path)
    assert str(path) in str(info.value)


# ---------------------------------------------------------------------- no code runs on load
def test_torch_pickle_with_a_malicious_reduce_is_refused(tmp_path, capsys):
    class Evil:
        def __reduce__(self):
            return (print, ("this must never run",))

    write_vlm_clt(tmp_path, [0], D, M)
    ckpt = torch.load(tmp_path / "transcoder_L0.pt", weights_only=True)
    torch.save({**ckpt, "extra": Evil()}, tmp_path / "transcoder_L0.pt")
    with open(tmp_path / "transcoder_L1.pt", "wb") as fh:  # a plain (non-zip) pickle too
        pickle.dump({**ckpt, "layer": 1, "extra": Evil()}, fh)
    for layer in (0, 1):
        with pytest.raises(TranscoderFormatError, match="refused by torch.load.*never runs pickled code"):
            load_transcoder(LocalSource(tmp_path), layers=[layer])
        with pytest.raises(TranscoderFormatError, match="refused by torch.load"):
            describe(LocalSource(tmp_path), layers=[layer])
    assert "must never run" not in capsys.readouterr().out


def test_no_loader_can_execute_code():
    """Every reader in the package: yaml.safe_load only, np.load never (npz read by hand, objects refused),
    torch.load only with weights_only=True, no trust_remote_code, no pickle/marshal/eval."""
    import re

    package = Path(__file__).resolve().parent.parent / "sparse_clt_hf"
    for path in package.rglob("*.py"):
        text = path.read_text()
        assert not re.search(r"yaml\.(load|unsafe_load|full_load)\(", text), path
        assert not re.search(r"\bnp\.load\(|numpy\.load\(", text), path
        assert not re.search(r"pickle\.loads?\(|marshal\.loads?\(|(?<![.\w])eval\(|(?<![.\w])exec\(", text), path
        assert "trust_remote_code=True" not in text, path
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, (path, call)


# ---------------------------------------------------------------------- ln2.hook_normalized follows the norm
def _ln2_plt(root: Path, hook: str = "ln2.hook_normalized", **extra) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.yaml").write_text(yaml.safe_dump({
        "model_kind": "transcoder_set", "feature_input_hook": hook, "feature_output_hook": "hook_mlp_out", **extra,
    }))
    t = {"W_enc": torch.randn(M, 32, generator=g), "b_enc": torch.randn(M, generator=g) * 0.1,
         "W_dec": torch.randn(M, 32, generator=g), "b_dec": torch.zeros(32)}
    for layer in (0, 1):
        save_file(t, str(root / f"layer_{layer}.safetensors"))
    return t


def test_ln2_hook_normalized_is_provisional_without_a_model(tmp_path):
    _ln2_plt(tmp_path)
    tc = load_transcoder(tmp_path)
    assert (tc.config.input_transform, tc.config.input_norm_eps) == ("rmsnorm", 1e-6)
    assert tc.config.extra["input_transform_depends_on_model_norm"] is True
    assert any("provisional" in n for n in describe(tmp_path).notes)


@pytest.mark.parametrize("arch,transform,eps", [("gpt2", "layernorm", 1e-5), ("opt", "layernorm", 1e-5),
                                                ("gpt_neox", "layernorm", 1e-5), ("llama", "rmsnorm", 1e-6),
                                                ("gemma2", "rmsnorm", 1e-6)])
def test_ln2_hook_normalized_follows_the_models_norm(tmp_path, arch, transform, eps):
    from tiny_models import tiny_model

    t = _ln2_plt(tmp_path)
    model = tiny_model(arch)
    tc = load_for_model(tmp_path, model)
    assert (tc.config.input_site, tc.config.input_transform, tc.config.input_norm_eps) == ("resid_mid", transform, eps)
    assert "input_transform_depends_on_model_norm" not in tc.config.extra
    x = torch.randn(7, 32, generator=torch.Generator().manual_seed(1)) * 3 + 0.5
    if transform == "layernorm":  # TransformerLens LayerNormPre: centre, then divide by sqrt(mean square + eps)
        c = x.double() - x.double().mean(-1, keepdim=True)
        xn = c / torch.sqrt(c.pow(2).mean(-1, keepdim=True) + eps)
    else:  # RMSNormPre
        xn = x.double() / torch.sqrt(x.double().pow(2).mean(-1, keepdim=True) + eps)
    expected = torch.relu(xn @ t["W_enc"].double().T + t["b_enc"].double())
    torch.testing.assert_close(tc.encode(x, 1).double(), expected, atol=1e-5, rtol=1e-5)


def test_an_explicit_input_transform_is_kept(tmp_path):
    from tiny_models import tiny_model

    _ln2_plt(tmp_path, input_transform="rmsnorm")
    assert load_for_model(tmp_path, tiny_model("gpt2")).config.input_transform == "rmsnorm"
    _ln2_plt(tmp_path / "mid", hook="hook_resid_mid")
    assert load_for_model(tmp_path / "mid", tiny_model("gpt2")).config.input_transform == "none"


def test_read_encoders_rejects_bad_layer_arguments(tmp_path):
    random_transcoder(d=D, layers=(0, 1), span=1).save_pretrained(tmp_path)
    for layers in ("01", [0, "1"], [-1], [True]):
        with pytest.raises(TranscoderFormatError, match="layers must be"):
            read_encoders(tmp_path, layers=layers)


def test_sanity_reference_layer_norm_is_torch_layer_norm():
    x = torch.randn(4, 32, dtype=torch.float64)
    c = x - x.mean(-1, keepdim=True)
    torch.testing.assert_close(c / torch.sqrt(c.pow(2).mean(-1, keepdim=True) + 1e-5), F.layer_norm(x, (32,), eps=1e-5))


def test_json_config_with_a_bom_reads(tmp_path):
    write_sparsify(tmp_path, ["layers.0"], D, M)
    path = tmp_path / "layers.0/cfg.json"
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    assert json.loads(path.read_text(encoding="utf-8-sig"))["k"] == 4
    assert load_transcoder(tmp_path).config.k == 4
