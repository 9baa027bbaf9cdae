"""What the commands tell the user (issue 15): feature labels next to the demo's features, ``explain``,
checks before the model loads, ``--help`` defaults, one progress bar per training phase, quiet GGUF
loading, TopK summaries, ``--stats`` on ``generate`` and its HTML page. Tiny models only."""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import random_transcoder
from test_demo import TINY_DEMO, char_tokenizer
from tiny_models import tiny_model

from sparse_clt_hf import Features, cli, training
from sparse_clt_hf import demo as demo_mod
from sparse_clt_hf import models as models_mod
from sparse_clt_hf.feature_stats import FeatureStats, feature_stats
from sparse_clt_hf.labels import TOKENIZER_DIR, corpus_stats, marked_context, parse_feature, save_stats
from sparse_clt_hf.view import DATA_ID, feature_label

TINY_STATS = dict(tokens=1500, seq_len=64, batch_size=8)


def main(argv):
    return cli.main(argv)


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory):
    """A tiny model and its demo transcoder (with statistics), fitted once for the module."""
    model, tok = tiny_model("llama"), char_tokenizer()
    folder = tmp_path_factory.mktemp("demo") / "clt"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(demo_mod, "DEMO_TRAINING", {**demo_mod.DEMO_TRAINING, **TINY_DEMO})
        mp.setattr(demo_mod, "DEMO_STATS", {**demo_mod.DEMO_STATS, **TINY_STATS})
        demo_mod.ensure_demo_transcoder(model, tok, folder, progress=False, log=lambda *a: None)
        demo_mod.ensure_demo_stats(model, tok, folder, progress=False, log=lambda *a: None)
    return model, tok, folder


@pytest.fixture
def demo_env(tiny_demo, monkeypatch):
    """The demo command on the tiny model and its cached transcoder; ``calls`` counts model loads."""
    model, tok, folder = tiny_demo
    calls: list = []
    monkeypatch.setattr(demo_mod, "DEMO_TRAINING", {**demo_mod.DEMO_TRAINING, **TINY_DEMO})
    monkeypatch.setattr(demo_mod, "DEMO_STATS", {**demo_mod.DEMO_STATS, **TINY_STATS})
    monkeypatch.setattr(models_mod, "load_model", lambda ref=None, **kw: calls.append(ref) or (model, tok, "tiny"))
    monkeypatch.setenv(demo_mod.DEMO_ENV, str(folder))
    return model, tok, folder, calls


