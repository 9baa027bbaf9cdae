"""The capture engine under adversarial use: threads, copies, device/dtype moves, every way a
generation config reaches generate, arguments validated before any hook, and faults injected in
every callback (each followed by an exact generate, no hook left behind, earlier records intact)."""

from __future__ import annotations

import copy
import pickle
import threading

import pytest
import torch
from conftest import random_transcoder
from test_attach import TOP_K, check_against_reference, full_mask, prompts
from tiny_models import tiny_model
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

from sparse_clt_hf import AlignmentError, HookSiteError, attach_clt


def _hook_count(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _generate(model, ids, mask, **kw):
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, **kw)


# ---------------------------------------------------------------------------- threads
def test_second_thread_generate_is_refused_at_once():
    model = tiny_model("llama")
    ids, mask = prompts()
    tc = random_transcoder()
    entered, release = threading.Event(), threading.Event()

    class Block(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            entered.set()
            release.wait(10)
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    result = {}
    with attach_clt(model, tc, top_k=TOP_K) as clt:
        def first():
            result["out"], result["feats"] = clt.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False,
                stopping_criteria=StoppingCriteriaList([Block()]),
            )

        t = threading.Thread(target=first)
        t.start()
        assert entered.wait(10)
        with pytest.raises(AlignmentError, match="another thread"):
            _generate(model, ids, mask)
        with torch.no_grad():  # a plain forward, or the decoder stack called directly, is refused too
            with pytest.raises(AlignmentError, match="another thread"):
                model(input_ids=ids, attention_mask=mask)
            with pytest.raises(AlignmentError, match="another thread"):
                model.model(input_ids=ids, attention_mask=mask)
        release.set()
        t.join(10)
        assert len(clt.calls) == 1, "the refused passes left a record"
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)  # after the call, other threads' passes record again
        assert len(clt.calls) == 2
    out, feats = result["out"], result["feats"]
    assert feats.num_positions == out.shape[1] - 1  # the first call is whole and exact
    check_against_reference(feats, model, "llama", tc, out, full_mask(out, mask))


# ---------------------------------------------------------------------------- copies
def test_deepcopy_of_an_attached_model_is_a_plain_model():
    model = tiny_model("llama")
    ids, mask = prompts()
    plain_before = _hook_count(model)
    with attach_clt(model, random_transcoder(), top_k=TOP_K) as clt:
        twin = copy.deepcopy(model)
        assert _hook_count(twin) == plain_before
        assert not {"generate", "generate_batch", "__deepcopy__"} & set(twin.__dict__)
        with torch.no_grad():
            twin.model.layers[0].mlp.down_proj.weight.add_(1.0)  # the copy has its own weights
        out_twin = _generate(twin, ids, mask)
        assert clt.calls == []  # the copy's generate is not recorded by the original's attachment
        out = _generate(model, ids, mask)
        assert not torch.equal(out_twin, out)
        assert len(clt.calls) == 1
        back = pickle.loads(pickle.dumps(model))  # pickling gives a plain model too
        assert _hook_count(back) == plain_before and "generate" not in back.__dict__
    assert _hook_count(model) == plain_before and "__deepcopy__" not in model.__dict__


def test_model_moved_to_another_dtype_after_attaching_stays_exact():
    model = tiny_model("llama")
    ids, mask = prompts()
    tc = random_transcoder()
    with attach_clt(model, tc, top_k=TOP_K, dtype=torch.float64) as clt:
        model.to(torch.float64)
        out, feats = clt.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    check_against_reference(feats, model, "llama", tc, out, full_mask(out, mask))


# ---------------------------------------------------------------------------- generate entry points
_CB_NAMES = ("generate_batch", "init_continuous_batching", "continuous_batching_context_manager")
_CB_REQUESTS = [[1, 5, 7, 9], [3, 4, 8]]


def _cb_config() -> GenerationConfig:
    return GenerationConfig(max_new_tokens=2, do_sample=False, eos_token_id=-1, pad_token_id=0)


def test_continuous_batching_is_refused_before_any_pass():
    """Continuous batching packs many requests into one row: generate_batch() and the manager entry points
    are refused before any pass; detaching gives the methods back."""
    model = tiny_model("llama")
    if not hasattr(model, "generate_batch"):
        pytest.skip("this transformers has no continuous batching")
    with attach_clt(model, random_transcoder(), top_k=TOP_K) as clt:
        with pytest.raises(AlignmentError, match="continuous batching packs the tokens of many requests"):
            model.generate_batch(inputs=_CB_REQUESTS, generation_config=_cb_config())
        with pytest.raises(AlignmentError, match="init_continuous_batching"):
            model.init_continuous_batching(generation_config=_cb_config())
        assert clt.calls == []
    assert not set(_CB_NAMES) & set(model.__dict__)


