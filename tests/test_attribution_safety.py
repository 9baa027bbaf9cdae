"""Attribution leaves the model as it was (bitwise outputs, no hook, attention implementation, requires_grad), also
after an exception or a KeyboardInterrupt in a backward batch; bad input gets a clear error before any work;
graphs round-trip through save/load; generated tokens and attachments; offloaded models."""

from __future__ import annotations

import pytest
import safetensors
import tiny_models
import torch
from conftest import random_transcoder
from tiny_models import tiny_model

from sparse_clt_hf import AttributionGraph, TranscoderFormatError, attach_clt, attribute
from sparse_clt_hf.attribution import AttributionMemoryError, attribute_generated, engine

PROMPT = torch.tensor([2, 17, 5, 99, 43, 8, 61, 23])


def char_tokenizer():
    return tiny_models.char_tokenizer(chat_template=None)


def state(model):
    hooks = [
        name
        for name, mod in model.named_modules()
        if mod._forward_hooks or mod._forward_pre_hooks or mod._backward_hooks
    ]
    attn = sorted({str(getattr(m.config, "_attn_implementation", None)) for m in model.modules() if hasattr(m, "config")})
    grads = [p.requires_grad for p in model.parameters()]
    with torch.no_grad():
        logits = model(PROMPT[None]).logits
    return hooks, attn, grads, logits


def assert_same(before, after):
    assert after[0] == before[0] == []
    assert after[1] == before[1]
    assert after[2] == before[2]
    assert torch.equal(after[3], before[3])


@pytest.mark.parametrize("arch", ["llama", "gemma2", "gpt2"])
def test_attributing_leaves_the_model_bitwise_unchanged(arch):
    model = tiny_model(arch)
    tc = random_transcoder(decoders=True)
    before = state(model)
    graph = attribute(model, tc, PROMPT, batch_size=16)
    assert graph.adjacency.abs().sum() > 0
    assert_same(before, state(model))


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt()])
def test_exception_in_a_backward_batch_leaves_no_trace(monkeypatch, error):
    model = tiny_model("qwen3")
    tc = random_transcoder(decoders=True)
    before = state(model)
    real = engine._Rows.compute
    calls = []

    def failing(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise error
        return real(self, *args, **kwargs)

    monkeypatch.setattr(engine._Rows, "compute", failing)
    with pytest.raises(type(error)):
        attribute(model, tc, PROMPT, batch_size=4)
    assert len(calls) == 2
    assert_same(before, state(model))


def test_eager_and_sdpa_models_give_the_same_graph():
    tc = random_transcoder(decoders=True)
    sdpa = attribute(tiny_model("llama"), tc, PROMPT)
    eager_model = tiny_model("llama")
    eager_model.set_attn_implementation("eager")
    eager = attribute(eager_model, tc, PROMPT)
    assert torch.equal(sdpa.features, eager.features)
    torch.testing.assert_close(eager.adjacency, sdpa.adjacency, rtol=1e-4, atol=1e-5)
    assert eager_model.config._attn_implementation == "eager"


class Counter:
    def __init__(self, model):
        self.n = 0
        self.handle = model.register_forward_pre_hook(lambda *a: setattr(self, "n", self.n + 1))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(prompt=[]), "prompt is empty"),
        (dict(prompt=torch.zeros(1, 2, 3, dtype=torch.long)), "1-D"),
        (dict(prompt=[2, 500]), "outside the vocabulary"),
        (dict(prompt=list(range(2, 100)) * 2), "context is 128"),
        (dict(prompt="hello"), "tokenizer"),
        (dict(targets=["ab"], tokenizer=char_tokenizer()), "'ab' is 2 tokens"),
        (dict(targets=[7, 1000]), "outside the vocabulary"),
        (dict(targets=[]), "targets is empty"),
        (dict(max_feature_nodes=0), "max_feature_nodes"),
        (dict(max_feature_nodes=-3), "max_feature_nodes"),
        (dict(batch_size=0), "batch_size"),
    ],
)
def test_bad_input_is_refused_before_any_work(kwargs, match):
    model = tiny_model("llama")
    counter = Counter(model)
    prompt = kwargs.pop("prompt", PROMPT)
    with pytest.raises(ValueError, match=match):
        attribute(model, random_transcoder(decoders=True), prompt, **kwargs)
    assert counter.n == 0


