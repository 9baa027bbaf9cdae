"""Hub access: turn a reference (local folder, ``org/repo[/sub][@rev]``, ``hf://``, registry name)
into a :class:`FileSource` that lists files and fetches single files on demand.

Format loaders only talk to a FileSource, so they read (and download) exactly the files they need:
:class:`HubSource` downloads one file per :meth:`~HubSource.fetch` through ``hf_hub_download`` (standard
HF cache, progress bars, ``HF_HUB_OFFLINE``), and reads safetensors headers with HTTP range requests.
This module also holds :func:`describe` (sizes, layers, site without reading weights),
:func:`check_before_download`, :func:`push_to_hub` and the ``inspect``/``convert``/``push`` commands.

Only the public huggingface_hub API is used (0.34 to 2.x). The endpoint is read at call time from
``$HF_ENDPOINT`` (falling back to ``huggingface_hub.constants.ENDPOINT``), so it can change after import.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import struct
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import parse_qs, unquote, urlparse

from .errors import HubAccessError, IncompatibleTranscoderError, TranscoderFormatError

if TYPE_CHECKING:
    from .transcoder import CrossLayerTranscoder


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

    format_hint: str | None = None
    activation_hint: dict[str, Any] | None = None  # registry {activation, k}: see formats.load_transcoder

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

    def size(self, path: str) -> int | None:
        full = self.root / path
        return full.stat().st_size if full.is_file() else None

    def header(self, path: str) -> dict[str, tuple[str, list[int]]]:
        return read_safetensors_header(self.fetch(path), f"{self.name}/{path}")

    def sub(self, folder: str) -> LocalSource:
        return LocalSource(self.root / folder)

    def resolve_uri(self, uri: str) -> tuple[FileSource, str]:
        if uri.startswith("hf://"):
            self._linked: dict = getattr(self, "_linked", {})
            return open_uri(uri, _repos=self._linked)
        full = (self.root / uri) if not Path(uri).is_absolute() else Path(uri)
        return LocalSource(full.parent), full.name


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
    activation_hint: dict[str, Any] | None = None  # registry {activation, k}: see formats.load_transcoder

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

    def header(self, path: str) -> dict[str, tuple[str, list[int]]]:
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
                return {k: (v.dtype, list(v.shape)) for k, v in meta.tensors.items()}
            except Exception as exc:
                from huggingface_hub.errors import SafetensorsParsingError

                if isinstance(exc, SafetensorsParsingError):
                    raise TranscoderFormatError(f"{label}: not a readable safetensors file ({exc})") from exc
                # server without range requests: fall back to downloading the file
        return read_safetensors_header(self.fetch(path), label)

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
        if Path(uri).is_absolute():
            return LocalSource(Path(uri).parent), Path(uri).name
        return self, uri


def read_safetensors_header(path: Path, label: str | None = None) -> dict[str, tuple[str, list[int]]]:
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
        try:
            meta = json.loads(fh.read(n))
            return {k: (v["dtype"], list(v["shape"])) for k, v in meta.items() if k != "__metadata__"}
        except (ValueError, KeyError, TypeError) as exc:
            raise TranscoderFormatError(f"{label}: corrupt safetensors header ({exc})") from exc


def tensor_shapes(source: FileSource, path: str) -> dict[str, tuple[str, list[int]]]:
    """Tensor name -> (dtype, shape) of a safetensors file of any source (headers only where possible)."""
    header = getattr(source, "header", None)
    if header is not None:
        return header(path)
    return read_safetensors_header(source.fetch(path), f"{source.name}/{path}")


def file_size(source: FileSource, path: str) -> int | None:
    """Size in bytes of a file of ``source`` without downloading it (None when unknown)."""
    size = getattr(source, "size", None)
    return size(path) if size is not None else None


# ---------------------------------------------------------------------------- references
_REPO_PART = r"[A-Za-z0-9][A-Za-z0-9._-]*"
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


def open_source(
    ref: str | Path,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | Path | None = None,
    local_files_only: bool = False,
) -> FileSource:
    """A FileSource for a registry name, a local folder, ``hf://org/repo/path`` or ``org/repo[/sub][@rev]``.

    Registry names win; their ``subfolder``/``revision``/``format`` are used (an explicit ``revision``
    overrides the registry's). The returned source has ``format_hint`` set when the registry names one,
    and ``activation_hint`` when it records the activation (and k) the authors' code uses.
    """
    from . import registry

    text = str(ref)
    entry = registry.get_entry(text) if isinstance(ref, str) else None
    if entry is not None:
        src = HubSource(
            entry.repo_id,
            entry.subfolder or "",
            revision=revision or entry.revision,
            token=token,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
        )
        src.format_hint = entry.format
        hint = {key: value for key, value in (("activation", entry.activation), ("k", entry.k)) if value is not None}
        src.activation_hint = hint or None
        return src
    path = Path(text).expanduser()
    if path.is_dir():
        return LocalSource(path)
    if text.startswith(("/", "./", "../", "~")) or (path.exists() and not path.is_dir()):
        raise TranscoderFormatError(
            f"{text!r} is not a folder (a transcoder reference must be a folder or repo)"
        )
    parsed = parse_hub_ref(text)
    if parsed is None:
        known = ", ".join(registry.names()[:12])
        raise TranscoderFormatError(
            f"{text!r} is not a local folder, an org/repo[/subfolder][@revision] reference, an hf:// URI "
            f"or a registry name (known names include: {known})"
        )
    return HubSource(
        parsed.repo_id,
        parsed.path,
        revision=revision or parsed.revision,
        token=token,
        cache_dir=cache_dir,
        local_files_only=local_files_only,
    )


# ---------------------------------------------------------------------------- describe
@dataclass
class Description:
    """What a transcoder is, read from configs and safetensors headers only (no weights)."""

    name: str
    format: str
    kind: str
    layers: list[int]
    n_features: list[int]
    d_model: int | None
    activation: str
    input_site: str
    output_site: str | None = None
    input_transform: str = "none"
    k: int | None = None
    model_name: str | None = None
    n_layers: int | None = None
    dtype: str | None = None
    encoder_bytes: int | None = None
    decoder_bytes: int | None = None
    total_bytes: int | None = None
    has_decoders: bool = False
    has_skip: bool = False
    metrics: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_format_dict(cls, name: str, fmt: str, data: dict[str, Any]) -> Description:
        """Adapt the dict a format module's ``describe`` returns (see ``formats._common.describe_dict``)."""
        data = dict(data)
        layers = [int(x) for x in data.pop("layers", [])]
        widths = data.pop("n_features", None)
        if not isinstance(widths, list):
            widths = [widths] * len(layers) if widths is not None else []
        known = {f for f in cls.__dataclass_fields__} - {"name", "format", "layers", "n_features", "extra"}
        kwargs = {k: data.pop(k) for k in list(data) if k in known}
        kwargs.setdefault("input_site", data.pop("site", None) or "?")
        kwargs.setdefault("activation", kwargs.get("activation") or "?")
        kwargs.setdefault("kind", "clt" if (data.get("span") or 1) != 1 else "plt")
        kwargs.setdefault("d_model", None)
        data.pop("format", None)
        return cls(name=name, format=fmt, layers=layers, n_features=widths, extra=data, **kwargs)


_ST_DTYPES = {
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "F64": "float64",
    "F8_E4M3": "float8_e4m3fn",
}


def _sum_sizes(source: FileSource, files: list[str]) -> int | None:
    sizes = [file_size(source, f) for f in files]
    return None if any(s is None for s in sizes) else sum(sizes)  # type: ignore[misc]


def describe_circuit_tracer(source: FileSource) -> Description:
    """Describe a circuit-tracer CLT/PLT from config.yaml and the encoder files' headers only."""
    from .formats import circuit_tracer as ct

    cfg = ct.read_config(source) or {}
    kind = cfg.get("model_kind")
    files = source.list_files()
    if kind == ct.CLT_KIND:
        layers = sorted(int(m.group(1)) for f in files if (m := ct._CLT_FILE.match(f)))
        targets = [(source, f"W_enc_{i}.safetensors", f"W_enc_{i}", f"threshold_{i}") for i in layers]
        dec_files = [f for f in files if re.match(r"^W_dec_\d+\.safetensors$", f)]
        skip = False
    else:
        resolved = ct._plt_files(source, cfg)
        layers = sorted(resolved)
        targets = [(*resolved[i], "W_enc", "activation_function.threshold") for i in layers]
        dec_files = []
        skip = False
    if not layers:
        raise TranscoderFormatError(f"{source.name}: config.yaml found but no per-layer weight files")
    widths, d_model, dtype, thresholds, notes = [], None, None, [], []
    for src, fname, w_name, thr_name in targets:
        if not fname.endswith(".safetensors"):
            notes.append(f"layer files are {Path(fname).suffix} (widths read from the first file)")
            from .transcoder import dtype_name

            enc = _first_foreign_encoder(src, fname)
            widths += [enc.n_features] * (len(layers) - len(widths))
            d_model, dtype = enc.d_model, dtype_name(enc.W_enc.dtype)
            thresholds.append(enc.threshold is not None)
            break
        header = tensor_shapes(src, fname)
        if w_name not in header:
            raise TranscoderFormatError(
                f"{src.name}/{fname}: missing tensor {w_name!r}; found {sorted(header)}"
            )
        st_dtype, shape = header[w_name]
        if len(shape) != 2:
            raise TranscoderFormatError(f"{src.name}/{fname}: {w_name} has shape {shape}; expected [m, d]")
        widths.append(shape[0])
        d_model, dtype = shape[1], _ST_DTYPES.get(st_dtype, st_dtype)
        thresholds.append(thr_name in header)
        skip = skip or "W_skip" in header
        if kind != ct.CLT_KIND and "W_dec" in header:
            dec_files.append(fname)
    site, transform = ct._site(cfg)
    out_hook = cfg.get("feature_output_hook")
    activation = cfg.get("activation") or ("jumprelu" if thresholds and all(thresholds) else "relu")
    enc_files = [t[1] for t in targets if t[0] is source]
    return Description(
        name=source.name,
        format=ct.NAME,
        kind="clt" if kind == ct.CLT_KIND else "plt",
        layers=layers,
        n_features=widths,
        d_model=d_model,
        activation=activation,
        k=cfg.get("k"),
        input_site=site,
        output_site=cfg.get("output_site")
        or (ct.site_from_transformerlens(out_hook)[0] if out_hook else None),
        input_transform=transform,
        model_name=cfg.get("model_name"),
        n_layers=cfg.get("n_layers") or (len(layers) if kind == ct.CLT_KIND else None),
        dtype=dtype,
        encoder_bytes=_sum_sizes(source, enc_files) if enc_files else None,
        decoder_bytes=_sum_sizes(source, dec_files) if kind == ct.CLT_KIND else None,
        total_bytes=_sum_sizes(source, files),
        has_decoders=bool(dec_files),
        has_skip=skip,
        metrics=dict(cfg.get("metrics") or {}),
        notes=notes,
    )


def _first_foreign_encoder(src: FileSource, fname: str):
    """Encoder of one non-safetensors layer file (e.g. Gemma Scope params.npz), via its format module."""
    from .formats import format_module

    return format_module("gemma_scope").load_layer_file(src, fname, False)


# Formats whose module has no describe() of its own yet.
_DESCRIBERS = {"circuit_tracer": describe_circuit_tracer}


def describe(source: FileSource, format: str | None = None, variant: str | None = None) -> Description:
    """Describe ``source`` without loading weights where its format allows (else from its encoders).

    ``variant`` picks one of several transcoders per layer (e.g. a Gemma Scope L0 folder)."""
    from .formats import detect_format, format_module, hinted_activation

    name = format or getattr(source, "format_hint", None) or detect_format(source)
    module = format_module(name)
    fn = getattr(module, "describe", None) or _DESCRIBERS.get(name)
    if fn is not None:
        desc = fn(source, variant=variant) if variant is not None else fn(source)
        desc = Description.from_format_dict(source.name, name, desc) if isinstance(desc, dict) else desc
        hint = getattr(source, "activation_hint", None)
        hinted = hinted_activation(hint, desc.activation, desc.k) if hint else None
        if hinted is not None and hinted != (desc.activation, desc.k):
            desc.activation, desc.k = hinted
            desc.notes.append("activation and k from the registry (what the authors' code runs)")
        return desc
    from .formats import load_transcoder

    tc = load_transcoder(source, format=name, **({"variant": variant} if variant else {}))
    return _describe_loaded(
        tc, source.name, name, ["read from the encoder weights (format has no describe())"]
    )


def _describe_loaded(tc: CrossLayerTranscoder, name: str, fmt: str, notes: list[str]) -> Description:
    c = tc.config
    return Description(
        name=name,
        format=fmt,
        kind="plt" if c.is_plt else "clt",
        layers=list(c.layers),
        n_features=list(c.n_features),
        d_model=c.d_model,
        activation=c.activation,
        k=c.k,
        input_site=c.input_site,
        output_site=c.output_site,
        input_transform=c.input_transform,
        model_name=c.model_name,
        n_layers=c.n_layers,
        dtype=c.dtype,
        has_decoders=tc.has_decoders(),
        metrics=dict(c.metrics),
        notes=notes,
    )


def check_before_download(
    source: FileSource,
    model: Any,
    layers: list[int] | None = None,
    format: str | None = None,
    warn_model_name: bool = True,
) -> Description:
    """Check that ``source`` fits ``model`` (width, layer ids, model name) before downloading weights.

    Raises IncompatibleTranscoderError for a width or layer mismatch and warns on a model-name mismatch.
    """
    from .transcoder import TranscoderConfig, check_compatible

    desc = describe(source, format=format)
    from .sites import model_dims

    d_model, depth, model_name = model_dims(model)
    chosen = list(desc.layers)
    if layers is not None:
        missing = sorted(set(int(x) for x in layers) - set(desc.layers))
        if missing:
            raise IncompatibleTranscoderError(
                f"{desc.name}: no encoders for layers {missing}; the transcoder has layers {desc.layers}"
            )
        chosen = sorted(set(int(x) for x in layers))
    widths = dict(zip(desc.layers, desc.n_features))
    cfg = TranscoderConfig(
        d_model=int(desc.d_model or d_model),
        layers=chosen,
        n_features=[widths[i] for i in chosen],
        model_name=desc.model_name,
    )
    check_compatible(cfg, d_model, depth, model_name if warn_model_name else None)
    return desc


# ---------------------------------------------------------------------------- sharing
def push_folder(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | bool | None = None,
    license: str | None = None,
) -> str:
    """Upload a native transcoder folder to ``repo_id`` in one commit; returns the commit URL.

    A model card README.md is generated (from :func:`describe`) when the folder has none; the folder
    itself is never modified. ``revision`` names a branch, created from main when missing.
    """
    from huggingface_hub import CommitOperationAdd, HfApi

    from .model_card import model_card_text

    folder = Path(folder)
    desc = describe(LocalSource(folder), format="circuit_tracer")
    files = [p for p in sorted(folder.rglob("*")) if p.is_file() and not _hidden(p.relative_to(folder))]
    ops = [CommitOperationAdd(p.relative_to(folder).as_posix(), str(p)) for p in files]
    if not (folder / "README.md").exists():
        card = model_card_text(desc, repo_id, license=license)
        ops.append(CommitOperationAdd("README.md", card.encode()))
    api = HfApi(endpoint=hub_endpoint(), token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    if revision and revision != "main":
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    info = api.create_commit(
        repo_id,
        operations=ops,
        revision=revision,
        commit_message=commit_message or f"Upload {desc.kind.upper()} transcoder with sparse-clt-hf",
    )
    return str(getattr(info, "commit_url", info))


def _hidden(rel: Path) -> bool:
    return any(part.startswith(".") for part in rel.parts)


def push_to_hub(
    tc: CrossLayerTranscoder,
    repo_id: str,
    *,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | bool | None = None,
    license: str | None = None,
) -> str:
    """Save ``tc`` in the native layout with a model card and upload it to ``repo_id``; the commit URL."""
    with tempfile.TemporaryDirectory(prefix="sparse-clt-push-") as tmp:
        tc.save_pretrained(tmp)
        return push_folder(
            tmp,
            repo_id,
            private=private,
            revision=revision,
            commit_message=commit_message,
            token=token,
            license=license,
        )


# ---------------------------------------------------------------------------- CLI
def _layers_arg(text: str | None) -> list[int] | None:
    if not text:
        return None
    out: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out += list(range(int(lo), int(hi) + 1)) if hi else [int(lo)]
    return out


def _add_ref_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--format", default=None, help="format name (default: detected)")
    parser.add_argument(
        "--variant", default=None, help="which transcoder per layer, e.g. a Gemma Scope L0 folder"
    )
    parser.add_argument("--revision", default=None, help="Hub branch, tag or commit")
    parser.add_argument("--cache-dir", default=None, help="Hub cache folder (default: the standard HF cache)")
    parser.add_argument("--local-files-only", action="store_true", help="use the cache only, never download")


def _open(args: argparse.Namespace) -> FileSource:
    return open_source(
        args.ref if hasattr(args, "ref") else args.src,
        revision=args.revision,
        cache_dir=args.cache_dir,
        local_files_only=args.local_files_only,
    )


def add_inspect_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("ref", help="folder, org/repo[/sub][@rev], hf:// URI or registry name")
    _add_ref_options(parser)


def _human(n: int | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def run_inspect(args: argparse.Namespace) -> int:
    desc = describe(_open(args), format=args.format, variant=args.variant)
    if args.json:
        print(json.dumps(desc.to_dict(), indent=2))
        return 0
    widths = sorted(set(desc.n_features))
    rows = [
        ("name", desc.name),
        ("format", f"{desc.format} ({desc.kind.upper()})"),
        ("model", desc.model_name or "?"),
        ("layers", f"{len(desc.layers)}: {desc.layers[0]}..{desc.layers[-1]}"),
        ("width", ", ".join(map(str, widths)) + " features per layer"),
        ("d_model", desc.d_model),
        ("site", desc.input_site + ("" if desc.input_transform == "none" else f" ({desc.input_transform})")),
        ("activation", desc.activation + (f" (k={desc.k})" if desc.k else "")),
        ("dtype", desc.dtype or "?"),
        ("encoders", _human(desc.encoder_bytes)),
        ("decoders", _human(desc.decoder_bytes) if desc.has_decoders else "none"),
        ("size on disk", _human(desc.total_bytes)),
    ]
    for key, value in rows:
        print(f"{key:>13}  {value}")
    for note in desc.notes:
        print(f"{'note':>13}  {note}")
    return 0


def add_convert_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="folder, org/repo[/sub][@rev], hf:// URI or registry name")
    parser.add_argument("dst", help="output folder (native circuit-tracer layout)")
    parser.add_argument("--layers", default=None, help="layers to keep, e.g. 0-3,7 (default: all)")
    parser.add_argument("--encoders-only", action="store_true", help="skip decoders (much smaller output)")
    _add_ref_options(parser)


def run_convert(args: argparse.Namespace) -> int:
    from .formats import load_transcoder

    src = _open(args)
    tc = load_transcoder(
        src,
        layers=_layers_arg(args.layers),
        format=args.format or getattr(src, "format_hint", None),
        decoders=not args.encoders_only,
        **({"variant": args.variant} if args.variant else {}),
    )
    out = tc.save_pretrained(args.dst)
    if args.json:
        print(json.dumps({"dst": str(out), "layers": tc.layers, "format": tc.config.source_format}))
    else:
        print(f"wrote {len(tc.layers)} layers ({tc.config.source_format} -> native) to {out}")
    return 0


def add_push_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", help="native transcoder folder (see `convert`)")
    parser.add_argument("repo", help="Hub repo id, org/name")
    parser.add_argument("--private", action="store_true", help="create the repo as private")
    parser.add_argument("--revision", default=None, help="branch to push to (created if missing)")
    parser.add_argument("--commit-message", default=None)
    parser.add_argument("--license", default=None, help="license for the model card metadata")


def run_push(args: argparse.Namespace) -> int:
    url = push_folder(
        args.dir,
        args.repo,
        private=args.private or None,
        revision=args.revision,
        commit_message=args.commit_message,
        license=args.license,
    )
    print(json.dumps({"repo": args.repo, "commit_url": url}) if args.json else f"pushed to {url}")
    return 0
