"""Training text: text that ships with Python, ``.txt``/``.jsonl`` files, and their tokenisation."""

from __future__ import annotations

import ast
import json
import sysconfig
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch


def python_texts() -> Iterator[str]:
    """Text that ships with Python: the ``pydoc_data`` help topics, then standard-library docstrings
    (read with :mod:`ast`, so no module is imported or executed)."""
    from pydoc_data.topics import topics

    for key in sorted(topics):
        yield topics[key]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo", "__pycache__"}
    for path in sorted(stdlib.rglob("*.py")):
        if skip & set(path.relative_to(stdlib).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 200:
                    yield doc


def file_texts(source: str | Path) -> Iterator[str]:
    """Documents of a ``.txt`` file (the whole file), a ``.jsonl`` file (the ``text`` field of each line)
    or a folder of such files (sorted, recursive)."""
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl") and p.is_file())
        if not files:
            raise FileNotFoundError(f"{path}: no .txt or .jsonl files in this folder")
    elif path.is_file():
        files = [path]
    else:
        raise FileNotFoundError(f"text source {path} does not exist")
    for f in files:
        if f.suffix == ".jsonl":
            for n, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except (ValueError, RecursionError) as exc:
                    raise ValueError(f"{f}:{n}: not valid JSON ({exc})") from None
                if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                    raise ValueError(f"{f}:{n}: each .jsonl line must be an object with a string 'text' field")
                yield row["text"]
        else:
            yield f.read_text(encoding="utf-8", errors="replace")


def text_source(source: str | Path | None) -> Iterator[str]:
    """``None`` or ``"python"``: :func:`python_texts`; otherwise :func:`file_texts`."""
    return python_texts() if source in (None, "python") else file_texts(source)  # type: ignore[arg-type]


def token_sequences(tokenizer: Any, texts: Iterable[str], seq_len: int, n_sequences: int) -> torch.Tensor:
    """Tokenise documents (joined by EOS) into at most ``n_sequences`` rows of ``seq_len`` tokens."""
    eos = getattr(tokenizer, "eos_token_id", None)
    need = seq_len * n_sequences
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
        if eos is not None:
            ids.append(int(eos))
        if len(ids) >= need:
            break
    n = min(n_sequences, len(ids) // seq_len)
    if n == 0:
        raise ValueError(f"the text gave {len(ids)} tokens, fewer than one sequence of {seq_len}")
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)
