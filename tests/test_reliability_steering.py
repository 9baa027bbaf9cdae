"""Reliability of steering state (issue 23, classes 1-3): races, partial failures, dtype limits.

Each test first reproduces the defect (real threads, a failure injected at every step of steer(),
values beyond a dtype's range) and then checks the contract:
- a state change from another thread while generate() runs is refused (AlignmentError), never a race;
- every public call completes or leaves the attachment exactly as before (steers, hooks, outputs);
- a value that does not fit the dtype it is stored in is refused naming the dtype and its range.
"""

from __future__ import annotations

import re
import threading

import pytest
import torch
from conftest import random_transcoder
from hypothesis import given, settings
from hypothesis import strategies as st
from test_attach import TOP_K, prompts
from tiny_models import tiny_model
from transformers import LogitsProcessor, LogitsProcessorList

import sparse_clt_hf.attach as attach_mod
import sparse_clt_hf.capture.steering as steering_mod
from sparse_clt_hf import AlignmentError, attach_clt
from sparse_clt_hf.capture.steer_args import check_positions, check_value


def _kw(new=6):
    ids, mask = prompts()
    return {"input_ids": ids, "attention_mask": mask, "max_new_tokens": new, "do_sample": False}


def _hooks(model):
    return sorted((id(m), "pre" if pre else "post", hid) for m in model.modules()
                  for pre, table in ((1, m._forward_pre_hooks), (0, m._forward_hooks)) for hid in table)


# ---------------------------------------------------------------------------- 1. races
class _Pause(LogitsProcessor):
    """Blocks the generating thread at its first step until the other thread is done."""

    def __init__(self):
        self.inside, self.done = threading.Event(), threading.Event()

    def __call__(self, input_ids, scores):
        if not self.inside.is_set():
            self.inside.set()
            assert self.done.wait(30)
        return scores


def test_state_changes_from_another_thread_during_generate_are_refused_and_leave_the_call_intact():
    model = tiny_model("llama")
    tc = random_transcoder(decoders=True)
    with attach_clt(model, tc, top_k=TOP_K) as clt:
        h = clt.steer(0, 5, 3.0)
        expected, expected_feats = clt.generate(**_kw())
        clt.reset()
        pause, result, refused = _Pause(), {}, []

        def run():
            result["out"] = clt.generate(**_kw(), logits_processor=LogitsProcessorList([pause]))

        worker = threading.Thread(target=run)
        worker.start()
        assert pause.inside.wait(30)
        for call in (lambda: h.set(-4.0), h.remove, lambda: clt.steer(1, 2, 1.0), clt.clear_steering,
                     clt.flush, clt.reset, lambda: clt.features, clt.detach):
            with pytest.raises(AlignmentError, match="another thread"):
                call()
            refused.append(call)
        pause.done.set()
        worker.join(30)
        out, feats = result["out"]
        assert torch.equal(out, expected)
        assert torch.equal(feats.values, expected_feats.values) and torch.equal(feats.mask, expected_feats.mask)
        assert h.value == 3.0 and clt.steering[0]["value"] == 3.0
        h.set(-4.0)  # between calls, from any thread: fine
        assert clt.steering[0]["value"] == -4.0


def test_set_from_the_generating_thread_in_on_step_still_works():
    model = tiny_model("llama")
    tc = random_transcoder(decoders=True)
    handles = []
    with attach_clt(model, tc, top_k=TOP_K, on_step=lambda f: handles[0].set(handles[0].value + 1)) as clt:
        handles.append(clt.steer(0, 5, 0.0))
        clt.generate(**_kw(new=4))
        assert handles[0].value >= 4


@pytest.mark.slow
def test_hammering_set_from_another_thread_never_breaks_generate():
    """Real concurrency: a thread calling set() in a loop while generate runs. Before the fix this raised
    IndexError inside generate or returned features whose values covered fewer positions than the mask."""
    model = tiny_model("llama")
    tc = random_transcoder(decoders=True)
    with attach_clt(model, tc, top_k=TOP_K, window=4) as clt:
        h = clt.steer(0, 5, 1.0)
        stop, seen = threading.Event(), {"refused": 0, "set": 0}

        def hammer():
            v = 0.0
            while not stop.is_set():
                v += 1
                try:
                    h.set(v % 7)
                    seen["set"] += 1
                except AlignmentError:
                    seen["refused"] += 1

        t = threading.Thread(target=hammer)
        t.start()
        try:
            for _ in range(5):
                out, feats = clt.generate(**_kw(new=12))
                assert feats.values.shape[1] == feats.mask.shape[1] == out.shape[1] - 1
                assert feats.mask.any()
        finally:
            stop.set()
            t.join(30)
        assert seen["refused"] > 0


# ---------------------------------------------------------------------------- 2. partial failures
class _Injected(Exception):
    pass


def _inject_at(monkeypatch, k):
    """Make the k-th call (0-based) among every step steer()/set_steers take raise; returns the counter."""
    count = {"n": 0}

    def wrap(fn):
        def wrapped(*a, **kw):
            i = count["n"]
            count["n"] += 1
            if i == k:
                raise _Injected(f"step {k}: {getattr(fn, '__name__', fn)}")
            return fn(*a, **kw)
        return wrapped

    for obj, name in [
        (attach_mod, "check_steer"), (attach_mod, "load_decoder_rows"), (attach_mod, "_forget_compiled_code"),
        (steering_mod.Steering, "_build"), (steering_mod.Steering, "_register"),
        (steering_mod.Steering, "record_encoders"), (steering_mod, "hook_sites"),
        (torch.nn.Module, "register_forward_pre_hook"), (torch.nn.Module, "register_forward_hook"),
        (torch.Tensor, "to"), (steering_mod, "_mark_static"),
    ]:
        monkeypatch.setattr(obj, name, wrap(getattr(obj, name)))
    return count