def test_transcoder_without_decoders_names_the_layer():
    model = tiny_model("llama")
    counter = Counter(model)
    with pytest.raises(TranscoderFormatError, match="layer 0: the transcoder has no decoder"):
        attribute(model, random_transcoder(decoders=False), PROMPT)
    assert counter.n == 0


def test_non_finite_activations_are_refused_with_the_layer():
    model = tiny_model("llama")
    tc = random_transcoder(decoders=True)
    tc.encoder(1).W_enc.data[3, 0] = float("nan")
    before = state(model)
    with pytest.raises(ValueError, match="layer 1: .*not finite"):
        attribute(model, tc, PROMPT)
    assert_same(before, state(model))


def test_memory_estimate_refuses_what_would_not_fit():
    model = tiny_model("llama")
    before = state(model)
    with pytest.raises(AttributionMemoryError, match=r"needs about .* GiB .* rows x .* columns.*max_memory"):
        attribute(model, random_transcoder(decoders=True), PROMPT, max_memory="10kB")
    assert_same(before, state(model))
    attribute(model, random_transcoder(decoders=True), PROMPT, max_memory="1GB")


def test_text_prompt_and_string_targets():
    tok = char_tokenizer()
    model = tiny_model("llama")
    graph = attribute(model, random_transcoder(decoders=True), "Paris is", tokenizer=tok, targets=["a", " "])
    assert graph.tokens.tolist() == [2] + tok("Paris is", add_special_tokens=False)["input_ids"]  # a BOS put first
    assert graph.logit_ids.tolist() == [tok.convert_tokens_to_ids("a"), tok.convert_tokens_to_ids(" ")]
    assert graph.token_strings[1:] == list("Paris is") and graph.logit_strings == ["a", " "]
    with torch.no_grad():
        probs = model(graph.tokens[None]).logits[0, -1].softmax(-1)
    torch.testing.assert_close(graph.logit_probs, probs[graph.logit_ids])


def test_default_targets_reach_the_desired_probability():
    model = tiny_model("llama")
    with torch.no_grad():
        probs = model(PROMPT[None]).logits[0, -1].softmax(-1)
    top = probs.sort(descending=True)
    graph = attribute(model, random_transcoder(decoders=True), PROMPT, max_n_logits=50, desired_logit_prob=0.2)
    k = len(graph.logit_ids)
    assert graph.logit_ids.tolist() == top.indices[:k].tolist()
    assert top.values[: k - 1].sum() < 0.2 <= top.values[:k].sum()


def test_save_load_roundtrip(tmp_path):
    graph = attribute(tiny_model("gpt2"), random_transcoder(decoders=True), PROMPT, tokenizer=None).prune()
    path = graph.save(tmp_path / "g.safetensors")
    assert path.read_bytes()[8:9] == b"{"  # a safetensors header, not a pickle
    back = AttributionGraph.load(path)
    for name in ("tokens", "features", "activations", "logit_ids", "logit_probs", "adjacency", "row_nodes",
                 "node_mask", "edge_mask", "cumulative_scores"):
        assert torch.equal(getattr(back, name), getattr(graph, name)), name
    assert back.meta == graph.meta and back.n_layers == graph.n_layers
    assert back.scores() == graph.scores()
    (tmp_path / "bad.safetensors").write_bytes(b"not a graph")
    with pytest.raises(ValueError, match="not a safetensors file|not an attribution graph"):
        AttributionGraph.load(tmp_path / "bad.safetensors")


def test_attribute_a_generated_token_and_through_an_attachment():
    model = tiny_model("llama")
    tc = random_transcoder(decoders=True)
    clt = attach_clt(model, tc, top_k=8)
    ids = torch.tensor([[0, 0, 2, 17, 5], [2, 9, 33, 41, 7]])
    mask = (ids != 0).long()
    out, feats = clt.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
    n_calls = len(clt.calls)
    graph = clt.attribute_generated(out, row=0, position=6)
    via = clt.attribute(PROMPT)
    assert len(clt.calls) == n_calls  # nothing recorded while attributing
    model(PROMPT[None])
    assert len(clt.calls) == n_calls + 1  # recording resumed
    clt.detach()
    assert graph.tokens.tolist() == out[0, 2:6].tolist()
    assert graph.logit_ids.tolist() == [int(out[0, 6])]
    direct = attribute(model, tc, out[0, 2:6], targets=[int(out[0, 6])])
    assert torch.equal(graph.features, direct.features)
    torch.testing.assert_close(graph.adjacency, direct.adjacency)
    full_mask = torch.cat([mask, torch.ones(2, 3, dtype=torch.long)], 1)
    same = attribute_generated(model, tc, out, row=0, position=6, attention_mask=full_mask)
    assert torch.equal(same.tokens, graph.tokens)
    assert torch.equal(via.features, attribute(model, tc, PROMPT).features)
    clt.detach()
    with pytest.raises(ValueError, match="position"):
        attribute_generated(model, tc, out, row=0, position=0)


