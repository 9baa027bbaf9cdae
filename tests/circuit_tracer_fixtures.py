"""Readers of the circuit-tracer reference fixtures in tests/data/circuit_tracer/<case>/ (written by
scripts/circuit_tracer_reference.py in a separate virtualenv; nothing here imports circuit-tracer).

Each case holds ``model/`` (a tiny HF model + tokenizer), ``transcoder/`` (circuit-tracer's file layout),
``reference.safetensors``, ``reference.json`` and ``graph.json`` / ``graph_topk.json`` (its frontend JSON).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent / "data" / "circuit_tracer"
CASES = sorted(p.name for p in ROOT.iterdir() if (p / "reference.json").exists()) if ROOT.exists() else []
RUNS = ("full", "topk")  # all features / max_feature_nodes set
CUSTOM_CASES = [c for c in CASES if (ROOT / c / "custom.json").exists()]  # + run "custom": CustomTarget directions


@dataclass
class Reference:
    """One circuit-tracer graph: its settings, tensors (dense [N, N] adjacency rebuilt), pruning and JSON."""

    case: str
    folder: Path
    meta: dict  #: reference.json
    run: dict  #: meta[run]: settings, scores, logit strings, timing
    tokens: torch.Tensor
    active_features: torch.Tensor  #: [n_active, 3] (layer, pos, feature), every active feature
    activations: torch.Tensor  #: [n_active]
    selected: torch.Tensor  #: indices into active_features of the graph's feature nodes
    logit_ids: torch.Tensor
    logit_probs: torch.Tensor
    adjacency: torch.Tensor  #: [N, N] dense, nodes: selected features | errors | tokens | logits
    node_mask: torch.Tensor  #: [N]
    edge_mask: torch.Tensor  #: [N, N]
    cumulative_scores: torch.Tensor  #: [N]
    graph_json: dict
    custom_vecs: torch.Tensor | None = None  #: [K, d] the custom targets' directions (run "custom")

    @property
    def n_layers(self) -> int:
        return int(json.loads((self.folder / "model" / "config.json").read_text())["num_hidden_layers"])

    @property
    def model_dir(self) -> Path:
        return self.folder / "model"

    @property
    def transcoder_dir(self) -> Path:
        return self.folder / "transcoder"


def load_reference(case: str, run: str = "full") -> Reference:
    folder = ROOT / case
    meta = json.loads((folder / "reference.json").read_text(encoding="utf-8"))
    t = load_file(str(folder / "reference.safetensors"))
    if run == "custom":  # custom target directions: custom.safetensors / custom.json / graph_custom.json
        t.update(load_file(str(folder / "custom.safetensors")))
        meta = {**meta, "custom": json.loads((folder / "custom.json").read_text(encoding="utf-8"))}
    p = {"full": "", "topk": "topk_", "custom": "custom_"}[run]
    selected, logit_ids = t[f"{p}selected_features"], t[f"{p}logit_ids"]
    rows = t[f"{p}adjacency_rows"]
    n_sel, k = len(selected), len(logit_ids)
    n = rows.shape[1]
    dense = torch.zeros(n, n)
    dense[:n_sel] = rows[:n_sel]
    dense[n - k :] = rows[n_sel:]
    edge_mask = torch.zeros(n, n, dtype=torch.bool)
    edge_index = t[f"{p}edge_index"].long()
    edge_mask[edge_index[0], edge_index[1]] = True
    name = {"full": "graph.json", "topk": "graph_topk.json", "custom": "graph_custom.json"}[run]
    return Reference(
        case=case, folder=folder, meta=meta, run=meta[run], tokens=t["tokens"],
        active_features=t[f"{p}active_features"], activations=t[f"{p}activations"], selected=selected,
        logit_ids=logit_ids, logit_probs=t[f"{p}logit_probs"], adjacency=dense, node_mask=t[f"{p}node_mask"],
        edge_mask=edge_mask, cumulative_scores=t[f"{p}cumulative_scores"],
        graph_json=json.loads((folder / name).read_text(encoding="utf-8")),
        custom_vecs=t.get("custom_vecs"),
    )
