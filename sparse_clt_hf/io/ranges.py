"""A read-only, seekable file whose reads are ranged reads (HTTP range requests for a Hub file).

``zipfile`` only seeks and reads, so an ``.npz`` opened through :class:`RangeFile` costs the bytes of its
end record, central directory and, per array read, the member's local header plus the first few KB of
its data (the ``.npy`` header; for a deflated member, the first compressed chunk): describing a
Gemma Scope ``params.npz`` on the Hub transfers kilobytes, not the file.
"""

from __future__ import annotations

import io
from collections.abc import Callable

from ..errors import HubAccessError


class RangeFile(io.RawIOBase):
    """``size`` bytes read on demand through ``read_at(start, length)``; ``tail`` holds the last bytes
    already read (the probe that checked the server honours ranges), served without a request."""

    def __init__(self, read_at: Callable[[int, int], bytes], size: int, name: str, tail: bytes = b"") -> None:
        super().__init__()
        self._read_at, self.size, self.name, self._tail = read_at, size, name, tail
        self._pos = 0
        self.bytes_read = len(tail)  # bytes transferred so far (tests and diagnostics)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.size}[whence]
        if base + offset < 0:
            raise OSError(f"{self.name}: seek to {base + offset} before the start of the file")
        self._pos = base + offset
        return self._pos

    def readinto(self, buf) -> int:  # type: ignore[override]
        n = min(len(buf), self.size - self._pos)
        if n <= 0:
            return 0
        tail_start = self.size - len(self._tail)
        if self._pos >= tail_start:
            data = self._tail[self._pos - tail_start : self._pos - tail_start + n]
        else:
            data = self._read_at(self._pos, n)
            self.bytes_read += len(data)
            if len(data) != n:
                raise OSError(f"{self.name}: asked for {n} bytes at {self._pos}, got {len(data)}")
        buf[:n] = data
        self._pos += n
        return n


def hub_range(
    repo_id: str, path: str, revision: str | None, endpoint: str, token: str | bool | None, start: int, length: int
) -> bytes | None:
    """Bytes ``start:start+length`` of a Hub repo file by one HTTP range request (the auth headers and
    session huggingface_hub uses for downloads); None when the server answers with the whole file instead
    (it ignores ``Range``)."""
    from huggingface_hub import constants, hf_hub_url
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    url = hf_hub_url(repo_id, path, revision=revision, endpoint=endpoint)
    last = start + length - 1
    headers = {**build_hf_headers(token=token), "Range": f"bytes={start}-{last}"}
    try:
        response = get_session().get(url, headers=headers, timeout=getattr(constants, "HF_HUB_DOWNLOAD_TIMEOUT", 10))
        hf_raise_for_status(response)
    except Exception as exc:
        where = repo_id + (f"@{revision}" if revision else "")
        raise HubAccessError(
            f"{where}: cannot read bytes {start}-{last} of {path!r} on {endpoint} ({type(exc).__name__}: {exc})"
        ) from exc
    return response.content if response.status_code == 206 else None
