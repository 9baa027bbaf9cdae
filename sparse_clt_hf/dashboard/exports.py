"""Exports of dashboard statistics for other viewers.

- :func:`export_circuit_tracer`: circuit-tracer's per-feature JSON (its ``frontend/feature_models.py``
  ``Model``: ``index``, ``transcoder_id``, ``examples_quantiles``, ``top_logits``/``bottom_logits``,
  ``act_min``/``act_max``, ``quantile_values``, ``histogram``, ``activation_frequency``), written as
  ``CT_DIR/features/<scan>/<index>.json`` where ``index`` is the Cantor pairing of (layer, feature),
  the number circuit-tracer's graph files give a feature node. Its frontend reads local feature
  files when the graph's scan starts with ``./``: with ``serve(data_dir=CT_DIR)``, scan
  ``./data/features/<scan>`` (the server maps ``/data/`` to ``CT_DIR``).
  ``histogram`` has the dashboard's bins up to the one holding the max (equal bins over ``[0, u * w)``,
  ``w`` the bin width, within one bin of ``[act_min, act_max] = [0, max]``); ``quantile_values``
  holds the 1st..100th percentiles (interpolated inside histogram bins).
- :func:`export_neuronpedia`: Neuronpedia's import directory, as its converter
  (``utils/neuronpedia-utils``) writes it: ``NP_DIR/<model>/<layer>-<source set>/`` with
  ``model.jsonl``, ``source.jsonl``, ``sourceset.jsonl``, ``release.jsonl``, and gzipped JSON-lines
  batches ``features/batch-N.jsonl.gz`` (one Feature per line: ``maxActApprox``, ``frac_nonzero``,
  ``freq_hist_data_bar_heights``/``_values``, ``pos_str``/``pos_values``, ``neg_str``/``neg_values``, ...)
  and ``activations/batch-N.jsonl.gz`` (one Activation per example: ``tokens``, ``values``,
  ``maxValue``, ``maxValueTokenIndex``, ``binMin``/``binMax``/``binContains`` = the quantile group's
  range and share, -1 for top activations).
"""

from __future__ import annotations

import gzip
import json
import os
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .logits import LogitEffects
from .site import check_out_dir
from .stats import DashboardStats

NP_BATCH = 128


def cantor(layer: int, feature: int) -> int:
    """circuit-tracer's feature number: the Cantor pairing of (layer, feature)."""
    return (layer + feature) * (layer + feature + 1) // 2 + feature


def _decode_all(tokenizer: Any, ids: set[int]) -> dict[int, str]:
    ids_sorted = sorted(i for i in ids if i >= 0)
    if hasattr(tokenizer, "batch_decode"):
        texts = tokenizer.batch_decode([[i] for i in ids_sorted])
    else:
        texts = [tokenizer.decode([i]) for i in ids_sorted]
    return dict(zip(ids_sorted, texts))


def _feature_parts(stats: DashboardStats, layer: int, f: int, logits: dict[int, LogitEffects]):
    """(examples, groups, top logit ids/values, bottom logit ids/values) of one feature."""
    examples = stats.examples(layer, f)
    bounds = stats.quantile_bounds(layer, f)
    hist = stats.histogram(layer, f).tolist()
    edges = stats.quantile_edges(layer, f).tolist()
    shares = [sum(hist[a:b]) / max(sum(hist), 1) for a, b in zip(edges[:-1], edges[1:])]
    eff = logits.get(layer)
    lt = lb = ([], [])
    if eff is not None:
        lt = (eff.top_ids[f].tolist(), eff.top_values[f].tolist())
        lb = (eff.bottom_ids[f].tolist(), eff.bottom_values[f].tolist())
    return examples, bounds, shares, lt, lb


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-").lower() or "model"


def _frequencies(base: Any, layer: int, count: list[int], exact: list | None) -> list[float]:
    """Each feature's frequency: recorded (top-k membership), or exact where ``exact`` has it."""
    freq = [c / max(base.n_positions, 1) for c in count]
    for e in exact or []:
        if e.layer == layer and e.feature < len(freq):
            freq[e.feature] = e.frequency
    return freq


