"""Upload a native transcoder folder to the Hub in one commit, with a generated model card."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Protocol

from ..formats import describe
from .model_card import model_card_text
from .sources import LocalSource, hub_endpoint


class SavesPretrained(Protocol):
    """Anything that writes a native transcoder folder (a ``CrossLayerTranscoder``)."""

    def save_pretrained(self, directory: str | Path) -> Any: ...


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
    tc: SavesPretrained,
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
