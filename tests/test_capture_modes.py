"""Every generation mode records every position, exactly, or raises: static cache, compiled decoding
(a compiled ``model.forward``, transformers' own compiled decode step, ``model.compile()``), and a pass
the hooks never saw. The reference is the one of test_attach: plain hooks on a forward over the final
sequences, dense textbook encode, sort."""

from __future__ import annotations

import pytest
import torch
from conftest import random_transcoder
from test_attach import TOP_K, check_against_reference, full_mask, prompts
from tiny_models import tiny_model
from transformers import CompileConfig

from sparse_clt_hf import AlignmentError, attach_clt

#: (backend, mode): dynamo + autograd tracing only, and the real lowering (inductor, in the mode transformers
#: uses on CUDA; on a CPU inductor emits C++ and skips the CUDA graphs of "reduce-overhead")
BACKENDS = [("aot_eager", None), ("inductor", "reduce-overhead")]


def _compile_config(backend: str = "aot_eager", mode: str | None = None) -> CompileConfig:
    """transformers' automatic compile of the decode step, also on CPU (it targets CUDA by default)."""
    cfg = CompileConfig(backend=backend, fullgraph=True, dynamic=False, mode=mode)
    cfg._compile_all_devices = True
    return cfg


def _generate_in_mode(model, kw: dict, mode: str):
    """Generate without and with an attachment (a fresh random transcoder) in ``mode``: "eager" (dynamic
    cache), "static", or "compiled" (static cache, transformers' compiled decode step); the ids must agree.
    Returns (transcoder, sequences, features)."""
    kw = dict(kw)
    if mode in ("static", "compiled"):
        kw["cache_implementation"] = "static"
    if mode == "compiled":
        kw["compile_config"] = _compile_config()
    plain = model.generate(**kw)
    tc = random_transcoder()
    try:
        with attach_clt(model, tc, top_k=TOP_K) as clt:
            out, feats = clt.generate(**kw)
    finally:
        torch._dynamo.reset()
    assert torch.equal(out, plain), "attaching changed the generated ids"
    return tc, out, feats


@pytest.fixture
def no_recompile():
    """Inside: any dynamo recompile is an error."""
    import torch._dynamo

    yield lambda: setattr(torch._dynamo.config, "error_on_recompile", True)
    torch._dynamo.config.error_on_recompile = False
    torch._dynamo.reset()


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_static_cache_records_every_decode_step(arch):
    model = tiny_model(arch)
    ids, mask = prompts()
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    tc, out, feats = _generate_in_mode(model, kw, "static")
    assert feats.num_positions == out.shape[1] - 1
    check_against_reference(feats, model, arch, tc, out, full_mask(out, mask))


@pytest.mark.parametrize("mode", ["eager", "static", pytest.param("compiled", marks=pytest.mark.slow)])
def test_padding_generate_infers_without_an_attention_mask(mode):
    """No attention_mask passed: generate infers it from the pad token (ids != pad_token_id). A static cache
    hands the stack only a 4-D mask, so the call must infer it the same way, or left padding would be
    reported as real positions."""
    model = tiny_model("llama")
    ids, mask = prompts()  # row 0 starts with two pad tokens (id 0)
    kw = dict(input_ids=ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    tc, out, feats = _generate_in_mode(model, kw, mode)
    assert torch.equal(feats.mask[:, : ids.shape[1]], mask.bool())
    check_against_reference(feats, model, "llama", tc, out, full_mask(out, mask))


def test_static_cache_with_sliding_layers_past_their_window():
    """Gemma-2 alternates sliding and full layers; with a prompt longer than the sliding window the static
    cache's layers hold different lengths, and the length the recorder assumes (device-held, never read
    inside generate) must still be the number of positions fed."""
    model = tiny_model("gemma2")
    model.config.sliding_window = 4
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    tc, out, feats = _generate_in_mode(model, kw, "static")
    check_against_reference(feats, model, "gemma2", tc, out, full_mask(out, mask))


@pytest.mark.parametrize("kind", ["dynamic", "static", pytest.param("static_compiled_forward", marks=pytest.mark.slow)])
def test_generate_continuing_a_cache_that_holds_a_prefix(kind):
    """Prefix caching (a cache filled by an earlier forward handed to generate): the positions already in the
    cache were never seen by this call, so they are padding (mask False); the rest is exact against a plain
    forward over the whole sequence. A static cache keeps its length on the device: read once, at the call's
    first pass."""
    import copy

    from test_attach import assert_features_match, reference
    from transformers import DynamicCache, StaticCache

    model = tiny_model("llama")
    tc = random_transcoder()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (1, 8), generator=g)
    cache = DynamicCache(config=model.config) if kind == "dynamic" else StaticCache(config=model.config, max_cache_len=32)
    with torch.no_grad():
        model(input_ids=ids[:, :5], past_key_values=cache, use_cache=True)
    kw = dict(input_ids=ids, max_new_tokens=4, do_sample=False)
    plain = model.generate(**kw, past_key_values=copy.deepcopy(cache))
    with attach_clt(model, tc, top_k=TOP_K) as clt:
        if kind == "static_compiled_forward":
            model.forward = torch.compile(model.forward, fullgraph=True, dynamic=False, backend="aot_eager")
        try:
            out, feats = clt.generate(**kw, past_key_values=copy.deepcopy(cache))
        finally:
            model.__dict__.pop("forward", None)
            torch._dynamo.reset()
    assert torch.equal(out, plain)
    t = feats.num_positions
    assert t == out.shape[1] - 1
    real = feats.mask
    assert not real[:, :5].any() and real[:, 5:].all()
    ref = reference(model, "llama", tc, out[:, :t], torch.ones_like(out[:, :t]), feats.layers)
    for i, layer in enumerate(feats.layers):
        assert_features_match(
            feats.values[:, :, i][real], feats.indices[:, :, i][real], feats.l0[:, :, i][real], ref[layer][real], TOP_K
        )


