"""What :mod:`sparse_clt_hf.training` fits (:class:`TrainingConfig`) and the small helpers the ``train``
command uses, without importing torch: ``sparse-clt-hf train --help`` shows these defaults at once."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

#: Activations training can produce: TopK is trained directly; a threshold activation (JumpReLU) trains as
#: TopK and then gets a per-layer threshold (see the module docstring).
TRAINABLE_ACTIVATIONS = ("topk", "jumprelu")

TRANSFORMS = {  # input transforms usable in training (no learned affine), same maths as transcoder.preprocess
    "none": lambda x, eps: x,
    "rmsnorm": lambda x, eps: x * (x.pow(2).mean(-1, keepdim=True) + eps).rsqrt(),
    "norm_rescale": lambda x, eps: x * (math.sqrt(x.shape[-1]) / x.norm(dim=-1, keepdim=True).clamp_min(eps)),
}


@dataclass
class TrainingConfig:
    """What to fit and how. ``span`` = number of layers each source layer writes to, itself included
    (1 = PLT; 0 = every later trained layer). ``tokens`` = training tokens (held-out ones are extra);
    ``epochs`` = passes over each buffer fill; ``buffer_mb`` bounds the activation buffer."""

    layers: list[int]
    n_features: int = 2048
    k: int = 32
    span: int = 1
    activation: str = "topk"  # topk | jumprelu
    input_site: str = "mlp_in"
    output_site: str = "mlp_out"
    input_transform: str = "none"
    input_norm_eps: float = 1e-6
    tokens: int = 100_000
    eval_tokens: int = 4096
    seq_len: int = 128
    skip_first: int = 1  # leading positions of every sequence left out (attention-sink outliers)
    model_batch: int = 16
    batch_size: int = 1024
    epochs: int = 2
    buffer_mb: float = 512.0
    lr: float = 1e-3
    warmup: float = 0.05  # fraction of steps with a linear warm-up
    decay: float = 0.3  # fraction of steps with a linear decay to 0 at the end
    aux_k: int = 64
    aux_coef: float = 1 / 32
    dead_tokens: int = 20_000  # a feature that has not fired for this many training tokens is dead
    seed: int = 0
    progress: bool = True
    model_name: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.layers = sorted({int(x) for x in self.layers})
        if not self.layers:
            raise ValueError("TrainingConfig.layers is empty: name at least one layer to train")
        if self.activation not in TRAINABLE_ACTIVATIONS:
            raise ValueError(
                f"activation must be one of {', '.join(map(repr, TRAINABLE_ACTIVATIONS))}, got {self.activation!r}"
            )
        if self.input_transform not in TRANSFORMS:
            raise ValueError(f"input_transform must be one of {', '.join(TRANSFORMS)}, got {self.input_transform!r}")
        if not 0 < self.k <= self.n_features:
            raise ValueError(f"k={self.k} must be in 1..n_features={self.n_features}")
        if self.span < 0:
            raise ValueError(f"span must be >= 0 (0 = all later layers), got {self.span}")
        if self.span != 1 and self.layers != list(range(self.layers[0], self.layers[-1] + 1)):
            raise ValueError(
                f"a cross-layer transcoder (span {self.span}) needs contiguous layers, got {self.layers}; "
                "use span=1 for a per-layer transcoder on scattered layers"
            )
        if self.seq_len <= self.skip_first:
            raise ValueError(f"seq_len={self.seq_len} must exceed skip_first={self.skip_first}")

    def n_out(self, layer: int) -> int:
        """Number of target layers that source ``layer`` writes to."""
        rest = self.layers[-1] - layer + 1
        return rest if self.span == 0 else min(self.span, rest)


# ---------------------------------------------------------------------------- helpers for commands
def parse_layers(text: str) -> list[int]:
    """``"3,4,5"`` or ``"2-7"`` (or a mix) -> sorted layer list."""
    out: set[int] = set()
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        try:
            out.update(range(int(lo), int(hi) + 1) if sep else [int(lo)])
        except ValueError:
            raise ValueError(f"cannot read layers {text!r}: use '3,4,5' or '2-7'") from None
    return sorted(out)


def format_metrics(metrics: dict[str, Any]) -> str:
    """A per-layer table (FVU, L0, dead) and a summary line."""
    dead_head = f"dead (of {w})" if (w := (metrics.get("training") or {}).get("n_features")) else "dead"
    lines = [f"{'layer':>5}  {'held-out FVU':>12}  {'L0':>7}  {dead_head:>5}"]
    for layer in metrics["fvu"]:
        lines.append(f"{layer:>5}  {metrics['fvu'][layer]:>12.4f}  {metrics['l0'].get(layer, 0):>7.2f}  "
                     f"{metrics['dead'].get(layer, 0):>{max(5, len(dead_head))}}")
    lines.append(f"{metrics['tokens']} training tokens, {metrics['eval_tokens']} held-out tokens, "
                 f"{metrics['steps']} steps, {metrics['train_seconds']:.1f} s")
    return "\n".join(lines)
