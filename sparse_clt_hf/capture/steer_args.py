"""The arguments of a steer, checked before anything changes, and the handle :meth:`steer` returns.

Every check here runs before the attachment's state is touched, so a refused argument leaves the
attachment exactly as it was. A value must be finite *in the dtype it is stored in* (the encoder's
compute dtype): 1e39 is a finite Python float but ``inf`` in float32 and bfloat16, 7e4 is ``inf`` in
float16 — such a value would make the logits non-finite, so it is refused naming the dtype's range.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import IncompatibleTranscoderError

MODES = ("clamp", "add", "scale")
POSITION_NAMES = ("all", "prompt", "generated")
#: "no upper bound" for position bounds; explicit slice bounds must stay below it (int64 device tensors)
END = 2**62


@dataclass
class Steer:
    """One active steer: ``feature`` of source ``layer`` set by ``mode`` with ``value`` at ``positions``."""

    layer: int
    feature: int
    value: float
    mode: str = "clamp"
    positions: str | slice = "all"
    #: decoder rows {target layer: [d]} on the target layer's device and dtype
    rows: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict[str, Any]:
        pos = self.positions
        if isinstance(pos, slice):
            pos = f"{pos.start or 0}:{'' if pos.stop is None else pos.stop}"
        return {"layer": self.layer, "feature": self.feature, "value": self.value, "mode": self.mode,
                "positions": pos, "targets": sorted(self.rows)}


def check_steer(
    layer: object, feature: object, value: object, mode: object, positions: object,
    widths: Mapping[int, int], active: list[Steer], dtypes: Mapping[int, torch.dtype] | None = None,
) -> Steer:
    """A validated :class:`Steer` (no rows yet); ``widths``: the attachment's layer -> n_features;
    ``dtypes``: layer -> the dtype the value is stored in (checked to hold it when given)."""
    if not _is_int(layer) or int(layer) not in widths:  # type: ignore[call-overload]
        raise IncompatibleTranscoderError(
            f"cannot steer layer {layer!r}: this attachment has transcoder layers {list(widths)}"
        )
    layer = int(layer)  # type: ignore[call-overload]
    width = widths[layer]
    if not _is_int(feature) or not 0 <= int(feature) < width:  # type: ignore[call-overload]
        raise ValueError(f"feature must be an integer in [0, {width}) for layer {layer}, got {feature!r}")
    feature = int(feature)  # type: ignore[call-overload]
    number = check_value(value, None if dtypes is None else dtypes[layer])
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(map(repr, MODES))}, got {mode!r}")
    where = check_positions(positions)
    if any(s.layer == layer and s.feature == feature for s in active):
        raise ValueError(f"feature {feature} of layer {layer} is already steered: remove that steer or set() its value")
    return Steer(layer, feature, number, str(mode), where)


def _is_int(x: object) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def check_value(value: object, dtype: torch.dtype | None = None) -> float:
    """A steering value as a float: a finite real number (a one-element tensor is accepted) that stays
    finite when stored in ``dtype`` (when given)."""
    if torch.is_tensor(value) and value.numel() == 1 and value.dtype != torch.bool:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise ValueError(f"value must be a finite number, got {value!r}")
    number = float(value)
    if dtype is not None and dtype.is_floating_point and not torch.tensor(number, dtype=dtype).isfinite():
        top = torch.finfo(dtype).max
        raise ValueError(
            f"value {number!r} does not fit {str(dtype).removeprefix('torch.')}, the dtype the steer is "
            f"stored and applied in: it must lie within [-{top:.6g}, {top:.6g}]"
        )
    return number


def check_positions(positions: object) -> str | slice:
    """``"all"``, ``"prompt"``, ``"generated"`` or a slice of absolute positions (0 <= start < stop <= 2**62)."""
    if isinstance(positions, str):
        if positions not in POSITION_NAMES:
            raise ValueError(
                f"positions must be one of {', '.join(map(repr, POSITION_NAMES))} or a slice of absolute "
                f"positions, got {positions!r}"
            )
        return positions
    if not isinstance(positions, slice):
        raise ValueError(f"positions must be 'all', 'prompt', 'generated' or a slice, got {positions!r}")
    start, stop, step = positions.start, positions.stop, positions.step
    for name, v in (("start", start), ("stop", stop), ("step", step)):
        if v is not None and (not _is_int(v)):
            raise ValueError(f"positions slice {name} must be an integer or None, got {v!r}")
    start = None if start is None else int(start)
    stop = None if stop is None else int(stop)
    if step not in (None, 1):
        raise ValueError(f"positions slice must have step 1, got {positions!r}")
    if (start is not None and start < 0) or (stop is not None and stop < 0):
        raise ValueError(f"positions slice must use non-negative absolute positions, got {positions!r}")
    if (start is not None and start >= END) or (stop is not None and stop > END):
        raise ValueError(f"positions slice bounds must be at most 2**62 (use None for no end), got {positions!r}")
    if stop is not None and stop <= (start or 0):
        raise ValueError(f"positions slice is empty (start >= stop): {positions!r}")
    return slice(start, stop)


class SteeringHandle:
    """What :meth:`CLTAttachment.steer` returns: :meth:`remove` it (or use it as a context manager);
    :meth:`set` a new value (an in-place write: a compiled decode step is not recompiled)."""

    def __init__(self, owner: Any, steer: Steer) -> None:
        self._owner = owner
        self.steer = steer

    @property
    def active(self) -> bool:
        return any(s is self.steer for s in self._owner._steering.steers)

    @property
    def value(self) -> float:
        return self.steer.value

    def set(self, value: float) -> None:
        """A new value. From the thread running ``generate()`` (e.g. ``on_step``) or between calls; from
        another thread while ``generate()`` runs it is refused (:class:`~sparse_clt_hf.AlignmentError`)."""
        self._owner._set_steer_value(self.steer, value)

    def remove(self) -> None:
        """Stop this steer (idempotent). With no steer left, the model runs bitwise as without steering."""
        self._owner._remove_steer(self.steer)

    def __enter__(self) -> SteeringHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        s = self.steer
        return (f"SteeringHandle(layer={s.layer}, feature={s.feature}, value={s.value}, mode={s.mode!r}, "
                f"positions={s.to_dict()['positions']!r}, active={self.active})")
