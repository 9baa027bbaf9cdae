"""sparse-clt-hf: sparse transcoder (CLT / PLT) features for any Hugging Face Transformers model."""

from .attach import CLTAttachment, attach_clt
from .errors import (
    AlignmentError,
    HookSiteError,
    HubAccessError,
    IncompatibleTranscoderError,
    SparseCLTError,
    TranscoderFormatError,
)
from .extract import ExtractedShard, iter_extracted, load_extracted
from .feature_stats import Context, FeatureStats, feature_stats
from .features import FeatureHit, Features
from .transcoder import CrossLayerTranscoder, LayerEncoder, TranscoderConfig

__version__ = "0.1.0"

__all__ = [
    "AlignmentError",
    "CLTAttachment",
    "Context",
    "ExtractedShard",
    "FeatureStats",
    "CrossLayerTranscoder",
    "FeatureHit",
    "Features",
    "HookSiteError",
    "HubAccessError",
    "IncompatibleTranscoderError",
    "LayerEncoder",
    "SparseCLTError",
    "TranscoderConfig",
    "TranscoderFormatError",
    "__version__",
    "attach_clt",
    "feature_stats",
    "iter_extracted",
    "load_extracted",
]
