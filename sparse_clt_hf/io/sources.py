"""File sources: the files of one transcoder, listed, sized and fetched one at a time.

:class:`LocalSource` reads a folder; :class:`HubSource` a Hub repo (or a sub-folder), downloading one
file per :meth:`~HubSource.fetch` through ``hf_hub_download`` (standard HF cache, progress bars,
``HF_HUB_OFFLINE``) and reading safetensors headers with huggingface_hub's metadata reads (HTTP range
requests), so describing a transcoder never downloads its weights. :meth:`~HubSource.open_range` opens a Hub
file as a seekable file of range requests (an ``.npz``'s zip directory and array headers are read that way).
:func:`read_safetensors_header` is the one local header reader; every header is
``{tensor: TensorInfo(dtype, shape)}``.

Only the public huggingface_hub API is used (0.34 to 2.x). The endpoint is read at call time from
``$HF_ENDPOINT`` (falling back to ``huggingface_hub.constants.ENDPOINT``), so it can change after import.
"""

from __future__ import annotations

import io
import os
import posixpath
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple, Protocol, TypedDict
from urllib.parse import parse_qs, unquote, urlparse

from ..errors import HubAccessError, TranscoderFormatError
from .ranges import RangeFile, hub_range
from .structured import load_json_object


class TensorInfo(NamedTuple):
    """dtype (safetensors name, e.g. ``"F32"``, or numpy's for npz) and shape of one stored tensor."""

    dtype: str
    shape: list[int]


Header = dict[str, TensorInfo]


class ActivationHint(TypedDict, total=False):
    """What the registry records about a release's activation (the authors' code may differ from its files)."""

    activation: str
    k: int


class FileSource(Protocol):
    """Files of one transcoder, relative to its root, fetched lazily."""

    name: str
    #: format named by the registry entry this source came from (None: detect)
    format_hint: str | None
    #: activation (and k) named by the registry entry this source came from
    activation_hint: ActivationHint | None

    def list_files(self) -> list[str]:
        """Relative POSIX paths of every file under the root (recursively)."""

    def exists(self, path: str) -> bool:
        """Whether ``path`` (relative) exists."""

    def fetch(self, path: str) -> Path:
        """A local path to ``path``, downloading it first if needed."""

    def size(self, path: str) -> int | None:
        """Size in bytes of ``path`` without downloading it (None when unknown)."""

    def header(self, path: str) -> Header:
        """Tensors of a safetensors file from its header only (no weights downloaded where possible)."""

    def open_range(self, path: str) -> BinaryIO:
        """``path`` as a seekable binary file that reads only the bytes asked for (range requests on the
        Hub; a download only where the server ignores ranges or downloads are off and the cache has it)."""

    def sub(self, folder: str) -> FileSource:
        """The source rooted at a sub-folder."""

    def resolve_uri(self, uri: str) -> tuple[FileSource, str]:
        """(source, relative file) for a URI found in a config (``hf://...`` or a path)."""


#: Most files a local folder may hold: a transcoder has at most a few thousand; more means a wrong
#: reference (``/``, a home folder), refused after a bounded scan instead of walking the whole disk.
MAX_LOCAL_FILES = 100_000


def _inside(path: str) -> bool:
    """Whether a relative POSIX path stays inside its root once normalised (no ``..`` escape)."""
    norm = posixpath.normpath(path)
    return not (norm == ".." or norm.startswith("../") or norm.startswith("/"))


def _config_uri_error(where: str, uri: str, why: str) -> TranscoderFormatError:
    return TranscoderFormatError(f"{where}: the config names {uri!r}, {why}")


