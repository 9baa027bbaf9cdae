"""Hub access: turn a reference (local folder, ``org/repo[/sub][@rev]``, ``hf://``, registry name)
into a :class:`FileSource` that lists files and fetches single files on demand.

Format loaders only talk to a FileSource, so they read (and download) exactly the files they need.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from .errors import TranscoderFormatError


class FileSource(Protocol):
    """Files of one transcoder, relative to its root, fetched lazily."""

    name: str

    def list_files(self) -> list[str]:
        """Relative POSIX paths of every file under the root (recursively)."""

    def exists(self, path: str) -> bool:
        """Whether ``path`` (relative) exists."""

    def fetch(self, path: str) -> Path:
        """A local path to ``path``, downloading it first if needed."""

    def sub(self, folder: str) -> FileSource:
        """The source rooted at a sub-folder."""

    def resolve_uri(self, uri: str) -> tuple[FileSource, str]:
        """(source, relative file) for a URI found in a config (``hf://...`` or a path)."""


class LocalSource:
    """A transcoder in a local folder."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise TranscoderFormatError(f"{self.root} is not a folder")
        self.name = str(self.root)

    def list_files(self) -> list[str]:
        return sorted(p.relative_to(self.root).as_posix() for p in self.root.rglob("*") if p.is_file())

    def exists(self, path: str) -> bool:
        return (self.root / path).is_file()

    def fetch(self, path: str) -> Path:
        full = self.root / path
        if not full.is_file():
            raise TranscoderFormatError(f"{self.name}: missing file {path!r}")
        return full

    def sub(self, folder: str) -> LocalSource:
        return LocalSource(self.root / folder)

    def resolve_uri(self, uri: str) -> tuple[FileSource, str]:
        if uri.startswith("hf://"):
            src, path = open_uri(uri)
            return src, path
        full = (self.root / uri) if not Path(uri).is_absolute() else Path(uri)
        return LocalSource(full.parent), full.name


def open_uri(uri: str) -> tuple[FileSource, str]:
    """(source, file) for ``hf://org/repo/path/file?revision=REV``."""
    raise NotImplementedError("hf:// URIs need the Hub module (not yet implemented)")


def open_source(
    ref: str | Path,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | Path | None = None,
    local_files_only: bool = False,
) -> FileSource:
    """A FileSource for a local folder (Hub references come with the Hub module)."""
    path = Path(ref).expanduser()
    if path.is_dir():
        return LocalSource(path)
    raise TranscoderFormatError(f"{ref!r} is not a local folder (Hub references are not supported yet)")


def push_to_hub(tc, repo_id: str, **kwargs) -> str:  # pragma: no cover - replaced by the Hub module
    raise NotImplementedError("push_to_hub is not implemented yet")
