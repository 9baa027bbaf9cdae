"""Peak memory (and time) of ``attribute`` + ``prune`` on a long prompt, next to what an N x N fp32 adjacency needs.

A tiny random Llama (d 64, 4 layers, 4,096 positions) with a random ReLU CLT whose biases make some features fire
at every position: a 2,048-token prompt gives tens of thousands of active features; ``max_feature_nodes`` 2,000
limits the attributed rows. On the CPU, peak memory is the peak RSS above the RSS before the call (VmHWM reset);
on CUDA ``torch.cuda.max_memory_allocated``. Prints one JSON object.

    python scripts/bench_attribution.py [--tokens 2048] [--max-feature-nodes 2000] [--width 512] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import transformers as tf

from sparse_clt_hf import CrossLayerTranscoder, LayerEncoder, TranscoderConfig, attribute
from sparse_clt_hf.bench_workloads import mem_peak, mem_reset


def tiny_clt(d: int, n_layers: int, width: int, seed: int = 0) -> CrossLayerTranscoder:
    g = torch.Generator().manual_seed(seed)
    encoders = {}
    for layer in range(n_layers):
        enc = LayerEncoder(torch.randn(width, d, generator=g) / d**0.5, torch.randn(width, generator=g) * 0.1 - 2.3)
        enc.set_decoder(torch.randn(width, n_layers - layer, d, generator=g) * 0.05, torch.zeros(d))
        encoders[layer] = enc
    cfg = TranscoderConfig(d_model=d, layers=list(range(n_layers)), n_features=[width] * n_layers, n_layers=n_layers,
                           input_transform="rmsnorm")
    return CrossLayerTranscoder(cfg, encoders)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--max-feature-nodes", type=int, default=2000)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    model = tf.LlamaForCausalLM(cfg).eval().to(device)
    tc = tiny_clt(64, 4, args.width).to(device)
    prompt = torch.randint(3, 256, (args.tokens,), generator=torch.Generator().manual_seed(1))
    prompt[0] = 2
    base = mem_reset(device)
    t0 = time.perf_counter()
    graph = attribute(model, tc, prompt, max_feature_nodes=args.max_feature_nodes, batch_size=args.batch_size)
    t1 = time.perf_counter()
    pruned = graph.prune()
    t2 = time.perf_counter()
    peak = mem_peak(device) - base
    n = graph.layout.n_nodes
    n_all = graph.meta["n_active_features"] + n - graph.layout.n_features
    report = {
        "device": str(device),
        "tokens": args.tokens,
        "active_features": graph.meta["n_active_features"],
        "attributed_features": graph.layout.n_features,
        "rows": int(graph.adjacency.shape[0]),
        "columns": n,
        "adjacency_mib": graph.adjacency.numel() * 4 / 2**20,
        "peak_mib": peak / 2**20,
        "n_by_n_fp32_mib_all_active": n_all * n_all * 4 / 2**20,
        "n_by_n_fp32_mib_graph_nodes": n * n * 4 / 2**20,
        "seconds_attribute": round(t1 - t0, 2),
        "seconds_prune": round(t2 - t1, 2),
        "kept_nodes": int(pruned.node_mask.sum()),
        "scores": graph.scores(),
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
