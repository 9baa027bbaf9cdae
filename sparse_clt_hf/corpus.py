"""Documents for an extraction: text files, .jsonl, folders of .txt, `datasets`; cut into windows."""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from .errors import ExtractError

TOKENIZE_CHUNK = 256  # documents tokenized per tokenizer call


# ---------------------------------------------------------------------------- data
@dataclass
class DataSource:
    """Documents to extract over, validated and counted up front (``n_documents``).

    ``kind`` is ``text`` (one document per non-blank line), ``jsonl`` (one JSON object per non-blank
    line, text in ``field``), ``folder`` (every ``*.txt`` file below the folder, sorted by relative
    path, one document each) or ``datasets`` (a ``datasets`` Hub name or a ``save_to_disk`` folder).
    Document ids are positions in this order, starting at 0. Texts must be valid Unicode (a JSON string
    with a lone surrogate such as ``"\\ud800"`` is refused up front: no tokenizer accepts it).
    """

    kind: str
    path: str
    n_documents: int
    field: str = "text"
    split: str = "train"
    files: list[str] | None = None
    _dataset: Any = None

    def documents(self) -> Iterator[str]:
        """The texts, in order (the first ``n_documents``)."""
        n = 0
        if self.n_documents == 0:
            return
        if self.kind == "text":
            with _open_text(self.path) as f:
                for line in f:
                    if line.strip():
                        yield line.rstrip("\r\n")
                        n += 1
                        if n == self.n_documents:
                            return
        elif self.kind == "jsonl":
            with _open_text(self.path) as f:
                for lineno, line in enumerate(f, 1):
                    if line.strip():
                        yield _jsonl_text(self.path, lineno, line, self.field)
                        n += 1
                        if n == self.n_documents:
                            return
        elif self.kind == "folder":
            root = Path(self.path)
            for name in (self.files or [])[: self.n_documents]:
                try:
                    yield (root / name).read_text(encoding="utf-8", errors="replace")
                except OSError as exc:
                    raise ExtractError(f"{root / name} cannot be read ({exc.strerror or exc})") from None
        else:
            for i, row in enumerate(self._dataset.select_columns([self.field])):
                if i == self.n_documents:
                    return
                text = row[self.field]
                if not isinstance(text, str):
                    raise ExtractError(f"{self.path}: row {i} field {self.field!r} is {type(text).__name__}, not text")
                yield _checked_text(text, f"{self.path}: row {i} field {self.field!r}")

    def describe(self) -> str:
        return f"{self.kind} {self.path} ({self.n_documents} documents)"


