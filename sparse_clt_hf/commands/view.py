"""``sparse-clt-hf view PATH --html OUT``: the HTML page of saved features.

``PATH`` is a features file (``Features.save``, e.g. ``generate --out f.safetensors``) or an extraction
folder (``extract --out DIR``). One row (``--row N``, or a file holding one row) gives one page at
``OUT``; several rows give ``OUT`` as an index of the documents (their first words, token counts) linking
to one page per document in the folder ``OUT`` names without ``.html`` plus ``_files``. Labels, frequencies and
max-activating contexts come from ``--stats``, else from a ``stats.safetensors`` in the extraction
folder (``sparse-clt-hf stats DIR`` writes it) or next to the file.
"""

from __future__ import annotations

import argparse
import html
import json
import sys
from pathlib import Path
from typing import Any

from ._options import find_tokenizer

INDEX_SNIPPET = 80  # characters of each document shown in the index


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="a features .safetensors file (Features.save, generate --out) or an "
                                     "extraction folder (extract --out)")
    parser.add_argument("--html", required=True, metavar="OUT",
                        help="the page to write (with several documents: their index, the pages beside it)")
    parser.add_argument("--stats", default=None, metavar="PATH",
                        help="statistics for labels: a stats.safetensors file or a folder holding one (default: "
                             "the one in the extraction folder or next to the file, if any)")
    parser.add_argument("--model", default=None,
                        help="model whose tokenizer decodes the tokens (default: the extraction's model, else SmolLM2)")
    parser.add_argument("--row", type=int, default=None,
                        help="only this batch row / document (0-based): one page instead of an index")
    parser.add_argument("--max-docs", type=int, default=200,
                        help="pages written at most for a folder of many documents (the first ones)")


def _load(path: Path) -> tuple[Any, list[Path]]:
    """The features at ``path`` and the folders to look in for statistics and a tokenizer."""
    from ..extract import MANIFEST
    from ..extracted import load_extracted
    from ..features import Features

    if path.is_dir():
        if not (path / MANIFEST).is_file():
            raise FileNotFoundError(f"{path}: not an extraction folder (no {MANIFEST}; `sparse-clt-hf extract` "
                                    "writes one) and not a features file")
        return load_extracted(path), [path]
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: expected a features .safetensors file or an extraction folder")
    return Features.load(path), [path.parent]


def _stats(args: argparse.Namespace, folders: list[Path]):
    from ..labels import check_stats_path, find_stats, stats_path

    if args.stats is not None:
        check_stats_path(args.stats)
        return find_stats(None, args.stats)
    for folder in folders:
        if stats_path(folder).is_file():
            return find_stats(folder)
    return None


def _snippet(tokenizer: Any, ids: list[int]) -> str:
    text = tokenizer.decode(ids[:INDEX_SNIPPET], skip_special_tokens=True).replace("\n", " ")
    return text[:INDEX_SNIPPET] + ("…" if len(text) > INDEX_SNIPPET or len(ids) > INDEX_SNIPPET else "")


def index_page(title: str, rows: list[dict[str, Any]], note: str) -> str:
    """A self-contained list of documents (every text escaped), each linking to its page (a document
    without tokens has none)."""
    items = "\n".join(
        (f'<li><a href="{html.escape(r["href"], quote=True)}">document {r["row"]}</a> ' if r["href"] else
         f'<li><span>document {r["row"]}</span> ')
        + f'<span class="n">{r["tokens"]} tokens</span> <span class="t">{html.escape(r["text"])}</span></li>'
        for r in rows)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font:14px/1.5 system-ui,sans-serif;margin:2em;max-width:70em}} li{{margin:.3em 0}}
.n{{color:#666;margin:0 .6em}} .t{{font-family:ui-monospace,monospace;white-space:pre-wrap}}</style></head>
<body><h1>{html.escape(title)}</h1><p>{html.escape(note)}</p><ol start="0">
{items}
</ol></body></html>
"""


def run(args: argparse.Namespace) -> int:
    path, out = Path(args.path), Path(args.html)
    if not out.resolve().parent.is_dir():
        raise FileNotFoundError(f"--html {out}: the folder {out.resolve().parent} does not exist")
    if args.max_docs <= 0:
        raise ValueError(f"--max-docs must be positive, got {args.max_docs}")
    feats, folders = _load(path)
    n_rows = feats.batch_size
    if args.row is not None and not 0 <= args.row < n_rows:
        raise ValueError(f"--row {args.row} out of range: {path} holds {n_rows} row(s) (0..{n_rows - 1})")
    stats = _stats(args, folders)
    tokenizer = find_tokenizer(args.model, folders)
    log = (lambda *a: print(*a, file=sys.stderr)) if args.json else print
    if args.row is not None or n_rows == 1:
        row = args.row or 0
        feats.to_html(out, tokenizer, stats=stats, row=row, title=f"{path.name}: row {row}")
        written = [str(out)]
        log(f"saved HTML view of row {row} of {path} to {out}" + ("" if stats is not None else " (no statistics: no labels)"))
    else:
        pages = out.parent / f"{out.stem}_files"
        pages.mkdir(exist_ok=True)
        shown = min(n_rows, args.max_docs)
        rows, written = [], [str(out)]
        for row in range(shown):
            page = pages / f"document-{row}.html"
            mask = feats.mask[row].bool()
            ids = [int(i) for i in feats.token_ids[row][mask].tolist()] if feats.token_ids is not None else []
            if mask.any():
                feats.to_html(page, tokenizer, stats=stats, row=row, title=f"{path.name}: document {row}")
                written.append(str(page))
            rows.append({"row": row, "tokens": len(ids), "text": _snippet(tokenizer, ids) if ids else "(no tokens)",
                         "href": f"{pages.name}/{page.name}" if mask.any() else None})
        note = (f"{n_rows} documents" + (f"; the first {shown} have pages (--max-docs)" if shown < n_rows else "")
                + ("; labels from the feature statistics" if stats is not None else
                   "; no feature statistics, so no labels (`sparse-clt-hf stats DIR` computes them)"))
        out.write_text(index_page(f"{path.name}: documents", rows, note), encoding="utf-8")
        log(f"saved an index of {n_rows} documents to {out} and {len(written) - 1} pages in {pages}")
    if args.json:
        print(json.dumps({"html": written, "rows": n_rows, "labels": stats is not None}))
    return 0
