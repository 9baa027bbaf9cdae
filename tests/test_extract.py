"""`sparse-clt-hf extract` on a tiny model saved to disk: features against an independent reference
(own hooks + the textbook encoder, one window at a time), 1 vs 2 processes, resume after an
interruption, data formats, and bad input rejected before any work."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tiny_models
import torch
from conftest import assert_features_match, random_transcoder, textbook_dense
from tiny_models import tiny_model

from sparse_clt_hf import cli, iter_extracted, load_extracted
from sparse_clt_hf import extract as extract_mod
from sparse_clt_hf.errors import ExtractError

REPO = Path(__file__).resolve().parents[1]
SEQ_LEN = 16
TOP_K = 5

DOCS = [
    "hello world",
    "The quick brown fox jumps over the lazy dog, twice over.",  # > 3 windows
    "",  # a document without tokens: an empty row
    "abc",
    "Sparse transcoders read the residual stream.",
    "x" * 16,  # exactly one window
    "y" * 17,  # one window and one token
    "the end of a small corpus, with some more characters to read",
    "short",
]


def char_tokenizer():
    return tiny_models.char_tokenizer(chat_template=None)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("extract")
    tiny_model("llama").save_pretrained(root / "model")
    char_tokenizer().save_pretrained(root / "model")
    tc = random_transcoder(d=32, layers=(0, 1, 2), widths=[64, 48, 64], site="resid_mid", seed=3)
    tc.config.model_name = None
    tc.save_pretrained(root / "clt")
    data = root / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(DOCS)))
    return {"root": root, "model": root / "model", "clt": root / "clt", "data": data, "tc": tc}


def extract_args(setup, out, *extra):
    return ["extract", "--model", str(setup["model"]), "--clt", str(setup["clt"]), "--data", str(setup["data"]),
            "--out", str(out), "--top-k", str(TOP_K), "--seq-len", str(SEQ_LEN), "--batch-size", "3",
            "--shard-size", "4", "--no-progress", *extra]


@pytest.fixture(scope="module")
def reference_run(setup):
    out = setup["root"] / "ref"
    assert cli.main(extract_args(setup, out)) == 0
    return out


def reference_features(setup, text: str, layers=(0, 1, 2)):
    """Dense activations per layer [n_tokens, m] of one document, window by window (each window a
    separate forward pass from position 0), read with plain hooks at resid_mid (the input of
    post_attention_layernorm) and encoded by the textbook formula."""
    from transformers import AutoModelForCausalLM

    model = setup.setdefault("_model", AutoModelForCausalLM.from_pretrained(str(setup["model"])).eval())
    ids = char_tokenizer()(text)["input_ids"]
    dense = {layer: [] for layer in layers}
    for off in range(0, len(ids), SEQ_LEN):
        seen = {}
        handles = [model.model.layers[layer].post_attention_layernorm.register_forward_pre_hook(
            lambda mod, args, _l=layer, _s=seen: _s.__setitem__(_l, args[0][0].detach().clone())) for layer in layers]
        try:
            with torch.no_grad():
                model(input_ids=torch.tensor([ids[off : off + SEQ_LEN]]))
        finally:
            for h in handles:
                h.remove()
        for layer in layers:
            dense[layer].append(textbook_dense(setup["tc"], seen[layer], layer))
    return ids, {layer: torch.cat(v) if v else None for layer, v in dense.items()}


def test_features_match_independent_reference(setup, reference_run):
    feats = load_extracted(reference_run)
    manifest = json.loads((reference_run / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["n_documents"] == len(DOCS)
    assert manifest["n_shards"] == len(manifest["shards"]) > 2
    assert feats.batch_size == len(DOCS) and feats.layers == [0, 1, 2] and feats.n_features == [64, 48, 64]
    assert feats.num_positions == max(len(d) for d in DOCS) and feats.k == TOP_K
    for row, text in enumerate(DOCS):
        ids, dense = reference_features(setup, text)
        n = len(ids)
        assert feats.mask[row].tolist() == [True] * n + [False] * (feats.num_positions - n)
        assert feats.token_ids[row, :n].tolist() == ids
        assert (feats.indices[row, n:] == -1).all()
        for li, layer in enumerate(feats.layers):
            if n:
                assert_features_match(feats.values[row, :n, li], feats.indices[row, :n, li], feats.l0[row, :n, li],
                                      dense[layer], TOP_K)


def test_shards_are_windows_with_offsets(reference_run):
    seen = []
    for shard in iter_extracted(reference_run, verify=True):
        assert shard.features.batch_size <= 4
        for d, off, length in zip(shard.documents.tolist(), shard.offsets.tolist(),
                                  shard.features.mask.sum(1).tolist()):
            seen.append((d, off, length))
    expect = [(d, off, min(SEQ_LEN, len(t) - off)) for d, t in enumerate(DOCS) for off in range(0, len(t), SEQ_LEN)]
    assert seen == expect


def assert_same_output(a: Path, b: Path, *, bitwise: bool = True) -> None:
    fa, fb = load_extracted(a), load_extracted(b)
    for name in ("indices", "values", "l0", "mask", "token_ids"):
        x, y = getattr(fa, name), getattr(fb, name)
        assert torch.equal(x, y) if bitwise or name != "values" else torch.allclose(x, y, atol=1e-6), name
    if bitwise:  # byte-identical shards
        ma, mb = (json.loads((p / "manifest.json").read_text()) for p in (a, b))
        assert [s["sha256"] for s in ma["shards"]] == [s["sha256"] for s in mb["shards"]]


def test_two_processes_give_the_same_output(setup, reference_run, tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` on CPU: two gloo processes split the shards,
    and write the same bytes as one process with as many threads (accelerate gives each CPU process
    OMP_NUM_THREADS=1; CPU kernels round differently with other thread counts). Both are fresh
    processes: the command sets MKL_CBWR before the first matmul, which this pytest process has passed."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    env.pop("MKL_CBWR", None)
    one, two = tmp_path / "one", tmp_path / "two"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]
    start = time.perf_counter()
    # the two-process run with progress on (no terminal here: no bar, only the closing summary line)
    with_progress = [a for a in extract_args(setup, two) if a != "--no-progress"]
    for cmd in ([sys.executable, "-m", "sparse_clt_hf", *extract_args(setup, one)],
                [*launch, "-m", "sparse_clt_hf", *with_progress]):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-4000:]
    assert json.loads((one / "manifest.json").read_text())["world_size"] == 1
    manifest = json.loads((two / "manifest.json").read_text())
    assert manifest["world_size"] == 2, "accelerate started one process"
    # the summary counts the shards of both processes (it used to say rank 0's only), and no bar was drawn
    n = manifest["n_shards"]
    assert f"{n} shards computed ({(n + 1) // 2} + {n // 2} by 2 processes), 0 reused" in proc.stderr, proc.stderr
    assert "\r" not in proc.stderr and "\x1b[" not in proc.stderr
    assert_same_output(one, two)
    assert_same_output(one, reference_run, bitwise=False)
    print(f"1- and 2-process extract: {time.perf_counter() - start:.1f} s")


def test_shard_summary_reports_every_process_and_the_idle_ones():
    one = extract_mod.shard_summary([{"computed": 3, "skipped": 1}])
    assert one == "3 shards computed, 1 reused"
    two = extract_mod.shard_summary([{"computed": 1, "skipped": 0}, {"computed": 0, "skipped": 0}])
    assert two.startswith("1 shards computed (1 + 0 by 2 processes), 0 reused; process 1 had no shard")


def test_interrupted_run_resumes_to_the_same_output(setup, reference_run, tmp_path, monkeypatch):
    out = tmp_path / "resume"
    real_write = extract_mod._write_shard
    written = []

    def write_then_die(directory, index, *args, **kwargs):
        if len(written) == 3:
            raise KeyboardInterrupt("killed")
        written.append(index)
        return real_write(directory, index, *args, **kwargs)

    monkeypatch.setattr(extract_mod, "_write_shard", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        cli.main(extract_args(setup, out))
    stopped = json.loads((out / "manifest.json").read_text())
    assert (stopped["status"], stopped["error"]) == ("failed", "KeyboardInterrupt: killed")  # says what happened
    with pytest.raises(ExtractError, match="unfinished.*KeyboardInterrupt: killed"):
        load_extracted(out)
    # one finished shard is damaged (truncated) and a temporary file is left behind
    damaged = extract_mod.shard_path(out, 1)
    damaged.write_bytes(damaged.read_bytes()[:100])
    (out / "shards" / "00003.safetensors.tmp").write_bytes(b"partial")

    computed = []
    monkeypatch.setattr(extract_mod, "_write_shard",
                        lambda d, i, *a, **k: computed.append(i) or real_write(d, i, *a, **k))
    assert cli.main(extract_args(setup, out)) == 0
    n_shards = json.loads((reference_run / "manifest.json").read_text())["n_shards"]
    assert computed == [1] + list(range(3, n_shards))  # shards 0 and 2 were kept
    assert not list((out / "shards").glob("*.tmp"))
    assert_same_output(out, reference_run)
    # a finished extraction rerun computes nothing
    computed.clear()
    assert cli.main(extract_args(setup, out)) == 0
    assert computed == []


def test_data_formats_give_the_same_documents(setup, reference_run, tmp_path):
    ref = load_extracted(reference_run)
    kept = [i for i, d in enumerate(DOCS) if d]  # blank lines are not documents in text files
    text = tmp_path / "docs.txt"
    text.write_text("\n".join(DOCS) + "\n")
    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    for j, i in enumerate(kept):  # sorted by relative path: a_00.txt ... then sub/...
        (folder / (f"a_{j:02d}.txt" if j < 3 else f"sub/b_{j:02d}.txt")).write_text(DOCS[i])
    (folder / "notes.md").write_text("ignored")
    for data in (text, folder):
        out = tmp_path / f"out_{data.name}"
        args = extract_args(setup, out)
        args[args.index("--data") + 1] = str(data)
        assert cli.main(args) == 0
        got = load_extracted(out)
        assert got.batch_size == len(kept)
        for name in ("indices", "values", "token_ids", "mask"):
            assert torch.equal(getattr(got, name), getattr(ref, name)[kept]), (data, name)


def test_datasets_source(setup, reference_run, tmp_path):
    datasets = pytest.importorskip("datasets")
    saved = tmp_path / "ds"
    datasets.Dataset.from_dict({"text": DOCS}).save_to_disk(str(saved))
    out = tmp_path / "out"
    args = extract_args(setup, out)
    args[args.index("--data") + 1] = str(saved)
    assert cli.main(args) == 0
    assert_same_output(out, reference_run)


def test_max_docs_and_single_shard_is_memory_mapped(setup, tmp_path):
    out = tmp_path / "one"
    args = extract_args(setup, out, "--max-docs", "2")
    args[args.index("--shard-size") + 1] = "8"
    args[args.index("--seq-len") + 1] = "64"
    assert cli.main(args) == 0
    feats = load_extracted(out)
    assert feats.batch_size == 2 and feats.num_positions == len(DOCS[1])
    ids, dense = reference_features(setup, DOCS[1][:16])
    assert feats.token_ids[1, :16].tolist() == ids


def error_of(capsys, argv) -> str:
    assert cli.main(argv) == 1
    return capsys.readouterr().err


def test_bad_input_is_a_clear_error_before_any_work(setup, tmp_path, capsys, monkeypatch):
    def no_forward(*a, **k):
        raise AssertionError("a forward pass ran")

    monkeypatch.setattr(extract_mod, "_run_shard", no_forward)

    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    args = extract_args(setup, tmp_path / "o1")
    args[args.index("--data") + 1] = str(empty)
    assert "no documents" in error_of(capsys, args)

    no_text = tmp_path / "bad.jsonl"
    no_text.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"body": "x"}) + "\n")
    args[args.index("--data") + 1] = str(no_text)
    err = error_of(capsys, args)
    assert "bad.jsonl:2" in err and "no 'text' field" in err and "body" in err

    wide = tmp_path / "wide"
    random_transcoder(d=48, layers=(0,)).save_pretrained(wide)
    args = extract_args(setup, tmp_path / "o2")
    args[args.index("--clt") + 1] = str(wide)
    assert "d_model=48" in error_of(capsys, args)
    assert not (tmp_path / "o2").exists()

    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert "is not a folder" in error_of(capsys, extract_args(setup, blocker / "out"))
    assert "is not a folder" in error_of(capsys, extract_args(setup, blocker))
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        assert "not writable" in error_of(capsys, extract_args(setup, ro / "out"))

    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    assert "not empty" in error_of(capsys, extract_args(setup, busy))


def test_other_arguments_on_an_existing_extraction_are_refused(setup, reference_run, tmp_path, capsys):
    out = tmp_path / "copy"
    shutil.copytree(reference_run, out)
    args = extract_args(setup, out)
    args[args.index("--top-k") + 1] = "7"
    err = error_of(capsys, args)
    assert "other arguments" in err and "top_k" in err


def test_extraction_keeps_its_tokenizer_for_later_commands(setup, reference_run, monkeypatch, capsys):
    """The tokenizer is saved next to the shards, so `stats` decodes its labels from it without loading the
    model's tokenizer files again (a GGUF takes seconds to parse): the same ids decode the same text."""
    from transformers import AutoTokenizer

    saved = AutoTokenizer.from_pretrained(str(reference_run / "tokenizer"))
    ids = char_tokenizer()("def f(x):")["input_ids"]
    assert saved("def f(x):")["input_ids"] == ids and saved.decode(ids) == char_tokenizer().decode(ids)
    from sparse_clt_hf import models

    real = models.load_tokenizer
    monkeypatch.setattr(models, "load_tokenizer", lambda name, *a, **k: real(name, *a, **k) if str(name).endswith(
        "tokenizer") else pytest.fail(f"loaded {name} instead of the extraction's tokenizer"))
    assert cli.main(["stats", str(reference_run), "--json", "--show", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["layers"][0]["most_frequent"][0]["label"]
