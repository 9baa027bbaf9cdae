"""Write circuit-tracer's own attribution graphs for tiny models, as fixtures for our fidelity test.

NOT part of the package, and never imported by the test suite: it imports circuit_tracer, which pins
transformers <= 4.57.3 and nnsight 0.6, so it runs in a separate virtualenv::

    python3 -m venv /work/ctvenv
    /work/ctvenv/bin/pip install torch==2.13.0 circuit-tracer==0.5.0 "nnsight>=0.6,<0.7" transformers==4.57.3
    /work/ctvenv/bin/python scripts/circuit_tracer_reference.py [--out tests/data/circuit_tracer] [--case NAME]

For each case it builds (seeded, deterministic) a tiny random model and a transcoder in circuit-tracer's own
file layout, saves both under ``<out>/<case>/{model,transcoder}/``, runs ``circuit_tracer.attribute`` on CPU in
fp32 through the nnsight backend (once on all features, once with ``max_feature_nodes``), prunes and scores
the graphs with circuit-tracer's functions and writes its graph JSON with its ``create_graph_files``.
Outputs per case: ``reference.safetensors`` (tensors), ``reference.json`` (settings, scores, timings,
versions) and ``graph.json`` / ``graph_topk.json`` (circuit-tracer's frontend JSON, re-dumped compactly).
tests/test_attribution_circuit_tracer.py reads them without circuit-tracer.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

import torch
import transformers as tf
import yaml
from safetensors.torch import save_file

D, N_LAYERS, M = 32, 3, 24  # model width, layers, features per layer
PROMPT_WORDS = ["the", "cat", "</script>", 'say "hi"', "sat", "on", "the", "mat"]
HOSTILE = ["</script>", 'say "hi"', "back\\slash", "<b>&amp;</b>", "line\u2028sep", "tab\there"]
EXTRA_WORDS = ["the", "cat", "sat", "on", "mat", "dog", "ran", "a", "big", "red"]
SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>"]
VOCAB = SPECIALS + HOSTILE + EXTRA_WORDS + [f"w{i}" for i in range(64 - len(SPECIALS) - len(HOSTILE) - len(EXTRA_WORDS))]
BOS = VOCAB.index("<bos>")
NODE_THRESHOLD, EDGE_THRESHOLD = 0.8, 0.98
TOPK_BATCH_SIZE = 8  # small, so the greedy ranking is refreshed while features are chosen


@dataclass
class Case:
    name: str
    arch: str  # transformers config class prefix: Llama, Gemma2, Qwen3
    kind: str  # "clt" or "plt"
    activation: str  # "jumprelu" or "relu"
    input_hook: str
    output_hook: str
    skip: bool = False
    seed: int = 0
    model_extra: dict = field(default_factory=dict)


CASES = [
    Case("llama_clt_jumprelu", "Llama", "clt", "jumprelu", "hook_resid_mid", "hook_mlp_out", seed=1),
    Case("llama_clt_relu", "Llama", "clt", "relu", "mlp.hook_in", "mlp.hook_out", seed=2),
    Case("gemma2_plt_relu", "Gemma2", "plt", "relu", "ln2.hook_normalized", "hook_mlp_out", seed=3,
         model_extra=dict(head_dim=8, sliding_window=4, query_pre_attn_scalar=8, final_logit_softcapping=30.0,
                          attn_logit_softcapping=50.0)),
    Case("qwen3_plt_jumprelu_skip", "Qwen3", "plt", "jumprelu", "mlp.hook_in", "mlp.hook_out", skip=True, seed=4,
         model_extra=dict(head_dim=8, tie_word_embeddings=False)),
]


def build_tokenizer(folder: Path) -> tf.PreTrainedTokenizerFast:
    """A word-level tokenizer over VOCAB (hostile strings included) saved next to the model."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = tf.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.save_pretrained(folder)
    return fast


