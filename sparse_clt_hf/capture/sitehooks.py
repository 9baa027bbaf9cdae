"""The site-hook protocol: code that runs at a transcoder site of one layer on every forward pass.

A :class:`SiteHook` is called with the layer and the site's activation ``[batch, positions, d]``
(or ``[rows, d]`` where the model flattens). A reader (the feature recorder) returns ``None``; a
writer (steering) may return a replacement tensor of the same shape, which the model then uses.
:func:`hook_sites` registers one hook object on resolved hook points and returns the handles.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import torch
from torch.utils.hooks import RemovableHandle

from ..sites import HookPoint


class SiteHook(Protocol):
    """Runs at a site of ``layer``; returns ``None`` (read only) or the tensor the model should use instead."""

    def __call__(self, layer: int, hidden: torch.Tensor) -> torch.Tensor | None: ...


_HIDDEN_KWARGS = ("hidden_states", "x", "input", "hidden_state")


def _find_input(args: tuple, kwargs: dict[str, Any]) -> tuple[int | str, torch.Tensor]:
    """Where the hidden states are among a module's inputs: a positional index or a keyword."""
    if args and torch.is_tensor(args[0]):
        return 0, args[0]
    for key in _HIDDEN_KWARGS:
        if torch.is_tensor(kwargs.get(key)):
            return key, kwargs[key]
    for key, value in kwargs.items():
        if torch.is_tensor(value) and value.is_floating_point():
            return key, value
    raise RuntimeError("could not find the hidden states among the hooked module's inputs")


def hook_sites(points: Mapping[int, HookPoint], hook: SiteHook) -> list[RemovableHandle]:
    """Register ``hook`` at every ``layer -> point``; on error, nothing stays registered."""
    handles: list[RemovableHandle] = []
    try:
        for layer, point in points.items():
            if point.which == "input":

                def pre(mod: Any, args: tuple, kwargs: dict[str, Any], _layer: int = layer) -> Any:
                    where, h = _find_input(args, kwargs)
                    new = hook(_layer, h)
                    if new is None:
                        return None
                    if isinstance(where, int):
                        return (new, *args[1:]), kwargs
                    return args, {**kwargs, where: new}

                handles.append(point.module.register_forward_pre_hook(pre, with_kwargs=True))
            else:

                def post(mod: Any, args: tuple, out: Any, _layer: int = layer) -> Any:
                    h = out if torch.is_tensor(out) else out[0]
                    new = hook(_layer, h)
                    if new is None:
                        return None
                    return new if torch.is_tensor(out) else (new, *out[1:])

                handles.append(point.module.register_forward_hook(post))
    except BaseException:
        for handle in handles:
            handle.remove()
        raise
    return handles