class LocalSource:
    """A transcoder in a local folder.

    A config in the folder may name files inside the folder (relative paths) and ``hf://`` URIs; a path
    outside it (absolute, or escaping with ``..``) is refused unless it lies in one of ``allowed``, the
    folders the caller passes explicitly. The check is on the path as written (symlinks inside the folder,
    as in a Hugging Face cache snapshot, are followed as usual).
    """

    format_hint: str | None = None
    activation_hint: ActivationHint | None = None

    def __init__(self, root: str | Path, *, allowed: tuple[str | Path, ...] | list[str | Path] = ()) -> None:
        try:
            self.root = Path(root).expanduser()
            is_dir = self.root.is_dir()
        except (OSError, ValueError, RuntimeError) as exc:
            raise TranscoderFormatError(f"{str(root)[:200]!r} cannot be opened as a folder ({exc})") from exc
        if not is_dir:
            raise TranscoderFormatError(f"{self.root} is not a folder")
        self.name = str(self.root)
        self.allowed = tuple(Path(os.path.abspath(Path(a).expanduser())) for a in allowed)

    def list_files(self) -> list[str]:
        out: list[str] = []
        for dirpath, _, filenames in os.walk(self.root, followlinks=True):
            rel = Path(dirpath).relative_to(self.root)
            out.extend((rel / f).as_posix() for f in filenames if os.path.isfile(os.path.join(dirpath, f)))
            if len(out) > MAX_LOCAL_FILES:
                raise TranscoderFormatError(
                    f"{self.name} holds more than {MAX_LOCAL_FILES} files: not a transcoder folder "
                    "(point at the folder that holds the transcoder's config and weight files)"
                )
        return sorted(out)

    def exists(self, path: str) -> bool:
        return (self.root / path).is_file()

    def fetch(self, path: str) -> Path:
        full = self.root / path
        if not full.is_file():
            raise TranscoderFormatError(f"{self.name}: missing file {path!r}")
        return full

    def size(self, path: str) -> int | None:
        full = self.root / path
        return full.stat().st_size if full.is_file() else None

    def header(self, path: str) -> Header:
        full = self.root / path
        if not full.is_file():
            raise TranscoderFormatError(f"{self.name}: missing file {path!r}")
        return read_safetensors_header(full, f"{self.name}/{path}")

    def open_range(self, path: str) -> BinaryIO:
        return open(self.fetch(path), "rb")

    def sub(self, folder: str) -> LocalSource:
        return LocalSource(self.root / folder, allowed=self.allowed)

    def resolve_uri(self, uri: str) -> tuple[FileSource, str]:
        if uri.startswith("hf://"):
            self._linked: dict = getattr(self, "_linked", {})
            return open_uri(uri, _repos=self._linked)
        if "://" in uri or "\\" in uri or any(ord(c) < 32 for c in uri):
            raise _config_uri_error(self.name, uri, "which is neither a path nor an hf:// URI")
        if not Path(uri).is_absolute() and _inside(uri):
            full = Path(os.path.normpath(self.root / uri))
            return LocalSource(full.parent, allowed=self.allowed), full.name
        full = Path(os.path.abspath(Path(self.root, uri)))
        if not any(full.is_relative_to(a) for a in self.allowed):
            raise _config_uri_error(
                self.name,
                uri,
                "outside this folder; a config may only point inside its folder or at hf:// URIs. To read it, "
                f"pass the folder explicitly: LocalSource({self.name!r}, allowed=[{str(full.parent)!r}])",
            )
        return LocalSource(full.parent, allowed=self.allowed), full.name


# ---------------------------------------------------------------------------- Hub source
def hub_endpoint() -> str:
    """The Hub endpoint, read now: ``$HF_ENDPOINT`` or huggingface_hub's default."""
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def _offline() -> bool:
    from huggingface_hub import constants

    check = getattr(constants, "is_offline_mode", None)
    return bool(check()) if check else bool(constants.HF_HUB_OFFLINE)


