"""Hub access, kept as one import for users: re-exports of :mod:`sparse_clt_hf.io` (sources, references,
push) and of the weight-free :func:`describe` / :func:`check_before_download`."""

from __future__ import annotations

from .errors import HubAccessError
from .formats import Description, describe
from .io.push import push_folder, push_to_hub
from .io.refs import Reference, open_source, resolve
from .io.sources import (
    FileSource,
    HubRef,
    HubSource,
    LocalSource,
    TensorInfo,
    hub_endpoint,
    open_uri,
    parse_hub_ref,
    read_safetensors_header,
)
from .loading import check_before_download

__all__ = [
    "Description",
    "FileSource",
    "HubAccessError",
    "HubRef",
    "HubSource",
    "LocalSource",
    "Reference",
    "TensorInfo",
    "check_before_download",
    "describe",
    "hub_endpoint",
    "open_source",
    "open_uri",
    "parse_hub_ref",
    "push_folder",
    "push_to_hub",
    "read_safetensors_header",
    "resolve",
]