def _checked_text(text: str, where: str) -> str:
    """``text`` when it is valid Unicode (encodable as UTF-8), else an error naming ``where``."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ExtractError(f"{where}: holds {text[exc.start]!r} at character {exc.start}, a lone surrogate that is "
                           "not valid Unicode (no tokenizer accepts it); fix or drop that document") from None
    return text


def _jsonl_text(path: str, lineno: int, line: str, field: str) -> str:
    """The text ``field`` of one .jsonl line, every way it can be wrong an :class:`ExtractError`."""
    try:
        record = json.loads(line)
    except (ValueError, RecursionError) as exc:
        raise ExtractError(f"{path}:{lineno}: not valid JSON ({exc})") from None
    if not isinstance(record, dict) or field not in record:
        keys = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise ExtractError(f"{path}:{lineno}: record has no {field!r} field (it has {keys}); "
                           f"choose the field with --text-field")
    if not isinstance(record[field], str):
        raise ExtractError(f"{path}:{lineno}: field {field!r} is {type(record[field]).__name__}, not text")
    return _checked_text(record[field], f"{path}:{lineno}: field {field!r}")


def _open_text(path: str):
    if str(path).endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8", errors="replace")
    return open(path, encoding="utf-8", errors="replace")


def open_data(
    data: str | os.PathLike[str],
    *,
    field: str = "text",
    max_docs: int | None = None,
    split: str = "train",
    follow_links: bool = False,
) -> DataSource:
    """Find, validate and count the documents of ``data`` (see :class:`DataSource`); raises
    :class:`ExtractError` on empty data, a record without a text ``field``, text that is not valid
    Unicode, or an unreadable source. Only the first ``max_docs`` documents are read and checked.

    In a folder, a ``.txt`` that is a symbolic link (or lies below one) resolving outside the folder is
    refused unless ``follow_links`` (``--follow-links``): a data folder then reads only files inside it."""
    if max_docs is not None and max_docs <= 0:
        raise ExtractError(f"--max-docs must be positive, got {max_docs}")
    limit = max_docs if max_docs is not None else float("inf")
    path = Path(data)
    if path.is_dir() and not ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file()):
        files = sorted(p.relative_to(path).as_posix() for p in path.rglob("*.txt") if p.is_file())
        root = path.resolve()
        outside = [f for f in files if root not in (path / f).resolve().parents]
        if outside and not follow_links:
            raise ExtractError(f"{path}: {outside[0]!r} links to {(path / outside[0]).resolve()}, outside the data "
                               f"folder ({len(outside)} such files); pass follow_links=True (--follow-links) to read them")
        if not files:
            raise ExtractError(f"no documents: folder {path} holds no .txt files")
        n = int(min(len(files), limit))
        return DataSource("folder", str(path.resolve()), n, field, split, files[:n])
    if path.is_file():
        name = path.name.removesuffix(".gz")
        n = 0
        if name.endswith((".jsonl", ".ndjson")):
            with _open_text(str(path)) as f:
                for lineno, line in enumerate(f, 1):
                    if n >= limit:
                        break
                    if not line.strip():
                        continue
                    _jsonl_text(str(path), lineno, line, field)
                    n += 1
            kind = "jsonl"
        else:
            with _open_text(str(path)) as f:
                for line in f:
                    if n >= limit:
                        break
                    n += bool(line.strip())
            kind = "text"
        if n == 0:
            raise ExtractError(f"no documents: {path} is empty (or holds only blank lines)")
        return DataSource(kind, str(path.resolve()), n, field, split)
    return _open_dataset(str(data), field, limit, split)


def _open_dataset(name: str, field: str, limit: float, split: str) -> DataSource:
    try:
        import datasets
    except ImportError:
        raise ExtractError(
            f"--data {name!r} is not a file or folder; reading it as a `datasets` name needs the optional "
            "dependency: pip install datasets"
        ) from None
    try:
        if Path(name).is_dir():
            ds = datasets.load_from_disk(name)
        else:
            ds = datasets.load_dataset(name, split=split)
    except Exception as exc:  # datasets raises many kinds (FileNotFoundError, DatasetNotFoundError, ...)
        raise ExtractError(f"cannot load dataset {name!r}: {exc}") from exc
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise ExtractError(f"dataset {name!r} has no split {split!r}; it has {sorted(ds)}")
        ds = ds[split]
    if field not in ds.column_names:
        raise ExtractError(f"dataset {name!r} has no {field!r} column (it has {ds.column_names}); "
                           f"choose the column with --text-field")
    n = int(min(len(ds), limit))
    if n == 0:
        raise ExtractError(f"no documents: dataset {name!r} (split {split!r}) is empty")
    return DataSource("datasets", name, n, field, split, _dataset=ds)


class Window(NamedTuple):
    document: int
    offset: int
    ids: list[int]
    last: bool  # the document's last window


def iter_windows(source: DataSource, tokenizer: Any, seq_len: int) -> Iterator[Window]:
    """Consecutive non-overlapping windows of at most ``seq_len`` tokens of every document, in order.
    A document with no tokens has no window (it is an empty row in :func:`load_extracted`)."""
    doc = 0
    chunk: list[str] = []

    def flush() -> Iterator[Window]:
        nonlocal doc
        try:
            enc = tokenizer(chunk, add_special_tokens=True, verbose=False)["input_ids"]
        except Exception as exc:  # tokenizers raise TypeError, ValueError, their own exceptions, ...
            raise ExtractError(f"the tokenizer refused documents {doc}..{doc + len(chunk) - 1} of {source.describe()} "
                               f"({type(exc).__name__}: {exc})") from exc
        for ids in enc:
            ids = list(ids)
            starts = range(0, len(ids), seq_len)
            for j, off in enumerate(starts):
                yield Window(doc, off, ids[off : off + seq_len], j == len(starts) - 1)
            doc += 1
        chunk.clear()

    for text in source.documents():
        chunk.append(text)
        if len(chunk) == TOKENIZE_CHUNK:
            yield from flush()
    if chunk:
        yield from flush()

