"""Extract transcoder features over a corpus: multi-process, resumable, written as safetensors shards.

Layout of an output folder::

    DIR/manifest.json              model, transcoder, arguments, shards (bytes, sha256), totals
    DIR/shards/00000.safetensors   one shard: a slice of Features, rows = windows of documents
    DIR/shards/00000.json          the shard's record (bytes, sha256, windows, tokens), written after it
    DIR/stats.safetensors          written by :func:`sparse_clt_hf.feature_stats`

Documents are tokenized (special tokens included, as the tokenizer adds them) and cut into
consecutive non-overlapping windows of at most ``seq_len`` tokens; each window is one forward pass
row, so context restarts at each window. Windows are numbered in input order and grouped into shards
of ``shard_size`` windows; shard ``i`` is computed by process ``i % world_size``. Shard boundaries and
batches therefore depend only on the data and the arguments, never on the number of processes, so
1 and N processes write identical shards.

Each shard holds ``indices`` [W, S, L, k], ``values`` [W, S, L, k], ``l0`` [W, S, L], ``mask`` [W, S],
``token_ids`` [W, S] (-1 on padding), ``documents`` [W] (document id, input order), ``offsets`` [W]
(position of the window's first token in its document) and ``lengths`` [W] (tokens in the window).

Identical output for 1 and N processes means byte-identical shards. On CPU this needs MKL's
conditional numerical reproducibility (its matmuls otherwise round differently depending on memory
alignment, by ~1e-8): the ``extract`` command sets ``MKL_CBWR=AUTO,STRICT`` unless it is set (a Python
caller sets it before the process's first matmul); and the same number of threads per process
(``accelerate launch`` gives each CPU process ``OMP_NUM_THREADS=1``; run a single process with
``OMP_NUM_THREADS=1`` to compare byte for byte). Otherwise values agree to float rounding.

Every process tokenizes the whole corpus (cheap next to the forward passes) to number the windows,
but keeps only the shard it is computing: memory is bounded by the shard size, never the dataset.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch

from .corpus import DataSource, Window, iter_windows, open_data
from .errors import ExtractError
from .extract_folder import (
    FORMAT,
    LOCK,
    MANIFEST,
    SHARDS,
    VERSION,
    changed_inputs,
    check_shard_record,
    data_fingerprint,
    folder_lock,
    model_fingerprint,
    read_json_file,
    read_manifest,
    sha256_file,
    shard_path,
    shard_record_path,
    transcoder_fingerprint,
    write_json_atomic,
)
from .io.folders import check_writable_folder

_sha256 = sha256_file  # (older name, kept for callers)
__all__ = ["MANIFEST", "SHARDS", "extract", "read_manifest", "shard_path"]

SHARD_BYTES = 256 * 2**20  # automatic shard size: features of one shard at most this many bytes


# ---------------------------------------------------------------------------- files
def _shard_done(directory: Path, index: int, expect: dict[str, Any]) -> bool:
    """Whether shard ``index`` is complete: its record exists, is well-formed, matches the plan, and the
    file's size and sha256 match the record (a truncated or damaged shard is redone)."""
    rec_path, path = shard_record_path(directory, index), shard_path(directory, index)
    if not (rec_path.is_file() and path.is_file()):
        return False
    try:
        rec = check_shard_record(read_json_file(rec_path, "shard record"), index, directory, rec_path)
    except ExtractError:
        return False
    if any(rec.get(k) != v for k, v in expect.items()):
        return False
    return path.stat().st_size == rec["bytes"] and sha256_file(path) == rec["sha256"]


def _write_shard(directory: Path, index: int, tensors: dict[str, torch.Tensor], meta: dict[str, str],
                 record: dict[str, Any]) -> dict[str, Any]:
    """Write a shard under a temporary name unique to this process, rename it into place, then write its
    record (with the range of its values, checked cheaply by every reader)."""
    from safetensors.torch import save_file

    path = shard_path(directory, index)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    values = tensors["values"]
    value_range = [float(values.min()), float(values.max())] if values.numel() else [0.0, 0.0]
    record = {**record, "file": f"{SHARDS}/{path.name}", "bytes": path.stat().st_size, "sha256": sha256_file(path),
              "value_range": value_range}
    write_json_atomic(shard_record_path(directory, index), record)
    return record


