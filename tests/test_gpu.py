"""Exactness on a GPU (issue 10): eager generate, static-cache generate (on CUDA transformers compiles the
decode step, with CUDA graphs) and a second static generate that must not recompile, each checked against
the independent reference of test_attach (plain hooks on a forward over the final sequences, dense
textbook encode in float64, sorted).

Skipped unless CUDA is available. ``SPARSE_CLT_GPU_TEST_DEVICE=cpu`` runs the same checks on the CPU
(the static decode step then compiled through transformers' ``CompileConfig`` with ``aot_eager``): that
is how ``GPU_CHECK_DRY=1 bash scripts/gpu_check.sh`` tests the script without a GPU.

No fixtures or parametrisation: ``scripts/gpu_tests.py`` calls these functions directly where pytest is
not installed (the GPU machine has none).
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
from conftest import random_transcoder
from test_attach import TOP_K, check_against_reference, prompts
from tiny_models import tiny_model

from sparse_clt_hf import attach_clt

DEVICE = os.environ.get("SPARSE_CLT_GPU_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else None)
pytestmark = pytest.mark.skipif(DEVICE is None, reason="needs CUDA (or SPARSE_CLT_GPU_TEST_DEVICE=cpu)")


def _setup(activation: str = "relu"):
    """A tiny Llama-config model (fp32) and a random transcoder on DEVICE; left-padded prompts there."""
    model = tiny_model("llama").to(DEVICE)
    tc = random_transcoder(activation=activation).to(DEVICE)
    ids, mask = prompts()
    return model, tc, ids.to(DEVICE), mask.to(DEVICE)


def _full_mask(out: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    ones = torch.ones(mask.shape[0], out.shape[1] - mask.shape[1], dtype=mask.dtype, device=mask.device)
    return torch.cat([mask, ones], dim=1)


def _check(feats, model, tc, out, mask) -> None:
    """test_attach's check, with every tensor on the model's device."""
    dev = out.device
    feats = dataclasses.replace(
        feats, **{f.name: getattr(feats, f.name).to(dev) for f in dataclasses.fields(feats)
                  if torch.is_tensor(getattr(feats, f.name))}
    )
    assert feats.num_positions == out.shape[1] - 1, "a position was not recorded"
    check_against_reference(feats, model, "llama", tc, out, _full_mask(out, mask))


def _static_kwargs() -> dict:
    kw: dict = {"cache_implementation": "static"}
    if DEVICE != "cuda":  # CUDA compiles the static decode step by itself; elsewhere ask for it
        from transformers import CompileConfig

        cfg = CompileConfig(backend="aot_eager", fullgraph=True, dynamic=False, mode=None)
        cfg._compile_all_devices = True
        kw["compile_config"] = cfg
    return kw


def test_eager_generate_matches_reference() -> None:
    for activation in ("relu", "jumprelu"):
        model, tc, ids, mask = _setup(activation)
        kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
        plain = model.generate(**kw)
        with attach_clt(model, tc, top_k=TOP_K) as clt:
            out, feats = clt.generate(**kw)
        assert torch.equal(out, plain), "attaching changed the generated ids"
        _check(feats, model, tc, out, mask)


def test_static_cache_compiled_generate_twice_without_recompiling() -> None:
    import torch._dynamo

    model, tc, ids, mask = _setup("jumprelu")
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=7, do_sample=False)
    plain = model.generate(**kw)  # eager: greedy ids of an fp32 model do not depend on the cache
    torch._dynamo.reset()
    try:
        with attach_clt(model, tc, top_k=TOP_K) as clt:
            first, f1 = clt.generate(**kw, **_static_kwargs())
            # transformers compiled the decode step (CUDA: by default, with CUDA graphs)
            assert "_compiled_call" in model.__dict__, "the static decode step was not compiled"
            torch._dynamo.config.error_on_recompile = True
            second, f2 = clt.generate(**kw, **_static_kwargs())
            torch._dynamo.config.error_on_recompile = False
            assert clt.stats.flushes > 0
    finally:
        torch._dynamo.config.error_on_recompile = False
        torch._dynamo.reset()
    for out, feats in ((first, f1), (second, f2)):
        assert torch.equal(out, plain), "the static (compiled) generate changed the generated ids"
        _check(feats, model, tc, out, mask)
    assert torch.equal(f1.indices, f2.indices) and torch.equal(f1.values, f2.values)


def test_static_cache_window_one_and_a_second_attachment() -> None:
    """Compiled decode steps with window=1 on one attachment and the default window on another (one layer)."""
    import torch._dynamo

    model, tc, ids, mask = _setup("relu")
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, **_static_kwargs())
    torch._dynamo.reset()
    try:
        with attach_clt(model, tc, top_k=TOP_K, window=1) as a, attach_clt(model, tc, top_k=TOP_K, layers=[1]) as b:
            out, fa = a.generate(**kw)
            (fb,) = b.calls
    finally:
        torch._dynamo.reset()
    _check(fa, model, tc, out, mask)
    _check(fb, model, tc, out, mask)


def test_decode_steps_make_no_host_sync_in_the_plugin() -> None:
    """CUDA's sync debug mode warns at every synchronising op, from the Python line that called it: the
    plugin's lines may sync a fixed number of times per call (its start and end checks), never per step."""
    import warnings

    import torch._dynamo

    if DEVICE != "cuda":
        pytest.skip("CUDA's sync debug mode needs CUDA")
    model, tc, ids, mask = _setup("jumprelu")
    counts: dict[tuple[str, int], int] = {}
    with attach_clt(model, tc, top_k=TOP_K) as clt:
        for mode, extra in (("eager", {}), ("static", _static_kwargs())):
            for new in (4, 12):
                kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False)
                clt.generate(**kw, **extra)  # warm (compiles the static decode step once)
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    torch.cuda.set_sync_debug_mode("warn")
                    try:
                        clt.generate(**kw, **extra)
                    finally:
                        torch.cuda.set_sync_debug_mode(0)
                ours = [w for w in caught if "sparse_clt_hf" in w.filename and "synchroniz" in str(w.message)]
                counts[(mode, new)] = len(ours)
                print(f"MEASURED host syncs from the plugin, {mode} generate of {new} tokens: {len(ours)}",
                      sorted({f"{w.filename.rsplit('/', 1)[-1]}:{w.lineno}" for w in ours}))
    torch._dynamo.reset()
    for mode in ("eager", "static"):
        assert counts[(mode, 12)] == counts[(mode, 4)], f"{mode}: host syncs grow with the decode steps: {counts}"
        assert counts[(mode, 4)] <= 4, f"{mode}: {counts}"