def export_circuit_tracer(stats: DashboardStats, out: str | os.PathLike[str], tokenizer: Any, *,
                          logits: dict[int, LogitEffects] | None = None, scan: str | None = None,
                          source: dict[str, Any] | None = None, exact: list | None = None) -> Path:
    """Write circuit-tracer feature files (see the module doc); returns ``CT_DIR/features/<scan>``.
    ``exact``: exact frequencies of some features (:mod:`.exact`), used instead of the recorded ones."""
    logits = logits or {}
    scan = scan or _slug(Path(str((source or {}).get("transcoder") or "sparse-clt-hf")).name)
    folder = check_out_dir(out, "--circuit-tracer") / "features" / scan
    folder.mkdir(parents=True, exist_ok=True)
    base = stats.base
    for li, layer in enumerate(base.layers):
        count, mx = base.count(layer).tolist(), base.max(layer).tolist()
        freq = _frequencies(base, layer, count, exact)
        for f in range(base.n_features[li]):
            examples, bounds, shares, lt, lb = _feature_parts(stats, layer, f, logits)
            vocab = _decode_all(tokenizer, {t for e in examples for t in e.token_ids} | set(lt[0]) | set(lb[0]))
            groups = [("top activations", [e for e in examples if e.group == -1])]
            groups += [(f"quantile {g + 1}: {lo:.3g} to {hi:.3g} ({100 * s:.1f}%)", [e for e in examples if e.group == g])
                       for g, ((lo, hi), s) in enumerate(zip(bounds, shares))]
            record = {
                "transcoder_id": f"{scan}/{layer}",
                "index": cantor(layer, f),
                "examples_quantiles": [
                    {"quantile_name": name, "examples": [
                        {"tokens": [vocab[t] for t in e.token_ids], "tokens_acts_list": e.acts,
                         "train_token_ind": e.index, "is_repeated_datapoint": False} for e in items]}
                    for name, items in groups if items],
                "top_logits": [vocab[i] for i in lt[0]],
                "bottom_logits": [vocab[i] for i in lb[0]],
                "act_min": 0.0,
                "act_max": float(mx[f]),
                "quantile_values": stats.percentiles(layer, f),
                "histogram": [float(c) for c in stats.histogram(layer, f)[: stats.used_bins(layer, f)].tolist()],
                "activation_frequency": freq[f],
            }
            (folder / f"{record['index']}.json").write_text(json.dumps(record), encoding="utf-8")
    return folder