@pytest.mark.slow
def test_paged_passes_that_bypass_the_refusal_are_reported_not_recorded():
    """If continuous batching reaches the model some other way, nothing is recorded from its packed rows and
    the next read says so; the attachment then records the next generate exactly as before."""
    model = tiny_model("llama")
    if not hasattr(model, "generate_batch"):
        pytest.skip("this transformers has no continuous batching")
    try:
        runs = len(model.generate_batch(inputs=_CB_REQUESTS, generation_config=_cb_config(), progress_bar=False)) == 2
    except Exception:
        runs = False
    if not runs:
        pytest.skip("continuous batching does not run on this tiny model with this transformers (4.57)")
    tc = random_transcoder()
    with attach_clt(model, tc, top_k=TOP_K) as clt:
        saved = {n: model.__dict__.pop(n) for n in _CB_NAMES if n in model.__dict__}  # a bypass
        try:
            model.generate_batch(inputs=_CB_REQUESTS, generation_config=_cb_config(), progress_bar=False)
        finally:
            model.__dict__.update(saved)
        with pytest.raises(AlignmentError, match="paged cache"):
            _ = clt.calls
        ids, mask = prompts()
        out, feats = clt.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
        assert len(clt.calls) == 1
    check_against_reference(feats, model, "llama", tc, out, full_mask(out, mask))


@pytest.mark.parametrize(
    "how",
    ["keyword", "config_keyword", "config_positional", "model_default"],
)
def test_beam_search_is_refused_from_every_source_before_generating(how):
    model = tiny_model("llama")
    ids, mask = prompts()
    seen = []
    with attach_clt(model, random_transcoder(), top_k=TOP_K, on_step=seen.append) as clt:
        with pytest.raises(AlignmentError, match="beam search"):
            if how == "keyword":
                model.generate(ids, attention_mask=mask, num_beams=2, max_new_tokens=2)
            elif how == "config_keyword":
                model.generate(ids, generation_config=GenerationConfig(num_beams=2, max_new_tokens=2), attention_mask=mask)
            elif how == "config_positional":
                model.generate(ids, GenerationConfig(num_beams=2, max_new_tokens=2), attention_mask=mask)
            else:
                model.generation_config.num_beams = 2
                model.generate(ids, attention_mask=mask, max_new_tokens=2)
        assert seen == [] and clt.calls == []  # refused before any pass


# ---------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"site": "lm_head:output"}, "not inside decoder layer"),
        ({"dtype": torch.int32}, "dtype must be a floating"),
        ({"dtype": "float16"}, "dtype must be a floating"),
        ({"top_k": True}, "top_k must be a positive integer"),
        ({"top_k": 2.0}, "top_k must be a positive integer"),
        ({"top_k": 10_000}, "larger than the widest"),
        ({"activation_threshold": "0.5"}, "activation_threshold must be a finite number"),
        ({"activation_threshold": float("nan")}, "activation_threshold must be a finite number"),
        ({"window": 2.5}, "window must be a positive integer"),
        ({"window": 0}, "window must be a positive integer"),
        ({"chunk_size": True}, "chunk_size must be a positive integer"),
        ({"on_step": 3}, "on_step must be a callable"),
        ({"layers": []}, "layers is empty"),
        ({"layers": [True]}, "layers must be integers"),
        ({"layers": [1.0]}, "layers must be integers"),
        ({"layers": "01"}, "layers must be an iterable"),
    ],
)
def test_bad_arguments_are_refused_before_any_hook(kwargs, match):
    model = tiny_model("llama")
    before = _hook_count(model)
    with pytest.raises((ValueError, HookSiteError), match=match):
        attach_clt(model, random_transcoder(), **kwargs)
    assert _hook_count(model) == before and "generate" not in model.__dict__


