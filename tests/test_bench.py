"""Smoke tests of ``sparse-clt-hf bench --quick``: it runs end to end and reports every figure, the new
W1 columns (hidden states, static cache, compiled static) and options included; the report's wording."""

from __future__ import annotations

import argparse
import copy
import json
import re

import pytest
import torch

from sparse_clt_hf import bench


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("bench") / "report.json"
    rc = bench.main(["--quick", "--json", "--out", str(out)])
    assert rc == 0
    return json.loads(out.read_text())


def test_quick_report_has_every_workload(quick_report: dict) -> None:
    assert {"meta", "w1", "w2", "w3", "w4", "targets"} <= set(quick_report)
    assert quick_report["meta"]["quick"] is True
    (w1,) = quick_report["w1"]
    variants = ("plain", "clt", "clt_w1", "hidden", "static_plain", "static_clt")
    for key in ("t_floor", "slowdown", "E", "slowdown_w1", "E_w1", "rows_per_layer", "hidden_ratio", "static_ratio",
                *(f"t_{v}" for v in variants), *(f"tok_s_{v}" for v in variants)):
        assert key in w1, key
    # 8 prompt tokens + 8 new tokens, the last of which never passes through the model, times batch 2.
    assert w1["rows_per_layer"] == 2 * (8 + 8 - 1)
    assert all(w1[f"t_{v}"] > 0 for v in (*variants, "floor"))
    # tokens/s is generated tokens x batch over the variant's time
    assert w1["tok_s_hidden"] == pytest.approx(2 * 8 / w1["t_hidden"])
    assert w1["static_compiled"] is False  # CPU without --compile: the static cache runs eagerly
    w2 = quick_report["w2"]
    for variant in ("clt", "plain", "hidden_states"):
        assert {"bytes_kept", "peak_bytes", "seconds", "encode_seconds"} <= set(w2[variant])
    # hidden states of 5 layers [1, 64, 64] fp32 are kept exactly; features are top-8 of 4 layers.
    assert w2["hidden_states"]["bytes_kept"] == 5 * 64 * 64 * 4
    assert w2["plain"]["bytes_kept"] == 0 and w2["hidden_states"]["encode_seconds"] > 0
    assert w2["bytes_kept_ratio"] > 1
    assert w2["t_floor"] == pytest.approx(w2["plain"]["seconds"] + w2["hidden_states"]["encode_seconds"])
    assert w2["clt_vs_floor"] == pytest.approx(w2["clt"]["seconds"] / w2["t_floor"])
    (w3,) = quick_report["w3"]
    assert {"t_matmul", "t_encode", "t_naive", "E_kernel", "vs_naive"} <= set(w3)
    assert len(quick_report["w4"]["memory_bytes"]) == quick_report["w4"]["calls"]


