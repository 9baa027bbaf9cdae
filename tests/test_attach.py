"""attach_clt: features aligned with generate() output, lifecycle, and bad input.

The reference for every check: one plain forward over the final sequences, site activations
captured by the test's own hooks (module table below, independent of sparse_clt_hf.sites),
dense-encoded with the textbook formula, sorted.
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_features_match, random_transcoder, textbook_dense
from tiny_models import tiny_model
from transformers import StoppingCriteria, StoppingCriteriaList

from sparse_clt_hf import AlignmentError, HookSiteError, IncompatibleTranscoderError, attach_clt

# The input of the pre-MLP norm (resid_mid), per architecture, written out by hand.
RESID_MID = {
    "llama": "model.layers.{l}.post_attention_layernorm",
    "gemma2": "model.layers.{l}.pre_feedforward_layernorm",
    "gpt2": "transformer.h.{l}.ln_2",
    "llava": "model.language_model.layers.{l}.post_attention_layernorm",
}
ARCHS = list(RESID_MID)
TOP_K = 6


def prompts(batch=2, length=5, pad_first=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 100, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    if pad_first:
        ids[0, :pad_first] = 0
        mask[0, :pad_first] = 0
    return ids, mask


def reference(model, arch, tc, sequences, mask, layers=(0, 1, 2)):
    """Dense reference activations {layer: [B, T, m]} over sequences (all positions)."""
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    got, handles = {}, []
    for layer in layers:
        mod = model.get_submodule(RESID_MID[arch].format(l=layer))
        handles.append(mod.register_forward_pre_hook(lambda m, a, layer=layer: got.__setitem__(layer, a[0])))
    try:
        with torch.no_grad():
            model(input_ids=sequences, attention_mask=mask, position_ids=pos)
    finally:
        for h in handles:
            h.remove()
    return {layer: textbook_dense(tc, got[layer], layer) for layer in layers}


def check_against_reference(feats, model, arch, tc, sequences, mask):
    t = feats.num_positions
    ref = reference(model, arch, tc, sequences[:, :t], mask[:, :t], feats.layers)
    real = feats.mask
    assert torch.equal(real, mask[:, :t].bool())
    for i, layer in enumerate(feats.layers):
        assert_features_match(
            feats.values[:, :, i][real], feats.indices[:, :, i][real], feats.l0[:, :, i][real], ref[layer][real], TOP_K
        )


def full_mask(out, mask):
    return torch.cat([mask, torch.ones(mask.shape[0], out.shape[1] - mask.shape[1], dtype=mask.dtype)], dim=1)


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_left_padded_and_bitwise_unchanged(arch):
    model = tiny_model(arch)
    ids, mask = prompts()
    with torch.no_grad():
        logits_plain = model(input_ids=ids, attention_mask=mask).logits
    plain = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    tc = random_transcoder()
    with attach_clt(model, tc, top_k=TOP_K) as clt:
        with torch.no_grad():
            logits_clt = model(input_ids=ids, attention_mask=mask).logits
        clt.reset()
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
        feats = clt.features
    assert torch.equal(logits_plain, logits_clt), "attaching changed the logits"
    assert torch.equal(plain, out), "attaching changed the generated ids"
    assert feats.indices.shape == (2, out.shape[1] - 1, 3, TOP_K)
    assert torch.equal(feats.token_ids, out[:, :-1])
    assert not feats.mask[0, :2].any() and feats.mask[0, 2:].all() and feats.mask[1].all()
    check_against_reference(feats, model, arch, tc, out, full_mask(out, mask))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_sampling_with_several_return_sequences(arch):
    model = tiny_model(arch)
    ids, mask = prompts()
    tc = random_transcoder()
    with attach_clt(model, tc, top_k=TOP_K) as clt:
        torch.manual_seed(3)
        out, feats = clt.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=True, num_return_sequences=2
        )
    assert feats.batch_size == 4 and feats.num_positions == out.shape[1] - 1
    assert torch.equal(feats.token_ids, out[:, :-1])
    check_against_reference(feats, model, arch, tc, out, full_mask(out, mask.repeat_interleave(2, 0)))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("variant", ["no_cache", "chunked_prefill"])
def test_recompute_and_chunked_prefill(arch, variant):
    model = tiny_model(arch)
    # transformers 4.57's chunked prefill ignores left padding in position ids: no padding there
    ids, mask = prompts(length=6, pad_first=2 if variant == "no_cache" else 0)
    kwargs = {"use_cache": False} if variant == "no_cache" else {"prefill_chunk_size": 2}
    tc = random_transcoder()
    with attach_clt(model, tc, top_k=TOP_K) as clt:
        out, feats = clt.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, **kwargs)
    assert feats.num_positions == out.shape[1] - 1, "the recomputed prefix was recorded twice"
    check_against_reference(feats, model, arch, tc, out, full_mask(out, mask))


@pytest.mark.parametrize("window", [1, 3, 64])
def test_decode_window_does_not_change_features(window):
    model = tiny_model("llama")
    ids, mask = prompts()
    tc = random_transcoder()
    with attach_clt(model, tc, top_k=TOP_K, window=window) as clt:
        out, feats = clt.generate(input_ids=ids, attention_mask=mask, max_new_tokens=7, do_sample=False)
    check_against_reference(feats, model, "llama", tc, out, full_mask(out, mask))


@pytest.mark.parametrize("arch", ARCHS)
def test_plain_forward_and_manual_cache_loop(arch):
    model = tiny_model(arch)
    ids, mask = prompts(pad_first=0)
    tc = random_transcoder()
    with attach_clt(model, tc, top_k=TOP_K) as clt:
        with torch.no_grad():
            out = model(input_ids=ids, use_cache=True)
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            model(input_ids=nxt, past_key_values=out.past_key_values, use_cache=True)
        feats = clt.features
    assert feats.num_positions == 6 and len(clt.calls) == 1
    seq = torch.cat([ids, nxt], 1)
    check_against_reference(feats, model, arch, tc, seq, torch.ones_like(seq))


def test_several_calls_are_appended_and_generate_returns_its_own():
    model = tiny_model("llama")
    tc = random_transcoder()
    with attach_clt(model, tc, top_k=TOP_K) as clt:
        ids1, m1 = prompts(batch=2, length=5)
        out1 = model.generate(input_ids=ids1, attention_mask=m1, max_new_tokens=3, do_sample=False)
        ids2, m2 = prompts(batch=3, length=4, pad_first=0, seed=1)
        out2, own = clt.generate(input_ids=ids2, attention_mask=m2, max_new_tokens=5, do_sample=False)
        allf = clt.features
        assert len(clt.calls) == 2
        assert allf.batch_size == 5 and allf.num_positions == max(out1.shape[1], out2.shape[1]) - 1
        assert own.batch_size == 3 and own.num_positions == out2.shape[1] - 1
        assert torch.equal(allf.indices[2:, : own.num_positions], own.indices)
        assert not allf.mask[:2, out1.shape[1] - 1 :].any(), "shorter call padded with mask False"
        check_against_reference(own, model, "llama", tc, out2, full_mask(out2, m2))
        clt.reset()
        with pytest.raises(LookupError):
            _ = clt.features


def test_beam_search_raises_and_leaves_attachment_usable():
    model = tiny_model("llama")
    ids, mask = prompts()
    tc = random_transcoder()
    with attach_clt(model, tc, top_k=TOP_K) as clt:
        with pytest.raises(AlignmentError, match="beam search"):
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, num_beams=2)
        out, feats = clt.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
        assert len(clt.calls) == 1
    check_against_reference(feats, model, "llama", tc, out, full_mask(out, mask))


@pytest.mark.parametrize("arch", ARCHS)
def test_on_step_streams_each_pass(arch):
    model = tiny_model(arch)
    ids, mask = prompts()
    tc = random_transcoder()
    steps = []
    with attach_clt(model, tc, top_k=TOP_K, on_step=steps.append) as clt:
        out, feats = clt.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    assert [s.num_positions for s in steps] == [5, 1, 1, 1]
    assert torch.equal(torch.cat([s.indices for s in steps], 1), feats.indices)
    assert torch.equal(torch.cat([s.token_ids for s in steps], 1), out[:, :-1])


class Boom(StoppingCriteria):
    def __init__(self, after):
        self.calls, self.after = 0, after

    def __call__(self, input_ids, scores, **kwargs):
        self.calls += 1
        if self.calls >= self.after:
            raise KeyboardInterrupt("stop!")
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


def hooks_left(model):
    return [
        name
        for name, mod in model.named_modules()
        if mod._forward_hooks or mod._forward_pre_hooks
    ]


@pytest.mark.parametrize("arch", ARCHS)
def test_detach_and_exception_leave_no_hook(arch):
    model = tiny_model(arch)
    ids, mask = prompts()
    clt = attach_clt(model, random_transcoder(), top_k=TOP_K)
    assert hooks_left(model) and "generate" in model.__dict__
    clt.detach()
    clt.detach()  # idempotent
    assert hooks_left(model) == [] and "generate" not in model.__dict__
    with pytest.raises(KeyboardInterrupt):
        with attach_clt(model, random_transcoder(), top_k=TOP_K):
            model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=5, stopping_criteria=StoppingCriteriaList([Boom(2)])
            )
    assert hooks_left(model) == [] and "generate" not in model.__dict__


@pytest.mark.parametrize("arch", ARCHS)
def test_exception_mid_generate_keeps_attachment_usable(arch):
    model = tiny_model(arch)
    ids, mask = prompts()
    tc = random_transcoder()
    with attach_clt(model, tc, top_k=TOP_K, window=2) as clt:
        with pytest.raises(KeyboardInterrupt):
            model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=6, stopping_criteria=StoppingCriteriaList([Boom(3)])
            )
        assert clt.calls == [], "the aborted call is not reported"
        out, feats = clt.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
        assert len(clt.calls) == 1
    check_against_reference(feats, model, arch, tc, out, full_mask(out, mask))


def test_two_attachments_are_independent():
    model = tiny_model("llama")
    ids, mask = prompts()
    tc_a, tc_b = random_transcoder(seed=1), random_transcoder(seed=2, layers=(1,), widths=[32])
    a = attach_clt(model, tc_a, top_k=TOP_K)
    b = attach_clt(model, tc_b, top_k=TOP_K)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
    fa, fb = a.features, b.features
    a.detach()
    assert "generate" in model.__dict__, "b still needs the generate tap"
    out2, fb2 = b.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
    b.detach()
    assert hooks_left(model) == [] and "generate" not in model.__dict__
    assert fa.layers == [0, 1, 2] and fb.layers == [1]
    check_against_reference(fa, model, "llama", tc_a, out, full_mask(out, mask))
    check_against_reference(fb2, model, "llama", tc_b, out2, full_mask(out2, mask))


def test_layer_subset_and_dtype_casting():
    model = tiny_model("llama")
    ids, mask = prompts()
    tc = random_transcoder().to(torch.bfloat16)
    with attach_clt(model, tc, layers=[2], top_k=TOP_K) as clt:
        out, feats = clt.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
    assert feats.layers == [2] and feats.values.dtype == torch.float32
    ref_tc = tc.to(torch.float32)
    check_against_reference(feats, model, "llama", ref_tc, out, full_mask(out, mask))


def test_features_container_views():
    model = tiny_model("llama")
    ids, mask = prompts(batch=3)
    tc = random_transcoder()
    with attach_clt(model, tc, top_k=TOP_K) as clt:
        _, feats = clt.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
    d = feats.layer(1)
    assert set(d) == {"layer", "activations", "indices", "sparsity"} and d["activations"].shape == (3, 7, TOP_K)
    dense = feats.to_dense(1)
    assert dense.shape == (3, 7, 64)
    # top(n): brute force over every valid slot, across batch rows
    hits = feats.top(5)
    flat = [
        (float(feats.values[b, t, li, j]), b, t, feats.layers[li], int(feats.indices[b, t, li, j]))
        for b in range(3) for t in range(7) for li in range(3) for j in range(TOP_K)
        if feats.mask[b, t] and feats.indices[b, t, li, j] >= 0
    ]
    best = sorted(flat, reverse=True)[:5]
    assert [round(h.activation, 6) for h in hits] == [round(v, 6) for v, *_ in best]
    for h in hits:
        assert feats.to_dense(h.layer)[h.batch, h.position, h.feature] == pytest.approx(h.activation)
        assert feats.mask[h.batch, h.position]
    records = feats.to_records()
    assert len(records) == int(((feats.indices >= 0) & feats.mask[:, :, None, None]).sum())
    assert {"batch", "position", "layer", "feature", "activation", "token_id"} <= set(records[0])


def test_features_save_load(tmp_path):
    model = tiny_model("llama")
    ids, mask = prompts()
    with attach_clt(model, random_transcoder(), top_k=TOP_K) as clt:
        _, feats = clt.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
    feats.save(tmp_path / "f.safetensors")
    back = type(feats).load(tmp_path / "f.safetensors")
    assert back.layers == feats.layers and back.n_features == feats.n_features
    for name in ("indices", "values", "l0", "mask", "token_ids"):
        assert torch.equal(getattr(back, name), getattr(feats, name))
    B, T, L, K = feats.indices.shape
    # values fp32 + indices int32 (4 bytes each per slot), l0 int32, mask bool, token ids int64
    assert feats.nbytes == B * T * L * K * 8 + B * T * L * 4 + B * T + B * T * 8


def test_bad_input_errors():
    model = tiny_model("llama")
    with pytest.raises(IncompatibleTranscoderError, match="d_model=16 does not match the model's hidden size 32"):
        attach_clt(model, random_transcoder(d=16))
    with pytest.raises(IncompatibleTranscoderError, match=r"layers \[5\] are out of range: the model has 3 layers"):
        attach_clt(model, random_transcoder(layers=(0, 5), widths=[8, 8]))
    with pytest.raises(IncompatibleTranscoderError, match=r"no encoder for layers \[2\]"):
        attach_clt(model, random_transcoder(layers=(0, 1), widths=[8, 8]), layers=[2])
    with pytest.raises(ValueError, match="top_k must be a positive integer"):
        attach_clt(model, random_transcoder(), top_k=0)
    neox = tiny_model("gpt_neox")
    with pytest.raises(HookSiteError, match="resid_mid.*gpt_neox"):
        attach_clt(neox, random_transcoder(site="resid_mid"))
    assert hooks_left(model) == [] and hooks_left(neox) == []
    with pytest.warns(UserWarning, match="trained on"):
        tc = random_transcoder()
        tc.config.model_name = "google/gemma-2-2b"
        model.name_or_path = "meta-llama/Llama-3.2-1B"
        attach_clt(model, tc).detach()


def test_accelerate_offloaded_model():
    """Layers dispatched by accelerate (weights offloaded, executed on cpu) get their encoder there."""
    from accelerate import cpu_offload

    model = tiny_model("llama")
    ids, mask = prompts()
    plain = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
    tc = random_transcoder()
    cpu_offload(model, execution_device="cpu")
    assert model.model.layers[0].mlp.up_proj.weight.device.type == "meta"
    with attach_clt(model, tc, top_k=TOP_K) as clt:
        assert {clt.transcoder.encoder(x).W_enc.device.type for x in clt.layers} == {"cpu"}
        out, feats = clt.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
    assert torch.equal(out, plain)
    assert feats.num_positions == out.shape[1] - 1 and torch.equal(feats.token_ids, out[:, :-1])


def test_assisted_decoding_drops_rejected_draft_positions():
    model = tiny_model("llama")
    assistant = tiny_model("llama", seed=5)
    ids, mask = prompts(batch=1, pad_first=0)
    tc = random_transcoder()
    plain = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    with attach_clt(model, tc, top_k=TOP_K) as clt:
        out, feats = clt.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, assistant_model=assistant
        )
    assert torch.equal(out, plain)
    assert feats.num_positions == out.shape[1] - 1 and torch.equal(feats.token_ids, out[:, :-1])
    check_against_reference(feats, model, "llama", tc, out, torch.ones_like(out))


@pytest.mark.slow
def test_compiled_model_forward_keeps_recording():
    """Hooks registered before torch.compile of the model's forward still record, aligned."""
    model = tiny_model("llama")
    ids, mask = prompts()
    tc = random_transcoder()
    plain = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    with attach_clt(model, tc, top_k=TOP_K) as clt:
        model.forward = torch.compile(model.forward)
        out, feats = clt.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    del model.forward
    assert torch.equal(out, plain)
    check_against_reference(feats, model, "llama", tc, out, full_mask(out, mask))
