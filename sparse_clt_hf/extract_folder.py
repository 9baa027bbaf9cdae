"""An extraction's output folder: its files, its manifest (read and checked), its lock, its inputs.

- The manifest and shard records are read through :mod:`sparse_clt_hf.io.structured` (bounded, no
  aliases) and every field is checked: damage is an :class:`~sparse_clt_hf.errors.ExtractError` naming
  the file and the field, never a ``KeyError``/``JSONDecodeError``/``AttributeError``.
- A shard's ``file`` must resolve inside the folder (no ``..``, no absolute path, no symlink out).
- One extraction writes into a folder at a time: the main process holds an exclusive lock on
  ``DIR/.lock`` (``fcntl.flock``; released by the OS if the process dies); temporary files carry
  the writer's pid, so even without the lock two writers never share one.
- :func:`input_fingerprints`: what the inputs were (data files: size, mtime and a sampled sha256;
  transcoder and model: a sha256 of sampled weights), recorded in the manifest and compared on resume.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from .errors import ExtractError
from .io.structured import load_json_object

FORMAT = "sparse-clt-hf-extract"
VERSION = 1
MANIFEST = "manifest.json"
SHARDS = "shards"
LOCK = ".lock"
STATUSES = ("running", "failed", "complete")
MAX_MANIFEST_BYTES = 256 << 20
MAX_DOCUMENTS = 1 << 40  # (a manifest claiming more is damaged)
#: bytes hashed per sampled block of a data file, and blocks sampled across its length
SAMPLE_BLOCK, SAMPLE_BLOCKS = 1 << 20, 16
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


# ---------------------------------------------------------------------------- files
def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON under a temporary name unique to this process, then rename it into place."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


def shard_path(directory: Path, index: int) -> Path:
    return directory / SHARDS / f"{index:05d}.safetensors"


def shard_record_path(directory: Path, index: int) -> Path:
    return directory / SHARDS / f"{index:05d}.json"


def read_json_file(path: Path, what: str) -> dict[str, Any]:
    """A JSON object file of the folder, or an :class:`ExtractError` naming it."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ExtractError(f"{what} {path} cannot be read ({exc.strerror or exc})") from None
    return load_json_object(data, f"{what} {path}", error=ExtractError, limit=MAX_MANIFEST_BYTES)