def build_model(case: Case, folder: Path) -> tf.PreTrainedModel:
    """A tiny random model with weights large enough to give peaked logits and non-trivial attention."""
    torch.manual_seed(case.seed)
    kwargs = dict(
        vocab_size=len(VOCAB), hidden_size=D, intermediate_size=64, num_hidden_layers=N_LAYERS,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
        eos_token_id=1, bos_token_id=BOS, initializer_range=0.3, rms_norm_eps=1e-6,
    )
    cfg = getattr(tf, f"{case.arch}Config")(**{**kwargs, **case.model_extra})
    model = getattr(tf, f"{case.arch}ForCausalLM")(cfg).eval()
    g = torch.Generator().manual_seed(case.seed + 100)
    with torch.no_grad():  # random norm gains, so a forgotten gain shows up
        for name, p in model.named_parameters():
            if "norm" in name:
                base = 0.0 if case.arch == "Gemma2" else 1.0  # Gemma scales by (1 + w)
                p.copy_(base + 0.3 * torch.randn(p.shape, generator=g))
    model.save_pretrained(folder, safe_serialization=True)
    return model


def site_inputs(case: Case, model: tf.PreTrainedModel, ids: torch.Tensor) -> list[torch.Tensor]:
    """[T, d] transcoder input of each layer, read with plain forward hooks (to calibrate the encoders)."""
    ln2 = "pre_feedforward_layernorm" if case.arch == "Gemma2" else "post_attention_layernorm"
    got: dict[int, torch.Tensor] = {}
    handles = []
    for i, layer in enumerate(model.model.layers):
        norm = getattr(layer, ln2)

        def hook(mod, args, out, i=i):
            x = args[0][0].float()
            if case.input_hook == "hook_resid_mid":
                got[i] = x
            elif case.input_hook == "ln2.hook_normalized":
                got[i] = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + mod.eps)
            else:  # mlp.hook_in: the norm's output
                got[i] = out[0].float()

        handles.append(norm.register_forward_hook(hook))
    with torch.no_grad():
        model(ids[None])
    for h in handles:
        h.remove()
    return [got[i] for i in range(N_LAYERS)]