def _check_out(out: Path, arguments: dict[str, Any]) -> dict[str, Any] | None:
    """Raise unless ``out`` can hold this extraction: a new or empty folder in a writable place, or a
    folder of an earlier extraction with the same arguments (which is resumed). Creates nothing."""
    if out.exists() and not out.is_dir():
        raise ExtractError(f"--out {out} exists and is not a folder")
    previous = None
    if out.is_dir():
        manifest = out / MANIFEST
        if manifest.is_file():
            try:
                previous = read_json_file(manifest, "manifest")
            except ExtractError as exc:
                raise ExtractError(f"{exc}; remove it or use another --out") from None
            if previous.get("format") != FORMAT:
                raise ExtractError(f"{out} holds a manifest.json that is not an extraction's; use another --out")
            before = previous.get("arguments") if isinstance(previous.get("arguments"), dict) else {}
            diff = {k: (before.get(k), v) for k, v in arguments.items() if before.get(k) != v}
            if diff:
                shown = ", ".join(f"{k}: {a!r} then, {b!r} now" for k, (a, b) in diff.items())
                raise ExtractError(f"{out} holds an extraction with other arguments ({shown}); "
                                   "rerun with the same arguments to resume, or use another --out")
        elif any(p.name not in (SHARDS, LOCK) for p in out.iterdir()):
            raise ExtractError(f"--out {out} is not empty and holds no extraction (no {MANIFEST}); use another folder")
    check_writable_folder(out, "--out", ExtractError)
    return previous


def _check_inputs(out: Path, previous: dict[str, Any] | None, inputs: dict[str, Any]) -> None:
    """Refuse to resume when the data, transcoder or model differ from those of the run that wrote ``out``."""
    changed = changed_inputs((previous or {}).get("inputs"), inputs)
    if changed:
        raise ExtractError(
            f"{out} was extracted from other inputs: the {' and the '.join(changed)} changed since (size, mtime "
            "or content); its shards would mix features of both. Use another --out, or delete the folder to "
            "start over"
        )


