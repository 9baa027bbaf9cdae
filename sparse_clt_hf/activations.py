"""Activation functions: one object per activation, used by encoding, training and every format.

Each :class:`Activation` has a dense form (:meth:`~Activation.dense`, what ``encode`` runs) and the
blocked form the top-k kernel (``CrossLayerTranscoder.encode_sparse``) runs on one block of
pre-activations at a time: :meth:`~Activation.prepare_block`, a top-k of the block,
:meth:`~Activation.count_block` and, once per row chunk, :meth:`~Activation.finish`. The base class
implements the blocked form for any element-wise activation from :meth:`~Activation.dense`; ReLU and
TopK override it where order-preserving shortcuts are faster.

Adding an activation is a subclass and an entry in :data:`ACTIVATIONS` (see :func:`register`).
"""

from __future__ import annotations

import torch

from .errors import TranscoderFormatError


class Activation:
    """An activation function ``a = act(z)`` of pre-activations ``z`` [..., m]."""

    #: name used in configs (``activation: <name>``)
    name: str = ""
    #: needs a per-feature ``threshold`` tensor [m]
    needs_threshold: bool = False
    #: needs a positive ``k`` (keeps the k largest pre-activations)
    takes_k: bool = False

    def dense(self, z: torch.Tensor, threshold: torch.Tensor | None = None, k: int | None = None) -> torch.Tensor:
        """Dense activations of ``z`` (element-wise activations ignore ``k``)."""
        raise NotImplementedError

    # -------------------------------------------------------------- blocked top-k form
    def candidates(self, k: int, act_k: int | None) -> int:
        """How many top values each block keeps as candidates."""
        return k

    def prepare_block(
        self, z: torch.Tensor, threshold: torch.Tensor | None, activation_threshold: float | None
    ) -> torch.Tensor:
        """The block's values whose top-k are the candidates (may modify ``z`` in place)."""
        z = self.dense(z, threshold)
        if activation_threshold is not None:
            z = z.masked_fill_(z < activation_threshold, 0)
        return z

    def count_block(self, z: torch.Tensor, activation_threshold: float | None) -> torch.Tensor | None:
        """Active features per row of the prepared block (may destroy ``z``); None: counted in finish."""
        # in-place comparison and a float sum: vectorised, exact up to 2**24 features
        return z.ne_(0).sum(-1, dtype=torch.float32)

    def finish(
        self,
        top_z: torch.Tensor,
        top_i: torch.Tensor,
        count: torch.Tensor | int,
        k: int,
        activation_threshold: float | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | int]:
        """The activated top-k (values, indices) of a row chunk and its active counts."""
        return top_z, top_i, count


class ReLU(Activation):
    """``max(z, 0)``; keeps the order of z, so the kernel takes the top-k of raw z and activates those."""

    name = "relu"

    def dense(self, z: torch.Tensor, threshold: torch.Tensor | None = None, k: int | None = None) -> torch.Tensor:
        return torch.relu(z)

    @staticmethod
    def _cut(activation_threshold: float | None) -> float | None:
        return activation_threshold if activation_threshold is not None and activation_threshold > 0 else None

    def prepare_block(self, z, threshold, activation_threshold):
        return z

    def count_block(self, z, activation_threshold):
        # relu with a positive threshold t is "zero what is < t"; without one, "zero what is <= 0"
        cut = self._cut(activation_threshold)
        active = z.gt_(0) if cut is None else z.ge_(cut)
        return active.sum(-1, dtype=torch.float32)

    def finish(self, top_z, top_i, count, k, activation_threshold):
        cut = self._cut(activation_threshold)
        top_z = top_z.clamp_min_(0) if cut is None else top_z.masked_fill_(top_z < cut, 0)
        return top_z, top_i, count


class JumpReLU(Activation):
    """``z * (z > threshold)`` (as in circuit-tracer)."""

    name = "jumprelu"
    needs_threshold = True

    def dense(self, z: torch.Tensor, threshold: torch.Tensor | None = None, k: int | None = None) -> torch.Tensor:
        return z * (z > threshold)

    def prepare_block(self, z, threshold, activation_threshold):
        z = z.mul_(z > threshold)
        if activation_threshold is not None:
            z = z.masked_fill_(z < activation_threshold, 0)
        return z


class TopK(Activation):
    """The k largest pre-activations, ReLU'd; everything else 0."""

    name = "topk"
    takes_k = True

    def dense(self, z: torch.Tensor, threshold: torch.Tensor | None = None, k: int | None = None) -> torch.Tensor:
        kk = min(int(k), z.shape[-1])  # type: ignore[arg-type]
        vals, idx = z.topk(kk, dim=-1)
        return torch.zeros_like(z).scatter_(-1, idx, torch.relu(vals))

    def candidates(self, k: int, act_k: int | None) -> int:
        return act_k if act_k is not None else k  # the act_k largest raw z

    def prepare_block(self, z, threshold, activation_threshold):
        return z

    def count_block(self, z, activation_threshold):
        return None

    def finish(self, top_z, top_i, count, k, activation_threshold):
        # the positives among the act_k largest z; keep the k largest of those
        top_z = top_z.clamp_min_(0)
        if activation_threshold is not None:
            top_z = top_z.masked_fill_(top_z < activation_threshold, 0)
        count = (top_z != 0).sum(-1)
        return top_z[:, :k], top_i[:, :k], count


#: name -> activation: the one place that lists the activations.
ACTIVATIONS: dict[str, Activation] = {a.name: a for a in (ReLU(), JumpReLU(), TopK())}


def register(activation: Activation) -> Activation:
    """Add ``activation`` to :data:`ACTIVATIONS` (by its ``name``) and return it."""
    ACTIVATIONS[activation.name] = activation
    return activation


def get_activation(name: str) -> Activation:
    """The activation called ``name``, with an error listing the known ones."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise TranscoderFormatError(
            f"unknown activation {name!r}; expected one of {', '.join(ACTIVATIONS)}"
        ) from None