@pytest.mark.slow  # compiles (aot_eager): 10-20 s on the shared CPU, like test_capture_modes' compile tests
def test_compiled_static_columns_and_jumprelu(tmp_path) -> None:
    """--compile (CPU: transformers' compiled decode step) runs the static columns in blocks, compile apart;
    the attached compiled generate records every step (the capture engine raises otherwise)."""
    out = tmp_path / "report.json"
    rc = bench.main(["--quick", "--json", "--only", "w1,w3", "--columns", "static", "--compile",
                     "--compile-backend", "aot_eager", "--kernel-rows", "16,32", "--out", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    (w1,) = report["w1"]
    assert w1["static_compiled"] is True and w1["static_plain_compiled"] and w1["static_clt_compiled"]
    assert w1["compile_static_plain"] > 0 and w1["compile_static_clt"] > 0
    assert "t_clt" not in w1 and "t_hidden" not in w1 and w1["t_static_clt"] > 0
    assert [r["rows"] for r in report["w3"]] == [16, 32]
    text = bench.render(report)
    assert "Compiled static columns" in text and "tok/s static_clt" in text


def test_gemma_preset_is_the_issues_gpu_setup() -> None:
    parser = argparse.ArgumentParser()
    bench.add_bench_arguments(parser)
    s = bench.settings_from_args(parser.parse_args(["--gemma2-2b", "--device", "cuda"]))
    assert (s.widths, s.batches, s.new_tokens, s.prompt, s.top_k) == ([16384], [1, 8, 32], [64], 128, 32)
    assert s.activation == "jumprelu" and s.kernel_rows == [4096, 32768] and s.kernel_shapes == [(2304, 16384)]
    assert "static" in s.columns and "hidden" in s.columns
    s = bench.settings_from_args(parser.parse_args(["--gemma2-2b", "--static-batches", "8", "--batches", "1,8"]))
    assert s.static_batches == [8] and s.batches == [1, 8]
    with pytest.raises(SystemExit):
        parser.parse_args(["--columns", "clt,dense"])


def test_jumprelu_transcoder_matches_the_floor() -> None:
    tc = bench.random_transcoder(16, [0], 64, activation="jumprelu")
    enc = tc.encoder(0)
    assert enc.threshold is not None and tc.config.activation == "jumprelu"
    x = torch.randn(10, 16)
    z = x @ enc.W_enc.T + enc.b_enc
    z = z * (z > enc.threshold)
    values, _, l0 = tc.encode_sparse(x, 0, 4)
    torch.testing.assert_close(values, z.topk(4, dim=-1).values.clamp_min(0))
    assert torch.equal(l0, (z > 0).sum(-1).int())


@pytest.mark.parametrize("ratio,words", [(9.1, "9.1x smaller"), (0.03, "33.3x larger"), (1.0, "1.0x smaller"),
                                         (float("nan"), "n/a"), (0.0, "n/a")])
def test_ratio_words(ratio: float, words: str) -> None:
    assert bench.ratio_words(ratio).startswith(words)


def test_w2_peak_wording_is_never_a_fraction_smaller(quick_report: dict) -> None:
    """Issue 15: "peak: 0.03x smaller" meant 33x larger."""
    report = copy.deepcopy(quick_report)
    w2 = report["w2"]
    w2["clt"]["peak_bytes"], w2["hidden_states"]["peak_bytes"] = 33 * 2**20, 2**20
    w2["peak_ratio"] = 1 / 33
    text = bench.render(report)
    assert "peak 33.0x higher" in text
    assert "0.03x" not in text and not re.search(r"0\.\d+x (smaller|lower)", text)


def test_targets_on_gpu_use_the_gpu_limits() -> None:
    report = {"meta": {"device": "cuda"}, "w1": [
        {"width": 16384, "batch": 8, "new_tokens": 64, "slowdown": 1.02, "static_ratio": 1.07, "E": 9.0}],
        "w2": {"clt_vs_floor": 1.1, "bytes_kept_ratio": 10, "peak_ratio": 2},
        "w3": [{"rows": 4096, "d": 2304, "m": 16384, "E_kernel": 1.6, "vs_naive": 0.5}]}
    t = bench.check_targets(report)
    assert t["clt/plain<=1.03 (m16384 b8 n64)"] is True
    assert t["static clt/plain<=1.05 (m16384 b8 n64)"] is False
    assert t["W2 attached <= 1.2x plain forward + one batched encode"] is True
    assert t["E_kernel<=1.5 (rows 4096, d2304 m16384)"] is False
    assert not any(k.startswith("E<=") for k in t)  # the CPU's E targets do not apply on a GPU


def test_floor_matches_the_library_encode() -> None:
    """The floor does the same work as the attachment: the same top-k as encode_sparse."""
    tc = bench.random_transcoder(16, [0], 64)
    x = torch.randn(10, 16)
    enc = tc.encoder(0)
    z = torch.relu(x @ enc.W_enc.T + enc.b_enc)
    values, indices, l0 = tc.encode_sparse(x, 0, 4)
    ref_v, ref_i = z.topk(4, dim=-1)
    torch.testing.assert_close(values, ref_v)
    assert torch.equal(l0, (z > 0).sum(-1).int())
    assert torch.equal(indices, ref_i.int().masked_fill(ref_v == 0, -1))


def test_cli_wires_bench(capsys: pytest.CaptureFixture[str]) -> None:
    from sparse_clt_hf.cli import build_parser

    try:
        parser = build_parser()
    except (ImportError, AttributeError) as exc:  # another sub-command's module is mid-edit
        pytest.skip(f"cli parser cannot be built: {exc}")
    args = parser.parse_args(["bench", "--quick", "--only", "w3", "--json"])
    assert bench.run_bench(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["w1"] == [] and len(report["w3"]) == 1


def test_scaling_sweep_runs_the_chosen_axis(tmp_path) -> None:
    out = tmp_path / "report.json"
    rc = bench.main(["--quick", "--json", "--only", "none", "--scaling", "--sweep", "batch=1,2", "--out", str(out)])
    assert rc == 0
    rows = json.loads(out.read_text())["scaling"]
    assert [(r["axis"], r["value"], r["batch"]) for r in rows] == [("batch", 1, 1), ("batch", 2, 2)]
    assert all(r["t_clt"] > 0 and "feature_bytes" in r for r in rows)


@pytest.mark.parametrize("spec,message", [("depth=1,2", "unknown axis 'depth'"), ("width=a", "integers"),
                                          ("batch=0", "positive")])
def test_bad_sweep_is_named(spec: str, message: str) -> None:
    with pytest.raises(SystemExit, match=message):
        bench.parse_sweeps([spec], bench.Settings().scaling)


def test_gpu_check_script_parses_and_its_summary_reads_a_report(quick_report: dict, tmp_path) -> None:
    """scripts/gpu_check.sh is valid bash; scripts/gpu_summary.py turns the bench's JSON into the README's tables
    (the script itself is run end to end with GPU_CHECK_DRY=1, which takes a minute: not here)."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    if shutil.which("bash"):
        subprocess.run(["bash", "-n", str(root / "scripts" / "gpu_check.sh")], check=True)
    (tmp_path / "bench_eager.json").write_text(json.dumps(quick_report))
    static = {**quick_report, "w1": [{**quick_report["w1"][0], "compile_static_plain": 70.0, "compile_static_clt": 71.0}]}
    (tmp_path / "bench_static_b8.json").write_text(json.dumps(static))
    (tmp_path / "tests.json").write_text(json.dumps({"runner": "direct (no pytest)", "device": "cuda", "counts": {
        "passed": 3, "failed": 0, "skipped": 0}, "results": []}))
    sys.path.insert(0, str(root / "scripts"))
    try:
        import gpu_summary
    finally:
        sys.path.remove(str(root / "scripts"))
    text = gpu_summary.summarise(tmp_path)
    assert "| batch | plain (s) | attached (s)" in text and "| batch | static plain (s)" in text
    assert "70.0 / 71.0" in text and "3 passed, 0 failed" in text and "W2 64-token prefill" in text


def test_gpu_attribution_check_runs_dry(tmp_path) -> None:
    """scripts/gpu_check_attribution.sh is valid bash, and its bench (tiny Gemma 2 on the CPU, thresholds
    calibrated to the target L0) measures both prompt lengths; with a max_memory nothing fits, each refusal
    is recorded instead of a crash."""
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    if shutil.which("bash"):
        subprocess.run(["bash", "-n", str(root / "scripts" / "gpu_check_attribution.sh")], check=True)
    script = root / "scripts" / "bench_attribution_gemma2.py"
    env = {**os.environ, "PYTHONPATH": str(root)}
    out = tmp_path / "report.json"
    subprocess.run([sys.executable, str(script), "--dry", "--out", str(out)], check=True, capture_output=True, env=env)
    report = json.loads(out.read_text())
    runs = report["runs"]
    assert [r["tokens"] for r in runs] == [16, 48]
    for r in runs:
        assert 3 <= r["active_per_token_layer"] <= 16  # calibrated to l0 = 8
        assert r["attributed_features"] <= 64 and r["seconds_attribute"] > 0 and r["kept_nodes"] > 0
    subprocess.run([sys.executable, str(script), "--dry", "--max-memory", "1000", "--out", str(out)], check=True,
                   capture_output=True, env=env)
    assert all("needs about" in r["refused"] for r in json.loads(out.read_text())["runs"])
