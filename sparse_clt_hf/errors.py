"""Exceptions raised by sparse-clt-hf. Each one says what was wrong and what was expected."""

from __future__ import annotations


class SparseCLTError(Exception):
    """Base class of every error this library raises on purpose."""


class TranscoderFormatError(SparseCLTError, ValueError):
    """A transcoder's files are missing, corrupt, or hold tensors of the wrong name, shape or dtype."""


class IncompatibleTranscoderError(SparseCLTError, ValueError):
    """A transcoder does not fit the model it is attached to (width, depth, layers)."""


class HookSiteError(SparseCLTError, ValueError):
    """A hook site does not exist for this architecture."""


class AlignmentError(SparseCLTError, RuntimeError):
    """Features cannot be aligned with the tokens of this call (e.g. beam search)."""


class HubAccessError(SparseCLTError, OSError):
    """A Hub repository, revision or file cannot be reached (missing, private, offline and not cached)."""


class ExtractError(SparseCLTError, ValueError):
    """Bad input for an extraction (data, output folder, arguments) or an unusable output folder."""


class FeaturesFileError(SparseCLTError, ValueError):
    """A features file (written by ``Features.save``) is missing, corrupt, or holds inconsistent tensors."""
