"""Attribution at Gemma-2-2B's size on a GPU (issue 19's GPU measurement): time and peak memory of
``attribute`` + ``prune`` per prompt length.

A random Gemma-2-2B (bf16) with a random JumpReLU cross-layer transcoder: 16,384 features on each of the 26
layers at ``resid_mid``, each writing to its own and every later layer's MLP output (decoders 16,384 x
(26 - l) x 2,304: about 26 GB in bf16). Random encoders fire on about half the features, so each layer's
threshold is calibrated on the prompt itself to a realistic L0 (``--l0``, default 64 per token and layer,
as published Gemma-2-2B transcoders have): the threshold of a layer is the ``l0``-th largest pre-activation
per position, averaged over positions. ``max_feature_nodes`` bounds the attributed rows (circuit-tracer's
default 8,192); where the adjacency rectangle (those rows x every active feature, fp32) would not fit, the
refusal is recorded and the rows are halved until it does. The JSON report (``--out``) is rewritten after every prompt length, so a run stopped by a
timeout keeps what it measured.

    python scripts/bench_attribution_gemma2.py --device cuda [--tokens 128,1024] [--out report.json]
    python scripts/bench_attribution_gemma2.py --dry        # tiny Gemma 2 on the CPU: tests the script
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import transformers as tf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sparse_clt_hf import CrossLayerTranscoder, LayerEncoder, TranscoderConfig, attribute  # noqa: E402
from sparse_clt_hf.attribution.engine import AttributionMemoryError  # noqa: E402
from sparse_clt_hf.bench_workloads import GEMMA2_2B_CONFIG, mem_peak, mem_reset  # noqa: E402
from sparse_clt_hf.capture.sitehooks import hook_sites  # noqa: E402
from sparse_clt_hf.sites import resolve_site  # noqa: E402

TINY_GEMMA2 = dict(GEMMA2_2B_CONFIG, vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16)


def build_model(config: dict, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """A random model built directly on ``device`` in ``dtype`` (no CPU copy of 2.6B parameters)."""
    cfg = tf.AutoConfig.for_model(**config)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            torch.manual_seed(0)
            model = tf.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    finally:
        torch.set_default_dtype(default)
    return model.eval()


@torch.no_grad()
def site_inputs(model: torch.nn.Module, prompt: torch.Tensor, layers: list[int]) -> dict[int, torch.Tensor]:
    """Each layer's ``resid_mid`` [T, d] on the prompt (the package's site hooks, read only)."""
    seen: dict[int, torch.Tensor] = {}
    handles = hook_sites({layer: resolve_site(model, "resid_mid", layer) for layer in layers},
                         lambda layer, hidden: seen.__setitem__(layer, hidden[0].detach()))
    try:
        model(input_ids=prompt[None].to(model.device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return seen


def random_clt(model: torch.nn.Module, prompt: torch.Tensor, width: int, l0: int, seed: int = 0) -> CrossLayerTranscoder:
    """Random JumpReLU CLT at resid_mid with thresholds calibrated to ``l0`` active features per token and
    layer on ``prompt``; weights made on the model's device in its dtype, a layer at a time."""
    cfg = model.config
    d, n_layers = cfg.hidden_size, cfg.num_hidden_layers
    device, dtype = model.device, model.dtype
    gen = torch.Generator(device=device).manual_seed(seed)
    layers = list(range(n_layers))
    inputs = site_inputs(model, prompt, layers)
    encoders = {}
    for layer in layers:
        W = torch.randn(width, d, generator=gen, device=device, dtype=dtype) / d**0.5
        b = torch.zeros(width, device=device, dtype=dtype)
        z = (inputs[layer].to(dtype) @ W.T).float()  # [T, m]
        thr = z.topk(l0, dim=-1).values[:, -1].mean().clamp_min(1e-3)
        enc = LayerEncoder(W, b, threshold=torch.full((width,), float(thr), device=device, dtype=dtype))
        W_dec = torch.randn(width, n_layers - layer, d, generator=gen, device=device, dtype=dtype) * (0.02 / d**0.5)
        enc.set_decoder(W_dec, torch.zeros(d, device=device, dtype=dtype))
        encoders[layer] = enc
        del z
    tc_cfg = TranscoderConfig(d_model=d, layers=layers, n_features=[width] * n_layers, input_site="resid_mid",
                              activation="jumprelu", n_layers=n_layers, dtype=str(dtype).removeprefix("torch."))
    return CrossLayerTranscoder(tc_cfg, encoders)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--tokens", default="128,1024", help="prompt lengths, comma-separated")
    p.add_argument("--width", type=int, default=16384)
    p.add_argument("--l0", type=int, default=64)
    p.add_argument("--max-feature-nodes", type=int, default=8192)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--max-memory", default=None, help="attribute's max_memory (default: the free memory)")
    p.add_argument("--out", default=None, help="JSON report, rewritten after every prompt length")
    p.add_argument("--dry", action="store_true", help="tiny Gemma 2 on the CPU (tests the script)")
    args = p.parse_args()
    if args.dry:
        args.device, config, dtype = "cpu", TINY_GEMMA2, torch.float32
        args.width, args.l0, args.max_feature_nodes = min(args.width, 256), min(args.l0, 8), min(args.max_feature_nodes, 64)
        lengths = [16, 48]
    else:
        config, dtype = GEMMA2_2B_CONFIG, torch.bfloat16
        lengths = [int(t) for t in args.tokens.split(",")]
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    t0 = time.perf_counter()
    model = build_model(config, device, dtype)
    longest = torch.randint(3, config["vocab_size"], (max(lengths),), generator=torch.Generator().manual_seed(1))
    longest[0] = 2
    tc = random_clt(model, longest, args.width, args.l0)
    report = {"device": torch.cuda.get_device_name(device) if cuda else "cpu", "model": "random Gemma-2-2B"
              if not args.dry else "tiny random Gemma 2", "dtype": str(dtype), "width": args.width, "l0_target": args.l0,
              "max_feature_nodes": args.max_feature_nodes, "setup_s": round(time.perf_counter() - t0, 1),
              "transcoder_gib": round(sum(t.numel() * t.element_size() for t in tc.parameters()) / 2**30, 2),
              "runs": []}
    if cuda:
        report["model_gib"] = round(torch.cuda.memory_allocated(device) / 2**30 - report["transcoder_gib"], 2)

    def write() -> None:
        text = json.dumps(report, indent=2)
        if args.out:
            Path(args.out).write_text(text + "\n")
        print(text, flush=True)

    for n in lengths:
        prompt = longest[:n]
        base = mem_reset(device)
        t1 = time.perf_counter()
        nodes = args.max_feature_nodes
        while True:  # the rectangle is [attributed rows x all active features]: halve the rows until it fits
            try:
                graph = attribute(model, tc, prompt, max_feature_nodes=nodes, batch_size=args.batch_size,
                                  max_memory=args.max_memory)
                break
            except AttributionMemoryError as exc:
                report["runs"].append({"tokens": n, "max_feature_nodes": nodes, "refused": str(exc)})
                write()
                if nodes <= 512:
                    graph = None
                    break
                nodes //= 2
                t1 = time.perf_counter()
        if graph is None:
            continue
        if cuda:
            torch.cuda.synchronize(device)
        t2 = time.perf_counter()
        pruned = graph.prune()
        t3 = time.perf_counter()
        peak = mem_peak(device) - base
        report["runs"].append({
            "tokens": n, "max_feature_nodes": nodes, "active_features": graph.meta["n_active_features"],
            "active_per_token_layer": round(graph.meta["n_active_features"] / (n * len(tc.layers)), 1),
            "attributed_features": graph.layout.n_features, "rows": int(graph.adjacency.shape[0]),
            "columns": graph.layout.n_nodes, "seconds_attribute": round(t2 - t1, 2),
            "seconds_prune": round(t3 - t2, 2), "peak_above_start_gib": round(peak / 2**30, 2),
            "kept_nodes": int(pruned.node_mask.sum()), "scores": graph.scores()})
        write()
        del graph, pruned
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