@pytest.mark.slow
def test_compiled_forward_fullgraph_static_cache_compiles_once(no_recompile):
    model = tiny_model("llama")
    ids, mask = prompts()
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, cache_implementation="static")
    plain = model.generate(**kw)
    tc = random_transcoder()
    with attach_clt(model, tc, top_k=TOP_K) as clt:
        model.forward = torch.compile(model.forward, fullgraph=True, dynamic=False, backend="aot_eager")
        try:
            first, f1 = clt.generate(**kw)
            no_recompile()
            second, f2 = clt.generate(**kw)
            # a plain forward through the compiled forward is recorded too (other kwargs: compiled anew)
            torch._dynamo.config.error_on_recompile = False
            with torch.no_grad():
                model(input_ids=ids, attention_mask=mask)
            f3 = clt.calls[-1]
        finally:
            del model.forward
    for out, feats in ((first, f1), (second, f2)):
        assert torch.equal(out, plain)
        check_against_reference(feats, model, "llama", tc, out, full_mask(out, mask))
    check_against_reference(f3, model, "llama", tc, ids, mask)


@pytest.mark.parametrize("mode", ["eager", "static", pytest.param("compiled", marks=pytest.mark.slow)])
def test_generate_from_embeddings_records_the_prompt_and_every_step(mode):
    """generate(inputs_embeds=...) returns the new tokens alone: the record still covers prompt + new - 1
    positions with the prompt's padding (static cache: the stack sees a 4-D mask, so it comes from the call),
    exact against the reference over the token ids the embeddings came from."""
    model = tiny_model("llama")
    ids, mask = prompts()
    embeds = model.get_input_embeddings()(ids).detach()
    kw = dict(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=5, do_sample=False)
    tc, out, feats = _generate_in_mode(model, kw, mode)
    assert out.shape[1] == 5
    seq = torch.cat([ids, out], dim=1)
    assert feats.num_positions == seq.shape[1] - 1
    check_against_reference(feats, model, "llama", tc, seq, full_mask(seq, mask))


