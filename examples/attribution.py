"""Why does the model predict its next token? An attribution graph, its most influential features, a page to explore.

    python examples/attribution.py ["your prompt"] [graph.html]

Uses SmolLM2-135M-Instruct and the demo transcoder (trained and cached on first use, with its feature statistics
for labels). Attributes the prompt's most likely next tokens through the transcoder's local replacement model
(circuit-tracer's method), keeps the most influential features (pruning), prints them and writes the graph JSON
(circuit-tracer / Neuronpedia format) and a self-contained HTML page: open it and click a node to see its
strongest inputs and outputs. About a minute on a laptop CPU once the demo transcoder is cached.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from _common import load, tiny, transcoder_for

import sparse_clt_hf
from sparse_clt_hf.graph_view import feature_details_from_stats, graph_html, labels_from_details, top_features


def statistics(model, tokenizer, transcoder):
    """The demo transcoder's feature statistics (computed once, cached next to it); None for the tiny model."""
    if tiny():
        return None
    from sparse_clt_hf.demo import ensure_demo_stats

    return ensure_demo_stats(model, tokenizer, transcoder)


def main(prompt: str = "def square(x):\n    return x *", html: str = "attribution-graph.html",
         max_feature_nodes: int = 200) -> dict:
    model, tokenizer = load()
    transcoder = transcoder_for(model, tokenizer)
    stats = statistics(model, tokenizer, transcoder)
    # Text is tokenized with a special token first (the attention sink), as circuit-tracer does; token ids would be
    # used exactly as given. max_feature_nodes: attribute only the most influential features (chosen greedily).
    graph = sparse_clt_hf.attribute(model, transcoder, prompt, tokenizer=tokenizer, max_feature_nodes=max_feature_nodes)
    for token, p in zip(graph.logit_strings or [], graph.logit_probs.tolist()):
        print(f"explains {token!r} (p={p:.3f})")
    replacement, completeness = graph.scores()
    print(f"{graph.meta['n_active_features']} active features ({graph.features.shape[0]} attributed); "
          f"replacement score {replacement:.3f}, completeness {completeness:.3f}")

    # Pruning keeps the nodes and edges that carry most of the influence on the logits (80% / 98%).
    pruned = graph.prune(node_threshold=0.8, edge_threshold=0.98)
    kept = graph.features.cpu()[pruned.node_mask[: graph.features.shape[0]].cpu()][:, [0, 2]].tolist()
    details = feature_details_from_stats(kept, stats, tokenizer) if stats is not None else None
    json_path = Path(html).with_suffix(".json")
    pruned.to_json(json_path, slug="example", scan=str(transcoder), node_threshold=0.8, edge_threshold=0.98,
                  labels=labels_from_details(details or {}))
    graph_json = json.loads(json_path.read_text(encoding="utf-8"))
    top = top_features(graph_json, 8)
    print("most influential features:" if top else "no feature kept by pruning (tokens and errors carry the logits)")
    for f in top:
        print(f"  L{f['layer']}/{f['feature']:<6} at #{f['position']} {f['token']!r:<12} act {f['activation']:.3g}  "
              f"{f['label']}")
    graph_html(graph_json, html, feature_details=details, title=f"Why the next token? {prompt}")
    print(f"wrote {json_path} and {html}: open the page and click a node")
    return {"graph": graph, "graph_json": graph_json, "top": top, "html": html}


if __name__ == "__main__":
    main(*sys.argv[1:3])
