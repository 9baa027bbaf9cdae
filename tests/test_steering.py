"""Steering (clt.steer): generate outputs and recorded features against an independent reference.

The reference is the test's own plain hooks (module table below, independent of sparse_clt_hf.sites):
at the input site of a steered source layer, the feature's activation ``a`` by the textbook dense
formula in float64 (conftest.textbook_dense), ``a'`` by the mode, and at the output module of every
target layer ``(a' - a) * W_dec[feature, j - s]`` added, at the absolute positions the steer covers
(a counter of positions fed to the model). Recorded features are checked against one forward pass over
the final sequences with the same hooks, the steered feature reading ``a'``.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import assert_features_match, random_transcoder, textbook_dense
from test_attach import RESID_MID, TOP_K, full_mask, prompts
from tiny_models import tiny_model

from sparse_clt_hf import IncompatibleTranscoderError, TranscoderFormatError, attach_clt
from sparse_clt_hf.loading import load_decoder_rows

MLP = {"llama": "model.layers.{l}.mlp", "gemma2": "model.layers.{l}.post_feedforward_layernorm"}
END = 10**9


class Reference:
    """Plain hooks that steer by the published semantics. ``steers``: (layer, feature, value, mode, (lo, hi))."""

    def __init__(self, model, arch, tc, steers, *, input_site=None, capture=False):
        self.model, self.tc, self.steers = model, tc, steers
        self.seen = 0
        self.start = 0
        self.coeff = {}
        self.captured = {}
        self.handles = [model.register_forward_pre_hook(self._model_pre, with_kwargs=True)]
        in_path, in_which = input_site or (RESID_MID[arch], "input")
        layers = sorted({s[0] for s in steers} | (set(tc.layers) if capture else set()))
        for layer in layers:  # readers first, then writers
            mod = model.get_submodule(in_path.format(l=layer))
            if in_which == "input":
                self.handles.append(mod.register_forward_pre_hook(lambda m, a, layer=layer: self._read(layer, a[0])))
            else:
                self.handles.append(mod.register_forward_hook(lambda m, a, o, layer=layer: self._read(layer, o)))
        for j in range(len(model.model.layers)):
            self.handles.append(model.get_submodule(MLP[arch].format(l=j)).register_forward_hook(
                lambda m, a, o, j=j: self._write(j, o)))

    def _model_pre(self, module, args, kwargs):
        ids = kwargs.get("input_ids")
        self.start = self.seen
        self.seen += ids.shape[1]

    def _new(self, a, value, mode):
        return {"clamp": torch.full_like(a, value), "add": a + value, "scale": a * value}[mode]

    def _read(self, layer, x):
        self.captured[layer] = x.detach().clone()
        dense = textbook_dense(self.tc, x, layer)
        pos = torch.arange(self.start, self.start + x.shape[1])
        for i, (s, f, value, mode, (lo, hi)) in enumerate(self.steers):
            if s == layer:
                a = dense[..., f]
                covered = (pos >= lo) & (pos < hi)
                self.coeff[i] = torch.where(covered, self._new(a, value, mode) - a, torch.zeros_like(a))

    def _write(self, j, out):
        delta = torch.zeros(out.shape, dtype=torch.float64)
        touched = False
        for i, (s, f, *_rest) in enumerate(self.steers):
            W = self.tc.encoder(s).W_dec
            if s <= j < s + W.shape[1]:
                delta += self.coeff[i][..., None] * W[f, j - s].double()
                touched = True
        return out + delta.to(out.dtype) if touched else None

    def steered_dense(self, x, layer, start=0):
        dense = textbook_dense(self.tc, x, layer)
        pos = torch.arange(start, start + x.shape[1])
        for s, f, value, mode, (lo, hi) in self.steers:
            if s == layer:
                covered = (pos >= lo) & (pos < hi)
                dense[..., f] = torch.where(covered, self._new(dense[..., f], value, mode), dense[..., f])
        return dense

    def remove(self):
        for h in self.handles:
            h.remove()


def ref_generate(model, arch, tc, steers, **kw):
    ref = Reference(model, arch, tc, steers)
    try:
        return model.generate(**kw)
    finally:
        ref.remove()


def check_features(feats, model, arch, tc, steers, sequences, mask, input_site=None):
    """Recorded features == textbook dense of a steered forward over ``sequences``, steered features at a'."""
    t = feats.num_positions
    seq, m = sequences[:, :t], mask[:, :t]
    ref = Reference(model, arch, tc, steers, input_site=input_site, capture=True)
    try:
        with torch.no_grad():
            model(input_ids=seq, attention_mask=m, position_ids=(m.cumsum(-1) - 1).clamp_min(0))
    finally:
        ref.remove()
    real = feats.mask
    assert torch.equal(real, m.bool())
    for i, layer in enumerate(feats.layers):
        dense = ref.steered_dense(ref.captured[layer], layer)
        assert_features_match(
            feats.values[:, :, i][real], feats.indices[:, :, i][real], feats.l0[:, :, i][real], dense[real], TOP_K
        )


