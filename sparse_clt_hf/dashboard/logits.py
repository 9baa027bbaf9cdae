"""Logit effects: the tokens whose logits a feature's decoder direction raises and lowers most.

The direction of feature ``i`` of source layer ``s`` is its decoder row; for a cross-layer transcoder
(``W_dec`` [m, n_out, d]) ``which`` picks the row: ``"sum"`` (default: the sum over every layer it
writes, i.e. its total direct write into the residual stream) or ``"last"`` (the slice into the last
layer it writes). The effect on the logits is ``direction @ W_U.T`` with ``W_U`` [vocab, d] the
model's output embedding; the final norm is not applied (its gain rescales the logits per
dimension; pass ``unembedding * gain`` to fold it in, as TransformerLens does).

Computed ``block`` features at a time, so memory is ``block * vocab`` floats, never ``m * vocab``.
A layer without a decoder (an encoder-only load) is skipped with a note.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import SparseCLTError

DIRECTIONS = ("sum", "last")
BLOCK_BYTES = 128 * 2**20


class LogitEffectsError(SparseCLTError, ValueError):
    """An unembedding that does not match the transcoder, or an unknown direction choice."""


@dataclass
class LogitEffects:
    """Per feature of one layer: the ``k`` most raised (``top_*``) and most lowered (``bottom_*``)
    token ids and logit changes per unit of activation; ``which`` says which decoder row was used."""

    layer: int
    which: str
    top_ids: torch.Tensor  # [m, k] int64, descending values
    top_values: torch.Tensor  # [m, k] float32
    bottom_ids: torch.Tensor  # [m, k] int64, ascending values
    bottom_values: torch.Tensor  # [m, k] float32


def unembedding_of(model: torch.nn.Module) -> torch.Tensor:
    """The output embedding ``W_U`` [vocab, d] of a Transformers causal LM."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or getattr(head, "weight", None) is None:
        raise LogitEffectsError(f"{type(model).__name__} has no output embedding (lm_head): no logit effects")
    return head.weight.detach()


def decoder_directions(transcoder, layer: int, which: str = "sum") -> torch.Tensor | None:
    """[m, d] decoder direction of every feature of ``layer`` (None when it has no decoder)."""
    if which not in DIRECTIONS:
        raise LogitEffectsError(f"which must be one of {DIRECTIONS}, got {which!r}")
    W = transcoder.encoder(layer).W_dec
    if W is None:
        return None
    return W.sum(1) if which == "sum" else W[:, -1, :]


@torch.no_grad()
def logit_effects(transcoder, unembedding: torch.Tensor, *, layers: list[int] | None = None, k: int = 10,
                  which: str = "sum", block: int | None = None) -> tuple[dict[int, LogitEffects], list[str]]:
    """Logit effects of every feature of ``layers`` (default: all); returns ``(effects, notes)`` where
    ``notes`` names the layers skipped for lack of a decoder."""
    if which not in DIRECTIONS:
        raise LogitEffectsError(f"which must be one of {DIRECTIONS}, got {which!r}")
    if unembedding.ndim != 2 or unembedding.shape[1] != transcoder.config.d_model:
        raise LogitEffectsError(f"unembedding has shape {tuple(unembedding.shape)}; expected [vocab, "
                                f"{transcoder.config.d_model}] (the transcoder's d_model)")
    vocab = unembedding.shape[0]
    k = min(int(k), vocab)
    if k <= 0:
        raise LogitEffectsError(f"k must be positive, got {k}")
    block = block or max(1, BLOCK_BYTES // (4 * vocab))
    U = unembedding.float()
    effects, notes = {}, []
    for layer in layers if layers is not None else transcoder.layers:
        D = decoder_directions(transcoder, layer, which)
        if D is None:
            notes.append(f"layer {layer}: no decoder loaded, logit effects skipped")
            continue
        m = D.shape[0]
        out = [torch.empty(m, k, dtype=torch.int64), torch.empty(m, k), torch.empty(m, k, dtype=torch.int64),
               torch.empty(m, k)]
        for s in range(0, m, block):
            logits = D[s : s + block].to(U.device, torch.float32) @ U.T  # [block, vocab]
            top = logits.topk(k, dim=1)
            bot = logits.topk(k, dim=1, largest=False)
            out[0][s : s + block], out[1][s : s + block] = top.indices.cpu(), top.values.cpu()
            out[2][s : s + block], out[3][s : s + block] = bot.indices.cpu(), bot.values.cpu()
        effects[layer] = LogitEffects(layer, which, *out)
    return effects, notes
