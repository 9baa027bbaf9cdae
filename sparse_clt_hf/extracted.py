"""Reading an extraction back: shards memory-mapped, one row per document (:func:`load_extracted`)."""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import torch

from .errors import ExtractError
from .extract_folder import FORMAT, inside, read_manifest, sha256_file
from .features import Features
from .io.structured import load_json_object

# ---------------------------------------------------------------------------- reading
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}
MAX_HEADER_BYTES = 100_000_000  # (safetensors' own limit)
#: the tensors of a shard and the kind of dtype each must have
_KINDS = {"indices": "integer", "values": "floating-point", "l0": "integer", "mask": "bool", "token_ids": "integer",
          "documents": "integer", "offsets": "integer", "lengths": "integer"}


def _kind(dtype: torch.dtype) -> str:
    return "bool" if dtype == torch.bool else "floating-point" if dtype.is_floating_point else "integer"


def _mmap_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors of a safetensors file backed by a copy-on-write memory map (pages are read on use). Every
    size read from the file is checked against the file's size before anything is allocated."""

    def bad(what: str) -> ExtractError:
        return ExtractError(f"shard {path}: {what} (damaged); rerun extract to redo it")

    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if not 0 < n <= min(size - 8, MAX_HEADER_BYTES):
            raise bad(f"header length {n} does not fit a file of {size} bytes")
        header = load_json_object(f.read(n), f"shard {path} header", error=ExtractError)
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size > 8 + n else None
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise bad("its metadata is not a map of strings")
    tensors = {}
    for name, info in header.items():
        if not isinstance(info, dict) or info.get("dtype") not in _DTYPES:
            raise bad(f"tensor {name!r} has dtype {info.get('dtype') if isinstance(info, dict) else info!r}")
        dtype, shape, offsets = _DTYPES[info["dtype"]], info.get("shape"), info.get("data_offsets")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise bad(f"tensor {name!r} has shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
            raise bad(f"tensor {name!r} has data offsets {offsets!r}")
        b, e = offsets
        numel = math.prod(shape)
        if not 0 <= b <= e <= size - 8 - n or e - b != numel * dtype.itemsize:
            raise bad(f"tensor {name!r} ({numel} x {dtype}) does not fit its offsets {offsets} in the file")
        if numel == 0:
            tensors[name] = torch.empty(shape, dtype=dtype)
        else:
            tensors[name] = torch.frombuffer(buf, dtype=dtype, count=numel, offset=8 + n + b).view(shape)
    return tensors, meta


def _check_shard(path: Path, t: dict[str, torch.Tensor], meta: dict[str, str], rec: dict, manifest: dict) -> None:
    """Cheap checks of a shard against its record and the manifest (one pass over the values, no hash):
    tensors, dtypes and shapes; feature ids in [-1, width); values finite and within the range recorded
    at write time; mask, lengths, token ids, documents and offsets consistent with each other."""

    def bad(what: str) -> ExtractError:
        return ExtractError(f"shard {path}: {what} (damaged); rerun extract to redo it, or read with verify=True "
                            "to check its hash")

    layers, widths, k, w = manifest["layers"], manifest["n_features"], manifest["top_k"], rec["windows"]
    expected_meta = json.dumps({"layers": layers, "n_features": widths})
    if meta.get(FORMAT) != expected_meta:
        raise bad(f"its metadata {str(meta.get(FORMAT))[:200]!r} does not match the manifest ({expected_meta})")
    missing = sorted(set(_KINDS) - set(t))
    if missing:
        raise bad(f"tensors {missing} are missing")
    for name, kind in _KINDS.items():
        if _kind(t[name].dtype) != kind:
            raise bad(f"{name!r} is {t[name].dtype}; expected {kind}")
    idx = t["indices"]
    s = idx.shape[1] if idx.ndim == 4 else -1
    shapes = {"indices": (w, s, len(layers), k), "values": (w, s, len(layers), k), "l0": (w, s, len(layers)),
              "mask": (w, s), "token_ids": (w, s), "documents": (w,), "offsets": (w,), "lengths": (w,)}
    for name, shape in shapes.items():
        if tuple(t[name].shape) != shape:
            raise bad(f"{name!r} has shape {list(t[name].shape)}; expected {list(shape)} ({w} windows, "
                      f"{len(layers)} layers, top-k {k})")
    mask, lengths, tokens, docs, offs = t["mask"], t["lengths"], t["token_ids"], t["documents"], t["offsets"]
    if not torch.equal(mask, torch.arange(s)[None, :] < lengths[:, None]) or int(lengths.sum()) != rec["tokens"]:
        raise bad(f"its mask and lengths disagree with each other or with the record's {rec['tokens']} tokens")
    if bool(((tokens >= 0) != mask).any()):
        raise bad("its token ids are -1 inside a window or set on padding")
    for i, (layer, width) in enumerate(zip(layers, widths)):
        ids = idx[:, :, i]
        if ids.numel() and (int(ids.min()) < -1 or int(ids.max()) >= width):
            raise bad(f"layer {layer} holds feature ids in [{int(ids.min())}, {int(ids.max())}]; expected -1 or "
                      f"[0, {width})")
    values = t["values"]
    if not bool(values.isfinite().all()):
        raise bad("its values are not all finite")
    lo, hi = rec.get("value_range", (-math.inf, math.inf))
    if values.numel() and (float(values.min()) < lo or float(values.max()) > hi):
        raise bad(f"its values span [{float(values.min()):.6g}, {float(values.max()):.6g}], outside the "
                  f"[{lo:.6g}, {hi:.6g}] recorded when it was written")
    if bool((t["l0"] < 0).any()) or bool(((idx >= 0).any(-1).any(-1) & ~mask).any()):
        raise bad("its l0 counts are negative or features are set on padding")
    same = docs[1:] == docs[:-1]  # a window continues its document where the one before ended; a new one starts at 0
    follows = torch.where(same, offs[1:] == offs[:-1] + lengths[:-1], offs[1:] == 0)
    if (int(docs[0]) != rec["first_document"] or int(docs[-1]) != rec["last_document"] or bool((docs[1:] < docs[:-1]).any())
            or int(offs[0]) != rec["first_offset"] or not bool(follows.all()) or bool((lengths < 1).any())):
        raise bad("its documents, offsets and lengths disagree with each other or with the record")


class ExtractedShard(NamedTuple):
    """One shard: ``features`` (rows = windows), each row's ``documents`` id and ``offsets`` (the
    document position of the row's first token; position ``t`` of row ``r`` is document position
    ``offsets[r] + t``)."""

    index: int
    features: Features
    documents: torch.Tensor
    offsets: torch.Tensor


def iter_extracted(directory: str | os.PathLike[str], *, verify: bool = False) -> Iterator[ExtractedShard]:
    """The shards of an extraction, in order, each memory-mapped (for outputs larger than memory).

    Every shard is checked cheaply (size, header, dtypes, shapes, feature ids < width, values finite and
    within the range recorded at write time, mask/lengths/documents consistent); ``verify`` also checks
    its sha256 against the manifest (reads every byte). Damage is an :class:`ExtractError` naming the shard."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    layers, widths = manifest["layers"], manifest["n_features"]
    for rec in manifest["shards"]:
        path = inside(directory, rec["file"], directory / "manifest.json")
        if not path.is_file() or path.stat().st_size != rec["bytes"] or (verify and sha256_file(path) != rec["sha256"]):
            raise ExtractError(f"shard {path} is missing or does not match the manifest: rerun extract to redo it")
        t, meta = _mmap_safetensors(path)
        _check_shard(path, t, meta, rec, manifest)
        feats = Features(t["indices"], t["values"], t["l0"], t["mask"], list(layers), t["token_ids"], list(widths))
        yield ExtractedShard(rec["index"], feats, t["documents"], t["offsets"])


def load_extracted(directory: str | os.PathLike[str], *, verify: bool = False) -> Features:
    """All features of an extraction: one batch row per document, in input order, right-padded to the
    longest document (``mask`` False on padding), ``token_ids`` kept. A document without tokens is a
    row with an all-False mask. With one shard whose rows are whole documents in order, the tensors
    are the memory-mapped shard itself; otherwise the rows are assembled in memory (use
    :func:`iter_extracted` for outputs larger than memory)."""
    manifest = read_manifest(directory)
    n_docs = int(manifest["n_documents"])
    shards = list(iter_extracted(directory, verify=verify))
    doc_len = torch.zeros(n_docs, dtype=torch.int64)
    for s in shards:
        ends = s.offsets + s.features.mask.sum(1)
        doc_len.scatter_reduce_(0, s.documents, ends, reduce="amax")
    if len(shards) == 1:
        s = shards[0]
        if len(s.documents) == n_docs and torch.equal(s.documents, torch.arange(n_docs)) and not s.offsets.any():
            return s.features
    if not shards:
        raise ExtractError(f"{directory} holds no shards (no document had any token)")
    f0 = shards[0].features
    t_max = int(doc_len.max()) if n_docs else 0
    n_layers, k = f0.indices.shape[2], f0.indices.shape[3]
    try:
        indices = torch.full((n_docs, t_max, n_layers, k), -1, dtype=f0.indices.dtype)
        values = torch.zeros((n_docs, t_max, n_layers, k), dtype=f0.values.dtype)
        l0 = torch.zeros((n_docs, t_max, n_layers), dtype=f0.l0.dtype)
        mask = torch.zeros((n_docs, t_max), dtype=torch.bool)
        tokens = torch.full((n_docs, t_max), -1, dtype=f0.token_ids.dtype)
    except (RuntimeError, MemoryError) as exc:
        raise ExtractError(f"{directory}: {n_docs} documents of up to {t_max} tokens do not fit in memory "
                           f"({exc}); read it shard by shard with iter_extracted") from None
    for s in shards:
        f = s.features
        w, t = f.mask.nonzero(as_tuple=True)
        d, p = s.documents[w], s.offsets[w] + t
        indices[d, p] = f.indices[w, t]
        values[d, p] = f.values[w, t]
        l0[d, p] = f.l0[w, t]
        mask[d, p] = True
        tokens[d, p] = f.token_ids[w, t]
    return Features(indices, values, l0, mask, list(manifest["layers"]), tokens, list(manifest["n_features"]))
