"""Every example runs end to end on the tiny random model (SPARSE_CLT_HF_EXAMPLE_TINY=1)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture
def load_example(monkeypatch):
    monkeypatch.setenv("SPARSE_CLT_HF_EXAMPLE_TINY", "1")
    monkeypatch.syspath_prepend(str(EXAMPLES))

    def load(name: str):
        spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    yield load
    sys.modules.pop("_common", None)


def test_generate_features(load_example, capsys):
    load_example("generate_features").main("hello")
    out = capsys.readouterr().out
    assert "Features(batch=1" in out and "records:" in out
    assert out.count("L") >= 12  # one line with layer/feature hits per generated token


def test_streaming_callback(load_example, capsys):
    sizes = load_example("streaming_callback").main("hello")
    prompt_len = len("hello")  # the tiny tokenizer has no chat template: one id per character
    assert sizes[0] == prompt_len and sizes[1:] == [1] * 7  # prefill, then one position per decode step
    lines = capsys.readouterr().out.splitlines()
    text = next(x for x in lines if x.startswith("text: "))[len("text: "):]
    assert len(text) == 8  # one character per generated token
    steps = [x for x in lines if x.startswith("step ")]
    assert len(steps) == 7  # every token fed back is printed as it streams, with its strongest feature
    for i, line in enumerate(steps):
        assert f'"{text[i]}"' in line and "strongest L" in line
    assert f'last token (not fed back): "{text[-1]}"' in lines


def test_train_and_save(load_example, tmp_path):
    metrics = load_example("train_and_save").main(str(tmp_path / "clt"))
    assert (tmp_path / "clt" / "config.yaml").is_file()
    assert set(metrics["fvu"]) == {0, 1} and all(v < 1 for v in metrics["fvu"].values())


def test_decode_memory(load_example, capsys):
    results = load_example("decode_memory").main(["--quick", "--new", "4", "--width", "64"])
    assert [r[0] for r in results] == ["plain", "attached", "plain", "attached"]
    assert all(r[3] == 0 for r in results[::2]) and all(r[3] > 0 for r in results[1::2])
    assert "peak RSS above start" in capsys.readouterr().out


def test_steering(load_example, capsys):
    result = load_example("steering").main("hello", max_new_tokens=8)
    assert result["reads"] == [round(result["value"], 4)]  # the steered feature reads the clamped value
    assert result["steered_ids"] != result["plain_ids"]
    out = capsys.readouterr().out
    assert "plain:" in out and "steered:" in out and "clamped to" in out


def test_examples_are_short_by_default_with_a_long_version(load_example):
    """About a minute on a laptop CPU by default (the decode example used to generate 4 x 1024 tokens, over
    5 minutes, with no progress); the long runs are a flag away."""
    decode = load_example("decode_memory")
    assert decode.options([]).new <= 128 and decode.options(["--long"]).new == 1024
    assert decode.options(["--long", "--new", "7"]).new == 7
    train = load_example("train_and_save")
    assert train.SHORT["tokens"] * train.SHORT["epochs"] <= 30_000 < train.LONG["tokens"]
