"""What ``generate --steer`` (and ``--compare``) prints about the steers: their names, the L0 they leave,
and the unsteered completion beside the steered one.

Semantics of a steered TopK layer (see ``docs/steering.md``): the transcoder chooses its k features from
the unsteered stream and a steered feature is set *on top of* them (its decoder delta ``(a' - a) W_dec``
is added; the other features keep their activations). So a steered feature that was not among the k is
recorded as an extra active feature (L0 = k + 1), one that was among them and is clamped to 0 leaves k - 1,
and the record shows exactly what acted on the model. The report states the L0 it recorded per layer
instead of promising k.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .features import Features


def steer_text(steer: Mapping[str, Any]) -> str:
    """``"L6/942 clamped to 40"``, ``"L6/942 +2"``, ``"L6/942 x0.5"``, ``"L6/942 ablated (clamped to 0)"``."""
    value, mode = float(steer["value"]), steer.get("mode", "clamp")
    num = f"{value:g}"
    how = {"clamp": "ablated (clamped to 0)" if value == 0 else f"clamped to {num}",
           "add": f"{'+' if value >= 0 else ''}{num}", "scale": f"x{num}"}.get(mode, f"{mode} {num}")
    positions = steer.get("positions", "all")
    where = "" if positions in (None, "all") else f" at {positions} positions"
    return f"L{steer['layer']}/{steer['feature']} {how}{where}"


def steered_keys(steers: Sequence[Mapping[str, Any]] | None) -> set[tuple[int, int]]:
    """``{(layer, feature)}`` of the steers."""
    return {(int(s["layer"]), int(s["feature"])) for s in steers or []}


def l0_by_layer(feats: Features) -> dict[int, tuple[int, int]]:
    """``{layer: (lowest, highest)}`` recorded L0 over the unpadded positions of ``feats``."""
    out: dict[int, tuple[int, int]] = {}
    mask = feats.mask.bool()
    for li, layer in enumerate(feats.layers):
        vals = feats.l0[..., li][mask]
        if vals.numel():
            out[layer] = (int(vals.min()), int(vals.max()))
    return out


def topk_l0_sentence(k: int, feats: Features, steers: Sequence[Mapping[str, Any]] | None) -> str:
    """What a TopK transcoder's recorded L0 is, from the record itself (``feats``: the generated part)."""
    ranges = l0_by_layer(feats)
    off = {layer: r for layer, r in ranges.items() if r != (k, k)}
    if not off:
        return (f"TopK transcoder (k={k}): every token has exactly {k} active features per layer, so L0 says "
                "nothing here")
    spans = ", ".join(f"layer {layer}: {lo}" + (f"-{hi}" if hi != lo else "") for layer, (lo, hi) in off.items())
    why = ("a steered feature is set on top of the k the transcoder chose, so it counts as one more where it "
           "was not among them (one fewer where it was and is clamped to 0)" if steers else
           "fewer features had a positive pre-activation there")
    return (f"TopK transcoder (k={k}): the transcoder chooses {k} active features per token and layer; recorded "
            f"L0 in {spans}, because {why}")


def steers_lines(steers: Sequence[Mapping[str, Any]]) -> list[str]:
    """The report's lines naming the steers."""
    return [f"steered:    {'; '.join(steer_text(s) for s in steers)}  (features marked * below)"]


def divergence(steered: torch.Tensor, baseline: torch.Tensor, prompt_len: int) -> int | None:
    """Index (0 = first generated token) where the two completions first differ; None if one is a prefix
    of the other and they have the same length (identical)."""
    a, b = steered[prompt_len:].tolist(), baseline[prompt_len:].tolist()
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))
