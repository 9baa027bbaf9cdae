"""Counters of the encode work an attachment did (users read them as ``clt.stats``; the bench too)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class CaptureStats:
    """Encode work since attach or the last :meth:`clear`.

    ``encode_calls``: calls of the encode kernel (one per layer per encoded batch of rows);
    ``rows``: token rows encoded, all layers together; ``seconds``: wall time spent encoding
    (host time: on a GPU it includes only the launch unless something synchronised);
    ``flushes``: decode-buffer windows encoded.
    """

    encode_calls: int = 0
    rows: int = 0
    seconds: float = 0.0
    flushes: int = 0

    def clear(self) -> None:
        self.encode_calls = self.rows = self.flushes = 0
        self.seconds = 0.0
