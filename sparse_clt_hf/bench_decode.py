"""W1 decode and the scaling sweeps of the bench (see :mod:`sparse_clt_hf.bench`): ``generate`` plain,
attached, with hidden states, with a static (compiled) cache, against a floor of one batched encode."""

from __future__ import annotations

import gc
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from .attach import attach_clt
from .bench_workloads import (
    Settings,
    _generate,
    _inputs,
    encode_hidden_states,
    median,
    mem_peak,
    mem_reset,
    random_transcoder,
    timed,
)
from .sites import resolve_site
from .transcoder import CrossLayerTranscoder


# ---------------------------------------------------------------------------- W1 decode
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
    """The floor: one batched linear + ReLU (or JumpReLU) + count + top-k per layer, written out by hand."""
    for layer, x in acts.items():
        enc = tc.encoder(layer)
        z = F.linear(x.to(enc.W_enc.dtype), enc.W_enc, enc.b_enc)
        z = z.relu_() if enc.threshold is None else z.mul_(z > enc.threshold)
        z.sign().sum(-1, dtype=torch.float32)
        z.topk(min(top_k, z.shape[-1]), dim=-1)


def static_extra(s: Settings, device: torch.device) -> dict[str, Any]:
    """``generate`` keywords of the static columns: a static cache; on CUDA transformers compiles the decode
    step by itself (CUDA graphs), elsewhere only when ``s.compile`` asks for it."""
    extra: dict[str, Any] = {"cache_implementation": "static"}
    if s.compile and device.type != "cuda":
        from transformers import CompileConfig

        cfg = CompileConfig(backend=s.compile_backend, fullgraph=True, dynamic=False, mode=None)
        cfg._compile_all_devices = True
        extra["compile_config"] = cfg
    return extra


def bench_decode(model: torch.nn.Module, d: int, n_layers: int, width: int, batch: int, new: int,
                 s: Settings, *, layers: list[int] | None = None, memory: bool = False,
                 columns: list[str] | None = None) -> dict[str, Any]:
    """W1 for one configuration: medians of interleaved runs of the variants (see the module docstring).

    Eager variants (and the floor) take turns in a rotating order after ``s.warmup`` untimed runs each.
    Compiled static variants run in two blocks, plain then attached: attaching and detaching drops the
    compiled code (dynamo does not guard on hooks), so interleaving them would recompile every time;
    each block's first call (the compile) is timed apart as ``compile_static_*``."""
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    layers = list(range(n_layers)) if layers is None else layers
    columns = list(s.columns if columns is None else columns)
    tc = random_transcoder(d, layers, width, activation=s.activation, device=device, dtype=dtype)
    inputs = _inputs(model, batch, s.prompt, seed=batch * 1000 + new)
    acts = capture_sites(model, layers, inputs, new)
    rows = next(iter(acts.values())).shape[0]
    encode_times: list[float] = []  # time inside the encoder calls of each default-window run (CPU)

    def plain(**extra: Any) -> Callable[[], None]:
        def run() -> None:
            with torch.no_grad():
                _generate(model, inputs, new, **extra)
        return run

    def clt(window: int | None, record: bool = False, **extra: Any) -> Callable[[], None]:
        def run() -> None:
            att = attach_clt(model, tc, top_k=s.top_k, window=window)
            stats = att.stats if record and device.type == "cpu" else None
            try:
                with torch.no_grad():
                    _generate(model, inputs, new, **extra)
                att.features  # noqa: B018 (reading materialises; part of the cost)
            finally:
                att.detach()
            if stats is not None:
                encode_times.append(stats.seconds)
        return run

    def hidden() -> None:
        with torch.no_grad():
            out = _generate(model, inputs, new, output_hidden_states=True, return_dict_in_generate=True)
            encode_hidden_states(tc, out.hidden_states, layers, s.top_k)

    variants: dict[str, Callable[[], None]] = {"plain": plain()}
    if "clt" in columns:
        variants["clt"] = clt(None, record=True)
    if "clt_w1" in columns:
        variants["clt_w1"] = clt(1)
    if "hidden" in columns:
        variants["hidden"] = hidden
    static = "static" in columns and (s.static_batches is None or batch in s.static_batches)
    extra = static_extra(s, device) if static else {}
    compiled = static and (device.type == "cuda" or "compile_config" in extra)
    if static and not compiled:
        variants["static_plain"], variants["static_clt"] = plain(**extra), clt(None, **extra)
    variants["floor"] = lambda: floor_encode(tc, acts, s.top_k)
    times = _interleaved(variants, s.reps, s.warmup, device)
    encode_times = encode_times[len(encode_times) - s.reps:]  # the timed runs (the warm-up ran first)
    out: dict[str, Any] = {
        "layers": len(layers), "width": width, "batch": batch, "prompt": s.prompt, "new_tokens": new,
        "rows_per_layer": rows, "reps": s.reps, "activation": s.activation,
    }
    if compiled:
        out.update(_static_blocks(model, tc, inputs, new, s, extra, device, times))
    out.update({f"t_{name}": median(ts) for name, ts in times.items()})
    out["runs"] = {name: [round(t, 4) for t in ts] for name, ts in times.items()}  # every timed run, in order
    for name, ts in times.items():
        if name != "floor":
            out[f"tok_s_{name}"] = batch * new / median(ts)
    ratio = lambda a, b: median([x / y for x, y in zip(times[a], times[b])])  # noqa: E731 (run by run)
    if "clt" in times:
        out["slowdown"] = ratio("clt", "plain")
        out["E"] = median([(c - p) / f for c, p, f in zip(times["clt"], times["plain"], times["floor"])])
    if encode_times:
        # Less noisy than E: the encode work done inside generate against the same work as one batch.
        out["t_encode_in_generate"] = median(encode_times)
        out["E_encode"] = median([e / f for e, f in zip(encode_times, times["floor"])])
    if "clt_w1" in times:
        out["slowdown_w1"] = ratio("clt_w1", "plain")
        out["E_w1"] = median([(c - p) / f for c, p, f in zip(times["clt_w1"], times["plain"], times["floor"])])
    if "hidden" in times:
        out["hidden_ratio"] = ratio("hidden", "plain")
    if "static_clt" in times:
        out["static_compiled"] = compiled
        out["static_ratio"] = median([c / p for c, p in zip(times["static_clt"], times["static_plain"])])
        out["static_speedup"] = median(times["plain"]) / median(times["static_plain"])
    if memory:
        out.update(_decode_memory(model, tc, inputs, new, s, device))
    return out