def test_cpu_offloaded_model_gives_the_same_graph():
    accelerate = pytest.importorskip("accelerate")
    tc = random_transcoder(decoders=True)
    plain = attribute(tiny_model("llama"), tc, PROMPT)
    model = tiny_model("llama")
    accelerate.cpu_offload(model, execution_device="cpu")
    offloaded = attribute(model, tc, PROMPT)
    assert torch.equal(offloaded.features, plain.features)
    torch.testing.assert_close(offloaded.adjacency, plain.adjacency)


def test_a_clt_folder_reads_only_the_active_features_decoder_rows(tmp_path, monkeypatch):
    from sparse_clt_hf.attribution import active

    tc = random_transcoder(decoders=True, seed=4)
    folder = tc.save_pretrained(tmp_path / "clt")
    in_memory = attribute(tiny_model("llama"), tc, PROMPT)
    read = []
    real_rows = active.load_decoder_rows

    def rows(source, layer, features, **kw):
        read.append((layer, list(features)))
        return real_rows(source, layer, features, **kw)

    monkeypatch.setattr(active, "load_decoder_rows", rows)
    from sparse_clt_hf import loading

    real_read = loading.read_encoders

    def read_encoders(*a, decoders=False, **k):
        assert not decoders, "loaded every decoder"
        return real_read(*a, **k)

    monkeypatch.setattr(loading, "read_encoders", read_encoders)
    graph = attribute(tiny_model("llama"), str(folder), PROMPT)
    assert torch.equal(graph.features, in_memory.features)
    torch.testing.assert_close(graph.adjacency, in_memory.adjacency)
    for layer, feats in read:  # each layer's active features, once each
        assert feats == sorted(set(graph.features[graph.features[:, 0] == layer, 2].tolist()))
    (folder / "W_dec_1.safetensors").unlink()
    model = tiny_model("llama")
    counter = Counter(model)
    with pytest.raises(TranscoderFormatError, match="layer 1 has no decoder"):
        attribute(model, str(folder), PROMPT)
    assert counter.n == 0


class RefusingWholeDecoders:
    """A safetensors handle that refuses to read a decoder tensor whole and records the rows sliced from it."""

    sliced: list[tuple[str, int]] = []
    real_open = safetensors.safe_open

    def __init__(self, path, framework="pt"):
        self.path, self.inner = str(path), RefusingWholeDecoders.real_open(path, framework=framework)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def keys(self):
        return self.inner.keys()

    def metadata(self):
        return self.inner.metadata()

    def get_tensor(self, name):
        if name.startswith("W_dec"):
            pytest.fail(f"read the whole decoder {name} of {self.path}")
        return self.inner.get_tensor(name)

    def get_slice(self, name):
        inner, sliced, path = self.inner.get_slice(name), self.sliced, self.path

        class Rows:
            def get_shape(self):
                return inner.get_shape()

            def __getitem__(self, rows):
                sliced.append((path, rows.stop - rows.start))
                return inner[rows]

        return Rows()