def busy_feature(model, tc, layer, kw):
    """The feature of ``layer`` with the largest mean activation in an unsteered run."""
    with attach_clt(model, tc, top_k=TOP_K, layers=[layer]) as clt:
        _, feats = clt.generate(**kw)
    vals, idx = feats.values[:, :, 0].flatten(0, 1), feats.indices[:, :, 0].flatten(0, 1).long()
    sums = torch.zeros(tc.encoder(layer).n_features).index_add_(0, idx.clamp_min(0).flatten(), vals.flatten().float())
    return int(sums.argmax())


def generate_kw(**extra):
    ids, mask = prompts()
    return {"input_ids": ids, "attention_mask": mask, "max_new_tokens": 6, "do_sample": False, **extra}


# ---------------------------------------------------------------------------- semantics against the reference
@pytest.mark.parametrize("kind", ["clt", "plt"])
@pytest.mark.parametrize("mode,value", [("clamp", 6.0), ("add", 4.0), ("scale", 25.0)])
def test_steer_matches_reference_left_padded(kind, mode, value):
    model = tiny_model("llama")
    tc = random_transcoder(decoders=True, span=1 if kind == "plt" else None)
    kw = generate_kw()
    plain = model.generate(**kw)
    f = busy_feature(model, tc, 1, kw)
    steers = [(1, f, value, mode, (0, END))]
    expected = ref_generate(model, "llama", tc, steers, **kw)
    with attach_clt(model, tc, top_k=TOP_K) as clt:
        h = clt.steer(1, f, value, mode=mode)
        assert clt.steering[0]["targets"] == ([1] if kind == "plt" else [1, 2])
        out, feats = clt.generate(**kw)
        h.remove()
    assert torch.equal(out, expected)
    assert not torch.equal(out, plain)  # the steer changes the text
    check_features(feats, model, "llama", tc, steers, out, full_mask(out, kw["attention_mask"]))
    if mode == "clamp":
        hit = feats.indices[:, :, 1] == f
        assert hit.any(-1)[feats.mask].all() and torch.all(feats.values[:, :, 1][hit] == value)


def test_several_steers_combine_gemma2_and_topk():
    """Two layers, two modes, an ablation; TopK activation (the steered feature's a needs the whole layer)."""
    model = tiny_model("gemma2")
    tc = random_transcoder(decoders=True, activation="topk", k=8)
    kw = generate_kw()
    f0, f2 = busy_feature(model, tc, 0, kw), busy_feature(model, tc, 2, kw)
    steers = [(0, f0, 8.0, "clamp", (0, END)), (0, (f0 + 1) % 64, 3.0, "add", (0, END)), (2, f2, 0.0, "clamp", (0, END))]
    expected = ref_generate(model, "gemma2", tc, steers, **kw)
    with attach_clt(model, tc, top_k=TOP_K) as clt:
        for s in steers:
            clt.steer(s[0], s[1], s[2], mode=s[3])
        assert len(clt.steering) == 3
        out, feats = clt.generate(**kw)
        clt.clear_steering()
        assert clt.steering == []
    assert torch.equal(out, expected)
    check_features(feats, model, "gemma2", tc, steers, out, full_mask(out, kw["attention_mask"]))
    assert not (feats.indices[:, :, 2] == f2).any()  # ablated


