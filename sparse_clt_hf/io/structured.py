"""The one place that parses YAML and JSON the package reads from files: bounded and alias-free.

A 1 KB YAML file with nested aliases (a "billion laughs" structure) expands into an object graph that
any later walk (copying a config, writing a model card, ``save_pretrained``) visits billions of times.
YAML anchors and aliases are therefore refused outright (no config, manifest or metadata we read needs
them), and every text is bounded in size before it is parsed; nesting deeper than :data:`MAX_DEPTH` is
refused too. Errors are raised as the caller's library error class, naming the file.
"""

from __future__ import annotations

import json
from typing import Any

import yaml

#: the largest config / manifest / metadata text parsed (bytes); real ones are a few KB
MAX_TEXT_BYTES = 16 << 20
#: the deepest nesting accepted (real configs nest 2-3 levels)
MAX_DEPTH = 64


class StructuredTextError(ValueError):
    """Raised (as the caller's error class, see ``error=``) for a text that is not accepted."""


class _NoAliasLoader(yaml.SafeLoader):
    """PyYAML's safe loader that refuses anchors, aliases and deep nesting while composing."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            raise yaml.composer.ComposerError(
                None, None, f"YAML aliases (*{event.anchor}) are not accepted", event.start_mark
            )
        if getattr(event, "anchor", None) is not None:
            raise yaml.composer.ComposerError(
                None, None, f"YAML anchors (&{event.anchor}) are not accepted", event.start_mark
            )
        self._depth = getattr(self, "_depth", 0) + 1
        try:
            if self._depth > MAX_DEPTH:
                raise yaml.composer.ComposerError(
                    None, None, f"nesting deeper than {MAX_DEPTH} levels", event.start_mark
                )
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _check_size(text: str | bytes, label: str, limit: int, error: type[Exception]) -> None:
    if len(text) > limit:
        raise error(f"{label}: {len(text)} bytes is larger than the {limit} accepted for this file")


def _depth(value: Any, label: str, error: type[Exception]) -> None:
    """Refuse JSON nested deeper than :data:`MAX_DEPTH` (iteratively: no recursion limit to hit)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > MAX_DEPTH:
                raise error(f"{label}: nesting deeper than {MAX_DEPTH} levels")
            stack.extend((v, depth + 1) for v in (item.values() if isinstance(item, dict) else item))


def load_yaml(text: str | bytes, label: str, *, error: type[Exception] = StructuredTextError,
              limit: int = MAX_TEXT_BYTES) -> Any:
    """Parse YAML ``text`` safely (no code, no anchors/aliases, bounded size and depth) or raise ``error``."""
    _check_size(text, label, limit, error)
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise error(f"{label}: not UTF-8 text ({exc})") from exc
    loader = _NoAliasLoader(text)  # (a SafeLoader: only plain data, never code)
    try:
        return loader.get_single_data()
    except (yaml.YAMLError, ValueError, TypeError, OverflowError, RecursionError) as exc:
        raise error(f"{label} is not accepted YAML: {exc}") from exc
    finally:
        loader.dispose()


def load_json(text: str | bytes, label: str, *, error: type[Exception] = StructuredTextError,
              limit: int = MAX_TEXT_BYTES) -> Any:
    """Parse JSON ``text`` (bounded size and depth) or raise ``error``."""
    _check_size(text, label, limit, error)
    try:
        value = json.loads(text)
    except (ValueError, TypeError, RecursionError) as exc:  # (UnicodeDecodeError is a ValueError)
        raise error(f"{label} is not valid JSON: {exc}") from exc
    _depth(value, label, error)
    return value


def load_json_object(text: str | bytes, label: str, *, error: type[Exception] = StructuredTextError,
                     limit: int = MAX_TEXT_BYTES) -> dict[str, Any]:
    """:func:`load_json` of a text that must hold a JSON object."""
    value = load_json(text, label, error=error, limit=limit)
    if not isinstance(value, dict):
        raise error(f"{label}: expected a JSON object, got {type(value).__name__}")
    return value
