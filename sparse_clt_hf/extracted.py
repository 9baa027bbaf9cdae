"""Reading an extraction back: shards memory-mapped, one row per document (:func:`load_extracted`)."""

from __future__ import annotations

import json
import mmap
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import torch

from .errors import ExtractError
from .extract import _sha256, read_manifest
from .features import Features

# ---------------------------------------------------------------------------- reading
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


def _mmap_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors of a safetensors file backed by a copy-on-write memory map (pages are read on use)."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        size = os.fstat(f.fileno()).st_size
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size > 8 + n else None
    meta = header.pop("__metadata__", {}) or {}
    tensors = {}
    for name, info in header.items():
        dtype = _DTYPES[info["dtype"]]
        b, e = info["data_offsets"]
        shape = info["shape"]
        numel = 1
        for d in shape:
            numel *= d
        if numel == 0:
            tensors[name] = torch.empty(shape, dtype=dtype)
        else:
            tensors[name] = torch.frombuffer(buf, dtype=dtype, count=numel, offset=8 + n + b).view(shape)
    return tensors, meta


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
    ``verify`` checks each shard's sha256 against the manifest first."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    layers, widths = manifest["layers"], manifest["n_features"]
    for rec in manifest["shards"]:
        path = directory / rec["file"]
        if not path.is_file() or path.stat().st_size != rec["bytes"] or (verify and _sha256(path) != rec["sha256"]):
            raise ExtractError(f"shard {path} is missing or does not match the manifest: rerun extract to redo it")
        t, _ = _mmap_safetensors(path)
        feats = Features(t["indices"], t["values"], t["l0"], t["mask"], list(layers), t["token_ids"], list(widths))
        yield ExtractedShard(rec["index"], feats, t["documents"], t["offsets"])


def load_extracted(directory: str | os.PathLike[str]) -> Features:
    """All features of an extraction: one batch row per document, in input order, right-padded to the
    longest document (``mask`` False on padding), ``token_ids`` kept. A document without tokens is a
    row with an all-False mask. With one shard whose rows are whole documents in order, the tensors
    are the memory-mapped shard itself; otherwise the rows are assembled in memory (use
    :func:`iter_extracted` for outputs larger than memory)."""
    manifest = read_manifest(directory)
    n_docs = int(manifest["n_documents"])
    shards = list(iter_extracted(directory))
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
    indices = torch.full((n_docs, t_max, n_layers, k), -1, dtype=f0.indices.dtype)
    values = torch.zeros((n_docs, t_max, n_layers, k), dtype=f0.values.dtype)
    l0 = torch.zeros((n_docs, t_max, n_layers), dtype=f0.l0.dtype)
    mask = torch.zeros((n_docs, t_max), dtype=torch.bool)
    tokens = torch.full((n_docs, t_max), -1, dtype=f0.token_ids.dtype)
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