@contextmanager
def folder_lock(out: Path, enabled: bool = True) -> Iterator[None]:
    """Hold ``out/.lock`` exclusively (the main process of an extraction); another holder is an error."""
    if not enabled:
        yield
        return
    try:
        import fcntl
    except ImportError:  # (no flock on this platform: unique temporary names still keep writers apart)
        yield
        return
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "unknown"
            raise ExtractError(
                f"another extraction is writing into {out} (process {holder} holds {out / LOCK}); wait for it to "
                "finish, or use another --out"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


# ---------------------------------------------------------------------------- the manifest
def _fail(path: Path, what: str) -> ExtractError:
    return ExtractError(f"{path}: {what} (damaged or not written by extract); rerun extract into a new folder")


def _is_int(x: Any, low: int = 0) -> bool:
    return type(x) is int and x >= low


def inside(directory: Path, name: Any, where: Path) -> Path:
    """``directory / name`` when ``name`` is a relative path resolving inside ``directory``."""
    if not isinstance(name, str) or not name or "\0" in name or Path(name).is_absolute():
        raise _fail(where, f"shard file {name!r} is not a relative path inside the folder")
    root = directory.resolve()
    path = (directory / name).resolve()
    if path != root and root not in path.parents:
        raise _fail(where, f"shard file {name!r} resolves to {path}, outside the folder {root}")
    return directory / name


def check_shard_record(rec: Any, index: int, directory: Path, where: Path) -> dict[str, Any]:
    """One shard record (in the manifest or ``shards/NNNNN.json``), every field checked."""
    if not isinstance(rec, dict):
        raise _fail(where, f"shard {index} is {type(rec).__name__}, not an object")
    for key, low in (("index", 0), ("windows", 1), ("tokens", 0), ("bytes", 1), ("first_document", 0),
                     ("first_offset", 0), ("last_document", 0)):
        if not _is_int(rec.get(key), low):
            raise _fail(where, f"shard {index} field {key!r} is {rec.get(key)!r}; expected an integer >= {low}")
    if rec["index"] != index:
        raise _fail(where, f"shard {index} says it is shard {rec['index']}")
    if not isinstance(rec.get("sha256"), str) or not _SHA256.match(rec["sha256"]):
        raise _fail(where, f"shard {index} field 'sha256' is {rec.get('sha256')!r}; expected 64 hex digits")
    if "value_range" in rec:
        vr = rec["value_range"]
        if not (isinstance(vr, list) and len(vr) == 2 and all(isinstance(v, (int, float)) for v in vr)
                and vr[0] <= vr[1]):
            raise _fail(where, f"shard {index} field 'value_range' is {vr!r}; expected [low, high]")
    inside(directory, rec.get("file"), where)
    return rec


def check_manifest(manifest: dict[str, Any], directory: Path, path: Path) -> dict[str, Any]:
    """Every field a reader uses, checked: layers, widths, counts, status, shards (inside the folder)."""
    if manifest.get("format") != FORMAT:
        raise ExtractError(f"{path} is not an extraction manifest (format {manifest.get('format')!r})")
    if manifest.get("status") not in STATUSES:
        raise _fail(path, f"'status' is {manifest.get('status')!r}; expected one of {list(STATUSES)}")
    layers, widths = manifest.get("layers"), manifest.get("n_features")
    if not isinstance(layers, list) or not layers or not all(_is_int(x) for x in layers) or layers != sorted(set(layers)):
        raise _fail(path, f"'layers' is {layers!r}; expected increasing layer numbers")
    if not isinstance(widths, list) or len(widths) != len(layers) or not all(_is_int(w, 1) for w in widths):
        raise _fail(path, f"'n_features' is {widths!r}; expected one positive width per layer")
    if not _is_int(manifest.get("top_k"), 1):
        raise _fail(path, f"'top_k' is {manifest.get('top_k')!r}; expected a positive integer")
    if not isinstance(manifest.get("arguments", {}), dict):
        raise _fail(path, "'arguments' is not an object")
    if manifest["status"] == "complete":
        for key in ("n_documents", "n_windows", "n_tokens", "n_shards"):
            if not _is_int(manifest.get(key)):
                raise _fail(path, f"'{key}' is {manifest.get(key)!r}; expected a non-negative integer")
        shards = manifest.get("shards")
        if not isinstance(shards, list) or len(shards) != manifest["n_shards"]:
            raise _fail(path, f"'shards' is not a list of {manifest['n_shards']} shard records")
        if manifest["n_documents"] > MAX_DOCUMENTS:
            raise _fail(path, f"'n_documents' is {manifest['n_documents']}, more than any extraction holds")
        for i, rec in enumerate(shards):
            check_shard_record(rec, i, directory, path)
            if rec["last_document"] >= manifest["n_documents"] or rec["first_document"] > rec["last_document"]:
                raise _fail(path, f"shard {i} names documents past the {manifest['n_documents']} extracted")
        for key, field in (("n_windows", "windows"), ("n_tokens", "tokens"), ("bytes", "bytes")):
            total = sum(rec[field] for rec in shards)
            if manifest.get(key, total) != total:
                raise _fail(path, f"'{key}' is {manifest.get(key)!r} but its shards add up to {total}")
    return manifest


def read_manifest(directory: str | os.PathLike[str], *, complete: bool = True) -> dict[str, Any]:
    """The manifest of an extraction folder, every field checked; raises if missing, damaged or (with
    ``complete``) unfinished or failed."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        raise ExtractError(f"{directory} holds no {MANIFEST}: not an extraction folder")
    manifest = check_manifest(read_json_file(path, "manifest"), directory, path)
    if complete and manifest["status"] != "complete":
        state = ("it failed: " + str(manifest.get("error"))[:500]) if manifest["status"] == "failed" else (
            "it is running or was stopped")
        raise ExtractError(f"the extraction in {directory} is unfinished ({state}); "
                           "rerun the same extract command to resume it")
    return manifest


# ---------------------------------------------------------------------------- what the inputs were
def file_fingerprint(path: Path) -> dict[str, Any]:
    """Size, mtime and a sha256 of sampled blocks (the whole file up to ``SAMPLE_BLOCKS`` MiB)."""
    st = path.stat()
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if st.st_size <= SAMPLE_BLOCK * SAMPLE_BLOCKS:
            h.update(f.read())
        else:
            step = (st.st_size - SAMPLE_BLOCK) // (SAMPLE_BLOCKS - 1)
            for i in range(SAMPLE_BLOCKS):
                f.seek(i * step)
                h.update(f.read(SAMPLE_BLOCK))
    return {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns, "sampled_sha256": h.hexdigest()}


def files_fingerprint(paths: Iterable[tuple[str, Path]]) -> dict[str, Any]:
    return {name: file_fingerprint(p) for name, p in paths}


def tensors_fingerprint(tensors: Iterable[tuple[str, torch.Tensor]], samples: int = 4096) -> str:
    """sha256 over each tensor's name, dtype, shape and ``samples`` evenly strided elements."""
    h = hashlib.sha256()
    for name, t in tensors:
        h.update(f"{name}:{t.dtype}:{list(t.shape)};".encode())
        if t.device.type == "meta" or not t.numel():
            continue
        flat = t.detach().reshape(-1)
        step = max(1, flat.numel() // samples)
        h.update(flat[::step][:samples].cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def transcoder_fingerprint(transcoder: Any) -> str:
    """:func:`tensors_fingerprint` of a (settled) transcoder's encoders, as an extraction's manifest records it."""
    return tensors_fingerprint((f"{layer}.{name}", t) for layer in transcoder.layers
                               for name, t in transcoder.encoder(layer).state_dict().items())


def model_fingerprint(model: Any) -> str:
    """:func:`tensors_fingerprint` of a model's parameters, as an extraction's manifest records it."""
    return tensors_fingerprint(model.named_parameters())


def _same(a: Any, b: Any) -> bool:
    """Fingerprints agree. A file agrees on size and sampled hash, and, when the hash did not cover
    all of it, on mtime too (a touched small file whose bytes are unchanged still agrees)."""
    if isinstance(a, dict) and isinstance(b, dict) and "sampled_sha256" in b:
        full = b.get("bytes", 0) <= SAMPLE_BLOCK * SAMPLE_BLOCKS
        return (a.get("bytes"), a.get("sampled_sha256")) == (b["bytes"], b["sampled_sha256"]) and (
            full or a.get("mtime_ns") == b.get("mtime_ns"))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in b)
    return a == b


def changed_inputs(before: Any, now: dict[str, Any]) -> list[str]:
    """Names of the inputs whose fingerprints differ (inputs an older manifest did not record are skipped)."""
    if not isinstance(before, dict):
        return []
    return [k for k, v in now.items() if k in before and not _same(before[k], v)]


def data_fingerprint(source: Any) -> Any:
    """What a :class:`~sparse_clt_hf.corpus.DataSource` holds now: its file(s) fingerprinted, or a
    ``datasets`` dataset's own fingerprint."""
    if source.kind in ("text", "jsonl"):
        return file_fingerprint(Path(source.path))
    if source.kind == "folder":
        return files_fingerprint((name, Path(source.path) / name) for name in source.files or ())
    return {"datasets_fingerprint": getattr(source._dataset, "_fingerprint", None)}