@dataclass
class _Repo:
    """State shared by every HubSource of one (repo, revision): options and the cached file list."""

    repo_id: str
    revision: str | None
    token: str | bool | None
    cache_dir: str | None
    local_files_only: bool
    endpoint: str | None
    files: dict[str, int | None] | None = None
    from_cache: bool = False
    fetched: dict[str, Path] = field(default_factory=dict)  # repo path -> local file, one HEAD per file
    linked: dict[tuple, _Repo] = field(
        default_factory=dict
    )  # repos its hf:// URIs point into (one listing each)

    @property
    def label(self) -> str:
        return self.repo_id + (f"@{self.revision}" if self.revision else "")

    def kwargs(self) -> dict[str, Any]:
        return {"revision": self.revision, "token": self.token, "cache_dir": self.cache_dir}

    def listing(self) -> dict[str, int | None]:
        """path -> size of every file in the repo at this revision (one API call, then cached)."""
        if self.files is None:
            self.files = (
                self._cached_listing() if self.local_files_only or _offline() else self._remote_listing()
            )
        return self.files

    def _remote_listing(self) -> dict[str, int | None]:
        from huggingface_hub import HfApi
        from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

        api = HfApi(endpoint=self.endpoint or hub_endpoint(), token=self.token)
        try:
            items = api.list_repo_tree(self.repo_id, revision=self.revision, recursive=True)
            return {it.path: getattr(it, "size", None) for it in items if hasattr(it, "blob_id")}
        except GatedRepoError as exc:
            raise HubAccessError(
                f"{self.label} is gated: accept its terms on the Hub and pass token= (or log in)"
            ) from exc
        except (RepositoryNotFoundError, RevisionNotFoundError) as exc:
            raise HubAccessError(
                f"Hub repo {self.repo_id!r} or its revision {self.revision or 'main'!r} was not found on "
                f"{api.endpoint} (or it is private: pass token=)"
            ) from exc
        except Exception as exc:  # network down, server error: use the cache when it has this revision
            try:
                return self._cached_listing()
            except HubAccessError:
                raise HubAccessError(
                    f"cannot list the files of {self.label} on {api.endpoint} ({type(exc).__name__}: {exc}) "
                    "and no cached snapshot of this revision exists"
                ) from exc

    def _cached_listing(self) -> dict[str, int | None]:
        from huggingface_hub import snapshot_download

        try:
            root = Path(
                snapshot_download(
                    self.repo_id, revision=self.revision, cache_dir=self.cache_dir, local_files_only=True
                )
            )
        except Exception as exc:
            raise HubAccessError(
                f"{self.label} is not in the local Hub cache and downloads are disabled "
                "(HF_HUB_OFFLINE=1 or local_files_only=True): download it once online first"
            ) from exc
        self.from_cache = True
        return {p.relative_to(root).as_posix(): p.stat().st_size for p in root.rglob("*") if p.is_file()}