# ---------------------------------------------------------------------------- records
def test_a_plain_forward_that_raises_leaves_no_record():
    model = tiny_model("llama")
    ids, mask = prompts()
    tc = random_transcoder()
    with attach_clt(model, tc, top_k=TOP_K) as clt:
        boom = model.model.layers[2].mlp.register_forward_hook(lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
        with pytest.raises(RuntimeError, match="boom"), torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
        boom.remove()
        assert clt.calls == []
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
        (feats,) = clt.calls
    check_against_reference(feats, model, "llama", tc, ids, mask)


def test_reset_frees_the_decode_buffer():
    model = tiny_model("llama")
    ids, mask = prompts()
    with attach_clt(model, random_transcoder(), top_k=TOP_K) as clt:
        _generate(model, ids, mask)
        assert clt._recorder.buffer.bufs
        clt.reset()
        assert not clt._recorder.buffer.bufs and clt.calls == []


# ---------------------------------------------------------------------------- fault injection
class _Stop(StoppingCriteria):
    def __init__(self, exc):
        self.exc, self.n = exc, 0

    def __call__(self, input_ids, scores, **kwargs):
        self.n += 1
        if self.n == 2:
            raise self.exc
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


def _oom(*args, **kwargs):
    raise torch.OutOfMemoryError("CUDA out of memory (simulated)")


@pytest.mark.parametrize("exc", [RuntimeError("injected"), KeyboardInterrupt()], ids=["error", "interrupt"])
@pytest.mark.parametrize("where", ["on_step", "stopping_criteria", "site_hook", "encode"])
def test_faults_leave_a_working_attachment(where, exc):
    model = tiny_model("llama")
    ids, mask = prompts()
    tc = random_transcoder()
    plain_hooks = _hook_count(model)
    calls = {"n": 0, "armed": False}

    def on_step(feats):
        calls["n"] += 1
        if calls["armed"] and calls["n"] == 2:
            raise exc

    with attach_clt(model, tc, top_k=TOP_K, window=2, on_step=on_step if where == "on_step" else None) as clt:
        first_out, first = clt.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
        attached_hooks = _hook_count(model)
        kw = {}
        undo = None
        calls["n"], calls["armed"] = 0, True
        if where == "stopping_criteria":
            kw["stopping_criteria"] = StoppingCriteriaList([_Stop(exc)])
        elif where == "site_hook":
            state = {"n": 0}

            def raise_on_second(*args):
                state["n"] += 1
                if state["n"] == 2:
                    raise exc

            undo = model.model.layers[1].post_attention_layernorm.register_forward_pre_hook(raise_on_second).remove
        elif where == "encode":
            if isinstance(exc, RuntimeError):
                exc = torch.OutOfMemoryError("simulated")
            real = clt.transcoder.encode_sparse
            clt.transcoder.encode_sparse = _oom if isinstance(exc, torch.OutOfMemoryError) else (lambda *a, **k: (_ for _ in ()).throw(exc))
            undo = lambda: setattr(clt.transcoder, "encode_sparse", real)  # noqa: E731
        with pytest.raises(type(exc)):
            clt.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, **kw)
        calls["armed"] = False
        if undo is not None:
            undo()
        assert _hook_count(model) == attached_hooks
        assert len(clt.calls) == 1 and torch.equal(clt.calls[0].indices, first.indices)  # earlier record intact
        out, feats = clt.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
        assert torch.equal(out, first_out)
    assert _hook_count(model) == plain_hooks and "generate" not in model.__dict__
    check_against_reference(feats, model, "llama", tc, out, full_mask(out, mask))


def test_a_loaded_transcoder_reading_ln2_normalized_follows_the_model_norm():
    """A transcoder object whose input transform depends on the model's norm (TransformerLens'
    ln2.hook_normalized) is settled for the model it is attached to (GPT-2: LayerNorm without affine)."""
    from sparse_clt_hf.sites import NORM_DEPENDENT_KEY

    model = tiny_model("gpt2")
    tc = random_transcoder(input_transform="rmsnorm")
    tc.config.extra[NORM_DEPENDENT_KEY] = True
    with attach_clt(model, tc, top_k=TOP_K) as clt:
        assert clt.transcoder.config.input_transform == "layernorm"
    assert tc.config.input_transform == "rmsnorm" and tc.config.extra[NORM_DEPENDENT_KEY]  # the user's object


@pytest.mark.parametrize("order", [("inference", "no_grad"), ("no_grad", "inference")])
def test_inference_mode_and_no_grad_calls_mix(order):
    """Tensors made during a call under torch.inference_mode() cannot be updated in place outside it: the
    attachment's persistent state (decode buffer, counters, steering tensors) is made as normal tensors,
    so calls under either mode can follow each other, recorded exactly and steered."""
    model = tiny_model("llama")
    ids, mask = prompts()
    tc = random_transcoder(decoders=True)
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    modes = {"inference": torch.inference_mode, "no_grad": torch.no_grad}
    with attach_clt(model, tc, top_k=TOP_K) as clt:
        for name in order:
            with modes[name]():
                out, feats = clt.generate(**kw)
            check_against_reference(feats, model, "llama", tc, out, full_mask(out, mask))
        with modes[order[0]]():
            handle = clt.steer(1, 3, 5.0, positions="generated")  # steering tensors made in the first mode
        for name in order:
            with modes[name]():
                handle.set(-2.0)
                clt.generate(**kw)  # (not a static cache: transformers 4.57 reuses one made in inference mode)