# ---------------------------------------------------------------------------- labels in the demo
def test_demo_prints_labels_next_to_features(demo_env, capsys):
    _, tok, folder, _ = demo_env
    stats = FeatureStats.load(folder / "stats.safetensors")
    args = ["demo", "--prompt", "hi", "--max-new-tokens", "3", "--show", "2"]
    assert main([*args, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["summary"]["labels"] is True and report["summary"]["activation"] == "topk"
    assert main(args) == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    labelled = 0
    for entry in report["tokens"]:
        assert len(entry["features"]) == 2
        for f in entry["features"]:
            label = feature_label(stats, tok, f["layer"], f["feature"])
            assert f["label"] == [tok.decode([t]) for t in stats.top_tokens(f["layer"], f["feature"], 3)]
            assert f["max"] == pytest.approx(float(stats.max(f["layer"])[f["feature"]]), abs=1e-3)
            line = next(x for x in lines if f"L{f['layer']}/{f['feature']}={f['activation']:.2f}" in x)
            assert line.rstrip().endswith(label), line  # the label is printed next to the feature
            labelled += label != "[]"
    assert labelled > 0
    assert "of max)" in text
    # which transcoder ran, recorded vs shown, TopK instead of L0, where the answer stopped, what next
    assert f"transcoder: {folder} (the cached demo transcoder" in text
    assert "Recorded the 8 strongest features per token and layer (--top-k); shown: the 2 strongest" in text
    assert "TopK transcoder (k=4): every token has exactly 4 active features per layer" in text
    assert "Mean L0" not in text
    assert "(stopped at --max-new-tokens 3" in text
    assert "sparse-clt-hf explain " in text


def test_cached_demo_transcoder_without_stats_gets_them_once(demo_env, tmp_path, monkeypatch, capsys):
    import shutil

    _, _, folder, _ = demo_env
    copy = tmp_path / "clt"
    shutil.copytree(folder, copy)
    (copy / "stats.safetensors").unlink()
    shutil.rmtree(copy / TOKENIZER_DIR)
    monkeypatch.setenv(demo_mod.DEMO_ENV, str(copy))
    runs = []
    real = demo_mod.ensure_demo_stats

    def counting(*a, **k):
        runs.append(1)
        return real(*a, **k)

    monkeypatch.setattr(demo_mod, "ensure_demo_stats", counting)
    import sparse_clt_hf.labels as labels

    computed = []
    real_corpus = labels.corpus_stats
    monkeypatch.setattr(labels, "corpus_stats", lambda *a, **k: computed.append(1) or real_corpus(*a, **k))
    args = ["demo", "--json", "--no-progress", "--prompt", "hi", "--max-new-tokens", "2"]
    assert main(args) == 0 and main(args) == 0
    assert computed == [1] and len(runs) == 2  # computed on first use, read afterwards
    assert (copy / "stats.safetensors").is_file() and (copy / TOKENIZER_DIR / "tokenizer.json").is_file()
    reports = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert all(r["summary"]["labels"] for r in reports)


# ---------------------------------------------------------------------------- explain
def _toy_stats(tmp_path):
    """Stats of one layer (3) of 4 features over "hello!" and "abcdef": feature 1 peaks on the second
    'l' of "hello!" (5.0), and fires on 'c' of "abcdef" (2.0)."""
    tok = char_tokenizer()
    ids = torch.tensor([tok("hello!")["input_ids"], tok("abcdef")["input_ids"]])
    indices = torch.full((2, 6, 1, 2), -1, dtype=torch.int32)
    values = torch.zeros(2, 6, 1, 2)
    indices[0, 3, 0, 0], values[0, 3, 0, 0] = 1, 5.0
    indices[1, 2, 0, 0], values[1, 2, 0, 0] = 1, 2.0
    indices[0, 0, 0, 0], values[0, 0, 0, 0] = 2, 1.0
    feats = Features(indices, values, (indices >= 0).sum(-1), torch.ones(2, 6, dtype=torch.bool), [3], ids, [4])
    stats = feature_stats(feats, top_n=5, context=8)
    folder = tmp_path / "stats"
    folder.mkdir()
    stats.save(folder / "stats.safetensors")
    tok.save_pretrained(str(tmp_path / "tok"))
    return folder, tmp_path / "tok"


def test_explain_marks_the_max_activating_token(tmp_path, capsys):
    folder, tok_dir = _toy_stats(tmp_path)
    assert main(["explain", "L3/1", "--stats", str(folder), "--model", str(tok_dir)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "L3/1  ['l', 'c']"
    assert "fires on 2 of 12 tokens (16.67%)" in out and "mean 3.50, max 5.00" in out
    rows = [x for x in out.splitlines() if x.startswith("  ") and "⟦" in x]
    assert "5.00  100%  hel⟦l⟧o!" in rows[0] and "2.00   40%  ab⟦c⟧def" in rows[1]
    assert main(["explain", "3/1", "--json", "--stats", str(folder / "stats.safetensors"),
                 "--model", str(tok_dir), "--contexts", "1"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["count"] == 2 and report["max"] == 5.0 and report["label"] == ["l", "c"]
    assert [c["text"] for c in report["contexts"]] == ["hel⟦l⟧o!"] and report["contexts"][0]["token"] == "l"


def test_explain_finds_the_tokenizer_and_reports_bad_features(tmp_path, capsys):
    folder, tok_dir = _toy_stats(tmp_path)
    char_tokenizer().save_pretrained(str(folder / TOKENIZER_DIR))  # saved next to the statistics
    assert main(["explain", "3/0", "--stats", str(folder)]) == 0
    assert "never among the recorded features" in capsys.readouterr().out
    for feature, message in (("3/9", "feature 9 out of range: layer 3 has 4 features"),
                             ("5/1", "layer 5 has no statistics"), ("3-1", "write LAYER/FEATURE")):
        assert main(["explain", feature, "--stats", str(folder)]) == 1
        assert message in capsys.readouterr().err
    assert main(["explain", "3/1", "--clt", str(tmp_path)]) == 1
    assert "no feature statistics next to" in capsys.readouterr().err


def test_explain_defaults_to_the_demo_transcoder(demo_env, capsys):
    _, tok, folder, calls = demo_env
    stats = FeatureStats.load(folder / "stats.safetensors")
    layer = stats.layers[0]
    feature = int(stats.count(layer).argmax())
    assert main(["explain", f"{layer}/{feature}", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert calls == []  # statistics and tokenizer next to the transcoder: no model load
    assert report["stats"] == str(folder / "stats.safetensors") and report["contexts"]
    first = stats.top_contexts(layer, feature)[0]
    assert report["contexts"][0]["text"] == marked_context(tok, first, stats.context)
    assert "⟦" in report["contexts"][0]["text"]


def test_explain_without_a_fitted_demo_transcoder(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(demo_mod.DEMO_ENV, str(tmp_path / "none"))
    monkeypatch.setattr(models_mod, "load_model", lambda ref=None, **kw: pytest.fail("model loaded"))
    assert main(["explain", "6/942"]) == 1
    assert "run `sparse-clt-hf demo` once" in capsys.readouterr().err


def test_parse_feature_and_marked_context():
    assert parse_feature("L6/942") == (6, 942) == parse_feature(" 6/942")
    from sparse_clt_hf.feature_stats import Context

    class Chars:
        def decode(self, ids):
            return "".join(map(chr, ids))

    tok, ids = Chars(), [ord(c) for c in "ab\ncdefg"]
    ctx = Context(document=0, position=5, activation=1.0, token_ids=ids, index=3)
    assert marked_context(tok, ctx, context=4) == "…ab↵⟦c⟧defg…"
    assert marked_context(tok, ctx, context=5) == "…ab↵⟦c⟧defg"


# ---------------------------------------------------------------------------- before the model loads
@pytest.fixture
def no_model_load(monkeypatch):
    monkeypatch.setattr(models_mod, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))


def test_bad_options_fail_before_the_model_loads(tmp_path, no_model_load, capsys):
    clt = tmp_path / "clt"
    random_transcoder(d=32, layers=(0, 1, 2)).save_pretrained(clt)
    wide = tmp_path / "wide"
    random_transcoder(d=48, layers=(0,)).save_pretrained(wide)
    model_dir = tmp_path / "model"
    tiny_model("llama").config.save_pretrained(model_dir)  # a config is all the check reads
    base = ["generate", "--prompt", "x", "--model", str(model_dir)]
    cases = [
        ([*base, "--clt", str(tmp_path / "missing")], "is not a folder"),
        ([*base, "--clt", str(clt), "--layers", "2-4"], "no weights for layers [3, 4]"),
        ([*base, "--clt", str(clt), "--layers", "x"], "cannot read layers"),
        ([*base, "--clt", str(wide)], "d_model=48"),
        ([*base, "--clt", str(clt), "--stats", str(tmp_path / "nostats")], "no statistics there"),
        ([*base, "--clt", str(clt), "--html", str(tmp_path / "no" / "v.html")], "does not exist"),
        ([*base, "--clt", str(clt), "--out", str(tmp_path / "no" / "f.safetensors")], "does not exist"),
        (["demo", "--clt", str(tmp_path / "missing")], "is not a folder"),
        (["demo", "--clt", str(wide)], "d_model=48"),  # the default model's dims are known without loading it
    ]
    for argv, message in cases:
        assert main(argv) == 1, argv
        assert message in capsys.readouterr().err, argv


# ---------------------------------------------------------------------------- generate: TopK, --stats, --html
def test_generate_topk_stats_html_and_saved(tmp_path, capsys):
    from test_demo import char_tokenizer as make_tok

    model = tiny_model("llama")
    tok = make_tok()
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    clt = tmp_path / "clt"
    tc = random_transcoder(d=32, layers=(0, 1), activation="topk", k=4)
    tc.config.model_name = None
    tc.save_pretrained(clt)
    stats = corpus_stats(model, tok, str(clt), ["the quick brown fox jumps over the lazy dog. " * 20],
                         tokens=400, seq_len=40, progress=False)
    assert stats.layers == [0, 1] and stats.n_positions == 11 * 39  # ceil(400 / 39) rows; their first position left out
    save_stats(stats, tmp_path / "st")
    page, out = tmp_path / "v.html", tmp_path / "f.safetensors"
    argv = ["generate", "--model", str(model_dir), "--clt", str(clt), "--prompt", "hello", "--max-new-tokens", "3",
            "--stats", str(tmp_path / "st"), "--html", str(page), "--out", str(out)]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "TopK transcoder (k=4): every token has exactly 4 active features per layer" in text
    assert f"saved features to {out}" in text and f"saved HTML view to {page}" in text
    assert "of max)" in text and f"--stats {tmp_path / 'st'}" in text
    m = re.search(rf'<script type="application/json" id="{DATA_ID}">(.*?)</script>', page.read_text(), re.S)
    data = json.loads(m.group(1))
    assert data["stats"], "the page carries the statistics of the features on it"
    # statistics next to the transcoder are found without --stats
    save_stats(stats, clt)
    assert main(argv[:-6] + ["--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["summary"]["labels"] and "label" in report["tokens"][0]["features"][0]


# ---------------------------------------------------------------------------- --help
def test_help_shows_defaults_and_every_option_has_help(capsys):
    import argparse

    parser = cli.build_parser()
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert "explain" in subs.choices
    for name, sub in subs.choices.items():
        assert isinstance(sub.formatter_class, type) and issubclass(sub.formatter_class,
                                                                    argparse.ArgumentDefaultsHelpFormatter)
        for action in sub._actions:
            assert action.help, f"{name} {action.option_strings or action.dest} has no help text"
        help_text = sub.format_help()
        assert "(default: None)" not in help_text and "(default: False)" not in help_text, name
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    out = capsys.readouterr().out
    assert re.search(r"--max-new-tokens.*?\(default: 24\)", out, re.S)
    assert re.search(r"--top-k.*?\(default: 8\)", out, re.S)
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert re.search(r"--width.*?\(default: 2048\)", capsys.readouterr().out, re.S)


# ---------------------------------------------------------------------------- progress bars
class RecordingBar:
    made: list[RecordingBar] = []

    open_now = 0
    most_open = 0

    def __init__(self, iterable=None, total=None, desc=None, unit="it", disable=False, **kwargs):
        self.total, self.desc, self.unit, self.n, self.postfix = total, desc, unit, 0, {}
        self.disable, self.closed = disable, False
        RecordingBar.made.append(self)
        RecordingBar.open_now += 1
        RecordingBar.most_open = max(RecordingBar.most_open, RecordingBar.open_now)

    def update(self, n=1):
        self.n += n

    def set_postfix(self, **kwargs):
        self.postfix.update(kwargs)

    def set_description(self, *args, **kwargs):
        raise AssertionError("a bar was relabelled")

    def unpause(self):
        pass

    def close(self):
        if not self.closed:
            self.closed = True
            RecordingBar.open_now -= 1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def test_training_has_one_bar_per_phase(monkeypatch):
    """One bar on the screen at a time (two open bars are nested: tqdm moves the cursor between them,
    which leaves escape codes in a log), each phase labelled with its buffer fill; and no bar at all off
    a terminal (tqdm's ``disable=None``)."""
    RecordingBar.made, RecordingBar.open_now, RecordingBar.most_open = [], 0, 0
    monkeypatch.setattr(training, "tqdm", RecordingBar)
    cfg = training.TrainingConfig(layers=[0, 1], n_features=64, k=4, span=2, tokens=1500, eval_tokens=300,
                                  seq_len=64, batch_size=256, epochs=1, aux_k=4, model_batch=4, buffer_mb=1e-4,
                                  dead_tokens=10)
    _, metrics = training.train_transcoder(tiny_model("llama"), char_tokenizer(), training.python_texts(), cfg)
    assert RecordingBar.most_open == 1 and RecordingBar.open_now == 0
    descs = [b.desc for b in RecordingBar.made]
    fills = len(descs) // 2
    assert fills > 1, descs  # several buffer fills: the case where two bars used to be open at once
    assert descs == [f"{phase} {i}/{fills}" for i in range(1, fills + 1)
                     for phase in ("collect activations", "train transcoder")] + ["held-out eval"]
    collect = [b for b in RecordingBar.made if b.desc.startswith("collect")]
    train = [b for b in RecordingBar.made if b.desc.startswith("train")]
    n_train, n_eval = -(-1500 // 63), -(-300 // 63)
    assert {b.unit for b in collect} == {"seq"} and sum(b.total for b in collect) == n_train
    assert {b.unit for b in train} == {"step"} and sum(b.total for b in train) == metrics["steps"]
    assert (RecordingBar.made[-1].unit, RecordingBar.made[-1].total) == ("seq", n_eval)
    assert all(b.n == b.total for b in RecordingBar.made)  # every counter ends full
    assert all(b.disable is None for b in RecordingBar.made)  # progress on: drawn on a terminal only
    dead, total = train[-1].postfix["dead"].split("/")
    assert int(total) == 2 * 64 and 0 <= int(dead) <= 128  # dead counts all layers: out of all their features
    assert "dead (of 64)" in training.format_metrics(metrics)


def test_gguf_loading_is_quiet_and_restores_the_bars():
    gguf_utils = pytest.importorskip("transformers.modeling_gguf_pytorch_utils")
    from transformers.utils import logging as hf_logging

    from sparse_clt_hf.models import quiet_gguf_loading

    original = gguf_utils.tqdm
    assert hf_logging.is_progress_bar_enabled()
    with quiet_gguf_loading():
        assert not hf_logging.is_progress_bar_enabled()
        assert gguf_utils.tqdm([1], total=1).disable
    assert gguf_utils.tqdm is original and hf_logging.is_progress_bar_enabled()