def _write_jsonl_gz(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = "".join(json.dumps(r) + "\n" for r in rows).encode("utf-8")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(gzip.compress(data, compresslevel=5))
    os.replace(tmp, path)


def export_neuronpedia(stats: DashboardStats, out: str | os.PathLike[str], tokenizer: Any, *,
                       logits: dict[int, LogitEffects] | None = None, model_id: str | None = None,
                       source_set: str | None = None, source: dict[str, Any] | None = None,
                       creator_name: str = "sparse-clt-hf", batch_size: int = NP_BATCH, exact: list | None = None) -> Path:
    """Write Neuronpedia's import directory (see the module doc); returns ``NP_DIR/<model>``. ``exact``: exact
    frequencies of some features (:mod:`.exact`), used instead of the recorded ones."""
    logits = logits or {}
    source = source or {}
    model_id = model_id or _slug(Path(str(source.get("model") or "model")).name)
    base = stats.base
    source_set = source_set or f"sparse-clt-hf-{max(base.n_features)}"
    root = check_out_dir(out, "--neuronpedia") / model_id
    created = datetime.now(timezone.utc).isoformat()
    for li, layer in enumerate(base.layers):
        source_id = f"{layer}-{source_set}"
        folder = root / source_id
        folder.mkdir(parents=True, exist_ok=True)
        meta = {
            "model.jsonl": {"id": model_id, "displayNameShort": model_id, "displayName": model_id,
                            "creatorId": None, "createdAt": created, "updatedAt": created, "instruct": False},
            "sourceset.jsonl": {"modelId": model_id, "name": source_set, "creatorName": creator_name,
                                "description": f"{source.get('transcoder') or 'transcoder'} features (sparse-clt-hf)",
                                "visibility": "PUBLIC", "createdAt": created, "creatorId": None},
            "source.jsonl": {"id": source_id, "modelId": model_id, "setName": source_set, "visibility": "PUBLIC",
                             "num_prompts": None, "num_tokens_in_prompt": None, "dataset": None,
                             "creatorId": None},
            "release.jsonl": {"name": source_set, "description": f"{source_set} (exported by sparse-clt-hf)",
                              "creatorName": creator_name, "createdAt": created, "creatorId": None, "urls": []},
        }
        for name, row in meta.items():
            (folder / name).write_text(json.dumps(row) + "\n", encoding="utf-8")
        count, mx = base.count(layer).tolist(), base.max(layer).tolist()
        freq = _frequencies(base, layer, count, exact)
        m = base.n_features[li]
        for batch, start in enumerate(range(0, m, batch_size)):
            features, activations = [], []
            for f in range(start, min(start + batch_size, m)):
                examples, bounds, shares, lt, lb = _feature_parts(stats, layer, f, logits)
                vocab = _decode_all(tokenizer, {t for e in examples for t in e.token_ids} | set(lt[0]) | set(lb[0]))
                edges, used = stats.bin_edges(layer, f).tolist(), stats.used_bins(layer, f)
                features.append({
                    "modelId": model_id, "layer": source_id, "index": str(f), "creatorId": None, "createdAt": created,
                    "maxActApprox": float(mx[f]), "hasVector": False, "vector": [], "vectorLabel": None,
                    "vectorDefaultSteerStrength": 10, "hookName": None,
                    "topkCosSimIndices": [], "topkCosSimValues": [],
                    "neuron_alignment_indices": [], "neuron_alignment_values": [], "neuron_alignment_l1": [],
                    "correlated_neurons_indices": [], "correlated_neurons_pearson": [], "correlated_neurons_l1": [],
                    "correlated_features_indices": [], "correlated_features_pearson": [],
                    "correlated_features_l1": [],
                    "pos_str": [vocab[i] for i in lt[0]], "pos_values": [float(v) for v in lt[1]],
                    "neg_str": [vocab[i] for i in lb[0]], "neg_values": [float(v) for v in lb[1]],
                    "frac_nonzero": freq[f],
                    "freq_hist_data_bar_heights": [float(c) for c in stats.histogram(layer, f)[:used].tolist()],
                    "freq_hist_data_bar_values": [(a + b) / 2 for a, b in zip(edges[:used], edges[1:used + 1])],
                    "logits_hist_data_bar_heights": [], "logits_hist_data_bar_values": [],
                    "decoder_weights_dist": [],
                })
                for n, e in enumerate(examples):
                    top = e.group == -1
                    lo, hi = (-1.0, -1.0) if top else bounds[e.group]
                    activations.append({
                        "id": f"{model_id}-{source_id}-{f}-{n}", "tokens": [vocab[t] for t in e.token_ids],
                        "index": str(f), "layer": source_id, "modelId": model_id,
                        "maxValue": max(e.acts), "maxValueTokenIndex": e.acts.index(max(e.acts)),
                        "minValue": min(e.acts), "values": e.acts, "creatorId": None,
                        "dataSource": None, "dataIndex": None, "dfaValues": [], "dfaTargetIndex": None,
                        "dfaMaxValue": None, "createdAt": created, "lossValues": [], "logitContributions": None,
                        "binMin": lo, "binMax": hi, "binContains": -1.0 if top else shares[e.group],
                        "qualifyingTokenIndex": e.index,
                    })
            _write_jsonl_gz(folder / "features" / f"batch-{batch}.jsonl.gz", features)
            _write_jsonl_gz(folder / "activations" / f"batch-{batch}.jsonl.gz", activations)
    return root