def test_an_eager_decode_step_adds_about_one_kernel_launch_per_layer() -> None:
    """Eager decoding of a real model is launch-bound: count CUDA kernel launches (torch.profiler) of 16 vs 8
    decode steps, attached and plain; the attachment's share per step must stay one copy per layer plus a
    counter add (a few more allowed), whatever the model (its per-layer work does not depend on the model)."""
    from collections import Counter

    from torch.profiler import ProfilerActivity, profile

    if DEVICE != "cuda":
        pytest.skip("counts CUDA kernel launches")
    model, tc, ids, mask = _setup("jumprelu")
    layers = model.config.num_hidden_layers

    def launches(run, new: int) -> tuple[int, int]:
        kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False)
        run(**kw)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            run(**kw)
            torch.cuda.synchronize()
        names = Counter(e.name for e in prof.events())
        kernels = sum(v for k, v in names.items() if "LaunchKernel" in k)
        syncs = sum(v for k, v in names.items() if "Synchronize" in k)
        return kernels, syncs

    plain = {n: launches(model.generate, n) for n in (8, 16)}
    with attach_clt(model, tc, top_k=TOP_K, window=32) as clt:  # one window per call
        attached = {n: launches(clt.generate, n) for n in (8, 16)}
    per_step = ((attached[16][0] - attached[8][0]) - (plain[16][0] - plain[8][0])) / 8
    plain_step = (plain[16][0] - plain[8][0]) / 8
    print(f"MEASURED kernel launches per eager decode step (tiny Llama, {layers} layers): plain {plain_step:.1f}, "
          f"added by the attachment {per_step:.1f}; syncs per call plain {plain[8][1]} attached {attached[8][1]}")
    assert per_step <= layers + 3, f"{per_step} launches per step added for {layers} layers"
