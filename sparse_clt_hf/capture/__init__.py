"""The capture engine: what runs while the model runs, in the order data flows through it.

- :mod:`.tap` wraps ``model.generate``: call boundaries, refusals (beam search), a per-step
  callback that accounts for compiled decode steps, and the end-of-call alignment check.
- :mod:`.positions` works out which token positions an eager forward pass adds to a record.
- :mod:`.buffer` is the decode buffer: a static ``[batch, window, d]`` tensor per layer that site
  hooks write into (in place, graph-safe) and that is encoded in one batched call per window.
- :mod:`.record` holds the encoded features of one call.
- :mod:`.sitehooks` is the small protocol for code that runs at a transcoder site of a layer
  (the feature recorder reads the stream; steering writes into it) and registers it as hooks.
- :mod:`.recorder` is the feature recorder: it ties the above together.
- :mod:`.stats` counts encode calls, rows, seconds and flushes.
"""

from .recorder import FeatureRecorder, StepCallback
from .sitehooks import SiteHook, hook_sites
from .stats import CaptureStats

__all__ = ["CaptureStats", "FeatureRecorder", "SiteHook", "StepCallback", "hook_sites"]