class HubSource:
    """Files of a transcoder in a Hub repo (optionally a sub-folder), downloaded one at a time."""

    format_hint: str | None = None
    activation_hint: ActivationHint | None = None

    def __init__(
        self,
        repo_id: str,
        subfolder: str = "",
        *,
        revision: str | None = None,
        token: str | bool | None = None,
        cache_dir: str | Path | None = None,
        local_files_only: bool = False,
        endpoint: str | None = None,
        _repo: _Repo | None = None,
    ) -> None:
        self.repo = _repo or _Repo(
            repo_id,
            revision,
            token,
            None if cache_dir is None else str(cache_dir),
            local_files_only,
            endpoint,
        )
        self.subfolder = subfolder.strip("/")
        self.name = f"{self.repo.repo_id}/{self.subfolder}" if self.subfolder else self.repo.repo_id
        if self.repo.revision:
            self.name += f"@{self.repo.revision}"

    def _full(self, path: str) -> str:
        return f"{self.subfolder}/{path}" if self.subfolder else path

    def list_files(self) -> list[str]:
        prefix = f"{self.subfolder}/" if self.subfolder else ""
        return sorted(p[len(prefix) :] for p in self.repo.listing() if p.startswith(prefix))

    def exists(self, path: str) -> bool:
        return self._full(path) in self.repo.listing()

    def size(self, path: str) -> int | None:
        return self.repo.listing().get(self._full(path))

    def _missing(self, path: str) -> TranscoderFormatError:
        files = self.list_files()
        shown = ", ".join(files[:20]) + (" ..." if len(files) > 20 else "")
        return TranscoderFormatError(f"{self.name}: missing file {path!r}; the repo has [{shown}]")

    def fetch(self, path: str) -> Path:
        """Download ``path`` (or take it from the cache) and return its local path."""
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

        full = self._full(path)
        if full in self.repo.fetched:
            return self.repo.fetched[full]
        if not self.exists(path):
            raise self._missing(path)
        try:
            local = hf_hub_download(
                self.repo.repo_id,
                full,
                # a listing that came from the cache means the Hub is unreachable: do not retry it per file
                local_files_only=self.repo.local_files_only or self.repo.from_cache,
                endpoint=self.repo.endpoint or hub_endpoint(),
                **self.repo.kwargs(),
            )
        except LocalEntryNotFoundError as exc:  # subclass of EntryNotFoundError in some versions
            raise HubAccessError(
                f"{self.name}: {path!r} is not in the local cache and cannot be downloaded now "
                f"(offline, local_files_only or no connection): {exc}"
            ) from exc
        except EntryNotFoundError as exc:
            raise self._missing(path) from exc
        self.repo.fetched[full] = Path(local)
        return Path(local)

    def header(self, path: str) -> Header:
        """Tensor name -> (dtype, shape) of a safetensors file, without downloading its data when possible."""
        from huggingface_hub import HfApi, try_to_load_from_cache

        label = f"{self.name}/{path}"
        cached = try_to_load_from_cache(
            self.repo.repo_id, self._full(path), cache_dir=self.repo.cache_dir, revision=self.repo.revision
        )
        if isinstance(cached, str):
            return read_safetensors_header(Path(cached), label)
        if not self.exists(path):
            raise self._missing(path)
        if not (self.repo.local_files_only or self.repo.from_cache or _offline()):
            api = HfApi(endpoint=self.repo.endpoint or hub_endpoint(), token=self.repo.token)
            try:
                meta = api.parse_safetensors_file_metadata(
                    self.repo.repo_id, self._full(path), revision=self.repo.revision, token=self.repo.token
                )
                return {k: TensorInfo(v.dtype, list(v.shape)) for k, v in meta.tensors.items()}
            except Exception as exc:
                from huggingface_hub.errors import SafetensorsParsingError

                if isinstance(exc, SafetensorsParsingError):
                    raise TranscoderFormatError(f"{label}: not a readable safetensors file ({exc})") from exc
                # server without range requests: fall back to downloading the file
        return read_safetensors_header(self.fetch(path), label)

    def open_range(self, path: str) -> BinaryIO:
        """A seekable file over HTTP range requests (the cached copy when there is one); the file is
        downloaded only when downloads are off (then it must be cached) or the server ignores ``Range``."""
        from huggingface_hub import try_to_load_from_cache

        full = self._full(path)
        cached = try_to_load_from_cache(self.repo.repo_id, full, cache_dir=self.repo.cache_dir, revision=self.repo.revision)
        if isinstance(cached, str):
            return open(cached, "rb")
        if not self.exists(path):
            raise self._missing(path)
        size = self.size(path)
        if size and not (self.repo.local_files_only or self.repo.from_cache or _offline()):
            # the probe reads the zip end record (and usually its directory): one request that also checks ranges
            start = max(size - 1024, 0)
            tail = self._get_range(full, start, size - start)
            if tail is not None and len(tail) == size - start:
                raw = RangeFile(lambda at, n: self._read_range(full, at, n), size, f"{self.name}/{path}", tail)
                return io.BufferedReader(raw, buffer_size=1024)  # a member's local header in one request
        return open(self.fetch(path), "rb")

    def _read_range(self, full: str, start: int, length: int) -> bytes:
        data = self._get_range(full, start, length)
        if data is None:
            raise HubAccessError(f"{self.repo.label}: the server stopped honouring range requests for {full!r}")
        return data

    def _get_range(self, full: str, start: int, length: int) -> bytes | None:
        r = self.repo
        return hub_range(r.repo_id, full, r.revision, r.endpoint or hub_endpoint(), r.token, start, length)

    def sub(self, folder: str) -> HubSource:
        return HubSource(self.repo.repo_id, self._full(folder.strip("/")), _repo=self.repo)

    def resolve_uri(self, uri: str) -> tuple[FileSource, str]:
        if uri.startswith("hf://"):
            return open_uri(
                uri,
                token=self.repo.token,
                cache_dir=self.repo.cache_dir,
                local_files_only=self.repo.local_files_only,
                endpoint=self.repo.endpoint,
                _repos=self.repo.linked,
            )
        full = posixpath.normpath(posixpath.join(self.subfolder, uri))
        if "://" in uri or "\\" in uri or uri.startswith("/") or any(ord(c) < 32 for c in uri) or not _inside(full):
            raise _config_uri_error(
                self.name, uri, "but a Hub repo's config may only name files of the same repo or hf:// URIs"
            )
        folder, _, name = full.rpartition("/")
        return HubSource(self.repo.repo_id, folder, _repo=self.repo), name


