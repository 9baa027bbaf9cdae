"""Which token positions an eager forward pass adds to a record.

Everything here reads what the decoder stack receives (input ids or embeddings, the cache, the
attention mask) and decides, in Python, where the pass's positions go: the next positions of the
current record (prefill, decode step, chunked prefill), only the new tail of a recomputed prefix
(``use_cache=False``), a rollback (assisted decoding rejected draft tokens), or a new record.

The cache length comes from ``get_seq_length()``: a Python int for a dynamic cache, but a device
tensor for a static one (transformers 5.x keeps ``cumulative_length`` on the device; 4.57 passes a
``cache_position`` tensor instead). :func:`past_length` hands such a length over unread: reading it
would be a host sync per pass, so the recorder reads it only outside generate and otherwise checks it
on the device against what it accounted for (:meth:`~.buffer.DecodeBuffer.expect_value`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class PassShape:
    """What the stack saw: batch, input positions, cached positions before them (an int, or a 0-d device
    tensor where the cache keeps its length on the device), token ids if any."""

    batch: int
    length: int
    past: int | torch.Tensor
    ids: torch.Tensor | None
    device: torch.device


@dataclass(frozen=True)
class Placement:
    """Where a pass goes. ``start``: first record position it writes; ``skip``: leading input
    positions already recorded (recomputed prefix); ``new_record``: it starts a new record."""

    start: int
    skip: int
    new_record: bool


def forward_is_compiled(model: Any) -> bool:
    """Whether ``model.forward`` was replaced by a ``torch.compile`` wrapper: the decoder stack's hooks then
    run inside the compiled region (no Python per pass) and the model's own hooks outside it, so the
    model's hooks must place each pass."""
    fwd = model.__dict__.get("forward")
    return fwd is not None and getattr(fwd, "_torchdynamo_orig_callable", None) is not None


def input_ids(args: tuple, kwargs: dict[str, Any]) -> torch.Tensor | None:
    ids = kwargs.get("input_ids")
    if ids is None and args and torch.is_tensor(args[0]) and not args[0].is_floating_point():
        ids = args[0]
    return ids


def cache_of(kwargs: dict[str, Any]) -> Any:
    """The cache a pass was given (transformers 5.x names it ``cache``, 4.x ``past_key_values``), or None."""
    return kwargs.get("cache", kwargs.get("past_key_values"))


def past_length(kwargs: dict[str, Any]) -> int | torch.Tensor:
    """Positions already in the cache the stack was given (0 without one): an int, or a 0-d tensor on
    the cache's device where the cache keeps its length there (not read here: no host sync)."""
    cache = cache_of(kwargs)
    if cache is None:
        return 0
    position = kwargs.get("cache_position")
    if torch.is_tensor(position) and position.numel() and getattr(cache, "is_compileable", False):
        # transformers 4.x: a static cache's get_seq_length counts the non-zero key slots of row 0, which
        # left padding fools (a zero pad embedding gives zero keys); the cache position is exact
        return position.reshape(-1)[0]
    getter = getattr(cache, "get_seq_length", None)
    if getter is not None:
        n = getter()
        return n.reshape(()) if torch.is_tensor(n) else int(n)
    if isinstance(cache, (tuple, list)) and cache and cache[0] is not None:  # legacy tuple cache
        return int(cache[0][0].shape[-2])
    return 0


def pass_shape(args: tuple, kwargs: dict[str, Any], caller_ids: torch.Tensor | None) -> PassShape | None:
    """The shape of a stack pass, or ``None`` for a pass that carries no token positions."""
    ids = input_ids(args, kwargs)
    embeds = kwargs.get("inputs_embeds")
    if ids is None and caller_ids is not None and embeds is not None and caller_ids.shape == embeds.shape[:2]:
        ids = caller_ids  # multimodal models pass embeddings to the text stack
    ref = ids if ids is not None else embeds
    if ref is None:
        return None
    return PassShape(ref.shape[0], ref.shape[1], past_length(kwargs), ids, ref.device)


def place(shape: PassShape, batch: int | None, recorded: int, in_call: bool) -> Placement:
    """Where a pass of ``shape`` goes, given the current record's batch and recorded positions
    (``shape.past`` must be an int by now)."""
    assert isinstance(shape.past, int)
    same = batch == shape.batch
    if same and shape.past > 0:
        return Placement(shape.past, 0, False)
    if same and shape.past == 0 and in_call and shape.length > recorded > 0:
        return Placement(0, recorded, False)  # use_cache=False: the prefix is recomputed
    return Placement(shape.past, 0, True)


def new_positions_mask(kwargs: dict[str, Any], batch: int, length: int, new: int, device: torch.device) -> torch.Tensor:
    """Mask [batch, new] of the pass's last ``new`` positions (False on padding)."""
    mask = kwargs.get("attention_mask")
    if torch.is_tensor(mask) and mask.ndim == 2 and mask.shape[0] == batch and mask.shape[1] >= length:
        return mask[:, mask.shape[1] - new :].bool()
    return torch.ones(batch, new, dtype=torch.bool, device=device)


def generated_mask(prompt_mask: torch.Tensor, start: int, new: int) -> torch.Tensor:
    """Mask [batch, new] of positions ``start..start+new`` of a generate call: the prompt's mask where
    they lie in the prompt, True after it (generate attends to every generated token). Used instead
    of what the stack receives, which a static cache turns into a 4-D mask."""
    batch, prompt = prompt_mask.shape
    mask = torch.ones(batch, new, dtype=torch.bool, device=prompt_mask.device)
    if start < prompt:
        upto = min(start + new, prompt)
        mask[:, : upto - start] = prompt_mask[:, start:upto].bool()
    return mask


class PassMasks:
    """Masks ``[batch, new]`` of the positions a pass adds (False on padding), one cached all-True mask per
    shape and device so that a decode step makes no new tensor."""

    def __init__(self) -> None:
        self._ones: dict[tuple[int, int, str], torch.Tensor] = {}

    def __call__(
        self,
        prompt_mask: torch.Tensor | None,
        batch: int,
        start: int,
        new: int,
        given: tuple[dict[str, Any], int] | None,
        device: torch.device,
    ) -> torch.Tensor:
        """Positions ``start..start+new``: from the generate call's prompt mask inside a call (the stack may
        see a 4-D mask there), else from the attention mask the pass was given (``given``: its kwargs and
        input length), else all real."""
        if prompt_mask is not None and prompt_mask.shape[0] == batch:
            if start >= prompt_mask.shape[1]:
                return self.all_real(batch, new, device)  # a decode step: no new tensor, no launch
            return generated_mask(prompt_mask, start, new).to(device)
        if given is not None:
            return new_positions_mask(given[0], batch, given[1], new, device)
        return self.all_real(batch, new, device)

    def all_real(self, batch: int, new: int, device: torch.device) -> torch.Tensor:
        """An all-True mask (read only)."""
        key = (batch, new, str(device))
        mask = self._ones.get(key)
        if mask is None:
            mask = self._ones[key] = torch.ones(batch, new, dtype=torch.bool, device=device)
        return mask
