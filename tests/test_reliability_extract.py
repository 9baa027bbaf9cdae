"""Extraction outputs under changed inputs, damage, traversal and concurrency (issue 23, class 4).

- resume refuses when the data, the transcoder or the model changed in place (same sizes, same token counts);
- every damage to a shard or the manifest (byte flips, every field edited) is an ExtractError on read,
  never UnicodeDecodeError / MemoryError / KeyError / JSONDecodeError / AttributeError / IndexError;
  a same-size flip the cheap checks cannot see is caught by verify=True;
- shard paths resolve inside the folder;
- two writers on one folder: the second gets a clear error; temporary names never collide;
- text the tokenizer cannot take is refused up front, and any failure leaves the manifest saying so.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import random_transcoder
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from test_extract import char_tokenizer
from tiny_models import tiny_model

from sparse_clt_hf import feature_stats, iter_extracted, load_extracted
from sparse_clt_hf.corpus import open_data
from sparse_clt_hf.errors import ExtractError
from sparse_clt_hf.extract import extract
from sparse_clt_hf.extract_folder import folder_lock, sha256_file

REPO = Path(__file__).resolve().parents[1]
DOCS = ["hello world", "The quick brown fox jumps over the lazy dog.", "abc", "x" * 20, "short one", "end"]
KW = {"top_k": 4, "seq_len": 8, "batch_size": 2, "shard_size": 2, "progress": False}


def _write_docs(path: Path, docs=DOCS) -> None:
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("rel_extract")
    model, tok = tiny_model("llama"), char_tokenizer()
    tc = random_transcoder(d=32, layers=(0, 1, 2), widths=[32, 24, 32], seed=3)
    tc.config.model_name = None
    tc.save_pretrained(root / "clt")
    data = root / "docs.jsonl"
    _write_docs(data)
    out = root / "base"
    extract(model, tok, str(root / "clt"), data, out, **KW)
    return {"root": root, "model": model, "tok": tok, "clt": root / "clt", "data": data, "base": out}


def _copy(env, tmp_path) -> Path:
    out = tmp_path / "copy"
    shutil.copytree(env["base"], out)
    return out


def _readers(out: Path, verify=False):
    return [lambda: load_extracted(out, verify=verify), lambda: list(iter_extracted(out, verify=verify)),
            lambda: feature_stats(out, save=False, verify=verify)]


def _all_refuse(out: Path, match: str | None = None, verify=False) -> None:
    for read in _readers(out, verify):
        with pytest.raises(ExtractError, match=match):
            read()


# ---------------------------------------------------------------------------- changed inputs
def test_in_place_data_edit_with_the_same_token_count_is_refused_on_resume(env, tmp_path):
    data = tmp_path / "docs.jsonl"
    _write_docs(data)
    out = tmp_path / "out"
    extract(env["model"], env["tok"], str(env["clt"]), data, out, **KW)
    shards = {p.name: sha256_file(p) for p in (out / "shards").glob("*.safetensors")}
    os.utime(data)  # touched, same bytes: still resumes (nothing recomputed)
    extract(env["model"], env["tok"], str(env["clt"]), data, out, **KW)
    _write_docs(data, [DOCS[0].replace("w", "W"), *DOCS[1:]])  # same size, same token counts
    with pytest.raises(ExtractError, match="the data changed"):
        extract(env["model"], env["tok"], str(env["clt"]), data, out, **KW)
    assert {p.name: sha256_file(p) for p in (out / "shards").glob("*.safetensors")} == shards
    assert json.loads((out / "manifest.json").read_text())["status"] == "complete"


def test_transcoder_replaced_at_the_same_path_is_refused(env, tmp_path):
    clt = tmp_path / "clt"
    shutil.copytree(env["clt"], clt)
    out = tmp_path / "out"
    extract(env["model"], env["tok"], str(clt), env["data"], out, **KW)
    other = random_transcoder(d=32, layers=(0, 1, 2), widths=[32, 24, 32], seed=4)
    other.config.model_name = None
    shutil.rmtree(clt)
    other.save_pretrained(clt)
    with pytest.raises(ExtractError, match="the transcoder changed"):
        extract(env["model"], env["tok"], str(clt), env["data"], out, **KW)


def test_model_with_other_weights_under_the_same_name_is_refused(env, tmp_path):
    out = tmp_path / "out"
    extract(env["model"], env["tok"], str(env["clt"]), env["data"], out, model_name="m", **KW)
    other = tiny_model("llama", seed=1)
    with pytest.raises(ExtractError, match="the model changed"):
        extract(other, env["tok"], str(env["clt"]), env["data"], out, model_name="m", **KW)


# ---------------------------------------------------------------------------- damaged shards
def _header(path: Path) -> tuple[int, dict]:
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return n, json.loads(raw[8 : 8 + n])


def _rewrite_header(path: Path, edit) -> None:
    """Edit the header JSON in place, padded to the same length (so the file size stays the same)."""
    raw = path.read_bytes()
    n, header = _header(path)
    edit(header)
    text = json.dumps(header, separators=(",", ":")).encode()
    path.write_bytes(struct.pack("<Q", max(n, len(text))) + text.ljust(n) + raw[8 + n :])


HEADER_DAMAGE = {
    "length_2_62": lambda p: p.write_bytes(struct.pack("<Q", 2**62) + p.read_bytes()[8:]),
    "length_zero": lambda p: p.write_bytes(struct.pack("<Q", 0) + p.read_bytes()[8:]),
    "not_utf8": lambda p: p.write_bytes(p.read_bytes()[:9] + b"\xff\xfe" + p.read_bytes()[11:]),
    "not_json": lambda p: p.write_bytes(p.read_bytes()[:8] + b"{" * 8 + p.read_bytes()[16:]),
    "dtype_tag": lambda p: _rewrite_header(p, lambda h: h["values"].update(dtype="X32")),
    "dtype_swap": lambda p: _rewrite_header(p, lambda h: h["values"].update(dtype="I32")),
    "shape": lambda p: _rewrite_header(p, lambda h: h["values"].update(shape=[1, 1, 1, 1])),
    "shape_type": lambda p: _rewrite_header(p, lambda h: h["values"].update(shape="big")),
    "offsets_past_end": lambda p: _rewrite_header(p, lambda h: h["values"].update(data_offsets=[0, 10**9])),
    "offsets_type": lambda p: _rewrite_header(p, lambda h: h["values"].update(data_offsets={"a": 1})),
    "tensor_info_type": lambda p: _rewrite_header(p, lambda h: h.update(values=7)),
    "renamed_tensor": lambda p: _rewrite_header(p, lambda h: h.update(valuez=h.pop("values"))),
    "metadata_type": lambda p: _rewrite_header(p, lambda h: h.update(__metadata__=[1])),
    "metadata_edit": lambda p: _rewrite_header(p, lambda h: h["__metadata__"].update(
        {"sparse-clt-hf-extract": h["__metadata__"]["sparse-clt-hf-extract"].replace("32", "99")})),
    "header_is_a_list": lambda p: _rewrite_header(p, lambda h: (h.clear())),
}


@pytest.mark.parametrize("damage", sorted(HEADER_DAMAGE))
def test_damaged_shard_headers_are_extract_errors(env, tmp_path, damage):
    out = _copy(env, tmp_path)
    path = out / "shards" / "00001.safetensors"
    HEADER_DAMAGE[damage](path)
    _all_refuse(out)
    _fix_size(out, 1)  # the size agrees with the manifest again: the header checks alone must catch it
    _all_refuse(out)


def _fix_size(out: Path, index: int) -> None:
    m = json.loads((out / "manifest.json").read_text())
    m["shards"][index]["bytes"] = (out / m["shards"][index]["file"]).stat().st_size
    m["bytes"] = sum(s["bytes"] for s in m["shards"])
    (out / "manifest.json").write_text(json.dumps(m))


def _edit_tensors(out: Path, index: int, edit) -> None:
    """Rewrite a shard with edited tensors and fix its size in the manifest (not its hash): only the
    cheap content checks stand between the damage and the reader."""
    from safetensors import safe_open

    path = out / "shards" / f"{index:05d}.safetensors"
    with safe_open(str(path), "pt") as g:
        meta = g.metadata()
    t = load_file(str(path))
    edit(t)
    save_file(t, str(path), metadata=meta)
    _fix_size(out, index)


TENSOR_DAMAGE = {
    "values_1e30": (lambda t: t["values"].view(-1).__setitem__(0, 1e30), "outside"),
    "values_nan": (lambda t: t["values"].view(-1).__setitem__(0, float("nan")), "finite"),
    "id_past_width": (lambda t: t["indices"].view(-1).__setitem__(0, 40), "feature ids"),
    "id_below": (lambda t: t["indices"].view(-1).__setitem__(0, -5), "feature ids"),
    "mask_flip": (lambda t: t["mask"].view(-1).__setitem__(0, not bool(t["mask"].view(-1)[0])), "mask"),
    "lengths": (lambda t: t["lengths"].__setitem__(0, 99), "mask"),
    "token_on_padding": (lambda t: t["token_ids"].__setitem__((-1, -1), 7) if not t["mask"][-1, -1]
                         else t["token_ids"].__setitem__((0, 0), -1), "token ids"),
    "documents": (lambda t: t["documents"].__setitem__(0, 10**6), "documents"),
    "offsets": (lambda t: t["offsets"].__setitem__(-1, -3), "offsets"),
    "l0_negative": (lambda t: t["l0"].view(-1).__setitem__(0, -1), "l0"),
    "missing_tensor": (lambda t: t.pop("l0"), "missing"),
    "dtype": (lambda t: t.__setitem__("mask", t["mask"].to(torch.uint8)), "mask"),
    "shape": (lambda t: t.__setitem__("values", t["values"][:, :, :, :2].contiguous()), "shape"),
}


@pytest.mark.parametrize("damage", sorted(TENSOR_DAMAGE))
def test_every_tensor_of_a_shard_edited_is_caught_by_the_cheap_checks(env, tmp_path, damage):
    out = _copy(env, tmp_path)
    edit, message = TENSOR_DAMAGE[damage]
    _edit_tensors(out, 1, edit)
    _all_refuse(out, message)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(position=st.floats(0, 1, exclude_max=True), mask=st.integers(1, 255))
def test_any_byte_flip_is_an_extract_error_with_verify_and_never_another_error(env, tmp_path, position, mask):
    out = tmp_path / "flip"
    if not out.exists():
        shutil.copytree(env["base"], out)
    path = out / "shards" / "00000.safetensors"
    good = path.read_bytes()
    i = int(position * len(good))
    try:
        path.write_bytes(good[:i] + bytes([good[i] ^ mask]) + good[i + 1 :])
        with pytest.raises(ExtractError):
            load_extracted(out, verify=True)
        try:
            load_extracted(out)  # cheap checks: an ExtractError, or values that pass every check
        except ExtractError:
            pass
    finally:
        path.write_bytes(good)


# ---------------------------------------------------------------------------- damaged manifests
BAD_VALUES = [None, "x", -1, 1.5, [], {}, 2**70, [[[]]], True]
MANIFEST_FIELDS = ["format", "status", "layers", "n_features", "top_k", "n_documents", "n_windows", "n_tokens",
                   "n_shards", "shards", "arguments"]
SHARD_FIELDS = ["index", "windows", "tokens", "bytes", "sha256", "file", "first_document", "first_offset",
                "last_document", "value_range"]


@pytest.mark.parametrize("field", MANIFEST_FIELDS)
def test_every_manifest_field_edited_or_removed_is_an_extract_error(env, tmp_path, field):
    out = _copy(env, tmp_path)
    good = json.loads((out / "manifest.json").read_text())
    for value in [*BAD_VALUES, "<removed>"]:
        m = dict(good)
        if value == "<removed>":
            m.pop(field)
        else:
            m[field] = value
        (out / "manifest.json").write_text(json.dumps(m))
        if field == "arguments" and (value == {} or value == "<removed>"):
            load_extracted(out)  # (readers do not use the arguments)
            continue
        _all_refuse(out)


@pytest.mark.parametrize("field", SHARD_FIELDS)
def test_every_shard_record_field_edited_is_an_extract_error(env, tmp_path, field):
    out = _copy(env, tmp_path)
    good = json.loads((out / "manifest.json").read_text())
    for value in BAD_VALUES + ([[5.0, 6.0]] if field == "value_range" else []):
        m = json.loads(json.dumps(good))
        m["shards"][1][field] = value
        (out / "manifest.json").write_text(json.dumps(m))
        _all_refuse(out)


@pytest.mark.parametrize("content", [b"", b"\xff\xfe{}", b"[1, 2]", b'{"format": "sparse-clt-hf-extract"}',
                                     b"{" * 10000, b"\x00" * 50])
def test_unreadable_manifests_are_extract_errors(env, tmp_path, content):
    out = _copy(env, tmp_path)
    (out / "manifest.json").write_bytes(content)
    _all_refuse(out)


@pytest.mark.parametrize("name", ["../../../etc/passwd", "/etc/passwd", "shards/../../outside.safetensors",
                                  "shards/link.safetensors", "shards", ""])
def test_shard_paths_must_resolve_inside_the_folder(env, tmp_path, name):
    out = _copy(env, tmp_path)
    outside = tmp_path / "outside.safetensors"
    shutil.copy(out / "shards" / "00000.safetensors", outside)
    (out / "shards" / "link.safetensors").symlink_to(outside)
    m = json.loads((out / "manifest.json").read_text())
    m["shards"][0]["file"] = name
    (out / "manifest.json").write_text(json.dumps(m))
    _all_refuse(out, "inside the folder|outside the folder|missing")


# ---------------------------------------------------------------------------- concurrency
def test_a_second_extraction_into_a_locked_folder_is_refused(env, tmp_path):
    out = tmp_path / "out"
    with folder_lock(out):
        with pytest.raises(ExtractError, match="another extraction is writing into"):
            extract(env["model"], env["tok"], str(env["clt"]), env["data"], out, **KW)
    extract(env["model"], env["tok"], str(env["clt"]), env["data"], out, **KW)  # once released: fine
    assert load_extracted(out).batch_size == len(DOCS)


def test_the_lock_is_held_across_processes_and_released_when_its_holder_dies(env, tmp_path):
    out = tmp_path / "out"
    script = ("import sys, time; from pathlib import Path; from sparse_clt_hf.extract_folder import folder_lock\n"
              "with folder_lock(Path(sys.argv[1])):\n print('held', flush=True); time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", script, str(out)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(ExtractError, match=f"process {proc.pid} holds"):
            extract(env["model"], env["tok"], str(env["clt"]), env["data"], out, **KW)
    finally:
        proc.kill()
        proc.wait()
    extract(env["model"], env["tok"], str(env["clt"]), env["data"], out, **KW)


@pytest.mark.slow
def test_two_extract_processes_on_one_folder(env, tmp_path):
    """Two real `extract` commands started together on one folder: each either completes or stops with
    the lock error (never ENOENT or a mixed folder), and the folder ends complete and readable."""
    model_dir = tmp_path / "model"
    env["model"].save_pretrained(model_dir)
    env["tok"].save_pretrained(model_dir)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "sparse_clt_hf", "extract", "--model", str(model_dir), "--clt", str(env["clt"]),
           "--data", str(env["data"]), "--out", str(out), "--top-k", "4", "--seq-len", "8", "--batch-size", "2",
           "--shard-size", "2", "--no-progress"]
    penv = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    procs = [subprocess.Popen(cmd, env=penv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [(p.wait(300), p.stderr.read()) for p in procs]
    for rc, err in results:
        assert rc == 0 or "another extraction is writing into" in err, err[-2000:]
        assert "FileNotFoundError" not in err and "Traceback" not in err, err[-2000:]
    assert any(rc == 0 for rc, _ in results)
    assert load_extracted(out, verify=True).batch_size == len(DOCS)


# ---------------------------------------------------------------------------- data the tokenizer refuses
def test_lone_surrogate_is_refused_up_front_naming_line_and_character(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "fine"}\n{"text": "bad \\ud800 here"}\n')
    with pytest.raises(ExtractError, match=r"d\.jsonl:2.*'\\ud800' at character 4.*surrogate"):
        open_data(data)


def test_a_failure_after_the_manifest_is_written_leaves_it_saying_what_happened(env, tmp_path):
    class Refusing:
        def __call__(self, texts, **kw):
            if any("fox" in t for t in texts):
                raise TypeError("TextEncodeInput must be Union[TextInputSequence, ...]")
            return env["tok"](texts, **kw)

    out = tmp_path / "out"
    with pytest.raises(ExtractError, match="tokenizer refused documents 0..5.*TypeError"):
        extract(env["model"], Refusing(), str(env["clt"]), env["data"], out, **KW)
    m = json.loads((out / "manifest.json").read_text())
    assert m["status"] == "failed" and "tokenizer refused" in m["error"]
    with pytest.raises(ExtractError, match="unfinished.*failed.*tokenizer refused"):
        load_extracted(out)
    extract(env["model"], env["tok"], str(env["clt"]), env["data"], out, **KW)  # resumes to complete
    assert json.loads((out / "manifest.json").read_text())["status"] == "complete"


def test_linked_txt_outside_a_data_folder_is_refused_unless_asked(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "a.txt").write_text("inside")
    secret = tmp_path / "secret.txt"
    secret.write_text("outside")
    (folder / "b.txt").symlink_to(secret)
    (folder / "c.txt").symlink_to(folder / "a.txt")  # a link inside the folder is fine
    with pytest.raises(ExtractError, match="'b.txt' links to .*outside the data folder.*follow_links"):
        open_data(folder)
    source = open_data(folder, follow_links=True)
    assert list(source.documents()) == ["inside", "outside", "inside"]


def test_unique_temporary_names_per_process(tmp_path):
    from sparse_clt_hf.extract_folder import write_json_atomic

    seen = []
    real = os.replace
    try:
        os.replace = lambda a, b: seen.append(Path(a).name) or real(a, b)
        write_json_atomic(tmp_path / "x.json", {"a": 1})
    finally:
        os.replace = real
    assert seen == [f"x.json.{os.getpid()}.tmp"]


_json = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False),
                               st.text(max_size=8), st.just("../../x"), st.just("/etc/passwd")),
                     lambda inner: st.one_of(st.lists(inner, max_size=3),
                                             st.dictionaries(st.text(max_size=4), inner, max_size=3)), max_leaves=8)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(where=st.sampled_from(["manifest", "shard"]), field=st.sampled_from(MANIFEST_FIELDS + SHARD_FIELDS + ["new"]),
       value=_json)
def test_any_json_value_in_any_field_reads_or_is_an_extract_error(env, tmp_path, where, field, value):
    out = tmp_path / "fields"
    if not out.exists():
        shutil.copytree(env["base"], out)
    path = out / "manifest.json"
    good = path.read_text()
    m = json.loads(good)
    (m if where == "manifest" else m["shards"][0])[field] = value
    try:
        path.write_text(json.dumps(m))
        for read in _readers(out):
            try:
                read()
            except ExtractError:
                pass
    finally:
        path.write_text(good)