def calibrate(z: torch.Tensor, g: torch.Generator, jump: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """b_enc (and thresholds) so that about 25% of positions 1.. fire, with no value near the edge."""
    q = torch.quantile(z[1:], 0.75, dim=0)
    thr = (torch.rand(z.shape[1], generator=g) * 0.3 + 0.05) * z[1:].std(0) if jump else torch.zeros(z.shape[1])
    b = thr - q
    for _ in range(50):  # move b_enc until every (position, feature) is 1e-3 away from its edge
        gap = (z + b - thr)[1:]
        near = gap.abs() < 1e-3 * (1 + z[1:].abs())
        if not near.any():
            break
        b = b + near.any(0).float() * 2e-3
    return b, thr


def build_transcoder(case: Case, model: tf.PreTrainedModel, ids: torch.Tensor, folder: Path) -> None:
    """Write the transcoder in circuit-tracer's layout (FORMATS.md 1-2), calibrated on this prompt."""
    g = torch.Generator().manual_seed(case.seed + 200)
    xs = site_inputs(case, model, ids)
    folder.mkdir(parents=True, exist_ok=True)
    kind = "cross_layer_transcoder" if case.kind == "clt" else "transcoder_set"
    cfg = {"model_name": f"tiny/{case.name}", "model_kind": kind, "feature_input_hook": case.input_hook,
           "feature_output_hook": case.output_hook}
    (folder / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    jump = case.activation == "jumprelu"
    for layer, x in enumerate(xs):
        W_enc = torch.randn(M, D, generator=g) / x.std() / D**0.5
        b_enc, thr = calibrate(x @ W_enc.T, g, jump)
        b_dec = torch.randn(D, generator=g) * 0.05
        if case.kind == "clt":
            enc = {f"W_enc_{layer}": W_enc, f"b_enc_{layer}": b_enc, f"b_dec_{layer}": b_dec}
            if jump:
                enc[f"threshold_{layer}"] = thr
            save_file(enc, str(folder / f"W_enc_{layer}.safetensors"))
            W_dec = torch.randn(M, N_LAYERS - layer, D, generator=g) * 0.2
            save_file({f"W_dec_{layer}": W_dec}, str(folder / f"W_dec_{layer}.safetensors"))
        else:
            t = {"W_enc": W_enc, "W_dec": torch.randn(M, D, generator=g) * 0.2, "b_enc": b_enc, "b_dec": b_dec}
            if jump:
                t["activation_function.threshold"] = thr
            if case.skip:
                t["W_skip"] = torch.randn(D, D, generator=g) * 0.05
            save_file({k: v.contiguous() for k, v in t.items()}, str(folder / f"layer_{layer}.safetensors"))


def load_ct_transcoder(case: Case, folder: Path):
    """The transcoder as circuit-tracer loads it (its own loaders, from the files we wrote)."""
    scan = f"tiny/{case.name}"
    if case.kind == "clt":
        from circuit_tracer.transcoder.cross_layer_transcoder import load_clt

        return load_clt(str(folder), feature_input_hook=case.input_hook, feature_output_hook=case.output_hook,
                        scan=scan, device=torch.device("cpu"), dtype=torch.float32)
    from circuit_tracer.transcoder.single_layer_transcoder import load_transcoder_set

    paths = {i: str(folder / f"layer_{i}.safetensors") for i in range(N_LAYERS)}
    return load_transcoder_set(paths, scan=scan, feature_input_hook=case.input_hook,
                               feature_output_hook=case.output_hook, device=torch.device("cpu"), dtype=torch.float32)


def graph_tensors(graph, prefix: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors + JSON facts of one circuit-tracer graph: the raw graph, its pruning and its scores."""
    from circuit_tracer.graph import compute_graph_scores, prune_graph

    node_mask, edge_mask, cumulative = prune_graph(graph, NODE_THRESHOLD, EDGE_THRESHOLD)
    replacement, completeness = compute_graph_scores(graph)
    adj, n_sel, n_logits = graph.adjacency_matrix.float(), len(graph.selected_features), len(graph.logit_targets)
    assert not adj[n_sel : adj.shape[0] - n_logits].any(), "circuit-tracer wrote error/token rows"
    t = {
        "active_features": graph.active_features.long(),
        "activations": graph.activation_values.float(),
        "selected_features": graph.selected_features.long(),
        "logit_ids": torch.tensor([lt.vocab_idx for lt in graph.logit_targets], dtype=torch.long),  # virtual too
        "logit_probs": graph.logit_probabilities.float(),
        # only the rows circuit-tracer computes (selected features, then logits): error/token rows are zero
        "adjacency_rows": torch.cat([adj[:n_sel], adj[adj.shape[0] - n_logits :]]),
        "node_mask": node_mask,
        "edge_index": edge_mask.nonzero().T.int(),  # [2, E] (target row, source column) of kept edges
        "cumulative_scores": cumulative.float(),
    }
    facts = {"replacement_score": replacement, "completeness_score": completeness,
             "logit_strings": [lt.token_str for lt in graph.logit_targets]}
    return {f"{prefix}{k}": v.contiguous() for k, v in t.items()}, facts


def graph_json(graph, slug: str) -> dict:
    """circuit-tracer's frontend JSON for this graph, written by its own create_graph_files."""
    from circuit_tracer.utils.create_graph_files import create_graph_files

    with tempfile.TemporaryDirectory() as tmp:
        create_graph_files(graph, slug=slug, output_path=tmp, scan=graph.scan, node_threshold=NODE_THRESHOLD,
                           edge_threshold=EDGE_THRESHOLD)
        return json.loads((Path(tmp) / f"{slug}.json").read_text())


def run_case(case: Case, out: Path) -> dict:
    from circuit_tracer import ReplacementModel, attribute

    root = out / case.name
    shutil.rmtree(root, ignore_errors=True)
    model_dir, tc_dir = root / "model", root / "transcoder"
    tokenizer = build_tokenizer(model_dir)
    hf_model = build_model(case, model_dir)
    ids = torch.tensor([BOS] + [VOCAB.index(w) for w in PROMPT_WORDS])
    build_transcoder(case, hf_model, ids, tc_dir)

    transcoder = load_ct_transcoder(case, tc_dir)
    t0 = time.perf_counter()
    rm = ReplacementModel.from_pretrained_and_transcoders(str(model_dir), transcoder, backend="nnsight",
                                                          device=torch.device("cpu"), dtype=torch.float32)
    load_s = time.perf_counter() - t0

    def timed(**kw):
        attribute(ids, rm, **kw)  # warm-up (first nnsight trace compiles)
        times = []
        for _ in range(3):
            t = time.perf_counter()
            graph = attribute(ids, rm, **kw)
            times.append(time.perf_counter() - t)
        return graph, min(times)

    full, full_s = timed()
    n_active = int(full.active_features.shape[0])
    max_nodes = max(1, n_active // 3)
    topk, topk_s = timed(max_feature_nodes=max_nodes, batch_size=TOPK_BATCH_SIZE)
    tensors, full_facts = graph_tensors(full, "")
    topk_tensors, topk_facts = graph_tensors(topk, "topk_")
    tensors.update(topk_tensors)
    tensors["tokens"] = ids
    save_file(tensors, str(root / "reference.safetensors"))
    for name, graph in (("graph.json", full), ("graph_topk.json", topk)):
        js = graph_json(graph, slug=case.name)
        (root / name).write_text(json.dumps(js, separators=(",", ":"), ensure_ascii=False))
    meta = {
        "case": case.name, "arch": case.arch, "kind": case.kind, "activation": case.activation,
        "feature_input_hook": case.input_hook, "feature_output_hook": case.output_hook, "skip": case.skip,
        "prompt_ids": ids.tolist(), "prompt_tokens": [tokenizer.decode([i]) for i in ids.tolist()],
        "scan": f"tiny/{case.name}", "node_threshold": NODE_THRESHOLD, "edge_threshold": EDGE_THRESHOLD,
        "full": {"max_n_logits": 10, "desired_logit_prob": 0.95, "batch_size": 512, "max_feature_nodes": None,
                 **full_facts, "seconds_per_graph": full_s},
        "topk": {"max_n_logits": 10, "desired_logit_prob": 0.95, "batch_size": TOPK_BATCH_SIZE,
                 "max_feature_nodes": max_nodes, **topk_facts, "seconds_per_graph": topk_s},
        "n_active_features": n_active, "model_load_seconds": load_s,
        "versions": {p: version(p) for p in ("circuit-tracer", "nnsight", "transformers", "torch")},
        "device": "cpu", "dtype": "float32", "torch_threads": torch.get_num_threads(),
    }
    (root / "reference.json").write_text(json.dumps(meta, indent=1, ensure_ascii=False))
    return meta


def run_custom(case: Case, out: Path) -> dict:
    """A third graph per case on custom target directions (circuit-tracer's CustomTarget): logit("the") -
    logit("cat") and a random direction, weights 1.0 and 0.5, on the case's existing model, transcoder and
    prompt. Writes ``custom.safetensors`` (the vectors, ``custom_vecs``, and the graph's tensors, prefix
    ``custom_``), ``custom.json`` (settings, labels, weights, scores) and ``graph_custom.json``."""
    from circuit_tracer import ReplacementModel, attribute
    from circuit_tracer.attribution.targets import CustomTarget
    from safetensors.torch import load_file

    root = out / case.name
    model_dir, tc_dir = root / "model", root / "transcoder"
    ids = load_file(str(root / "reference.safetensors"))["tokens"]
    hf = tf.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    W = hf.get_output_embeddings().weight.detach().float()
    g = torch.Generator().manual_seed(case.seed + 300)
    labels, probs = ["the - cat", "random"], [1.0, 0.5]
    vecs = torch.stack([W[VOCAB.index("the")] - W[VOCAB.index("cat")], torch.randn(D, generator=g) * W.std()])
    rm = ReplacementModel.from_pretrained_and_transcoders(str(model_dir), load_ct_transcoder(case, tc_dir),
                                                          backend="nnsight", device=torch.device("cpu"),
                                                          dtype=torch.float32)
    targets = [CustomTarget(lab, p, v) for lab, p, v in zip(labels, probs, vecs)]
    graph = attribute(ids, rm, attribution_targets=targets, batch_size=512)
    tensors, facts = graph_tensors(graph, "custom_")
    tensors["custom_vecs"] = vecs.contiguous()
    save_file(tensors, str(root / "custom.safetensors"))
    (root / "graph_custom.json").write_text(json.dumps(graph_json(graph, slug=case.name), separators=(",", ":"),
                                                       ensure_ascii=False))
    meta = {"labels": labels, "probs": probs, "max_n_logits": 10, "desired_logit_prob": 0.95, "batch_size": 512,
            "max_feature_nodes": None, **facts,
            "versions": {p: version(p) for p in ("circuit-tracer", "nnsight", "transformers", "torch")}}
    (root / "custom.json").write_text(json.dumps(meta, indent=1, ensure_ascii=False))
    return meta


def time_only(out: Path, names: list[str] | None, repeats: int, threads: int) -> dict:
    """Seconds per graph of circuit-tracer on the existing fixtures (nothing rewritten): median and min."""
    from circuit_tracer import ReplacementModel, attribute

    torch.set_num_threads(threads)
    result = {}
    for case in CASES:
        if names and case.name not in names:
            continue
        root = out / case.name
        meta = json.loads((root / "reference.json").read_text(encoding="utf-8"))
        ids = torch.tensor(meta["prompt_ids"])
        rm = ReplacementModel.from_pretrained_and_transcoders(
            str(root / "model"), load_ct_transcoder(case, root / "transcoder"), backend="nnsight",
            device=torch.device("cpu"), dtype=torch.float32,
        )
        for run in ("full", "topk"):
            kw = {"max_feature_nodes": meta[run]["max_feature_nodes"], "batch_size": meta[run]["batch_size"]}
            attribute(ids, rm, **kw)  # warm-up
            times = []
            for _ in range(repeats):
                t = time.perf_counter()
                attribute(ids, rm, **kw)
                times.append(time.perf_counter() - t)
            times.sort()
            result[f"{case.name}/{run}"] = {"median_s": times[len(times) // 2], "min_s": times[0]}
            print(f"{case.name}/{run}: median {times[len(times) // 2] * 1e3:.1f} ms, min {times[0] * 1e3:.1f} ms")
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "tests/data/circuit_tracer")
    p.add_argument("--case", action="append", help="only these cases (default: all)")
    p.add_argument("--time-only", action="store_true", help="only time circuit-tracer on the existing fixtures")
    p.add_argument("--custom-only", action="store_true",
                   help="only (re)write the custom-target graphs of the existing fixtures")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--timings-out", type=Path, help="with --time-only: write the timings here as JSON")
    args = p.parse_args()
    torch.set_grad_enabled(True)
    if args.time_only:
        timings = time_only(args.out, args.case, args.repeats, args.threads)
        if args.timings_out:
            args.timings_out.write_text(json.dumps(timings, indent=1))
        return
    for case in CASES:
        if args.case and case.name not in args.case:
            continue
        if args.custom_only:
            meta = run_custom(case, args.out)
            print(f"{case.name} custom targets: scores {meta['replacement_score']:.4f}/{meta['completeness_score']:.4f}")
            continue
        meta = run_case(case, args.out)
        run_custom(case, args.out)
        print(f"{case.name}: {meta['n_active_features']} features, {len(meta['full']['logit_strings'])} logits, "
              f"{meta['full']['seconds_per_graph'] * 1e3:.1f} ms/graph (topk {meta['topk']['seconds_per_graph'] * 1e3:.1f} "
              f"ms), scores {meta['full']['replacement_score']:.4f}/{meta['full']['completeness_score']:.4f}")


if __name__ == "__main__":
    main()