def read_safetensors_header(path: Path, label: str | None = None) -> Header:
    """Tensor name -> (dtype, shape) from a local safetensors file, reading only its JSON header."""
    label = label or str(path)
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if not 0 < n <= min(size - 8, 100_000_000):
            raise TranscoderFormatError(
                f"{label}: not a safetensors file (header length {n} does not fit a file of {size} bytes)"
            )
        meta = load_json_object(fh.read(n), f"{label}: safetensors header", error=TranscoderFormatError,
                                limit=100_000_000)
        try:
            out = {k: TensorInfo(v["dtype"], list(v["shape"])) for k, v in meta.items() if k != "__metadata__"}
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
            raise TranscoderFormatError(f"{label}: corrupt safetensors header ({type(exc).__name__}: {exc})") from exc
    for name, info in out.items():
        if not isinstance(info.dtype, str) or not all(type(s) is int and s >= 0 for s in info.shape):
            raise TranscoderFormatError(f"{label}: corrupt safetensors header (tensor {name!r}: {info})")
    return out


# ---------------------------------------------------------------------------- Hub references and URIs
_REPO_PART = r"[A-Za-z0-9][A-Za-z0-9._-]*"
MAX_REPO_PART = 96  # the Hub's limit on a repo id's owner and name
_HUB_REF = re.compile(rf"^(?P<repo>{_REPO_PART}/{_REPO_PART})(?P<sub>(?:/[^@]+)?)(?:@(?P<rev>.+))?$")


@dataclass
class HubRef:
    """A parsed Hub reference: repo, sub-folder (or file, for URIs) and revision."""

    repo_id: str
    path: str = ""
    revision: str | None = None


def parse_hub_ref(ref: str) -> HubRef | None:
    """Parse ``hf://org/repo/path?revision=REV`` or ``org/repo[/sub][@rev]``; None if it is neither."""
    if ref.startswith("hf://"):
        url = urlparse(ref)
        parts = [unquote(p) for p in (url.netloc + url.path).split("/") if p]
        if len(parts) < 2:
            raise TranscoderFormatError(f"{ref!r}: an hf:// URI needs hf://org/repo[/path][?revision=REV]")
        revision = (parse_qs(url.query).get("revision") or [None])[0]
        repo, _, rev_in_name = parts[1].partition("@")
        return HubRef(f"{parts[0]}/{repo}", "/".join(parts[2:]), revision or rev_in_name or None)
    m = _HUB_REF.match(ref)
    if not m:
        return None
    if any(len(part) > MAX_REPO_PART for part in m["repo"].split("/")):
        raise TranscoderFormatError(
            f"{ref[:120]!r}: a Hub repo's owner and name are at most {MAX_REPO_PART} characters each"
        )
    return HubRef(m["repo"], m["sub"].strip("/"), m["rev"])


def open_uri(
    uri: str,
    *,
    token: str | bool | None = None,
    cache_dir: str | Path | None = None,
    local_files_only: bool = False,
    endpoint: str | None = None,
    _repos: dict[tuple, _Repo] | None = None,
) -> tuple[FileSource, str]:
    """(source, file) for ``hf://org/repo/path/file?revision=REV``: the source is the file's folder.

    ``_repos`` shares repo state (file listing, fetched files) between the URIs of one config, so a
    26-layer ``transcoders:`` list into one repo lists that repo once.
    """
    ref = parse_hub_ref(uri)
    if ref is None or not ref.path:
        raise TranscoderFormatError(f"{uri!r} does not name a file (expected hf://org/repo/path/file)")
    folder, _, name = ref.path.rpartition("/")
    key = (ref.repo_id, ref.revision)
    repos = {} if _repos is None else _repos
    if key not in repos:
        cache = None if cache_dir is None else str(cache_dir)
        repos[key] = _Repo(ref.repo_id, ref.revision, token, cache, local_files_only, endpoint)
    return HubSource(ref.repo_id, folder, _repo=repos[key]), name
