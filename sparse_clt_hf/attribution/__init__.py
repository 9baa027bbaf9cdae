"""Attribution graphs: why the model produced a token, in the local replacement model of a transcoder.

Modules (data flows down): ``layout`` (node order) -> ``prune`` (influence, pruning, scores: pure tensor
functions) -> ``graph`` (:class:`AttributionGraph`, save/load, JSON) -> ``engine`` (:func:`attribute`).
"""

from .engine import AttributionMemoryError, CustomTarget, attribute, attribute_generated, logit_difference
from .graph import AttributionGraph

__all__ = ["AttributionGraph", "AttributionMemoryError", "CustomTarget", "attribute", "attribute_generated",
           "logit_difference"]
