"""Model card (README.md) for a transcoder pushed to the Hub: YAML metadata, a per-layer table, usage.

Metrics come from ``config.metrics`` in either layout: ``{"l0": {layer: v}, "fvu": {layer: v}}``,
``{layer: {"l0": v, "fvu": v}}``, or a scalar ``{"l0": v}`` that applies to every layer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..formats.base import Description

METRIC_COLUMNS = {"l0": "L0", "fvu": "FVU"}


def layer_metric(metrics: dict[str, Any], name: str, layer: int) -> float | None:
    """Metric ``name`` of ``layer`` from a metrics dict in any supported layout, or None."""
    for key in (name, name.upper()):
        value = metrics.get(key)
        if isinstance(value, dict):
            value = value.get(layer, value.get(str(layer)))
        if isinstance(value, (int, float)):
            return float(value)
    per_layer = metrics.get(layer, metrics.get(str(layer)))
    if isinstance(per_layer, dict):
        value = per_layer.get(name, per_layer.get(name.upper()))
        if isinstance(value, (int, float)):
            return float(value)
    return None


def _table(desc: Description) -> str:
    metric_names = [
        m for m in METRIC_COLUMNS if any(layer_metric(desc.metrics, m, i) is not None for i in desc.layers)
    ]
    head = ["layer", "features", "site", "activation"] + [METRIC_COLUMNS[m] for m in metric_names]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    act = desc.activation + (f" (k={desc.k})" if desc.k else "")
    site = desc.input_site + ("" if desc.input_transform == "none" else f" + {desc.input_transform}")
    for layer, width in zip(desc.layers, desc.n_features):
        cells = [str(layer), str(width), site, act]
        for m in metric_names:
            v = layer_metric(desc.metrics, m, layer)
            cells.append("" if v is None else f"{v:.4g}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def model_card_text(desc: Description, repo_id: str, *, license: str | None = None) -> str:
    """The README.md for ``repo_id``: metadata (library_name, base_model, tags, license) and body."""
    from huggingface_hub import ModelCard, ModelCardData

    kind = "cross-layer transcoder" if desc.kind == "clt" else "per-layer transcoder"
    data = ModelCardData(
        library_name="sparse-clt-hf",
        base_model=desc.model_name or None,
        license=license,
        tags=["sparse-clt-hf", "transcoder", desc.kind, "circuit-tracer", "interpretability"],
    )
    layers = desc.layers
    body = f"""
# {repo_id.split("/")[-1]}

A {kind} ({desc.kind.upper()}) for `{desc.model_name or "an unnamed model"}`, saved by
[sparse-clt-hf](https://pypi.org/project/sparse-clt-hf/) in the circuit-tracer layout
(`config.yaml` + `{"W_enc_{i}.safetensors" if desc.kind == "clt" else "layer_{i}.safetensors"}`).

- layers: {len(layers)} ({layers[0]}..{layers[-1]}), d_model {desc.d_model}, dtype {desc.dtype}
- reads `{desc.input_site}` (input transform: {desc.input_transform}), writes `{desc.output_site}`
- activation: {desc.activation}{f" (k={desc.k})" if desc.k else ""}; decoders included: {desc.has_decoders}

{_table(desc)}

## Usage

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
from sparse_clt_hf import attach_clt

name = "{desc.model_name or "MODEL"}"
model, tok = AutoModelForCausalLM.from_pretrained(name), AutoTokenizer.from_pretrained(name)
clt = attach_clt(model, "{repo_id}", top_k=16)   # downloads only the encoder files
out = model.generate(**tok("The capital of France is", return_tensors="pt"), max_new_tokens=20)
print(clt.features)
```
"""
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n{body}"))
