"""Feature labels: per-feature statistics stored next to a transcoder, and how they are shown.

A transcoder folder may hold ``stats.safetensors`` (a :class:`~sparse_clt_hf.feature_stats.FeatureStats`
file, the same name an extraction folder uses) and ``tokenizer/`` (the tokenizer the statistics' token
ids belong to). The demo writes both when it fits its transcoder (:func:`corpus_stats` over part of
the training corpus); ``demo``, ``generate`` and ``explain`` read them (:func:`find_stats`).

A feature's *label* is its most frequent max-activating tokens in that corpus
(:func:`sparse_clt_hf.view.feature_label`); :func:`marked_context` renders one max-activating context
with the max-activating token marked ``⟦like this⟧``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from .feature_stats import STATS_FILE, Context, FeatureStats, feature_stats

if TYPE_CHECKING:
    from .features import Features

TOKENIZER_DIR = "tokenizer"
MARK_OPEN, MARK_CLOSE = "⟦", "⟧"


def stats_path(folder: str | os.PathLike[str]) -> Path:
    """Where the statistics of the transcoder in ``folder`` live: ``folder/stats.safetensors``."""
    return Path(folder) / STATS_FILE


def find_stats(clt: str | os.PathLike[str] | None, stats: str | os.PathLike[str] | None = None) -> FeatureStats | None:
    """``stats`` (a stats file or a folder holding one, e.g. an extraction) when given (it must exist);
    else the statistics next to a local transcoder folder ``clt``, or None when there are none."""
    if stats is not None:
        return FeatureStats.load(stats)
    if clt is not None and stats_path(clt).is_file():
        return FeatureStats.load(stats_path(clt))
    return None


def check_stats_path(stats: str | os.PathLike[str] | None) -> None:
    """Fail early (before a model loads) when ``--stats`` names nothing readable."""
    if stats is None:
        return
    path = Path(stats)
    if not (path.is_file() or (path / STATS_FILE).is_file()):
        raise FileNotFoundError(
            f"--stats {path}: no statistics there (a stats.safetensors file, or a folder holding one: "
            "`sparse-clt-hf stats DIR` writes DIR/stats.safetensors)"
        )


@torch.no_grad()
def corpus_features(
    model: torch.nn.Module,
    tokenizer: Any,
    transcoder: Any,
    texts: Iterable[str],
    *,
    tokens: int = 16_384,
    seq_len: int = 128,
    batch_size: int = 16,
    skip_first: int = 1,
    top_k: int | None = None,
    progress: bool = True,
    desc: str = "feature statistics",
) -> Features:
    """The features of ``transcoder`` over about ``tokens`` tokens of ``texts``.

    The text is cut into rows of ``seq_len`` tokens (documents joined by EOS, as in training); each
    row is one "document" of the statistics. The first ``skip_first`` positions of every row are masked
    out (the attention-sink position has outlier activations, and training skipped it too).
    ``top_k`` features are recorded per token and layer (default: the transcoder's k, else 32)."""
    from .attach import attach_clt
    from .training_data import token_sequences

    n_rows = max(1, -(-tokens // (seq_len - skip_first)))
    ids = token_sequences(tokenizer, texts, seq_len, n_rows)
    if top_k is None:
        cfg = getattr(transcoder, "config", None)
        top_k = int(getattr(cfg, "k", None) or 32)
    device = next(model.parameters()).device
    bar = tqdm(total=ids.shape[0], desc=desc, unit="seq", disable=None if progress else True)  # None: only on a terminal
    try:
        with attach_clt(model, transcoder, top_k=top_k) as clt:
            for start in range(0, ids.shape[0], batch_size):
                chunk = ids[start : start + batch_size].to(device)
                model(input_ids=chunk, attention_mask=torch.ones_like(chunk), use_cache=False)
                bar.update(chunk.shape[0])
            feats = clt.features
    finally:
        bar.close()
    feats.mask[:, :skip_first] = False
    return feats


def corpus_stats(
    model: torch.nn.Module,
    tokenizer: Any,
    transcoder: Any,
    texts: Iterable[str],
    *,
    top_n: int = 10,
    context: int = 8,
    **options: Any,
) -> FeatureStats:
    """Statistics of every feature of ``transcoder`` over the corpus features of :func:`corpus_features`
    (``options``: its ``tokens``, ``seq_len``, ``batch_size``, ``skip_first``, ``top_k``, ``progress``)."""
    feats = corpus_features(model, tokenizer, transcoder, texts, **options)
    return feature_stats(feats, top_n=top_n, context=context)


def save_stats(stats: FeatureStats, folder: str | os.PathLike[str], tokenizer: Any = None) -> Path:
    """Write ``stats`` (and the tokenizer its token ids belong to) next to the transcoder in ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(str(folder / TOKENIZER_DIR))
    stats.save(stats_path(folder))
    return stats_path(folder)


def keep_tokenizer(tokenizer: Any, folder: str | os.PathLike[str], log: Any = None) -> None:
    """Save ``tokenizer`` as ``folder/tokenizer/`` when it is not there yet, so that later commands on the
    folder (stats, dashboard, view) decode offline without reading the model's files again (SmolLM2's
    GGUF takes seconds to parse). Best effort: a tokenizer that cannot be saved leaves a note in ``log``."""
    target = Path(folder) / TOKENIZER_DIR
    if tokenizer is None or not hasattr(tokenizer, "save_pretrained") or target.exists():
        return
    try:
        tokenizer.save_pretrained(str(target))
    except Exception as exc:  # noqa: BLE001 - a convenience: the folder is complete without it
        if log is not None:
            log(f"note: the tokenizer was not saved to {target} ({type(exc).__name__}: {exc})")


# ---------------------------------------------------------------------------- text
def _visible(text: str) -> str:
    return text.replace("\r", "").replace("\n", "↵").replace("\t", "→")


def marked_context(tokenizer: Any, ctx: Context, context: int | None = None) -> str:
    """One max-activating context on one line, the max-activating token marked: ``…the list⟦ comprehension⟧ is…``
    (newlines shown as ``↵``). ``…`` marks a window cut inside its document: on the left when the
    window starts after the document's start; on the right when ``context`` tokens follow the marked
    one (the window's full width: the document may go on)."""
    ids = list(ctx.token_ids)
    if not ids:
        return ""
    i = ctx.index
    before = tokenizer.decode(ids[:i]) if i > 0 else ""
    token = tokenizer.decode([ids[i]])
    after = tokenizer.decode(ids[i + 1 :]) if i + 1 < len(ids) else ""
    left = "…" if ctx.position > i else ""
    right = "…" if context is None or len(ids) - 1 - i >= context else ""
    return f"{left}{_visible(before)}{MARK_OPEN}{_visible(token)}{MARK_CLOSE}{_visible(after)}{right}"


def feature_summary(stats: FeatureStats, layer: int, feature: int) -> dict[str, Any]:
    """Frequency, count, mean and max of one feature (JSON-ready)."""
    return {
        "layer": layer,
        "feature": feature,
        "count": int(stats.count(layer)[feature]),
        "n_positions": stats.n_positions,
        "frequency": float(stats.frequency(layer)[feature]),
        "mean": round(float(stats.mean(layer)[feature]), 4),
        "max": round(float(stats.max(layer)[feature]), 4),
    }


def parse_feature(text: str) -> tuple[int, int]:
    """``"6/942"`` or ``"L6/942"`` -> ``(6, 942)``."""
    body = text.strip()
    if body[:1] in ("L", "l"):
        body = body[1:]
    layer, sep, feature = body.partition("/")
    try:
        if not sep:
            raise ValueError
        return int(layer), int(feature)
    except ValueError:
        raise ValueError(f"cannot read feature {text!r}: write LAYER/FEATURE, e.g. 6/942 or L6/942") from None