@pytest.mark.parametrize("mode", ["eager", "static", pytest.param("compiled", marks=pytest.mark.slow)])
def test_vision_language_generate_with_an_image(mode):
    """LLaVA with an image: the text stack receives embeddings in which 16 image-token positions carry the
    vision tower's features; every position (image ones included) is recorded and exact against plain hooks
    on a forward over the final sequences with the same image, left padding kept."""
    from conftest import assert_features_match, textbook_dense
    from test_attach import RESID_MID

    model = tiny_model("llava")
    cfg = model.config
    image_token = cfg.text_config.vocab_size - 1  # the tiny vocabulary has no id 32000
    cfg.image_token_index = image_token
    if hasattr(cfg, "image_token_id"):
        cfg.image_token_id = image_token
    n_image = (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2
    g = torch.Generator().manual_seed(0)
    ids = torch.cat([torch.randint(3, 100, (2, 3), generator=g), torch.full((2, n_image), image_token),
                     torch.randint(3, 100, (2, 3), generator=g)], dim=1)
    mask = torch.ones_like(ids)
    ids[0, :2], mask[0, :2] = 0, 0
    pixels = torch.randn(2, 3, cfg.vision_config.image_size, cfg.vision_config.image_size, generator=g)
    kw = dict(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=4, do_sample=False)
    tc, out, feats = _generate_in_mode(model, kw, mode)
    t = feats.num_positions
    assert t == out.shape[1] - 1
    seq, m = out[:, :t], full_mask(out, mask)[:, :t]
    got, handles = {}, []
    for layer in feats.layers:
        site = model.get_submodule(RESID_MID["llava"].format(l=layer))
        handles.append(site.register_forward_pre_hook(lambda mod, a, layer=layer: got.__setitem__(layer, a[0])))
    try:
        with torch.no_grad():
            model(input_ids=seq, pixel_values=pixels, attention_mask=m, position_ids=(m.cumsum(-1) - 1).clamp_min(0))
    finally:
        for h in handles:
            h.remove()
    real = feats.mask
    assert torch.equal(real, m.bool())
    for i, layer in enumerate(feats.layers):
        dense = textbook_dense(tc, got[layer], layer)
        assert_features_match(
            feats.values[:, :, i][real], feats.indices[:, :, i][real], feats.l0[:, :, i][real], dense[real], TOP_K
        )


@pytest.mark.slow
def test_compiled_forward_places_plain_calls_like_eager_ones():
    """Through a compiled model.forward the stack's hooks run inside the compiled region, so the model's own
    hooks place each pass: two independent forwards are two records (not one of twice the length), a manual
    cache loop continues its record, and use_cache=False in generate (a recomputed prefix the compiled
    region cannot drop) is refused instead of recorded twice."""
    model = tiny_model("llama")
    ids, mask = prompts()
    other = torch.randint(0, model.config.vocab_size, ids.shape, generator=torch.Generator().manual_seed(5))
    tc = random_transcoder()
    with attach_clt(model, tc, top_k=TOP_K) as clt:
        model.forward = torch.compile(model.forward, fullgraph=True, dynamic=False, backend="aot_eager")
        try:
            with torch.no_grad():
                model(input_ids=ids, attention_mask=mask)
                model(input_ids=other, attention_mask=mask)
                first = clt.calls
                clt.reset()
                out = model(input_ids=ids, attention_mask=mask, use_cache=True)
                nxt = out.logits[:, -1:].argmax(-1)
                model(input_ids=nxt, attention_mask=torch.cat([mask, torch.ones_like(nxt)], 1),
                      past_key_values=out.past_key_values, use_cache=True)
                loop = clt.calls
            passes = []
            probe = model.register_forward_pre_hook(lambda *a: passes.append(1))  # outside the compiled region
            with pytest.raises(AlignmentError, match="use_cache=False with a compiled model.forward"):
                clt.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False, use_cache=False)
            probe.remove()
            assert passes == [], "refused only after running passes"
        finally:
            del model.forward
            torch._dynamo.reset()
    assert [c.num_positions for c in first] == [ids.shape[1], ids.shape[1]]
    check_against_reference(first[0], model, "llama", tc, ids, mask)
    check_against_reference(first[1], model, "llama", tc, other, mask)
    assert len(loop) == 1 and loop[0].num_positions == ids.shape[1] + 1
    seq = torch.cat([ids, nxt], 1)
    check_against_reference(loop[0], model, "llama", tc, seq, full_mask(seq, mask))


@pytest.mark.slow
@pytest.mark.parametrize("backend,mode", BACKENDS)
def test_transformers_compiled_decode_step_compiles_once(backend, mode, no_recompile):
    """generate(cache_implementation="static") compiles the decode step (on CUDA by default; here on CPU)."""
    model = tiny_model("llama")
    ids, mask = prompts()
    kw = dict(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=7,
        do_sample=False,
        cache_implementation="static",
        compile_config=_compile_config(backend, mode),
    )
    plain = model.generate(**kw)
    tc = random_transcoder()
    with attach_clt(model, tc, top_k=TOP_K, window=3) as a, attach_clt(model, tc, top_k=TOP_K, layers=[1]) as b:
        out1, fa1 = a.generate(**kw)
        no_recompile()
        out2, fa2 = a.generate(**kw)
        fb = b.calls
    for out, feats in ((out1, fa1), (out2, fa2), (out1, fb[0]), (out2, fb[1])):
        assert torch.equal(out, plain)
        assert feats.num_positions == out.shape[1] - 1
        check_against_reference(feats, model, "llama", tc, out, full_mask(out, mask))


