"""Seconds per attribution graph, ours next to circuit-tracer's, side by side in one run.

On the fixture cases of tests/data/circuit_tracer/ (tiny random models and transcoders in circuit-tracer's layout,
see scripts/circuit_tracer_reference.py), each round times circuit-tracer first, in its own virtualenv
(``CT_PYTHON scripts/circuit_tracer_reference.py --time-only``, a subprocess: circuit-tracer pins transformers
<= 4.57.3 and nnsight 0.6), then ours in this process, alternately, so both see the same machine load. Both sides:
CPU, fp32, ``torch.set_num_threads(1)``, the model and transcoder already loaded, a warm-up call, then
``--repeats`` timed calls per round; the same settings as the fixture (``max_n_logits``, ``desired_logit_prob``,
``max_feature_nodes``, ``batch_size``; "full" attributes every active feature, "topk" limits the feature rows).
Ours is timed twice: given the transcoder folder (its decoder rows read for the active features only, inside the
timed call) and given a ``CrossLayerTranscoder`` loaded with decoders beforehand (as circuit-tracer holds it).
Prints per case the median over all rounds and the ratio ours / circuit-tracer, and one JSON object at the end.

    python scripts/bench_attribution_vs_circuit_tracer.py [--rounds 3] [--repeats 5] [--ct-python /work/ctvenv/bin/python]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import transformers as tf

from sparse_clt_hf import CrossLayerTranscoder, attribute

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "data" / "circuit_tracer"
RUNS = ("full", "topk")
SETTINGS = ("max_n_logits", "desired_logit_prob", "max_feature_nodes", "batch_size")


def circuit_tracer_round(ct_python: str, cases: list[str], repeats: int) -> dict[str, float]:
    """One subprocess of circuit-tracer's own timing: ``case/run`` -> median seconds over ``repeats`` calls."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "timings.json"
        cmd = [ct_python, str(ROOT / "scripts" / "circuit_tracer_reference.py"), "--time-only", "--out", str(FIXTURES),
               "--repeats", str(repeats), "--threads", "1", "--timings-out", str(out)]
        for case in cases:
            cmd += ["--case", case]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
        return {k: v["median_s"] for k, v in json.loads(out.read_text()).items()}


def load_case(case: str) -> tuple[torch.nn.Module, dict, CrossLayerTranscoder]:
    folder = FIXTURES / case
    meta = json.loads((folder / "reference.json").read_text(encoding="utf-8"))
    model = tf.AutoModelForCausalLM.from_pretrained(folder / "model", dtype=torch.float32,
                                                    attn_implementation="eager").eval()
    loaded = CrossLayerTranscoder.from_pretrained(str(folder / "transcoder"), decoders=True)
    return model, meta, loaded


def our_round(loaded_cases: dict, repeats: int) -> dict[str, float]:
    """``case/run/how`` -> median seconds of ``attribute`` over ``repeats`` calls (after a warm-up)."""
    result = {}
    for case, (model, meta, loaded) in loaded_cases.items():
        ids = meta["prompt_ids"]
        for run in RUNS:
            kw = {k: meta[run][k] for k in SETTINGS}
            for how, tc in (("folder", str(FIXTURES / case / "transcoder")), ("loaded", loaded)):
                attribute(model, tc, ids, progress=False, **kw)  # warm-up
                times = []
                for _ in range(repeats):
                    t = time.perf_counter()
                    attribute(model, tc, ids, progress=False, **kw)
                    times.append(time.perf_counter() - t)
                result[f"{case}/{run}/{how}"] = statistics.median(times)
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--case", action="append", help="only these cases (default: every fixture)")
    p.add_argument("--ct-python", default="/work/ctvenv/bin/python", help="the python of circuit-tracer's venv")
    args = p.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message="transcoder was trained on")
    cases = args.case or sorted(d.name for d in FIXTURES.iterdir() if (d / "reference.json").exists())
    loaded_cases = {case: load_case(case) for case in cases}
    ct: dict[str, list[float]] = {}
    ours: dict[str, list[float]] = {}
    for r in range(args.rounds):
        for k, v in circuit_tracer_round(args.ct_python, cases, args.repeats).items():
            ct.setdefault(k, []).append(v)
        for k, v in our_round(loaded_cases, args.repeats).items():
            ours.setdefault(k, []).append(v)
        print(f"round {r + 1}/{args.rounds} done (load average {os.getloadavg()[0]:.2f})", file=sys.stderr)
    rows = {}
    print(f"{'case/run':34} {'circuit-tracer':>15} {'ours (folder)':>14} {'ratio':>6} {'ours (loaded)':>14} {'ratio':>6}")
    for case in cases:
        for run in RUNS:
            key = f"{case}/{run}"
            c = statistics.median(ct[key])
            f = statistics.median(ours[f"{key}/folder"])
            m = statistics.median(ours[f"{key}/loaded"])
            rows[key] = {"circuit_tracer_ms": c * 1e3, "ours_folder_ms": f * 1e3, "ours_loaded_ms": m * 1e3,
                         "ratio_folder": f / c, "ratio_loaded": m / c}
            print(f"{key:34} {c * 1e3:12.1f} ms {f * 1e3:11.1f} ms {f / c:6.2f} {m * 1e3:11.1f} ms {m / c:6.2f}")
    report = {"rounds": args.rounds, "repeats": args.repeats, "threads": 1, "load_average_end": os.getloadavg(),
              "torch": torch.__version__, "transformers": tf.__version__, "cases": rows}
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