@pytest.mark.parametrize("action", ["steer", "remove", "clear"])
def test_a_failure_at_any_step_leaves_the_attachment_exactly_as_before(monkeypatch, action):
    model = tiny_model("llama")
    tc = random_transcoder(decoders=True)
    kw = _kw(new=3)
    with attach_clt(model, tc, top_k=TOP_K) as clt:
        first = clt.steer(0, 5, 4.0)
        clt.steer(1, 7, -2.0, mode="add", positions=slice(2, 6))
        before_out, before_feats = clt.generate(**kw)
        state = (clt.steering, _hooks(model))
        calls = {"steer": lambda: clt.steer(2, 3, 5.0, mode="scale"), "remove": first.remove,
                 "clear": clt.clear_steering}[action]
        k = 0
        while True:
            with monkeypatch.context() as m:
                counter = _inject_at(m, k)
                try:
                    calls()
                except _Injected:
                    failed = True
                else:
                    failed = False
            if not failed:
                assert counter["n"] <= k  # every step was tried
                break
            assert (clt.steering, _hooks(model)) == state, f"step {k} changed the state"
            out, feats = clt.generate(**kw)
            assert torch.equal(out, before_out) and torch.equal(feats.values, before_feats.values)
            k += 1
        assert k >= 3
        assert clt.steering != state[0]  # the uninjected call did change it


@pytest.mark.parametrize("stop", [2**62 + 1, 2**63, 2**64, 2**70])
def test_positions_beyond_int64_are_refused_before_anything_changes(stop):
    model = tiny_model("llama")
    tc = random_transcoder(decoders=True)
    with attach_clt(model, tc, top_k=TOP_K) as clt:
        clt.steer(0, 5, 4.0)
        before = (clt.steering, _hooks(model))
        with pytest.raises(ValueError, match="2\\*\\*62"):
            clt.steer(1, 2, 1.0, positions=slice(0, stop))
        with pytest.raises(ValueError, match="2\\*\\*62"):
            clt.steer(1, 2, 1.0, positions=slice(stop, None))
        assert (clt.steering, _hooks(model)) == before
        clt.generate(**_kw(new=2))  # no KeyError


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.none(), st.integers(-(2**70), 2**70)), st.one_of(st.none(), st.integers(-(2**70), 2**70)))
def test_positions_slices_are_accepted_exactly_when_they_fit(start, stop):
    ok = ((start is None or 0 <= start < 2**62) and (stop is None or 0 <= stop <= 2**62)
          and (stop is None or stop > (start or 0)))
    if ok:
        assert check_positions(slice(start, stop)) == slice(start, stop)
    else:
        with pytest.raises(ValueError):
            check_positions(slice(start, stop))


# ---------------------------------------------------------------------------- 3. dtype limits
LIMITS = {torch.float32: 3.4028234663852886e38, torch.bfloat16: 3.3895313892515355e38, torch.float16: 65504.0}


@pytest.mark.parametrize("dtype,bad", [(torch.float32, 1e39), (torch.bfloat16, 1e39), (torch.float16, 7e4)])
def test_values_beyond_the_dtype_range_are_refused_naming_the_dtype(dtype, bad):
    model = tiny_model("llama")
    tc = random_transcoder(decoders=True)
    name = str(dtype).removeprefix("torch.")
    with attach_clt(model, tc, top_k=TOP_K, dtype=dtype) as clt:
        for value in (bad, -bad):
            with pytest.raises(ValueError, match=f"{name}.*{re.escape(format(LIMITS[dtype], '.6g'))}"):
                clt.steer(0, 5, value)
        assert clt.steering == []
        h = clt.steer(0, 5, 2.0)
        with pytest.raises(ValueError, match=name):
            h.set(bad)
        assert h.value == 2.0 and clt.steering[0]["value"] == 2.0
        h.set(LIMITS[dtype])  # the largest finite value fits


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(sorted(LIMITS, key=str)), st.floats(allow_nan=False, allow_infinity=False))
def test_a_value_is_accepted_exactly_when_it_is_finite_in_its_dtype(dtype, value):
    top, eps = LIMITS[dtype], torch.finfo(dtype).eps
    if abs(value) <= top:
        assert check_value(value, dtype) == value
    elif abs(value) >= top * (1 + eps):  # beyond max + half an ulp: rounds to inf
        with pytest.raises(ValueError, match="does not fit"):
            check_value(value, dtype)


def test_decoder_rows_that_overflow_the_model_dtype_are_refused_before_anything_changes():
    model = tiny_model("llama").half()
    tc = random_transcoder(decoders=True)
    tc.encoder(0).W_dec.data[5] = 1e5  # finite in float32, inf in float16
    with attach_clt(model, tc, top_k=TOP_K) as clt:
        before = _hooks(model)
        with pytest.raises(ValueError, match="float16"):
            clt.steer(0, 5, 1.0)
        assert clt.steering == [] and _hooks(model) == before
        clt.steer(0, 6, 1.0)
