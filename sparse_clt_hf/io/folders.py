"""Output folders: is a path a folder we can write into (or create), checked before any work starts."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def check_writable_folder(out: str | os.PathLike[str], flag: str, error: type[Exception]) -> Path:
    """Raise ``error`` unless ``out`` is, or can become, a writable folder (its nearest existing ancestor
    takes a temporary file); ``flag`` names the option in the message. Creates nothing that stays."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise error(f"{flag} {out} exists and is not a folder")
    probe = out
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise error(f"{flag} {out}: {probe} is not a folder")
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as exc:
        raise error(f"{flag} {out} is not writable ({probe}: {exc.strerror or exc})") from None
    return out
