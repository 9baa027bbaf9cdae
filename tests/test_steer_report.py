"""What ``generate --steer`` reports (issue 20 items 3-4): the steers are named and their features marked,
``--compare`` prints the unsteered completion and its features beside the steered ones (text, JSON and page),
and a steered TopK layer's L0 is reported as recorded: the steered feature is set on top of the transcoder's
k, so it counts as one more where it was not among them. The reference for the last point is the unsteered
run itself: on the prompt, a source layer's input is not changed by its own steer."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import random_transcoder
from test_demo import char_tokenizer
from test_view import embedded
from tiny_models import tiny_model

from sparse_clt_hf import Features, cli
from sparse_clt_hf.steer_report import divergence, steer_text, topk_l0_sentence

K = 4
STEER = (1, 9, 30.0)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("steer")
    tiny_model("llama").save_pretrained(root / "model")
    char_tokenizer().save_pretrained(root / "model")
    tc = random_transcoder(activation="topk", k=K, decoders=True)
    tc.config.model_name = None
    tc.save_pretrained(root / "clt")
    return root


def generate(dirs, *extra: str) -> list[str]:
    return ["generate", "--model", str(dirs / "model"), "--clt", str(dirs / "clt"), "--prompt", "abcdef",
            "--max-new-tokens", "6", "--top-k", "8", "--show", "3", *extra]


def test_report_names_the_steer_marks_it_and_states_the_recorded_l0(dirs, tmp_path, capsys):
    layer, feature, value = STEER
    steered_file, base_file = tmp_path / "s.safetensors", tmp_path / "b.safetensors"
    assert cli.main(generate(dirs, "--out", str(base_file))) == 0
    base_text = capsys.readouterr().out
    assert f"exactly {K} active features" in base_text and "steered:" not in base_text
    assert cli.main(generate(dirs, "--steer", f"{layer}:{feature}={value:g}", "--out", str(steered_file))) == 0
    text = capsys.readouterr().out
    assert f"steered:    L{layer}/{feature} clamped to 30  (features marked * below)" in text
    assert f"L{layer}/{feature}*=30.00" in text

    steered, base = Features.load(steered_file), Features.load(base_file)
    li = steered.layers.index(layer)
    prompt_len = len("<abcdef>")
    for t in range(prompt_len):  # the prompt: the steered layer's input is the unsteered one
        chosen = {int(f) for f in base.indices[0, t, li] if f >= 0}
        assert len(chosen) == K
        recorded = {int(f): float(v) for f, v in zip(steered.indices[0, t, li], steered.values[0, t, li]) if f >= 0}
        assert set(recorded) == chosen | {feature} and recorded[feature] == pytest.approx(value)
        assert int(steered.l0[0, t, li]) == K + (feature not in chosen)
    gen = steered.positions(prompt_len - 1, steered.num_positions)
    lo, hi = int(gen.l0[0, :, li].min()), int(gen.l0[0, :, li].max())
    assert hi == K + 1  # the steered feature is never among the top 4 of this random transcoder
    assert "exactly" not in text
    assert f"recorded L0 in layer {layer}: {lo}" + (f"-{hi}" if hi != lo else "") + ", because" in text
    assert "set on top of the k the transcoder chose" in text


def test_compare_shows_both_completions_and_features(dirs, tmp_path, capsys):
    layer, feature, value = STEER
    page = tmp_path / "c.html"
    assert cli.main(generate(dirs, "--json", "--steer", f"{layer}:{feature}=400", "--compare", "--html", str(page))) == 0
    report = json.loads(capsys.readouterr().out)
    assert cli.main(generate(dirs, "--json")) == 0
    plain = json.loads(capsys.readouterr().out)
    base = report["baseline"]
    assert base["text"] == plain["text"] and base["tokens"] == plain["tokens"]  # the unsteered run, as without --steer
    assert base["text"] != report["text"], "the steer should change this completion"
    assert base["diverges_at"] == divergence(torch.tensor([ord(c) for c in report["text"]]),
                                             torch.tensor([ord(c) for c in base["text"]]), 0)
    assert report["summary"]["l0_by_layer"][str(layer)][1] == K + 1
    data = embedded(page.read_text(encoding="utf-8"))
    assert data["steers"] == [{"layer": layer, "feature": feature, "value": 400.0, "mode": "clamp", "positions": "all"}]
    assert data["baseline"] is not None
    shown = "".join(data["vocab"][str(tk["id"])] for tk in data["baseline"]["tokens"] if tk["t"] >= data["prompt_len"])
    assert shown.replace("<eos>", "") == base["text"]
    # the text report prints both completions and both tables
    assert cli.main(generate(dirs, "--steer", f"{layer}:{feature}=400", "--compare")) == 0
    text = capsys.readouterr().out
    assert f"without the steers (--compare; the completions diverge at generated token #{base['diverges_at']}):\n" \
           f"{base['text']}" in text
    assert text.count("strongest features at that position") == 2


def test_compare_needs_a_steer(dirs, capsys):
    assert cli.main(generate(dirs, "--compare")) == 1
    assert "--compare compares a steered run" in capsys.readouterr().err


def test_steer_text_and_l0_sentence():
    assert steer_text({"layer": 6, "feature": 942, "value": 40.0, "mode": "clamp"}) == "L6/942 clamped to 40"
    assert steer_text({"layer": 6, "feature": 942, "value": 0.0}) == "L6/942 ablated (clamped to 0)"
    assert steer_text({"layer": 6, "feature": 1, "value": -2, "mode": "add", "positions": "generated"}) == \
        "L6/1 -2 at generated positions"
    assert steer_text({"layer": 6, "feature": 1, "value": 0.5, "mode": "scale"}) == "L6/1 x0.5"
    l0 = torch.tensor([[[32, 32], [33, 32], [31, 32]]])
    feats = Features(torch.zeros(1, 3, 2, 1, dtype=torch.int32), torch.zeros(1, 3, 2, 1), l0,
                     torch.ones(1, 3, dtype=torch.bool), [6, 7])
    sentence = topk_l0_sentence(32, feats, [{"layer": 6, "feature": 1, "value": 1.0}])
    assert "layer 6: 31-33" in sentence and "layer 7" not in sentence and "exactly" not in sentence
    assert "exactly 32" in topk_l0_sentence(32, feats.positions(0, 1), [])
