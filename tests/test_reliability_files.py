"""Hostile configuration and metadata files (issue 23, class 5): YAML alias structures ("billion laughs")
at several depths and keys, deep nesting and oversize texts, in every YAML/JSON the package reads
(transcoder configs, the registry, extraction manifests, features and stats metadata). Each is refused
with the library's own error naming the file, before anything walks the expanded structure."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from conftest import random_transcoder
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from sparse_clt_hf import Features, FeaturesFileError, TranscoderFormatError, registry
from sparse_clt_hf.errors import ExtractError
from sparse_clt_hf.feature_stats import FeatureStats, FeatureStatsError, feature_stats
from sparse_clt_hf.io.structured import MAX_DEPTH, StructuredTextError, load_json, load_yaml
from sparse_clt_hf.loading import load_transcoder

PACKAGE = Path(__file__).resolve().parent.parent / "sparse_clt_hf"


def laughs(depth: int, width: int = 9) -> str:
    """A YAML "billion laughs": ``width ** depth`` strings from a few hundred bytes."""
    lines = ['a0: &a0 ["lol", "lol"]']
    for i in range(1, depth + 1):
        lines.append(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * width)}]")
    return "\n".join(lines)


def _circuit_tracer(tmp_path: Path) -> Path:
    random_transcoder(d=16, layers=(0, 1), widths=[24, 24], span=1).save_pretrained(tmp_path)
    return tmp_path / "config.yaml"


@pytest.mark.parametrize("depth", [1, 3, 9])
@pytest.mark.parametrize("key", ["metrics", "notes", "model_name", "top"])
def test_alias_structures_in_a_transcoder_config_are_refused(tmp_path, depth, key):
    config = _circuit_tracer(tmp_path)
    cfg = yaml.safe_load(config.read_text())
    text = yaml.safe_dump({k: v for k, v in cfg.items() if k != key})
    bomb = laughs(depth)
    if key == "top":  # anchors at the top level, merged into the config itself
        text = bomb + "\n" + text
    else:
        text += f"{key}:\n" + "\n".join("  " + line for line in bomb.splitlines()) + "\n"
    config.write_text(text)
    assert len(text) < 4096
    with pytest.raises(TranscoderFormatError, match=r"config\.yaml.*(alias|anchor)"):
        load_transcoder(tmp_path)


def test_one_anchor_alone_is_refused_and_a_plain_config_still_loads(tmp_path):
    config = _circuit_tracer(tmp_path)
    plain = config.read_text()
    load_transcoder(tmp_path)
    config.write_text(plain + "notes: &n hello\n")
    with pytest.raises(TranscoderFormatError, match="anchors"):
        load_transcoder(tmp_path)
    config.write_text(plain + "extra: &n [1]\nmore: *n\n")
    with pytest.raises(TranscoderFormatError, match="anchors|aliases"):
        load_transcoder(tmp_path)


def test_deep_nesting_and_oversize_configs_are_refused(tmp_path):
    config = _circuit_tracer(tmp_path)
    plain = config.read_text()
    config.write_text(plain + "metrics: " + "[" * (MAX_DEPTH + 5) + "]" * (MAX_DEPTH + 5) + "\n")
    with pytest.raises(TranscoderFormatError, match="nesting deeper"):
        load_transcoder(tmp_path)
    config.write_text(plain + "notes: '" + "x" * (17 << 20) + "'\n")
    with pytest.raises(TranscoderFormatError, match="larger than"):
        load_transcoder(tmp_path)


def test_json_configs_deep_nesting_is_refused_naming_the_file(tmp_path):
    from format_fixtures import write_saelens

    write_saelens(tmp_path, 0, 16, 24)
    cfg = tmp_path / "cfg.json"
    data = json.loads(cfg.read_text())
    cfg.write_text(json.dumps(data)[:-1] + ', "extra": ' + "[" * 5000 + "]" * 5000 + "}")
    with pytest.raises(TranscoderFormatError, match=r"cfg\.json"):
        load_transcoder(tmp_path, format="saelens")


def test_registry_file_with_aliases_is_refused(tmp_path, monkeypatch):
    path = tmp_path / "reg.yaml"
    path.write_text("mine:\n  repo_id: a/b\n  notes:\n" + "\n".join("    " + s for s in laughs(6).splitlines()) + "\n")
    monkeypatch.setenv(registry.ENV_VAR, str(path))
    registry._load.cache_clear()
    try:
        with pytest.raises(TranscoderFormatError, match="registry file.*(alias|anchor)"):
            registry.entries()
    finally:
        registry._load.cache_clear()


def test_features_and_stats_metadata_nesting_is_refused(tmp_path):
    import torch

    f = Features(torch.zeros(1, 2, 1, 2, dtype=torch.int32), torch.zeros(1, 2, 1, 2), torch.zeros(1, 2, 1, dtype=torch.int32),
                 torch.ones(1, 2, dtype=torch.bool), [0], torch.ones(1, 2, dtype=torch.int64), [4])
    path = tmp_path / "f.safetensors"
    f.save(path)
    t = load_file(str(path))
    save_file(t, str(path), metadata={"layers": "[" * 100 + "]" * 100, "format": "sparse-clt-hf"})
    with pytest.raises(FeaturesFileError, match="nesting deeper"):
        Features.load(path)
    stats = feature_stats(f, top_n=1, context=1)
    stats.save(tmp_path / "s.safetensors")
    good = load_file(str(tmp_path / "s.safetensors"))
    base = {"format": "sparse-clt-hf-feature-stats", "version": "1", "layers": "[0]", "n_features": "[4]",
            "n_positions": "2", "top_n": "1", "context": "1"}
    assert FeatureStats.load(tmp_path / "s.safetensors").n_features == [4]
    for key, value, message in [("layers", "[" * 100 + "]" * 100, "nesting deeper"), ("layers", "[0,", "not valid JSON"),
                                ("n_features", "[0]", "n_features"), ("n_features", "{}", "n_features"),
                                ("top_n", "9" * 40, "top_n"), ("top_n", "-1", "top_n"), ("context", "5", "top_tokens"),
                                ("n_positions", "x", "n_positions")]:
        save_file(good, str(tmp_path / "s.safetensors"), metadata={**base, key: value})
        with pytest.raises(FeatureStatsError, match=message):
            FeatureStats.load(tmp_path / "s.safetensors")
    (tmp_path / "s.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(FeatureStatsError, match="not a readable"):
        FeatureStats.load(tmp_path / "s.safetensors")


def test_extraction_manifest_alias_free_and_bounded(tmp_path):
    from sparse_clt_hf.extract_folder import read_manifest

    (tmp_path / "manifest.json").write_text('{"format": ' + "[" * 200 + "]" * 200 + "}")
    with pytest.raises(ExtractError, match="nesting deeper"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_bytes(b'{"format": "\xff\xfe"}')
    with pytest.raises(ExtractError, match="manifest"):
        read_manifest(tmp_path)


# ---------------------------------------------------------------------------- the loader itself
_scalars = st.one_of(st.integers(-10**6, 10**6), st.text(alphabet="abcxyz ", max_size=6), st.booleans(), st.none())
_docs = st.recursive(_scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.text("abcdef", min_size=1, max_size=4),
                                                                       inner, max_size=4)), max_leaves=20)


@settings(max_examples=150, deadline=None)
@given(_docs)
def test_alias_free_yaml_reads_as_pyyaml_safe_load_does(doc):
    text = yaml.safe_dump(doc)
    assert load_yaml(text, "t") == yaml.safe_load(text)
    assert load_json(json.dumps(doc), "t") == json.loads(json.dumps(doc))


@settings(max_examples=150, deadline=None)
@given(_docs, st.integers(1, 6), st.integers(1, 12), st.sampled_from(["seq", "map", "scalar"]))
def test_any_anchor_or_alias_is_refused(doc, depth, width, where):
    text = yaml.safe_dump({"data": doc})
    if where == "seq":
        text += laughs(depth, width)
    elif where == "map":
        text += "m: &m {a: 1}\nn: *m\n"
    else:
        text += "s: &s x\n"
    with pytest.raises(StructuredTextError, match="anchors|aliases"):
        load_yaml(text, "t")


def test_every_yaml_and_json_read_goes_through_the_bounded_loader():
    """No module parses YAML itself; JSON is parsed directly only for documents of a data file (one line
    each, already a str in memory) and the benchmark's own subprocess output."""
    allowed_json = {"corpus.py", "training_data.py", "bench_workloads.py"}
    for path in PACKAGE.rglob("*.py"):
        if path.name == "structured.py":
            continue
        text = path.read_text()
        assert not re.search(r"yaml\.(safe_load|load|full_load|unsafe_load|compose)\(", text), path
        if path.name not in allowed_json:
            assert not re.search(r"json\.loads?\(", text), path
