"""The command line as a newcomer meets it: answers ``--help`` and bad arguments without importing torch
or transformers; one set of model options (device, dtype, device map, attention kernel) for every
command that loads a model; ``generate`` without ``--clt`` uses the demo transcoder; ``view`` of saved
features and of an extraction; ``stats`` labels; a transcoder folder with a gap in its layer files."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from conftest import random_transcoder
from test_demo import char_tokenizer
from test_ux import demo_env, tiny_demo  # noqa: F401  (fixtures: the demo on a tiny model)
from test_view import run_chromium
from tiny_models import tiny_model

from sparse_clt_hf import CrossLayerTranscoder, Features, FeatureStats, cli, load_extracted
from sparse_clt_hf import models as models_mod
from sparse_clt_hf.commands import COMMANDS, _options
from sparse_clt_hf.errors import TranscoderFormatError
from sparse_clt_hf.view import DATA_ID

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "safetensors", "huggingface_hub", "accelerate")
MODEL_COMMANDS = ("demo", "generate", "extract", "train", "bench", "explain")


# ---------------------------------------------------------------------------- parsing imports nothing heavy
PARSE_ONLY = """
import contextlib, io, json, sys
from sparse_clt_hf import cli
from sparse_clt_hf.commands import COMMANDS
calls = [["--help"], *[[name, "--help"] for name in COMMANDS], ["generate", "--device", "gpu", "--prompt", "x"],
         ["demo", "--dtype", "fp8"], ["view"], ["stats"]]
codes = []
for argv in calls:
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            cli.main(argv)
        codes.append(None)
    except SystemExit as exc:
        codes.append(exc.code)
print(json.dumps({"codes": codes, "loaded": [m for m in HEAVY if m in sys.modules]}))
"""


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120, env=env, cwd=REPO)


def test_help_and_argument_errors_import_neither_torch_nor_transformers():
    """Every sub-command's --help and argument errors are answered after importing the CLI only: checked
    in a fresh process's sys.modules (the import of torch alone takes seconds)."""
    proc = _run("-c", f"HEAVY = {HEAVY!r}\n{PARSE_ONLY}")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["loaded"] == []
    assert report["codes"] == [0] * (1 + len(COMMANDS)) + [2, 2, 2, 2]


@pytest.mark.parametrize("argv", [["--help"], ["generate", "--help"], ["generate", "--device", "gpu"]])
def test_python_dash_m_answers_before_importing_torch(argv):
    """``python -m sparse_clt_hf`` as a user runs it, with ``-X importtime``: no torch or transformers module
    is imported at all (measured by the interpreter, not by the clock)."""
    proc = _run("-X", "importtime", "-m", "sparse_clt_hf", *argv)
    assert proc.returncode == (0 if "--help" in argv else 2), proc.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert "sparse_clt_hf.cli" in imported
    assert not {m for m in imported if m.split(".")[0] in HEAVY}, sorted(m for m in imported if m.split(".")[0] in HEAVY)
    if "--help" not in argv:
        assert "invalid device 'gpu'" in proc.stderr


def test_the_package_imports_lazily_and_keeps_its_public_names():
    code = ("import sys, sparse_clt_hf as s; assert 'torch' not in sys.modules; "
            "import sparse_clt_hf.feature_stats; from sparse_clt_hf import feature_stats, Features; "
            "assert callable(feature_stats) and not isinstance(feature_stats, type(sys)); "
            "assert Features.__name__ == 'Features' and set(s.__all__) <= set(dir(s)); print('ok')")
    proc = _run("-c", code)
    assert proc.stdout.strip() == "ok", proc.stderr


# ---------------------------------------------------------------------------- model options
def parse(*argv: str):
    return cli.build_parser().parse_args(["generate", "--prompt", "x", *argv])