def _interleaved(variants: dict[str, Callable[[], None]], reps: int, warmup: int,
                 device: torch.device) -> dict[str, list[float]]:
    """Seconds of each variant per repetition: ``warmup`` untimed rounds, then ``reps`` rounds in a
    rotating order (no variant always first)."""
    names = list(variants)
    for _ in range(warmup):
        for name in names:
            variants[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(reps):
        for name in names[rep % len(names):] + names[: rep % len(names)]:
            gc.collect()
            times[name].append(timed(variants[name], device))
    return times


def _static_blocks(model: torch.nn.Module, tc: CrossLayerTranscoder, inputs: dict[str, torch.Tensor], new: int,
                   s: Settings, extra: dict[str, Any], device: torch.device,
                   times: dict[str, list[float]]) -> dict[str, Any]:
    """The compiled static columns: a plain block, then an attached block (one attachment, reset between
    runs). Adds their times to ``times``; returns the first calls' seconds (compile included)."""
    out: dict[str, Any] = {}
    att = None
    try:
        for name in ("static_plain", "static_clt"):
            if name == "static_clt":
                att = attach_clt(model, tc, top_k=s.top_k)

            def run(att: Any = att) -> None:
                with torch.no_grad():
                    _generate(model, inputs, new, **extra)
                if att is not None:
                    att.features  # noqa: B018
                    att.reset()

            out[f"compile_{name}"] = timed(run, device)  # first call: compiles (and captures graphs)
            out[f"{name}_compiled"] = "_compiled_call" in model.__dict__
            for _ in range(max(0, s.warmup - 1)):
                run()
            times[name] = []
            for _ in range(s.reps):
                gc.collect()
                times[name].append(timed(run, device))
    finally:
        if att is not None:
            att.detach()
    return out


def _decode_memory(model: torch.nn.Module, tc: CrossLayerTranscoder, inputs: dict[str, torch.Tensor],
                   new: int, s: Settings, device: torch.device) -> dict[str, Any]:
    """Peak memory of one plain and one attached generate above the memory before it, and feature bytes."""
    peaks = {}
    feature_bytes = 0
    for name in ("plain", "clt"):
        att = attach_clt(model, tc, top_k=s.top_k) if name == "clt" else None
        gc.collect()
        before = mem_reset(device)
        with torch.no_grad():
            _generate(model, inputs, new)
        if att is not None:
            feats = att.features
            feature_bytes = feats.nbytes
            att.detach()
            del feats
        peaks[name] = mem_peak(device) - before
        del att
    return {"peak_plain_bytes": peaks["plain"], "peak_clt_bytes": peaks["clt"], "feature_bytes": feature_bytes,
            "peak_extra_bytes": peaks["clt"] - peaks["plain"]}


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
                               layers=layers, columns=["clt"], memory=True)
            out.append({"axis": axis, "value": value, **row})
    return out
