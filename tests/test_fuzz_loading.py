"""Property-based and fuzz tests (hypothesis) of encoding and loading.

- ``encode_sparse`` equals a dense top-k computed independently in float64 (values sorted descending,
  -1 ids with value 0 in empty slots, l0 the active count and >= the kept count).
- Every config parser, given arbitrary YAML / JSON values, gives a usable transcoder or a library error.
- Every format's files, truncated at random offsets or overwritten with random bytes, give a library
  error or a usable transcoder: never another exception type, never a hang.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import random_transcoder
from format_fixtures import (
    one_layer_writers,
    write_gemma_scope2_clt,
    write_gemma_scope2_plt,
    write_saelens,
    write_sparsify,
    write_vlm_clt,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparse_clt_hf import (
    CrossLayerTranscoder,
    LayerEncoder,
    SparseCLTError,
    TranscoderConfig,
    registry,
    transcoder,
)
from sparse_clt_hf.formats import describe
from sparse_clt_hf.io.sources import LocalSource
from sparse_clt_hf.loading import load_transcoder

D, M = 8, 12
#: 25 derandomized examples per test in the suite; FUZZ_EXAMPLES=N runs N random ones (a longer hunt)
_HUNT = int(os.environ.get("FUZZ_EXAMPLES", "0"))
FAST = settings(max_examples=_HUNT or 25, deadline=None, suppress_health_check=[HealthCheck.too_slow],
                derandomize=not _HUNT)


# ---------------------------------------------------------------------- encode_sparse vs float64 dense top-k
def _reference(z: torch.Tensor, activation: str, thr: torch.Tensor | None, k: int | None, cut: float | None):
    """(sorted active values, active count, activation at each feature id) in float64, from the definitions.
    For TopK exactly k pre-activations are kept; among tied ones any may be, so the per-id lookup keeps all."""
    zero = torch.zeros_like(z)
    if activation == "topk":
        kk = min(k, z.shape[-1])
        top = z.sort(-1, descending=True).values
        kept, kth = top[:, :kk].clamp_min(0), top[:, kk - 1 : kk]
        lookup = torch.where((z >= kth) & (z > 0), z, zero)
    else:
        kept = torch.where(z > (0 if activation == "relu" else thr), z, zero)
        lookup = kept
    if cut is not None:
        kept = torch.where(kept >= cut, kept, torch.zeros_like(kept))
        lookup = torch.where(lookup >= cut, lookup, zero)
    return kept.sort(-1, descending=True).values, (kept != 0).sum(-1), lookup


@st.composite
def encode_cases(draw):
    n = draw(st.integers(1, 9))
    m = draw(st.sampled_from([1, 3, 17, 300, 520]))
    activation = draw(st.sampled_from(["relu", "jumprelu", "topk"]))
    k = draw(st.integers(1, 6)) if activation == "topk" else None
    seed = draw(st.integers(0, 2**16))
    top_k = draw(st.integers(1, 10))
    chunk = draw(st.one_of(st.none(), st.integers(1, n)))
    cut = draw(st.one_of(st.none(), st.sampled_from([0.25, 1.25, 3.25])))
    return n, m, activation, k, seed, top_k, chunk, cut


@FAST
@given(encode_cases())
def test_encode_sparse_is_the_float64_dense_top_k(case):
    n, m, activation, k, seed, top_k, chunk, cut = case
    g = torch.Generator().manual_seed(seed)
    # small integers and half-integer biases: every z is exact in float32 and never 0 (no boundary ambiguity)
    W = torch.randint(-2, 3, (m, D), generator=g).float()
    b = torch.randint(-4, 4, (m,), generator=g).float() + 0.5
    x = torch.randint(-2, 3, (n, D), generator=g).float()
    thr = torch.randint(0, 6, (m,), generator=g).float() + 0.25 if activation == "jumprelu" else None
    cfg = TranscoderConfig(d_model=D, layers=[0], n_features=[m], activation=activation, k=k)
    tc = CrossLayerTranscoder(cfg, {0: LayerEncoder(W, b, threshold=thr)})
    saved = transcoder.ENCODE_TUNING["cpu"]
    # 256-feature column blocks: m 300/520 crosses block edges
    transcoder.ENCODE_TUNING["cpu"] = dataclasses.replace(saved, block_bytes=1024)
    try:
        values, indices, l0 = tc.encode_sparse(x, 0, top_k, chunk_size=chunk, activation_threshold=cut)
    finally:
        transcoder.ENCODE_TUNING["cpu"] = saved
    z = x.double() @ W.double().T + b.double()
    expected, count, lookup = _reference(z, activation, None if thr is None else thr.double(), k, cut)
    expected = torch.cat([expected, expected.new_zeros(n, top_k)], -1)[:, :top_k]
    kept = indices >= 0
    assert values.shape == indices.shape == (n, top_k) and l0.shape == (n,)
    assert torch.all(values[:, :-1] >= values[:, 1:]), "values sorted descending"
    assert torch.all(values[~kept] == 0) and torch.all(values[kept] != 0), "-1 exactly where the value is 0"
    assert torch.all(l0 >= kept.sum(-1)) and torch.equal(l0.long(), count)
    assert torch.equal(values.double(), expected)
    rows, slots = kept.nonzero(as_tuple=True)
    assert torch.equal(values[rows, slots].double(), lookup[rows, indices[rows, slots].long()]), "ids point at values"
    assert all(len(set(r[r >= 0].tolist())) == int((r >= 0).sum()) for r in indices), "no id twice in a row"


# ---------------------------------------------------------------------- config parsers
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-10**12, 10**12) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)
INTERESTING = st.sampled_from([0, 1, -1, 2, 3, 7, 0.5, "", "x", "topk", "relu", "jumprelu", True, False, None, [],
                               {}, [0], "1", "rmsnorm", "blocks.0.hook_resid_pre", "layers.0.mlp",
                               "model.layers.0.mlp.input", "ln2.hook_normalized"])
VALUES = st.one_of(INTERESTING, JSON)


def _native_plt(p: Path) -> None:
    random_transcoder(d=D, layers=(0, 1), widths=[M, M], span=1).save_pretrained(p)


def _native_clt(p: Path) -> None:
    random_transcoder(d=D, layers=(0, 1), widths=[M, M], activation="jumprelu").save_pretrained(p)


# name -> (writer, config file, keys worth mutating besides random ones)
CONFIGS = {
    "circuit_tracer_plt": (_native_plt, "config.yaml", ["model_kind", "feature_input_hook", "feature_output_hook",
                           "activation", "k", "hook_site", "input_transform", "input_norm_eps", "layers", "n_layers",
                           "span", "metrics", "input_scale", "transcoders", "output_site", "model_name"]),
    "circuit_tracer_clt": (_native_clt, "config.yaml", ["model_kind", "activation", "k", "layers", "n_layers", "span",
                           "input_scale", "transcoders", "hook_site", "feature_input_hook", "input_transform"]),
    "gemma_scope2": (lambda p: write_gemma_scope2_plt(p, [0], D, M), "transcoder_all/layer_0_width_16k_l0_small/"
                     "config.json", ["hf_hook_point_in", "hf_hook_point_out", "architecture", "model_name", "width"]),
    "gemma_scope2_clt": (lambda p: write_gemma_scope2_clt(p, 2, D, M), "clt/width_262k_l0_medium/config.json",
                         ["hf_hook_point_in", "hf_hook_point_out", "architecture", "model_name"]),
    "sparsify": (lambda p: write_sparsify(p, ["layers.0.mlp"], D, M, transcode=True), "layers.0.mlp/cfg.json",
                 ["activation", "k", "num_latents", "d_in", "transcode", "n_targets", "normalize_io",
                  "coalesce_topk", "post_encoder_scale", "skip_connection"]),
    "saelens": (lambda p: write_saelens(p, 0, D, M, architecture="topk"), "cfg.json",
                ["architecture", "d_in", "d_sae", "k", "apply_b_dec_to_input", "normalize_activations",
                 "rescale_acts_by_decoder_norm", "metadata", "hook_name", "hook_point", "hook_point_layer",
                 "activation_fn_str", "activation_fn_kwargs", "scaling_factor", "hf_hook_name"]),
}


def _load_or_library_error(root: Path, x_width: int = D) -> None:
    """Load and describe ``root``: a library error, or a transcoder that encodes."""
    start = time.perf_counter()
    for call in (describe, load_transcoder):
        try:
            result = call(LocalSource(root))
        except SparseCLTError as exc:
            assert str(exc), "library errors carry a message"
            continue
        if call is load_transcoder:
            x = torch.randn(3, result.config.d_model, generator=torch.Generator().manual_seed(0))
            for layer in result.layers:
                result.encode_sparse(x, layer, 4)
    assert time.perf_counter() - start < 10, "no hang"


def _mutate(cfg: dict, key: str, value, drop: bool) -> dict:
    out = dict(cfg)
    if drop:
        out.pop(key, None)
    else:
        out[key] = value
    return out


@pytest.mark.parametrize("name", sorted(CONFIGS))
@FAST
@given(data=st.data())
def test_config_parsers_give_a_transcoder_or_a_library_error(name, data):
    writer, rel, keys = CONFIGS[name]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        writer(root)
        path = root / rel
        cfg = yaml.safe_load(path.read_text()) if rel.endswith(".yaml") else json.loads(path.read_text())
        for _ in range(data.draw(st.integers(1, 3))):
            key = data.draw(st.one_of(st.sampled_from(keys), st.text(max_size=6)))
            cfg = _mutate(cfg, key, data.draw(VALUES), data.draw(st.booleans()))
        if data.draw(st.integers(0, 9)) == 0:  # sometimes the whole file is one arbitrary value
            cfg = data.draw(VALUES)
        text = yaml.safe_dump(cfg) if rel.endswith(".yaml") else json.dumps(cfg)
        path.write_text(text)
        _load_or_library_error(root)


@FAST
@given(meta=st.dictionaries(st.sampled_from(["layer", "hidden_dim", "feature_dim", "model_name", "state_dict",
                                             "training_metadata"]), VALUES, max_size=3))
def test_vlm_checkpoint_metadata_gives_a_transcoder_or_a_library_error(meta):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_vlm_clt(root, [0], D, M, dtype=torch.float32)
        path = root / "transcoder_L0.pt"
        torch.save({**torch.load(path, weights_only=True), **meta}, path)
        _load_or_library_error(root)


@FAST
@given(entry=st.one_of(VALUES, st.dictionaries(
    st.sampled_from(["repo_id", "subfolder", "revision", "format", "activation", "k", "aliases", "n_layers"]),
    VALUES, max_size=4)))
def test_registry_entries_give_an_entry_or_a_library_error(entry):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "reg.yaml"
        path.write_text(yaml.safe_dump({"fuzz-entry": entry}))
        old = os.environ.get(registry.ENV_VAR)
        os.environ[registry.ENV_VAR] = str(path)
        registry._load.cache_clear()
        try:
            try:
                found = registry.get_entry("fuzz-entry")
            except SparseCLTError:
                return
            assert isinstance(found.repo_id, str) and found.reference
            assert found.k is None or (isinstance(found.k, int) and found.k > 0)
        finally:
            if old is None:
                os.environ.pop(registry.ENV_VAR)
            else:
                os.environ[registry.ENV_VAR] = old
            registry._load.cache_clear()


# ---------------------------------------------------------------------- truncated and random files
WRITERS = {"circuit_tracer": _native_clt, **one_layer_writers(D, M)}


@pytest.mark.parametrize("fmt", sorted(WRITERS))
@FAST
@given(data=st.data())
def test_damaged_files_give_a_library_error_never_another_exception(fmt, data):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        WRITERS[fmt](root)
        files = sorted(p for p in root.rglob("*") if p.is_file())
        for _ in range(data.draw(st.integers(1, 2))):
            path = data.draw(st.sampled_from(files))
            raw = path.read_bytes()
            how = data.draw(st.sampled_from(["truncate", "overwrite", "random", "empty"]))
            if how == "truncate":
                raw = raw[: data.draw(st.integers(0, max(len(raw) - 1, 0)))]
            elif how == "overwrite":
                at = data.draw(st.integers(0, max(len(raw) - 1, 0)))
                patch = data.draw(st.binary(min_size=1, max_size=16))
                raw = raw[:at] + patch + raw[at + len(patch):]
            elif how == "random":
                raw = data.draw(st.binary(max_size=300))
            else:
                raw = b""
            path.write_bytes(raw)
        _load_or_library_error(root)
