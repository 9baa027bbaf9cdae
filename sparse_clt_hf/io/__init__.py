"""Where transcoder files come from and go to.

- :mod:`~sparse_clt_hf.io.sources`: :class:`~sparse_clt_hf.io.sources.FileSource` (local folders and
  Hub repos: list, size, header, fetch one file), the safetensors header reader, ``hf://`` URIs.
- :mod:`~sparse_clt_hf.io.refs`: a user's reference (folder, ``org/repo[/sub][@rev]``, ``hf://``,
  registry name) resolved to a typed :class:`~sparse_clt_hf.io.refs.Reference` (source + hints).
- :mod:`~sparse_clt_hf.io.push`: upload a native folder with a model card.

This package imports nothing at import time, so its modules can sit at different layers
(``sources``/``refs`` below the formats, ``push`` above them).
"""
