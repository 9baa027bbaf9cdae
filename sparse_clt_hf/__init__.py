"""sparse-clt-hf: sparse transcoder (CLT / PLT) features for any Hugging Face Transformers model."""

from ._version import __version__
from .attach import CLTAttachment, attach_clt
from .attribution import AttributionGraph, attribute
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

__all__ = [
    "AlignmentError",
    "AttributionGraph",
    "CLTAttachment",
    "Context",
    "ExtractedShard",
    "FeatureStats",
    "CrossLayerTranscoder",
    "FeatureHit",
    "Features",
    "FeaturesFileError",
    "HookSiteError",
    "HubAccessError",
    "IncompatibleTranscoderError",
    "LayerEncoder",
    "SparseCLTError",
    "TranscoderConfig",
    "TranscoderFormatError",
    "__version__",
    "attach_clt",
    "attribute",
    "feature_stats",
    "iter_extracted",
    "load_extracted",
]
