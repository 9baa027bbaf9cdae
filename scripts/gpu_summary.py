"""Compact summary of scripts/gpu_check.sh's results (Markdown, for the README): ``python3 scripts/gpu_summary.py OUT``.

Reads OUT/env.txt, steps.txt, tests.json, bench_eager.json and bench_static_b*.json (whatever exists:
a step that was cut short or skipped leaves its rows out) and prints the W1 / W2 / W3 tables, the
issue's targets and the test outcomes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def _load(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _f(x: Any, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def _ratio(row: dict[str, Any], a: str, b: str) -> str:
    return f"{row[a] / row[b]:.2f}x" if a in row and b in row else "-"


def summarise(out: Path) -> str:
    lines: list[str] = []
    env = out / "env.txt"
    if env.exists():
        lines += ["```", *env.read_text().strip().splitlines(), "```"]
    steps = out / "steps.txt"
    if steps.exists():
        lines += ["", "Steps: " + "; ".join(steps.read_text().strip().splitlines())]
    tests = _load(out / "tests.json")
    if tests:
        if "counts" in tests:
            c = tests["counts"]
            lines += ["", f"Exactness tests ({tests['runner']}, {tests['device']}): {c['passed']} passed, "
                          f"{c['failed']} failed, {c['skipped']} skipped"]
            lines += [f"- {r['outcome']}: {r['test']} ({r['seconds']} s)" for r in tests["results"]]
        else:
            lines += ["", f"Exactness tests (pytest): exit status {tests.get('exit_status')}"]
    log = out / "tests.log"
    if log.exists():  # what the tests measured (host syncs, kernel launches per step), printed as "MEASURED ..."
        measured = sorted({line.strip() for line in log.read_text(errors="replace").splitlines()
                           if line.strip().startswith("MEASURED")})
        lines += [f"- {line}" for line in measured]
    eager = _load(out / "bench_eager.json")
    static = sorted((r for p in out.glob("bench_static_b*.json") for r in (_load(p) or {}).get("w1", [])),
                    key=lambda r: r["batch"])
    meta = (eager or {}).get("meta")
    if meta:
        lines += ["", f"Bench: {meta['model']}, {meta['dtype']} on {meta['machine']}, torch {meta['torch']}, "
                      f"transformers {meta['transformers']}, transcoder {meta['activation']}, medians of "
                      f"{meta['reps']} after {meta['warmup']} warm-up; `{meta['command']}`"]
    w1 = (eager or {}).get("w1", [])
    if w1:
        lines += ["", "| batch | plain (s) | attached (s) | attached / plain | hidden + encode (s) | hidden / plain "
                      "| floor (s) | tok/s plain / attached / hidden |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in w1:
            lines.append(f"| {r['batch']} | {_f(r['t_plain'])} | {_f(r.get('t_clt'))} | {_ratio(r, 't_clt', 't_plain')} "
                         f"| {_f(r.get('t_hidden'))} | {_ratio(r, 't_hidden', 't_plain')} | {_f(r['t_floor'])} "
                         f"| {_f(r['tok_s_plain'], 0)} / {_f(r.get('tok_s_clt'), 0)} / {_f(r.get('tok_s_hidden'), 0)} |")
    if static:
        lines += ["", "| batch | static plain (s) | static attached (s) | attached / plain | compiled | compile plain / "
                      "attached (s) | eager plain (s) | tok/s static plain / attached |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in static:
            lines.append(f"| {r['batch']} | {_f(r.get('t_static_plain'))} | {_f(r.get('t_static_clt'))} "
                         f"| {_f(r.get('static_ratio'), 2)}x | {r.get('static_compiled')} "
                         f"| {_f(r.get('compile_static_plain'), 1)} / {_f(r.get('compile_static_clt'), 1)} "
                         f"| {_f(r['t_plain'])} | {_f(r.get('tok_s_static_plain'), 0)} / {_f(r.get('tok_s_static_clt'), 0)} |")
    w2 = (eager or {}).get("w2")
    if w2:
        lines += ["", f"W2 {w2['length']}-token prefill (warm, medians of {w2['reps']}): attached "
                      f"{w2['clt']['seconds']:.4f} s, plain forward {w2['plain']['seconds']:.4f} s + one batched encode "
                      f"{w2['hidden_states']['encode_seconds']:.4f} s = {w2['t_floor']:.4f} s: "
                      f"{w2['clt_vs_floor']:.2f}x; hidden states + encode {w2['hidden_states']['seconds']:.4f} s; "
                      f"peak MiB attached / hidden {w2['clt']['peak_bytes'] / 2**20:.0f} / "
                      f"{w2['hidden_states']['peak_bytes'] / 2**20:.0f}"]
    for r in (eager or {}).get("w3", []):
        lines.append(f"W3 {r['rows']} rows, d {r['d']}, m {r['m']}: encode_sparse {r['t_encode'] * 1e3:.2f} ms vs matmul "
                     f"{r['t_matmul'] * 1e3:.2f} ms ({r['E_kernel']:.2f}x), naive {r['t_naive'] * 1e3:.2f} ms")
    targets: dict[str, bool] = {}
    for report in [eager, *[_load(p) for p in sorted(out.glob("bench_static_b*.json"))]]:
        targets.update((report or {}).get("targets", {}))
    if targets:
        lines += ["", "Targets: " + ", ".join(f"{k} {'ok' if v else 'MISSED'}" for k, v in targets.items())]
    if not (tests or eager or static):
        lines.append("no results found in " + str(out))
    return "\n".join(lines)


if __name__ == "__main__":
    print(summarise(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/gpu_check_out")))
