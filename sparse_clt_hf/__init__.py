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
from .features import FeatureHit, Features
from .transcoder import CrossLayerTranscoder, LayerEncoder, TranscoderConfig

__version__ = "0.1.0"

__all__ = [
    "AlignmentError",
    "CLTAttachment",
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
]