@pytest.mark.parametrize("cuda,argv,expected", [
    (False, [], {"dtype": torch.float32}),  # the cpu: float32, loaded where from_pretrained loads
    (True, [], {"dtype": "auto", "device_map": "cuda"}),  # a GPU: the checkpoint's dtype, straight onto it
    (True, ["--device", "cpu"], {"dtype": torch.float32}),
    (False, ["--device", "cpu", "--dtype", "bfloat16"], {"dtype": torch.bfloat16}),
    (False, ["--dtype", "auto"], {"dtype": "auto"}),
    (True, ["--device", "cuda:1", "--dtype", "float16"], {"dtype": torch.float16, "device_map": "cuda:1"}),
    (False, ["--device-map", "auto"], {"dtype": "auto", "device_map": "auto"}),
    (False, ["--device-map", "auto", "--dtype", "float32", "--attn-implementation", "sdpa"],
     {"dtype": torch.float32, "device_map": "auto", "attn_implementation": "sdpa"}),
    (False, ["--attn-implementation", "kernels-community/flash-attn"],
     {"dtype": torch.float32, "attn_implementation": "kernels-community/flash-attn"}),
])
def test_model_options_give_the_from_pretrained_kwargs(monkeypatch, cuda, argv, expected):
    monkeypatch.setattr(_options, "_accelerator_available", lambda kind: cuda if kind == "cuda" else kind == "cpu")
    assert _options.model_load_kwargs(parse(*argv)) == expected


