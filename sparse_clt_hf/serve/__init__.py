"""An OpenAI-compatible HTTP server whose completions carry every token's transcoder features.

``sparse-clt-hf serve`` (:mod:`sparse_clt_hf.commands.serve`) runs it with uvicorn; :func:`create_app`
builds the ASGI app to mount in your own. FastAPI and uvicorn are an optional extra:
``pip install "sparse-clt-hf[serve]"``. See docs/serve.md.
"""

from __future__ import annotations

from typing import Any

try:
    from .app import create_app
except ImportError as exc:  # pragma: no cover - the optional extra is missing
    raise ImportError(
        f"the server needs FastAPI and uvicorn ({exc}): pip install 'sparse-clt-hf[serve]'"
    ) from exc
from .schemas import APIError

__all__ = ["APIError", "attach_for_serving", "create_app"]


class StepHook:
    """The attachment's ``on_step`` callback, pointed at a scheduler once the app exists."""

    def __init__(self) -> None:
        self.target: Any = None

    def __call__(self, features: Any) -> None:
        if self.target is not None:
            self.target(features)


def attach_for_serving(model: Any, transcoder: Any, **kwargs: Any) -> Any:
    """:func:`~sparse_clt_hf.attach.attach_clt` with the per-pass callback the server needs (every
    pass's features are handed over as soon as they are encoded, so tokens stream with their features)."""
    from ..attach import attach_clt

    hook = StepHook()
    clt = attach_clt(model, transcoder, on_step=hook, **kwargs)
    clt._serve_on_step = hook
    return clt