@pytest.mark.parametrize("positions", ["prompt", "generated", slice(6, 8)])
def test_positions(positions):
    model = tiny_model("llama")
    tc = random_transcoder(decoders=True)
    kw = generate_kw(max_new_tokens=7)
    prompt = kw["input_ids"].shape[1]
    lo, hi = (6, 8) if isinstance(positions, slice) else {"prompt": (0, prompt), "generated": (prompt, END)}[positions]
    steers = [(0, busy_feature(model, tc, 0, kw), 12.0, "clamp", (lo, hi))]
    expected = ref_generate(model, "llama", tc, steers, **kw)
    everywhere = ref_generate(model, "llama", tc, [(*steers[0][:4], (0, END))], **kw)
    with attach_clt(model, tc, top_k=TOP_K, window=4) as clt:
        clt.steer(*steers[0][:3], positions=positions)
        out, feats = clt.generate(**kw)
    assert torch.equal(out, expected) and not torch.equal(out, everywhere)
    check_features(feats, model, "llama", tc, steers, out, full_mask(out, kw["attention_mask"]))
    hit = ((feats.indices[:, :, 0] == steers[0][1]) & (feats.values[:, :, 0] == 12.0)).any(-1)
    pos = torch.arange(feats.num_positions)
    assert torch.equal(hit.any(0), (pos >= lo) & (pos < hi))


def test_num_return_sequences_and_static_cache():
    model = tiny_model("llama")
    tc = random_transcoder(decoders=True)
    kw = generate_kw(do_sample=True, top_k=1, num_return_sequences=2, cache_implementation="static")
    steers = [(2, busy_feature(model, tc, 2, generate_kw()), 9.0, "clamp", (0, END))]
    expected = ref_generate(model, "llama", tc, steers, **kw)
    with attach_clt(model, tc, top_k=TOP_K) as clt:
        clt.steer(*steers[0][:3])
        out, feats = clt.generate(**kw)
    assert out.shape[0] == 4 and torch.equal(out, expected)
    mask = kw["attention_mask"].repeat_interleave(2, dim=0)
    check_features(feats, model, "llama", tc, steers, out, full_mask(out, mask))


def test_read_and_write_at_one_module_record_the_unsteered_read():
    """Input site == output site (mlp output): the record and the read see the value before the delta."""
    model = tiny_model("llama")
    tc = random_transcoder(decoders=True, span=1, site="model.layers.{layer}.mlp:output")
    kw = generate_kw()
    site = ("model.layers.{l}.mlp", "output")
    f = busy_feature(model, tc, 1, kw)
    steers = [(1, f, 5.0, "clamp", (0, END))]
    ref = Reference(model, "llama", tc, steers, input_site=site)
    try:
        expected = model.generate(**kw)
    finally:
        ref.remove()
    with attach_clt(model, tc, top_k=TOP_K) as clt:
        clt.steer(1, f, 5.0)
        out, feats = clt.generate(**kw)
    assert torch.equal(out, expected)
    check_features(feats, model, "llama", tc, steers, out, full_mask(out, kw["attention_mask"]), input_site=site)


def test_output_site_before_input_site_is_an_error():
    model = tiny_model("llama")
    tc = random_transcoder(decoders=True, span=1, site="resid_post")
    with attach_clt(model, tc, top_k=TOP_K) as clt:
        clt.steer(0, 1, 3.0)
        with pytest.raises(Exception, match="input site must come before its output site"):
            clt.generate(**generate_kw())


# ---------------------------------------------------------------------------- bitwise and lifecycle
def test_remove_restores_bitwise_outputs_and_records():
    model = tiny_model("llama")
    tc = random_transcoder(decoders=True)
    kw = generate_kw()
    ids, mask = kw["input_ids"], kw["attention_mask"]
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    plain = model.generate(**kw)
    with attach_clt(model, tc, top_k=TOP_K) as clt:
        _, before = clt.generate(**kw)
        with clt.steer(0, 5, 7.0, positions="generated") as h:  # nothing covered in a plain forward pass
            with torch.no_grad():
                assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, logits)
            steered, _ = clt.generate(**kw)
            assert h.active and not torch.equal(steered, plain)
        assert not h.active
        h.remove()  # idempotent
        with torch.no_grad():
            assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, logits)
        out, after = clt.generate(**kw)
        clt.steer(1, 2, 3.0, mode="add")
        clt.clear_steering()
        out2, after2 = clt.generate(**kw)
        with clt.steer(1, 2, 3.0):
            pass
    assert torch.equal(out, plain) and torch.equal(out2, plain)
    for feats in (after, after2):
        assert torch.equal(feats.indices, before.indices) and torch.equal(feats.values, before.values)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_set_value_and_detach():
    model = tiny_model("llama")
    tc = random_transcoder(decoders=True)
    kw = generate_kw()
    plain = model.generate(**kw)
    with attach_clt(model, tc, top_k=TOP_K) as clt:
        h = clt.steer(0, 5, 7.0)
        clone = copy.deepcopy(model)  # a plain model: no recorder and no steering hook
        assert torch.equal(clone.generate(**kw), plain) and _hook_count(clone) == 0
        h.set(-2.0)
        assert h.value == -2.0 and clt.steering[0]["value"] == -2.0
        out, _ = clt.generate(**kw)
        with pytest.raises(ValueError, match="finite"):
            h.set(float("nan"))
    assert torch.equal(out, ref_generate(model, "llama", tc, [(0, 5, -2.0, "clamp", (0, END))], **kw))
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    with pytest.raises(RuntimeError, match="detached"):
        clt.steer(0, 5, 1.0)