# ---------------------------------------------------------------------------- extraction
def _auto_shard_size(seq_len: int, batch_size: int, n_layers: int, k: int, value_bytes: int) -> int:
    per_window = seq_len * (n_layers * (k * (4 + value_bytes) + 4) + 9)
    windows = max(1, SHARD_BYTES // per_window)
    return max(batch_size, windows // batch_size * batch_size)


def input_device(model: torch.nn.Module) -> torch.device:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is not None and getattr(emb, "weight", None) is not None and emb.weight.device.type != "meta":
        return emb.weight.device
    return next(p.device for p in model.parameters())


def forward_kwargs(model: torch.nn.Module) -> dict[str, Any]:
    """Keyword arguments of an extraction's forward pass: no KV cache, and logits of one position only where the model allows it (a [B, T, vocab]
    logits tensor would dwarf everything else)."""
    import inspect

    params = inspect.signature(model.forward).parameters
    kw: dict[str, Any] = {}
    if "use_cache" in params:
        kw["use_cache"] = False
    if "logits_to_keep" in params:
        kw["logits_to_keep"] = 1
    return kw


def shard_batches(lengths: list[int], batch_size: int) -> Iterator[list[int]]:
    """The rows (windows) of each forward pass over a shard, longest first (ties in window order): the
    same composition on every run, so that a rerun (a resume, exact frequencies) computes the same
    numbers; a batch is padded to its first row's length."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])  # stable: ties keep window order
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


def _run_shard(model, clt, windows: list[Window], batch_size: int) -> dict[str, torch.Tensor]:
    """Features of one shard's windows (batches of :func:`shard_batches`)."""
    n = len(windows)
    lengths = torch.tensor([len(w.ids) for w in windows], dtype=torch.int64)
    s = int(lengths.max())
    device = input_device(model)
    fwd = forward_kwargs(model)
    out: dict[str, torch.Tensor] = {}
    n_layers, k = len(clt.layers), clt.top_k
    for rows in shard_batches(lengths.tolist(), batch_size):
        t = len(windows[rows[0]].ids)
        ids = torch.zeros(len(rows), t, dtype=torch.long)
        att = torch.zeros(len(rows), t, dtype=torch.long)
        for r, i in enumerate(rows):
            ids[r, : len(windows[i].ids)] = torch.tensor(windows[i].ids)
            att[r, : len(windows[i].ids)] = 1
        clt.reset()
        with torch.no_grad():
            model(input_ids=ids.to(device), attention_mask=att.to(device), **fwd)
        f = clt.features
        clt.reset()
        if not out:
            out = {
                "indices": torch.full((n, s, n_layers, k), -1, dtype=f.indices.dtype),
                "values": torch.zeros((n, s, n_layers, k), dtype=f.values.dtype),
                "l0": torch.zeros((n, s, n_layers), dtype=f.l0.dtype),
            }
        valid = att.bool()
        idx = torch.tensor(rows)
        out["indices"][idx, :t] = torch.where(valid[:, :, None, None], f.indices[:, :t].cpu(), -1)
        out["values"][idx, :t] = torch.where(valid[:, :, None, None], f.values[:, :t].cpu(), 0)
        out["l0"][idx, :t] = torch.where(valid[:, :, None], f.l0[:, :t].cpu(), 0)
    pos = torch.arange(s)
    out["mask"] = pos[None, :] < lengths[:, None]
    tokens = torch.full((n, s), -1, dtype=torch.int64)
    for i, w in enumerate(windows):
        tokens[i, : len(w.ids)] = torch.tensor(w.ids, dtype=torch.int64)
    out["token_ids"] = tokens
    out["documents"] = torch.tensor([w.document for w in windows], dtype=torch.int64)
    out["offsets"] = torch.tensor([w.offset for w in windows], dtype=torch.int64)
    out["lengths"] = lengths
    return out


def _partial_state():
    from accelerate import PartialState

    # Without CUDA, cpu=True makes `accelerate launch --multi_gpu --num_processes N` start N gloo
    # processes (accelerate 1.15 otherwise treats each of them as a lone process).
    return PartialState(cpu=not torch.cuda.is_available())


def extract(
    model: torch.nn.Module,
    tokenizer: Any,
    transcoder: Any,
    data: str | os.PathLike[str] | DataSource,
    out: str | os.PathLike[str],
    *,
    layers: list[int] | None = None,
    top_k: int = 32,
    seq_len: int = 1024,
    batch_size: int = 8,
    max_docs: int | None = None,
    shard_size: int | None = None,
    text_field: str = "text",
    split: str = "train",
    model_name: str | None = None,
    transcoder_name: str | None = None,
    progress: bool = True,
    log=None,
    follow_links: bool = False,
) -> dict[str, Any]:
    """Extract the top-k features of ``transcoder`` over ``data`` into the folder ``out`` and return
    its manifest. Resumes an earlier run with the same arguments (finished shards are kept).

    Run under ``accelerate launch`` to split the shards across processes (``model`` is moved to each
    process's device unless it was loaded with a ``device_map``). Every check (data, output folder,
    transcoder against model) happens before the first forward pass.
    """
    log = log or (lambda *a: print(*a, file=sys.stderr))
    for name, v in (("seq_len", seq_len), ("batch_size", batch_size), ("top_k", top_k)):
        if not isinstance(v, int) or v <= 0:
            raise ExtractError(f"{name} must be a positive integer, got {v!r}")
    if shard_size is not None and shard_size <= 0:
        raise ExtractError(f"shard_size must be a positive number of windows, got {shard_size!r}")
    state = _partial_state()
    source = data if isinstance(data, DataSource) else open_data(
        data, field=text_field, max_docs=max_docs, split=split, follow_links=follow_links)
    out = Path(out)
    model_name = model_name or getattr(model, "name_or_path", None) or type(model).__name__
    transcoder_name = transcoder_name or (str(transcoder) if isinstance(transcoder, (str, os.PathLike)) else None)
    wanted_layers = None if layers is None else sorted({int(x) for x in layers})
    # checked against an earlier run before anything else: the shard size is part of the plan
    base_args = {"data": source.path, "data_kind": source.kind, "text_field": source.field, "max_docs": max_docs,
                 "layers": wanted_layers, "top_k": top_k, "seq_len": seq_len, "batch_size": batch_size,
                 "model": model_name, "transcoder": transcoder_name}
    if source.kind == "datasets":
        base_args["split"] = source.split
    check_args = {**base_args, **({} if shard_size is None else {"shard_size": shard_size})}
    previous = _check_out(out, check_args)
    inputs: dict[str, Any] = {"data": data_fingerprint(source)}
    _check_inputs(out, previous, inputs)  # the data, before the model is moved or attached
    return _extract_checked(model, tokenizer, transcoder, source, out, state, check_args, base_args, inputs,
                            wanted_layers=wanted_layers, top_k=top_k, seq_len=seq_len, batch_size=batch_size,
                            shard_size=shard_size, progress=progress, log=log)


def _extract_checked(model, tokenizer, transcoder, source: DataSource, out: Path, state, check_args, base_args,
                     inputs, *, wanted_layers, top_k, seq_len, batch_size, shard_size, progress, log) -> dict[str, Any]:
    """:func:`extract` once the arguments and data are checked. The folder is locked (main process) before
    anything is written; on any failure after the manifest was written, the manifest says so
    (``status: failed`` and the error) before the error propagates."""
    from ._version import __version__
    from .attach import attach_clt

    if not hasattr(getattr(model, "hf_device_map", None), "items"):
        model.to(state.device)
    elif state.num_processes > 1:
        raise ExtractError("a model split with device_map runs in one process; launch without --num_processes")
    clt = attach_clt(model, transcoder, layers=wanted_layers, top_k=top_k)
    written = False
    manifest: dict[str, Any] = {}
    held = ExitStack()
    try:
        inputs["transcoder"] = transcoder_fingerprint(clt.transcoder)
        inputs["model"] = model_fingerprint(model)
        previous = _check_out(out, check_args)
        _check_inputs(out, previous, inputs)
        held.enter_context(folder_lock(out, state.is_main_process))
        previous = _check_out(out, check_args)  # again, under the lock: another run may have written meanwhile
        _check_inputs(out, previous, inputs)
        value_bytes = torch.finfo(clt.transcoder.encoder(clt.layers[0]).W_enc.dtype).bits // 8
        if shard_size is None:
            shard_size = (previous or {}).get("arguments", {}).get("shard_size") or _auto_shard_size(
                seq_len, batch_size, len(clt.layers), top_k, value_bytes)
        arguments = {**base_args, "shard_size": shard_size}
        manifest = {
            "format": FORMAT, "version": VERSION, "library_version": __version__, "status": "running",
            "model": base_args["model"], "transcoder": base_args["transcoder"], "arguments": arguments,
            "layers": list(clt.layers), "n_features": list(clt.widths), "top_k": top_k,
            "world_size": state.num_processes, "inputs": inputs,
        }
        if state.is_main_process:
            (out / SHARDS).mkdir(parents=True, exist_ok=True)
            for stale in [*(out / SHARDS).glob("*.tmp"), *out.glob(f"{MANIFEST}.*.tmp")]:
                stale.unlink()  # (left by a writer that died; this process holds the folder's lock)
            if previous is None or previous.get("status") != "complete":
                write_json_atomic(out / MANIFEST, manifest)
                written = True
            from .labels import keep_tokenizer

            keep_tokenizer(tokenizer, out, log)
        state.wait_for_everyone()
        # one metadata key: safetensors writes several in no fixed order, and shards must be byte-identical
        meta = {FORMAT: json.dumps({"layers": list(clt.layers), "n_features": list(clt.widths)})}
        totals = _run_shards(model, clt, source, tokenizer, out, state, seq_len=seq_len, batch_size=batch_size,
                             shard_size=shard_size, meta=meta, progress=progress and state.is_main_process)
        clt.detach()
        state.wait_for_everyone()
        per_process = _gather_counts(state, totals)
        if state.is_main_process:
            shards = []
            for i in range(totals["n_shards"]):
                rec_path = shard_record_path(out, i)
                if not rec_path.is_file():
                    raise ExtractError(f"shard {i} has no record {rec_path}: a process failed; rerun to resume")
                shards.append(check_shard_record(read_json_file(rec_path, "shard record"), i, out, rec_path))
            manifest.update(status="complete", n_documents=source.n_documents, n_windows=totals["n_windows"],
                            n_tokens=totals["n_tokens"], n_shards=totals["n_shards"],
                            bytes=sum(s["bytes"] for s in shards), shards=shards)
            write_json_atomic(out / MANIFEST, manifest)
            written = False
            if progress:
                log(f"extracted {source.n_documents} documents, {totals['n_tokens']} tokens, "
                    f"{totals['n_shards']} shards ({manifest['bytes'] / 2**20:.1f} MiB) -> {out}; "
                    f"{shard_summary(per_process)}")
    except BaseException as exc:
        if written:
            write_json_atomic(out / MANIFEST, {**manifest, "status": "failed",
                                               "error": f"{type(exc).__name__}: {exc}"[:2000]})
        raise
    finally:
        clt.detach()
        held.close()
    state.wait_for_everyone()
    return read_manifest(out)


def _gather_counts(state, totals: dict[str, int]) -> list[dict[str, int]]:
    """Every process's ``computed``/``skipped`` shard counts, in rank order (a collective: all call it)."""
    mine = {"computed": totals["computed"], "skipped": totals["skipped"]}
    if state.num_processes == 1:
        return [mine]
    from accelerate.utils import gather_object

    return list(gather_object([mine]))


def shard_summary(per_process: list[dict[str, int]]) -> str:
    """``"5 shards computed (3 + 2 by 2 processes), 0 reused"``: the totals of all processes, and which
    processes had nothing to do (fewer shards than processes: smaller ``--shard-size`` spreads the work)."""
    computed = sum(c["computed"] for c in per_process)
    skipped = sum(c["skipped"] for c in per_process)
    text = f"{computed} shards computed"
    if len(per_process) > 1:
        text += f" ({' + '.join(str(c['computed']) for c in per_process)} by {len(per_process)} processes)"
    text += f", {skipped} reused"
    idle = [rank for rank, c in enumerate(per_process) if c["computed"] + c["skipped"] == 0]
    if idle and len(per_process) > 1:
        text += (f"; process{'es' if len(idle) > 1 else ''} {', '.join(map(str, idle))} had no shard (fewer shards "
                 "than processes: a smaller --shard-size spreads the work)")
    return text


def _run_shards(model, clt, source: DataSource, tokenizer, out: Path, state, *, seq_len: int, batch_size: int,
                shard_size: int, meta: dict[str, str], progress: bool) -> dict[str, int]:
    """Stream the windows, compute and write this process's shards; return the totals."""
    from tqdm.auto import tqdm

    rank, world = state.process_index, state.num_processes
    bar = tqdm(total=source.n_documents, unit="doc", desc="extract", disable=None if progress else True,  # None: only on a terminal
               dynamic_ncols=True)
    started = time.perf_counter()
    counts = {"n_windows": 0, "n_tokens": 0, "n_shards": 0, "computed": 0, "skipped": 0}
    pending: list[Window] = []
    mine_tokens = 0

    def finish(index: int, windows: list[Window]) -> None:
        nonlocal mine_tokens
        first, last = windows[0], windows[-1]
        plan = {"index": index, "windows": len(windows), "tokens": sum(len(w.ids) for w in windows),
                "first_document": first.document, "first_offset": first.offset, "last_document": last.document}
        if index % world == rank:
            if _shard_done(out, index, plan):
                counts["skipped"] += 1
            else:
                tensors = _run_shard(model, clt, windows, batch_size)
                _write_shard(out, index, tensors, meta, plan)
                counts["computed"] += 1
                mine_tokens += plan["tokens"]
            if progress:
                done_docs = last.document + (1 if last.last else 0)
                bar.update(done_docs - bar.n)
                elapsed = time.perf_counter() - started
                bar.set_postfix_str(f"{mine_tokens * world / max(elapsed, 1e-9):,.0f} tok/s", refresh=False)

    index = 0
    for w in iter_windows(source, tokenizer, seq_len):
        counts["n_windows"] += 1
        counts["n_tokens"] += len(w.ids)
        pending.append(w)
        if len(pending) == shard_size:
            finish(index, pending)
            pending, index = [], index + 1
    if pending:
        finish(index, pending)
        index += 1
    counts["n_shards"] = index
    if progress:
        bar.update(source.n_documents - bar.n)
    bar.close()
    return counts