def test_a_plt_folder_reads_only_the_active_rows_and_gives_the_in_memory_graph(tmp_path, monkeypatch):
    from sparse_clt_hf.formats import common

    tc = random_transcoder(decoders=True, span=1, activation="jumprelu", seed=5)
    g = torch.Generator().manual_seed(1)
    for layer in tc.layers:  # a skip path too: read with the layer's small tensors
        tc.encoder(layer).set_decoder(None, None, torch.randn(32, 32, generator=g) * 0.05)
    folder = tc.save_pretrained(tmp_path / "plt")
    in_memory = attribute(tiny_model("gemma2"), tc, PROMPT)
    monkeypatch.setattr(safetensors, "safe_open", RefusingWholeDecoders)
    monkeypatch.setattr(common, "safe_open", RefusingWholeDecoders)
    monkeypatch.setattr(RefusingWholeDecoders, "sliced", [])
    graph = attribute(tiny_model("gemma2"), str(folder), PROMPT)
    assert torch.equal(graph.features, in_memory.features)
    torch.testing.assert_close(graph.adjacency, in_memory.adjacency)
    for layer in tc.layers:  # each active feature's row once, nothing else
        rows = sum(n for path, n in RefusingWholeDecoders.sliced if path.endswith(f"layer_{layer}.safetensors"))
        assert rows == len(set(graph.features[graph.features[:, 0] == layer, 2].tolist())) > 0


def test_automatic_batch_size_shrinks_to_fit_the_memory_limit():
    model = tiny_model("llama")
    tc = random_transcoder(decoders=True)
    full = attribute(model, tc, PROMPT)
    n = full.meta["n_active_features"]
    big = engine.estimate_memory(model, n + 10, full.layout.n_nodes, len(PROMPT), 64, 0)
    small = engine.estimate_memory(model, n + 10, full.layout.n_nodes, len(PROMPT), 4, 10**6)
    assert small < big
    graph = attribute(model, tc, PROMPT, max_memory=(small + big) // 2)  # fits only with a smaller batch
    torch.testing.assert_close(graph.adjacency, full.adjacency)
    with pytest.raises(AttributionMemoryError):
        attribute(model, tc, PROMPT, batch_size=64, max_memory=(small + big) // 2)  # an explicit batch stays


def test_an_attachment_loaded_from_a_folder_attributes_its_layers(tmp_path):
    tc = random_transcoder(decoders=True, seed=6)
    folder = tc.save_pretrained(tmp_path / "clt")
    model = tiny_model("llama")
    clt = attach_clt(model, str(folder), layers=[0, 1])
    graph = clt.attribute(PROMPT)
    clt.detach()
    assert set(graph.features[:, 0].tolist()) <= {0, 1}
    direct = attribute(model, tc.select_layers([0, 1]), PROMPT)
    assert torch.equal(graph.features, direct.features)
    torch.testing.assert_close(graph.adjacency, direct.adjacency)


@pytest.mark.filterwarnings("ignore:transcoder was trained on")
def test_a_saelens_folder_reads_one_layers_decoder_at_a_time_and_gives_the_in_memory_graph(tmp_path, monkeypatch):
    """Formats without row slices load one layer with its decoder at a time (never all decoders at once)."""
    from format_fixtures import write_saelens

    from sparse_clt_hf.attribution import active
    from sparse_clt_hf.formats import saelens
    from sparse_clt_hf.loading import load_transcoder

    for layer in (0, 1, 2):
        write_saelens(tmp_path, layer, 32, 48, architecture="jumprelu_skip_transcoder", folder=f"L{layer}",
                      hook="blocks.{layer}.ln2.hook_normalized", hook_out="blocks.{layer}.hook_mlp_out")
    in_memory = attribute(tiny_model("llama"), load_transcoder(str(tmp_path), decoders=True), PROMPT)
    loads, rows = [], []
    real_load, real_rows = saelens.load, active.load_decoder_rows

    def load(source, layers, decoders, **kw):
        loads.append((None if layers is None else list(layers), decoders))
        return real_load(source, layers, decoders, **kw)

    def read_rows(source, layer, features, **kw):
        rows.append((layer, list(features)))
        return real_rows(source, layer, features, **kw)

    monkeypatch.setattr(saelens, "load", load)
    monkeypatch.setattr(active, "load_decoder_rows", read_rows)
    graph = attribute(tiny_model("llama"), str(tmp_path), PROMPT)
    assert torch.equal(graph.features, in_memory.features) and in_memory.meta["n_active_features"] > 0
    torch.testing.assert_close(graph.adjacency, in_memory.adjacency)
    assert all(len(layers) == 1 for layers, decoders in loads if decoders), loads
    assert [layers for layers, decoders in loads if not decoders] == [None]  # every encoder, once, no decoder
    for layer, feats in rows:
        assert feats == sorted(set(graph.features[graph.features[:, 0] == layer, 2].tolist()))