def _hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize(
    "args,kwargs,error,match",
    [
        ((5, 0, 1.0), {}, IncompatibleTranscoderError, "layers"),
        ((1, 0, 1.0), {}, IncompatibleTranscoderError, "layers"),  # attached with layers=[0, 2]
        ((0, 64, 1.0), {}, ValueError, r"\[0, 64\)"),
        ((0, -1, 1.0), {}, ValueError, "feature"),
        ((0, 1.5, 1.0), {}, ValueError, "feature"),
        ((0, 1, float("inf")), {}, ValueError, "finite"),
        ((0, 1, float("nan")), {}, ValueError, "finite"),
        ((0, 1, "3"), {}, ValueError, "finite"),
        ((0, 1, 1.0), {"mode": "set"}, ValueError, "mode"),
        ((0, 1, 1.0), {"positions": "decode"}, ValueError, "positions"),
        ((0, 1, 1.0), {"positions": slice(5, 5)}, ValueError, "empty"),
        ((0, 1, 1.0), {"positions": slice(-3, None)}, ValueError, "non-negative"),
        ((0, 1, 1.0), {"positions": slice(0, 9, 2)}, ValueError, "step"),
        ((0, 1, 1.0), {"positions": [1, 2]}, ValueError, "positions"),
    ],
)
def test_bad_input_is_refused_before_any_pass(args, kwargs, error, match):
    model = tiny_model("llama")
    tc = random_transcoder(decoders=True)
    with attach_clt(model, tc, top_k=TOP_K, layers=[0, 2]) as clt:
        hooks = _hook_count(model)
        with pytest.raises(error, match=match):
            clt.steer(*args, **kwargs)
        assert _hook_count(model) == hooks and clt.steering == []
        clt.steer(0, 1, 1.0)
        with pytest.raises(ValueError, match="already steered"):
            clt.steer(0, 1, 2.0)


def test_transcoder_without_decoders_is_a_clear_error(tmp_path):
    model = tiny_model("llama")
    tc = random_transcoder()
    with attach_clt(model, tc, top_k=TOP_K) as clt:
        with pytest.raises(TranscoderFormatError, match="layer 1.*no decoder"):
            clt.steer(1, 0, 1.0)
        assert clt.steering == [] and not clt._steering.handles
    tc.save_pretrained(tmp_path / "enc_only")
    with attach_clt(model, str(tmp_path / "enc_only"), top_k=TOP_K) as clt:
        with pytest.raises(TranscoderFormatError, match="layer 2 has no decoder"):
            clt.steer(2, 0, 1.0)


# ---------------------------------------------------------------------------- decoder rows from disk
@pytest.mark.parametrize("kind", ["clt", "plt"])
def test_steering_from_disk_reads_rows_by_slices(kind, tmp_path, monkeypatch):
    model = tiny_model("llama")
    tc = random_transcoder(decoders=True, span=1 if kind == "plt" else None)
    tc.save_pretrained(tmp_path / "tc")
    rows = load_decoder_rows(str(tmp_path / "tc"), 1, [7, 3])
    assert torch.equal(rows, tc.encoder(1).W_dec[[7, 3]])
    from sparse_clt_hf import formats

    def no_full_load(*a, **k):
        raise AssertionError("the native layout is read by slices, not loaded")

    monkeypatch.setattr(formats.circuit_tracer, "load", no_full_load)
    monkeypatch.setattr(formats.format_module("circuit_tracer"), "load", no_full_load)
    kw = generate_kw()
    f = busy_feature(model, tc, 1, kw)
    with attach_clt(model, tc, top_k=TOP_K) as clt:
        clt.steer(1, f, 6.0)
        expected, fe = clt.generate(**kw)
    monkeypatch.undo()
    with attach_clt(model, str(tmp_path / "tc"), top_k=TOP_K) as clt:
        monkeypatch.setattr(formats.circuit_tracer, "load", no_full_load)
        clt.steer(1, f, 6.0)
        out, fo = clt.generate(**kw)
    assert torch.equal(out, expected) and torch.equal(fo.indices, fe.indices)


