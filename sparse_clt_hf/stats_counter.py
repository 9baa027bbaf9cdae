"""Encode statistics of an attachment: calls, rows, seconds and window flushes.

The capture engine owns one :class:`EncodeStats` per attachment (``clt.stats``) and counts through
:meth:`EncodeStats.timed`; the bench reads ``seconds`` instead of replacing methods at run time.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

T = TypeVar("T")


@dataclass
class EncodeStats:
    """Counters of the encoder calls of one attachment since it was created or :meth:`reset`."""

    encode_calls: int = 0  #: calls of ``encode_sparse`` (one per layer per encode)
    rows: int = 0  #: rows (token positions) encoded, summed over layers
    seconds: float = 0.0  #: wall time inside the encoder calls
    flushes: int = 0  #: decode windows flushed (batched encodes of buffered steps)

    def timed(self, fn: Callable[..., T]) -> Callable[..., T]:
        """``fn`` wrapped so that each call adds one call, its rows (``len`` of the first argument) and
        its wall time to these counters."""

        def wrapper(*args: Any, **kwargs: Any) -> T:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start
                self.encode_calls += 1
                self.rows += int(args[0].shape[0]) if args and hasattr(args[0], "shape") else 0

        return wrapper

    def reset(self) -> None:
        """Set every counter back to zero."""
        self.encode_calls, self.rows, self.seconds, self.flushes = 0, 0, 0.0, 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
