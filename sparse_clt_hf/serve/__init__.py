"""An OpenAI-compatible HTTP server whose completions carry every token's transcoder features.

``sparse-clt-hf serve`` (:mod:`sparse_clt_hf.commands.serve`) runs it with uvicorn; :func:`create_app`
builds the ASGI app to mount in your own. FastAPI and uvicorn are an optional extra:
``pip install "sparse-clt-hf[serve]"``. See docs/serve.md.
"""

from __future__ import annotations

try:
    from .app import attach_for_serving, create_app
except ImportError as exc:  # pragma: no cover - the optional extra is missing
    raise ImportError(
        f"the server needs FastAPI and uvicorn ({exc}): pip install 'sparse-clt-hf[serve]'"
    ) from exc
from .schemas import APIError

__all__ = ["APIError", "attach_for_serving", "create_app"]
