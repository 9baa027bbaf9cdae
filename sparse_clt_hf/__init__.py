"""sparse-clt-hf: sparse transcoder (CLT / PLT) features for any Hugging Face Transformers model.

The public names below are imported on first use (PEP 562), so that ``import sparse_clt_hf.cli`` and
``sparse-clt-hf --help`` do not pay for importing torch and transformers.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

from ._version import __version__

#: public name -> the module that defines it (one place; ``__getattr__`` and ``__all__`` read it)
_EXPORTS: dict[str, str] = {
    "CLTAttachment": "attach",
    "attach_clt": "attach",
    "AttributionGraph": "attribution",
    "CustomTarget": "attribution",
    "attribute": "attribution",
    "logit_difference": "attribution",
    "AlignmentError": "errors",
    "FeaturesFileError": "errors",
    "HookSiteError": "errors",
    "HubAccessError": "errors",
    "IncompatibleTranscoderError": "errors",
    "SparseCLTError": "errors",
    "TranscoderFormatError": "errors",
    "ExtractedShard": "extracted",
    "iter_extracted": "extracted",
    "load_extracted": "extracted",
    "Context": "feature_stats",
    "FeatureStats": "feature_stats",
    "feature_stats": "feature_stats",
    "FeatureHit": "features",
    "Features": "features",
    "CrossLayerTranscoder": "transcoder",
    "LayerEncoder": "transcoder",
    "TranscoderConfig": "transcoder",
}

__all__ = sorted([*_EXPORTS, "__version__"])


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'sparse_clt_hf' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


class _Package(types.ModuleType):
    """The sub-module ``feature_stats`` and the function ``feature_stats`` share a name: importing the
    sub-module must not hide the function (``from sparse_clt_hf import feature_stats`` is the function,
    as it was when this file imported everything eagerly)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _EXPORTS and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


if TYPE_CHECKING:  # what type checkers and IDEs see
    # ruff: noqa: F401  (these names are re-exported lazily by __getattr__)
    from .attach import CLTAttachment, attach_clt
    from .attribution import AttributionGraph, CustomTarget, attribute, logit_difference
    from .errors import (
        AlignmentError,
        FeaturesFileError,
        HookSiteError,
        HubAccessError,
        IncompatibleTranscoderError,
        SparseCLTError,
        TranscoderFormatError,
    )
    from .extracted import ExtractedShard, iter_extracted, load_extracted
    from .feature_stats import Context, FeatureStats, feature_stats
    from .features import FeatureHit, Features
    from .transcoder import CrossLayerTranscoder, LayerEncoder, TranscoderConfig
