"""References: what a user passes (folder, ``org/repo[/sub][@rev]``, ``hf://...``, registry name)
resolved to a typed :class:`Reference`: a file source plus the registry's format and activation hints."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Union

from .. import registry
from ..errors import TranscoderFormatError
from .sources import ActivationHint, FileSource, HubSource, LocalSource, parse_hub_ref

#: What the loaders accept as a transcoder reference.
RefLike = Union[str, Path, FileSource, "Reference"]


@dataclass
class Reference:
    """A resolved reference: where the files are, and what the registry says about them."""

    source: FileSource
    format_hint: str | None = None
    activation_hint: ActivationHint | None = None

    @property
    def name(self) -> str:
        return self.source.name

    @classmethod
    def of_source(cls, source: FileSource) -> Reference:
        """The reference of an already opened source (its declared hints, usually None)."""
        return cls(source, source.format_hint, source.activation_hint)


def resolve(
    ref: RefLike,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | Path | None = None,
    local_files_only: bool = False,
) -> Reference:
    """A :class:`Reference` for a registry name, a local folder, ``hf://org/repo/path`` or
    ``org/repo[/sub][@rev]`` (an opened source or a Reference pass through unchanged).

    Registry names win; their ``subfolder``/``revision``/``format`` are used (an explicit ``revision``
    overrides the registry's), and their ``activation``/``k`` become the activation hint.
    """
    if isinstance(ref, Reference):
        return ref
    if not isinstance(ref, (str, Path)):
        return Reference.of_source(ref)
    text = check_reference_text(ref)
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
        hint: ActivationHint = {}
        if entry.activation is not None:
            hint["activation"] = entry.activation
        if entry.k is not None:
            hint["k"] = entry.k
        return Reference(src, entry.format, hint or None)
    path = Path(text).expanduser()
    try:
        is_dir, exists = path.is_dir(), path.exists()
    except (OSError, ValueError, RuntimeError) as exc:  # too long, no permission, a loop of links
        raise TranscoderFormatError(f"{text[:200]!r} cannot be read as a folder ({type(exc).__name__}: {exc})") from exc
    if is_dir:
        if path.resolve() == Path(path.resolve().anchor):
            raise TranscoderFormatError(f"{text!r} is the filesystem root, not a transcoder folder")
        return Reference(LocalSource(path))
    if text.startswith(("/", "./", "../", "~")) or exists:
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
    source = HubSource(
        parsed.repo_id,
        parsed.path,
        revision=revision or parsed.revision,
        token=token,
        cache_dir=cache_dir,
        local_files_only=local_files_only,
    )
    return Reference(source)


#: Longest reference accepted (a path or a repo id with sub-folder and revision).
MAX_REFERENCE_LENGTH = 4096


def check_reference_text(ref: str | Path) -> str:
    """The text of a reference, refused before any filesystem or network access when it is empty, too
    long, or holds control characters."""
    text = str(ref)
    if not text.strip():
        raise TranscoderFormatError(
            "empty transcoder reference: pass a folder, an org/repo[/subfolder][@revision], an hf:// URI "
            "or a registry name"
        )
    if len(text) > MAX_REFERENCE_LENGTH:
        raise TranscoderFormatError(
            f"transcoder reference of {len(text)} characters (at most {MAX_REFERENCE_LENGTH}): {text[:80]!r}..."
        )
    bad = next((c for c in text if ord(c) < 32 or ord(c) == 127), None)
    if bad is not None:
        raise TranscoderFormatError(f"transcoder reference {text[:200]!r} holds the control character {bad!r}")
    return text


def open_source(ref: str | Path, **hub_kwargs: object) -> FileSource:
    """The :class:`FileSource` of a reference, carrying the registry's hints (see :func:`resolve`)."""
    resolved = resolve(ref, **hub_kwargs)  # type: ignore[arg-type]
    resolved.source.format_hint = resolved.format_hint
    resolved.source.activation_hint = resolved.activation_hint
    return resolved.source
