"""Registry of published transcoders: short names for Hub releases, read from YAML files.

Each entry maps a name (``clt-gemma-2-2b-426k``) to where the files live (``repo_id``, ``subfolder``,
``revision``), how to read them (``format``) and what they are (model, layers, width, site, L0/FVU where
published). The YAML files are looked up in, in order: the paths in ``$SPARSE_CLT_HF_REGISTRY``
(``os.pathsep``-separated files or folders), ``sparse_clt_hf/configs/`` (when packaged) and the
repository's ``configs/`` folder. A later file never overrides an earlier entry.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields
from functools import lru_cache
from pathlib import Path
from typing import Any

from .errors import TranscoderFormatError
from .io.structured import load_yaml

ENV_VAR = "SPARSE_CLT_HF_REGISTRY"
_PACKAGE_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True)
class RegistryEntry:
    """One published transcoder. ``None`` means not published (the loader reads it from the files)."""

    name: str
    repo_id: str
    subfolder: str | None = None
    revision: str | None = None
    format: str | None = None
    kind: str | None = None
    model: str | None = None
    n_layers: int | None = None
    d_model: int | None = None
    width: int | None = None
    site: str | None = None
    input_transform: str | None = None
    activation: str | None = None
    k: int | None = None
    dtype: str | None = None
    l0: Any = None
    fvu: Any = None
    license: str | None = None
    notes: str | None = None
    source: str | None = None
    aliases: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def reference(self) -> str:
        """The equivalent ``org/repo[/subfolder][@revision]`` reference."""
        ref = self.repo_id + (f"/{self.subfolder.strip('/')}" if self.subfolder else "")
        return ref + (f"@{self.revision}" if self.revision else "")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def registry_paths() -> list[Path]:
    """YAML files that make up the registry, in priority order."""
    roots: list[Path] = [Path(p) for p in os.environ.get(ENV_VAR, "").split(os.pathsep) if p]
    roots += [_PACKAGE_DIR / "configs", _PACKAGE_DIR.parent / "configs"]
    out: list[Path] = []
    for root in roots:
        if root.is_file():
            out.append(root)
        elif root.is_dir():
            out.extend(sorted(p for p in root.iterdir() if p.suffix in (".yaml", ".yml")))
    return out


#: entry fields that must be strings / positive integers when given
_STR_FIELDS = ("repo_id", "subfolder", "revision", "format", "kind", "model", "site", "input_transform",
               "activation", "dtype", "license", "notes", "source")
_INT_FIELDS = ("n_layers", "d_model", "width", "k")


def _entry(name: str, data: Any, path: Path) -> RegistryEntry:
    where = f"registry {path}: entry {name!r}"
    if not isinstance(data, dict) or not data.get("repo_id"):
        raise TranscoderFormatError(f"{where} must be a mapping with a repo_id")
    known = {f.name for f in fields(RegistryEntry)} - {"name", "extra"}
    extra = {k: v for k, v in data.items() if k not in known}
    values = {k: v for k, v in data.items() if k in known and v is not None}
    for key in _STR_FIELDS:
        if key in values and not isinstance(values[key], str):
            raise TranscoderFormatError(f"{where}: {key!r} is {values[key]!r}; expected a string")
    for key in _INT_FIELDS:
        value = values.get(key)
        if value is not None and (type(value) is not int or value <= 0):
            raise TranscoderFormatError(f"{where}: {key!r} is {value!r}; expected a positive integer")
    aliases = values.get("aliases") or ()
    if isinstance(aliases, str):
        aliases = (aliases,)
    if not isinstance(aliases, (list, tuple)) or not all(isinstance(a, (str, int)) for a in aliases):
        raise TranscoderFormatError(f"{where}: 'aliases' is {aliases!r}; expected a list of names")
    values["aliases"] = tuple(str(a) for a in aliases)
    return RegistryEntry(name=name, extra=extra, **values)


@lru_cache(maxsize=8)
def _load(paths: tuple[Path, ...]) -> dict[str, RegistryEntry]:
    entries: dict[str, RegistryEntry] = {}
    for path in paths:
        try:
            data = load_yaml(path.read_bytes(), f"registry file {path}", error=TranscoderFormatError) or {}
        except OSError as exc:
            raise TranscoderFormatError(f"registry file {path} cannot be read: {exc}") from exc
        if not isinstance(data, dict):
            raise TranscoderFormatError(f"registry file {path} must map names to entries")
        for name, value in data.items():
            entries.setdefault(str(name), _entry(str(name), value, path))
    return entries


def entries() -> dict[str, RegistryEntry]:
    """Every registry entry by name."""
    return dict(_load(tuple(registry_paths())))


def get_entry(name: str) -> RegistryEntry | None:
    """The entry called ``name`` or one of its ``aliases`` (case-insensitive), or None."""
    table = entries()
    if name in table:
        return table[name]
    lowered = {alias.lower(): e for e in table.values() for alias in (e.name, *e.aliases)}
    return lowered.get(str(name).lower())


def names() -> list[str]:
    """Sorted registry names."""
    return sorted(entries())