def test_an_unavailable_device_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.setattr(_options, "_accelerator_available", lambda kind: kind == "cpu")
    with pytest.raises(ValueError, match="--device cuda: no cuda device is available"):
        _options.model_load_kwargs(parse("--device", "cuda"))
    monkeypatch.setattr(models_mod, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    assert cli.main(["generate", "--prompt", "x", "--model", "m", "--clt", "c", "--device", "mps"]) == 1


@pytest.mark.parametrize("argv,message", [
    (["--device", "gpu"], "invalid device 'gpu'"),
    (["--device", "cuda:x"], "invalid device 'cuda:x'"),
    (["--dtype", "fp8"], "invalid choice: 'fp8'"),
    (["--attn-implementation", "sdpaa"], "invalid attention implementation 'sdpaa'"),
    (["--device", "cpu", "--device-map", "auto"], "not allowed with argument"),
])
def test_bad_model_options_are_argparse_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        parse(*argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("command", MODEL_COMMANDS)
def test_every_command_that_loads_a_model_takes_the_model_options(command, capsys):
    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    text = capsys.readouterr().out
    for option in ("--device", "--dtype", "--attn-implementation"):
        assert option in text, (command, option)
    assert ("--device-map" in text) == (command != "bench"), command  # bench measures one device


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    tiny_model("llama").save_pretrained(root / "model")
    char_tokenizer().save_pretrained(root / "model")
    tc = random_transcoder(d=32, layers=(0, 1, 2), site="resid_mid", seed=2)
    tc.config.model_name = None
    tc.save_pretrained(root / "clt")
    return root / "model", root / "clt"


def test_cpu_bfloat16_loads_a_bfloat16_model_and_records_in_it(tiny_dirs, tmp_path, monkeypatch):
    model_dir, clt_dir = tiny_dirs
    model, _, _ = _options.load_model(parse("--device", "cpu", "--dtype", "bfloat16"), str(model_dir))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    seen = []
    real = models_mod.load_model
    monkeypatch.setattr(models_mod, "load_model", lambda ref=None, **kw: seen.append(kw) or real(ref, **kw))
    out = tmp_path / "f.safetensors"
    assert cli.main(["generate", "--model", str(model_dir), "--clt", str(clt_dir), "--prompt", "hi", "--json",
                     "--max-new-tokens", "3", "--device", "cpu", "--dtype", "bfloat16", "--out", str(out)]) == 0
    assert seen == [{"dtype": torch.bfloat16}]
    assert Features.load(out).values.dtype == torch.bfloat16  # the transcoder ran in the model's dtype


# ---------------------------------------------------------------------------- generate without --clt
def test_generate_without_clt_uses_the_demo_transcoder(demo_env, capsys):  # noqa: F811
    _, _, folder, calls = demo_env
    argv = ["--prompt", "hi", "--max-new-tokens", "3", "--json"]
    assert cli.main(["generate", *argv]) == 0
    generated = json.loads(capsys.readouterr().out)
    assert cli.main(["demo", *argv]) == 0
    demo = json.loads(capsys.readouterr().out)
    assert calls == [None, None]  # the default model, both times
    assert generated["summary"]["transcoder"] == demo["summary"]["transcoder"] == str(folder)
    assert generated["summary"]["labels"] and generated["summary"]["demo_transcoder"]
    assert generated["tokens"] == demo["tokens"] and generated["text"] == demo["text"]


def test_generate_with_another_model_still_needs_clt(capsys, monkeypatch):
    monkeypatch.setattr(models_mod, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    assert cli.main(["generate", "--prompt", "hi", "--model", "org/other"]) == 1
    assert "--clt is required with --model org/other" in capsys.readouterr().err


# ---------------------------------------------------------------------------- view and stats
def page(path: Path) -> dict:
    text = path.read_text(encoding="utf-8")
    found = re.search(rf'<script type="application/json" id="{DATA_ID}">(.*?)</script>', text, re.S)
    assert found, path
    return json.loads(found.group(1))


def test_view_of_a_saved_features_file(tiny_dirs, tmp_path, capsys):
    model_dir, clt_dir = tiny_dirs
    feats_file = tmp_path / "f.safetensors"
    assert cli.main(["generate", "--model", str(model_dir), "--clt", str(clt_dir), "--prompt", "hello",
                     "--max-new-tokens", "4", "--out", str(feats_file), "--json"]) == 0
    capsys.readouterr()
    out = tmp_path / "v.html"
    assert cli.main(["view", str(feats_file), "--html", str(out), "--model", str(model_dir)]) == 0
    data = page(out)
    feats = Features.load(feats_file)
    assert [t["id"] for t in data["tokens"]] == feats.token_ids[0].tolist()
    first = data["tokens"][0]["f"][0]  # [feature, activation] pairs of layer 0 at position 0, strongest first
    assert [f for f, _ in first] == [f for f in feats.indices[0, 0, 0].tolist() if f >= 0]
    assert data["stats"] is None
    # bad input: a clear error before anything is written
    assert cli.main(["view", str(tmp_path / "missing.safetensors"), "--html", str(tmp_path / "x.html")]) == 1
    assert cli.main(["view", str(tmp_path), "--html", str(tmp_path / "x.html")]) == 1
    assert cli.main(["view", str(feats_file), "--html", str(tmp_path / "x.html"), "--row", "3"]) == 1
    err = capsys.readouterr().err
    assert "does not exist" in err and "not an extraction folder" in err and "--row 3 out of range" in err
    assert not (tmp_path / "x.html").exists()


DOCS = ["hello world", "", "The quick brown fox jumps over the lazy dog.", "abc <script>alert(1)</script>"]


@pytest.fixture(scope="module")
def extraction(tiny_dirs, tmp_path_factory):
    model_dir, clt_dir = tiny_dirs
    root = tmp_path_factory.mktemp("extraction")
    data = root / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    out = root / "out"
    assert cli.main(["extract", "--model", str(model_dir), "--clt", str(clt_dir), "--data", str(data),
                     "--out", str(out), "--top-k", "4", "--seq-len", "8", "--batch-size", "2", "--shard-size", "2",
                     "--no-progress"]) == 0
    return out


def test_stats_prints_labels_and_a_clean_path(extraction, capsys):
    assert cli.main(["stats", f"{extraction}/", "--show", "2"]) == 0
    text = capsys.readouterr().out
    assert f"saved {extraction}/stats.safetensors" in text and "//" not in text
    stats, tok = FeatureStats.load(extraction), char_tokenizer()
    for layer in stats.layers:
        freq = stats.frequency(layer)
        top = sorted(range(len(freq)), key=lambda f: (-float(freq[f]), f))[0]  # an independent sort
        label = [tok.decode([t]) for t in stats.top_tokens(layer, top, 3)]
        assert re.search(rf"L{layer}/{top}: .*{re.escape(repr(label))}", text), (layer, top, text)
    assert cli.main(["stats", str(extraction), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert all(isinstance(f["label"], list) for entry in report["layers"] for f in entry["most_frequent"])


def test_view_of_an_extraction_folder_is_an_index_of_its_documents(extraction, tmp_path, capsys):
    (extraction / "stats.safetensors").unlink(missing_ok=True)
    assert cli.main(["stats", str(extraction), "--json"]) == 0
    capsys.readouterr()
    out = tmp_path / "docs.html"
    assert cli.main(["view", str(extraction), "--html", str(out)]) == 0
    index = out.read_text(encoding="utf-8")
    assert "<script>alert" not in index and "&lt;script&gt;alert(1)" in index  # document text escaped
    links = re.findall(r'<li><a href="([^"]+)">document (\d+)</a>', index)
    assert [int(n) for _, n in links] == [0, 2, 3]  # document 1 has no tokens: listed, without a page
    assert "<li><span>document 1</span>" in index
    feats = load_extracted(extraction)  # the reference: every document assembled from the shards
    for href, n in links:
        row = int(n)
        ids = feats.token_ids[row][feats.mask[row]].tolist()
        data = page(out.parent / href)
        assert [t["id"] for t in data["tokens"]] == ids
        assert data["stats"]  # labels: the extraction's statistics were found
    # in a browser: every document listed with its text (the hostile one as text), each link opens a page
    dom = run_chromium("--dump-dom", out.resolve().as_uri())
    assert dom.count("<li>") == len(DOCS) and "alert(1)&lt;/script&gt;" in dom and "<script>alert" not in dom
    linked = run_chromium("--dump-dom", (out.parent / links[0][0]).resolve().as_uri())
    shown = [int(t) for t in re.findall(r'class="tok[^"]*" data-t="(\d+)"', linked)]
    assert shown == list(range(len(DOCS[0])))  # document 0's page shows each of its tokens once
    one = tmp_path / "one.html"
    assert cli.main(["view", str(extraction), "--html", str(one), "--row", "2"]) == 0
    assert [t["id"] for t in page(one)["tokens"]] == feats.token_ids[2][feats.mask[2]].tolist()


# ---------------------------------------------------------------------------- a gap in the layer files
def _plt_with_a_gap(root: Path, **config) -> Path:
    tc = random_transcoder(d=16, layers=(0, 1, 2), span=1, seed=1)
    tc.save_pretrained(root)
    (root / "layer_1.safetensors").unlink()
    cfg = yaml.safe_load((root / "config.yaml").read_text())
    for key in ("layers", "n_layers", "n_features"):
        cfg.pop(key, None)
    cfg.update(config)
    (root / "config.yaml").write_text(yaml.safe_dump(cfg))
    return root


def test_a_gap_in_the_layer_files_is_warned_about(tmp_path):
    folder = _plt_with_a_gap(tmp_path / "plt")
    with pytest.warns(UserWarning, match=r"no layer file for layers \[1\] between layers 0 and 2"):
        tc = CrossLayerTranscoder.from_pretrained(folder)
    assert tc.layers == [0, 2]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # asking for layers that exist: nothing to warn about
        assert CrossLayerTranscoder.from_pretrained(folder, layers=[2]).layers == [2]


def test_a_gap_is_refused_when_the_config_declares_the_number_of_layers(tmp_path):
    folder = _plt_with_a_gap(tmp_path / "plt", n_layers=3)
    with pytest.raises(TranscoderFormatError, match=r"layers \[1\] are listed by the config but their weights"):
        CrossLayerTranscoder.from_pretrained(folder)
    assert CrossLayerTranscoder.from_pretrained(folder, layers=[0, 2]).layers == [0, 2]