@pytest.mark.slow
def test_compiled_decode_with_on_step_and_num_return_sequences():
    model = tiny_model("llama")
    ids, mask = prompts()
    kw = dict(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=4,
        do_sample=True,
        num_return_sequences=2,
        cache_implementation="static",
        compile_config=_compile_config(),
    )
    tc = random_transcoder()
    steps = []
    torch.manual_seed(0)
    with attach_clt(model, tc, top_k=TOP_K, on_step=steps.append) as clt:
        out, feats = clt.generate(**kw)
    assert feats.num_positions == out.shape[1] - 1 and feats.batch_size == 4
    assert [s.num_positions for s in steps] == [ids.shape[1]] + [1] * 3
    assert torch.equal(torch.cat([s.indices for s in steps], dim=1), feats.indices)
    full = full_mask(out, mask.repeat_interleave(2, dim=0))
    check_against_reference(feats, model, "llama", tc, out, full)


def test_a_pass_the_hooks_never_saw_raises():
    """A decode step that bypasses the decoder stack's hooks is an AlignmentError, never fewer positions."""
    model = tiny_model("llama")
    ids, mask = prompts()
    tc = random_transcoder()
    stack = model.model
    real_call = type(stack).__call__
    calls = {"n": 0}

    class Sneaky(type(stack)):
        def __call__(self, *args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 3:  # the second decode step runs without any hook
                return self.forward(*args, **kwargs)
            return real_call(self, *args, **kwargs)

    with attach_clt(model, tc, top_k=TOP_K) as clt:
        stack.__class__ = Sneaky
        try:
            with pytest.raises(AlignmentError, match="could not follow|did not see"):
                clt.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
        finally:
            stack.__class__ = Sneaky.__mro__[1]
        assert clt.calls == []  # nothing half-recorded is reported
        out, feats = clt.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    check_against_reference(feats, model, "llama", tc, out, full_mask(out, mask))


@pytest.mark.slow
def test_a_plain_call_through_torch_compile_of_the_model_raises_at_the_next_read():
    """torch.compile(model) (a wrapper module) compiles the model's hooks too, even before any pass made a
    decode buffer: the first plain call through it cannot be followed and the next read says so (it used to
    report no call at all); generate through the wrapper runs the attached model's generate and is recorded."""
    model = tiny_model("llama")
    ids, mask = prompts()
    tc = random_transcoder()
    with attach_clt(model, tc, top_k=TOP_K) as clt:
        wrapper = torch.compile(model, backend="aot_eager")
        try:
            with torch.no_grad():
                wrapper(input_ids=ids, attention_mask=mask)
            with pytest.raises(AlignmentError, match="torch.compile"):
                _ = clt.calls
            out = wrapper.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
            (feats,) = clt.calls
        finally:
            torch._dynamo.reset()
    check_against_reference(feats, model, "llama", tc, out, full_mask(out, mask))


@pytest.mark.slow
def test_model_compile_generate_records_and_a_plain_forward_it_cannot_follow_raises(no_recompile):
    """model.compile() compiles the whole call, the model's own hooks included: generate is followed (the
    step callback accounts for it); a plain forward is not, and the next read says so instead of
    returning fewer positions. The attachment works again afterwards."""
    model = tiny_model("llama")
    ids, mask = prompts()
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, cache_implementation="static")
    plain = model.generate(**kw)
    tc = random_transcoder()
    with attach_clt(model, tc, top_k=TOP_K) as clt:
        model.compile(backend="aot_eager", fullgraph=True, dynamic=False)
        try:
            out, feats = clt.generate(**kw)
            no_recompile()
            out2, feats2 = clt.generate(**kw)
            torch._dynamo.config.error_on_recompile = False
            with torch.no_grad():
                model(input_ids=ids, attention_mask=mask)
            with pytest.raises(AlignmentError, match="outside generate"):
                clt.features  # noqa: B018
            out3, feats3 = clt.generate(**kw)
        finally:
            model._compiled_call_impl = None
    for o, f in ((out, feats), (out2, feats2), (out3, feats3)):
        assert torch.equal(o, plain)
        check_against_reference(f, model, "llama", tc, o, full_mask(o, mask))