def test_other_formats_load_the_one_layer(tmp_path):
    from format_fixtures import write_saelens

    from sparse_clt_hf import CrossLayerTranscoder

    folder = tmp_path / "sae"
    write_saelens(folder, 1, 32, 16, architecture="transcoder")
    full = CrossLayerTranscoder.from_pretrained(str(folder), decoders=True)
    layer = full.layers[0]
    rows = load_decoder_rows(str(folder), layer, [0, 2])
    assert torch.equal(rows, full.encoder(layer).W_dec[[0, 2]])


# ---------------------------------------------------------------------------- CLI
def test_generate_cli_steer_json(tmp_path, capsys):
    from test_demo import char_tokenizer

    from sparse_clt_hf import cli

    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "model")
    char_tokenizer().save_pretrained(tmp_path / "model")
    tc = random_transcoder(decoders=True)
    tc.config.model_name = None
    tc.save_pretrained(tmp_path / "clt")
    base = ["generate", "--json", "--model", str(tmp_path / "model"), "--clt", str(tmp_path / "clt"),
            "--prompt", "abc", "--max-new-tokens", "4", "--top-k", "4", "--show", "4"]
    assert cli.main(base + ["--steer", "1:9=30", "--steer", "0:3=-2:add"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["summary"]["steers"] == [
        {"layer": 1, "feature": 9, "value": 30.0, "mode": "clamp"},
        {"layer": 0, "feature": 3, "value": -2.0, "mode": "add"},
    ]
    assert all({"layer": 1, "feature": 9, "activation": 30.0} in t["features"] for t in report["tokens"])
    assert cli.main(base + ["--steer", "1:99=1"]) == 1
    assert "feature must be an integer in [0, 64)" in json.loads(capsys.readouterr().out)["error"]
    with pytest.raises(SystemExit):
        cli.main(base + ["--steer", "1=2"])


# ---------------------------------------------------------------------------- compiled decoding (slow)
def _compile_config(backend: str = "aot_eager", mode: str | None = None):
    from test_capture_modes import _compile_config as cfg

    return cfg(backend, mode)


@pytest.fixture
def no_recompile():
    import torch._dynamo

    yield lambda: setattr(torch._dynamo.config, "error_on_recompile", True)
    torch._dynamo.config.error_on_recompile = False
    torch._dynamo.reset()


@pytest.mark.slow
@pytest.mark.parametrize("how", ["forward", "compile_config", "compile_config_inductor"])
def test_compiled_decoding_steers_every_step_and_new_values_do_not_recompile(how, no_recompile):
    model = tiny_model("llama")
    tc = random_transcoder(decoders=True)
    kw = generate_kw(max_new_tokens=7, cache_implementation="static")
    f = busy_feature(model, tc, 1, kw)
    prompt = kw["input_ids"].shape[1]
    steers = {v: [(1, f, v, "clamp", (prompt, END))] for v in (9.0, -4.0)}
    expected = {v: ref_generate(model, "llama", tc, s, **kw) for v, s in steers.items()}
    plain = model.generate(**kw)
    if how == "compile_config":
        kw["compile_config"] = _compile_config()
    elif how == "compile_config_inductor":  # the real lowering, in the mode transformers uses on CUDA
        kw["compile_config"] = _compile_config("inductor", "reduce-overhead")
    with attach_clt(model, tc, top_k=TOP_K, window=3) as clt:
        h = clt.steer(1, f, 9.0, positions="generated")
        if how == "forward":
            model.forward = torch.compile(model.forward, fullgraph=True, dynamic=False, backend="aot_eager")
        try:
            first, f1 = clt.generate(**kw)
            no_recompile()
            h.set(-4.0)
            second, f2 = clt.generate(**kw)
            torch._dynamo.config.error_on_recompile = False
            h.remove()
            third, _ = clt.generate(**kw)
        finally:
            model.__dict__.pop("forward", None)
    assert torch.equal(first, expected[9.0]) and torch.equal(second, expected[-4.0])
    assert not torch.equal(first, plain) and torch.equal(third, plain)
    for out, feats, v in ((first, f1, 9.0), (second, f2, -4.0)):
        check_features(feats, model, "llama", tc, steers[v], out, full_mask(out, kw["attention_mask"]))


def test_recomputed_prefix_chunked_prefill_and_bf16():
    """use_cache=False steers the recomputed prefix too; prefill_chunk_size; bf16 with activation_threshold."""
    model = tiny_model("llama")
    tc = random_transcoder(decoders=True)
    steers = [(0, 5, 4.0, "add", (0, END))]
    for extra in ({"use_cache": False}, {"prefill_chunk_size": 2}):
        kw = generate_kw(**extra)
        if "prefill_chunk_size" in extra:  # transformers 4.57's chunked prefill ignores left padding in position ids
            kw["input_ids"], kw["attention_mask"] = prompts(pad_first=0)
        expected = ref_generate(model, "llama", tc, steers, **kw)
        with attach_clt(model, tc, top_k=TOP_K, window=2) as clt:
            clt.steer(0, 5, 4.0, mode="add")
            out, feats = clt.generate(**kw)
        assert torch.equal(out, expected)
        check_features(feats, model, "llama", tc, steers, out, full_mask(out, kw["attention_mask"]))
    model = model.to(torch.bfloat16)
    with attach_clt(model, tc, top_k=TOP_K, activation_threshold=0.05) as clt:
        clt.steer(1, 3, 2.5)
        _, feats = clt.generate(**generate_kw())
    hit = feats.indices[:, :, 1] == 3
    assert hit.any(-1)[feats.mask].all() and torch.all(feats.values[:, :, 1][hit] == 2.5)
    assert feats.values.dtype == torch.bfloat16


@pytest.mark.slow
@pytest.mark.parametrize("how", ["forward", "model_compile"])
def test_plain_forwards_through_a_compiled_forward_steer_the_same_positions_as_eager(how):
    """Through a compiled model.forward (or model.compile()) the stack's hooks run inside the compiled region;
    each plain call must still start at position 0 (or the cache's length), so a position-restricted steer
    hits the same positions as in eager mode, call after call, and as the independent plain-hook reference."""
    model = tiny_model("llama")
    tc = random_transcoder(decoders=True)
    ids, mask = prompts(pad_first=0)
    steers = [(1, 5, 20.0, "clamp", (1, 3))]
    ref = Reference(model, "llama", tc, steers)
    try:
        with torch.no_grad():
            expected = model(input_ids=ids, attention_mask=mask).logits
    finally:
        ref.remove()
    with attach_clt(model, tc, top_k=TOP_K) as clt:
        clt.steer(1, 5, 20.0, mode="clamp", positions=slice(1, 3))
        with torch.no_grad():
            eager = model(input_ids=ids, attention_mask=mask).logits
            if how == "forward":
                model.forward = torch.compile(model.forward, fullgraph=True, dynamic=False, backend="aot_eager")
            else:
                model.compile(backend="aot_eager", fullgraph=True, dynamic=False)
            try:
                compiled = [model(input_ids=ids, attention_mask=mask).logits for _ in range(2)]
            finally:
                model.__dict__.pop("forward", None)
                model._compiled_call_impl = None
                torch._dynamo.reset()
    torch.testing.assert_close(eager, expected, rtol=1e-4, atol=1e-4)
    for logits in compiled:
        torch.testing.assert_close(logits, eager, rtol=1e-5, atol=1e-5)


def test_a_prompt_of_embeddings_splits_prompt_and_generated_positions_like_token_ids():
    """generate(inputs_embeds=...) knows its prompt length too: a steer on the generated positions gives the
    same new tokens as the same prompt passed as token ids (whose steering the reference checks)."""
    model = tiny_model("llama")
    tc = random_transcoder(decoders=True)
    kw = generate_kw(max_new_tokens=6)
    ids, mask = kw.pop("input_ids"), kw.pop("attention_mask")
    f = busy_feature(model, tc, 1, dict(input_ids=ids, attention_mask=mask, **kw))
    embeds = model.get_input_embeddings()(ids).detach()
    with attach_clt(model, tc, top_k=TOP_K) as clt:
        clt.steer(1, f, 9.0, positions="generated")
        from_ids, _ = clt.generate(input_ids=ids, attention_mask=mask, **kw)
        from_embeds, feats = clt.generate(inputs_embeds=embeds, attention_mask=mask, **kw)
    plain = model.generate(input_ids=ids, attention_mask=mask, **kw)
    assert not torch.equal(from_ids, plain), "the steer changed nothing: the test would prove nothing"
    assert torch.equal(from_embeds, from_ids[:, ids.shape[1]:])
    assert feats.num_positions == ids.shape[1] + from_embeds.shape[1] - 1
