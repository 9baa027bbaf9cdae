"""Helpers shared by the format modules: JSON configs, layer choice, safetensors/npz reads, headers,
HF module hook names, and the describe summary.

Everything here reads without executing code (json, npz with ``allow_pickle=False``, safetensors)
and turns library errors into :class:`TranscoderFormatError` naming the file.
"""

from __future__ import annotations

import math
import re
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from safetensors import safe_open

from ..errors import HubAccessError, SparseCLTError, TranscoderFormatError
from ..io.sources import FileSource, Header, TensorInfo
from ..io.structured import load_json_object
from ..layer_encoder import check_shape
from .base import Summary
from .checks import check_tensor, decode_text

#: Description note for a transform that depends on the model's norm (see ``sites.NORM_DEPENDENT_HOOKS``).
PROVISIONAL_NOTE = (
    "input_transform {transform!r} is provisional: TransformerLens' ln2.hook_normalized is RMS-normalised on "
    "RMSNorm models and (x - mean) / sqrt(var + eps) on LayerNorm models (GPT-2, Pythia, OPT, ...); "
    "attach_clt / load_for_model choose it from the model's norm"
)
LAYER_IN_NAME = re.compile(r"(?:^|[/._-])layers?[._-]?(\d+)(?=$|[/._-])")


def read_json(source: FileSource, path: str) -> dict[str, Any]:
    """Parse a JSON object file of ``source`` with an error naming the file."""
    label = f"{source.name}/{path}"
    text = decode_text(source.fetch(path).read_bytes(), label)
    return load_json_object(text, label, error=TranscoderFormatError)


def choose_layers(
    source: FileSource,
    available: Iterable[int],
    wanted: list[int] | None,
    what: str,
    expected: Iterable[int] | None = None,
) -> list[int]:
    """The requested layers (all when None), checked against those ``source`` has.

    ``expected``: the layers the config lists (or a CLT's contiguous range); when all layers are asked
    for, one of those without its file is an error (never skipped), so ``layers=`` must exclude it."""
    have = sorted(set(available))
    if not have:
        raise TranscoderFormatError(f"{source.name}: no {what} found")
    if wanted is None:
        absent = sorted(set(expected or ()) - set(have))
        if absent:
            raise TranscoderFormatError(
                f"{source.name}: layers {absent} are listed by the config but their {what} are missing; "
                f"it has layers {have} (pass layers= to load only those)"
            )
        return have
    missing = [x for x in wanted if x not in have]
    if missing:
        raise TranscoderFormatError(f"{source.name}: no {what} for layers {missing}; it has layers {have}")
    return list(wanted)


def folder_of(path: str) -> str:
    """The folder part of a relative POSIX path ('' at the root)."""
    return path.rsplit("/", 1)[0] if "/" in path else ""


def join(folder: str, name: str) -> str:
    return f"{folder}/{name}" if folder else name


def layer_from_name(name: str) -> int | None:
    """The last ``layer_N`` / ``layers.N`` number in a path or repo name, if any."""
    found = LAYER_IN_NAME.findall(name)
    return int(found[-1]) if found else None


def pick_variant(source: FileSource, variants: dict[str, Any], variant: str | None, what: str) -> str:
    """One key of ``variants``: the only one, or the one asked for, else a clear error listing them."""
    if variant is not None:
        if variant not in variants:
            raise TranscoderFormatError(f"{source.name}: no {what} {variant!r}; found {sorted(variants)}")
        return variant
    if len(variants) != 1:
        raise TranscoderFormatError(
            f"{source.name} holds several {what}s {sorted(variants)}; pass variant=... to choose one "
            f"or point at a folder that holds one"
        )
    return next(iter(variants))


#: largest expansion of a deflated zip member (zlib's maximum ratio is about 1032:1)
_MAX_DEFLATE_RATIO = 1100
_NPY_HEADER_READERS = {
    (1, 0): np.lib.format.read_array_header_1_0,
    (2, 0): np.lib.format.read_array_header_2_0,
}


def _npz_error(label: str, what: str, exc: BaseException) -> SparseCLTError:
    """A format error naming the file, or the Hub error behind it (zipfile turns a failed ranged read
    into BadZipFile: the network, not the file, is at fault)."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, HubAccessError):
            return HubAccessError(f"{label}: {cause}")
        cause = cause.__cause__ or cause.__context__
    return TranscoderFormatError(f"{label}: {what} ({type(exc).__name__}: {exc})")


class NpzReader:
    """Per-array reads from one ``.npz`` file, with errors naming file and array.

    Never unpickles (an array of Python objects is refused) and checks each array's header against
    the bytes the archive holds before allocating anything, so a header claiming a huge shape is an
    error, not an allocation. ``path`` may be a seekable binary file (e.g. :meth:`FileSource.open_range`,
    whose reads are range requests): only the zip directory and the arrays read are then transferred."""

    def __init__(self, path: Path | BinaryIO, label: str) -> None:
        self.label = label
        try:
            if isinstance(path, (str, Path)):
                self._archive_size = Path(path).stat().st_size
            else:
                self._archive_size = path.seek(0, 2)
            self._zip = zipfile.ZipFile(path)
            self._members = {
                info.filename[:-4]: info for info in self._zip.infolist() if info.filename.endswith(".npy")
            }
        except MemoryError:
            raise
        except Exception as exc:  # zipfile raises many types for corrupt archives
            raise _npz_error(label, "not a readable .npz file", exc) from exc
        self.keys = set(self._members)

    def info(self, name: str) -> tuple[tuple[int, ...], bool, np.dtype]:
        """(shape, fortran order, dtype) of array ``name`` from its header, checked against the archive."""
        member = self._members[name]
        try:
            with self._zip.open(member) as fh:
                return self._header(fh, name, member)[:3]
        except (SparseCLTError, MemoryError):
            raise
        except Exception as exc:
            raise _npz_error(self.label, f"array {name!r} has an unreadable header", exc) from exc

    def _header(self, fh: Any, name: str, member: zipfile.ZipInfo) -> tuple[tuple[int, ...], bool, np.dtype, int]:
        version = np.lib.format.read_magic(fh)
        reader = _NPY_HEADER_READERS.get(version)
        if reader is None:
            raise TranscoderFormatError(f"{self.label}: array {name!r} has unsupported .npy version {version}")
        shape, fortran, dtype = reader(fh)
        if dtype.hasobject:
            raise TranscoderFormatError(
                f"{self.label}: array {name!r} holds Python objects (a pickle); refused - this library never "
                "unpickles (expected a numeric array)"
            )
        nbytes = math.prod(int(s) for s in shape) * dtype.itemsize
        data_bytes = member.file_size - fh.tell()
        stored_limit = (
            self._archive_size if member.compress_type == zipfile.ZIP_STORED
            else min(member.compress_size, self._archive_size) * _MAX_DEFLATE_RATIO + 65536
        )
        if nbytes != data_bytes or data_bytes > stored_limit:
            raise TranscoderFormatError(
                f"{self.label}: array {name!r} claims shape {list(shape)} of {dtype} ({nbytes} bytes) but the "
                f"archive holds {max(data_bytes, 0)} bytes for it (truncated or corrupt file)"
            )
        return tuple(int(s) for s in shape), bool(fortran), dtype, nbytes

    def _read(self, name: str) -> np.ndarray:
        member = self._members[name]
        with self._zip.open(member) as fh:
            shape, fortran, dtype, nbytes = self._header(fh, name, member)
            buf = bytearray(nbytes)
            pos = 0
            while pos < nbytes:
                chunk = fh.read(min(nbytes - pos, 1 << 24))
                if not chunk:
                    raise EOFError(f"{nbytes - pos} bytes missing")
                buf[pos : pos + len(chunk)] = chunk
                pos += len(chunk)
        array = np.frombuffer(buf, dtype=dtype)
        return array.reshape(shape[::-1]).T if fortran else array.reshape(shape)

    def get(self, name: str, shape: Iterable[int | None] | None = None, required: bool = True) -> torch.Tensor | None:
        if name not in self.keys:
            if required:
                raise TranscoderFormatError(f"{self.label}: missing array {name!r}; found {sorted(self.keys)}")
            return None
        try:
            array = self._read(name)
        except (SparseCLTError, MemoryError):
            raise
        except Exception as exc:
            raise _npz_error(self.label, f"array {name!r} could not be read (truncated or corrupt file?)", exc) from exc
        if array.dtype.kind != "f" or array.dtype.itemsize not in (2, 4, 8):
            raise TranscoderFormatError(
                f"{self.label}: array {name!r} has dtype {array.dtype}; expected a floating-point array"
            )
        if not array.dtype.isnative:
            array = array.astype(array.dtype.newbyteorder("="))
        tensor = check_tensor(name, torch.from_numpy(np.ascontiguousarray(array)), self.label)
        return tensor if shape is None else check_shape(name, tensor, shape, self.label)


def source_npz_headers(source: FileSource, path: str) -> Header:
    """:func:`npz_headers` of a source's file through :meth:`FileSource.open_range`: on the Hub, range
    requests for the zip directory and each array's headers (no download, deflated members included)."""
    with source.open_range(path) as fh:
        return npz_headers(fh, f"{source.name}/{path}")


def npz_headers(path: Path | BinaryIO, label: str) -> Header:
    """{array: TensorInfo(dtype, shape)} of an ``.npz`` (a path or seekable file) from the ``.npy`` headers
    only (no data read)."""
    reader = NpzReader(path, label)
    out: Header = {}
    for name in sorted(reader.keys):
        shape, _, dtype = reader.info(name)
        out[name] = TensorInfo(str(dtype), list(shape))
    return out


#: safetensors dtype names -> torch's (how configs and descriptions write a dtype)
ST_DTYPES = {
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "F64": "float64",
    "F8_E4M3": "float8_e4m3fn",
}


def dtype_of(info: TensorInfo) -> str:
    """A header's dtype as torch names it (``"F32"`` -> ``"float32"``)."""
    return ST_DTYPES.get(info.dtype, info.dtype)


def header_info(header: Header, label: str, tensor: str, ndim: int = 2) -> TensorInfo:
    """The info of ``tensor`` in a header read from ``label``, checked to have ``ndim`` dims."""
    if tensor not in header:
        raise TranscoderFormatError(f"{label}: no tensor {tensor!r}; found {sorted(header)}")
    info = header[tensor]
    if len(info.shape) != ndim or any(s < 0 for s in info.shape):
        raise TranscoderFormatError(f"{label}: {tensor} has shape {info.shape}; expected {ndim} dims")
    return info


def header_tensor(source: FileSource, path: str, tensor: str, ndim: int = 2) -> tuple[TensorInfo, Header]:
    """(info of ``tensor``, whole header) of a safetensors file of ``source``, from its header only."""
    header = source.header(path)
    return header_info(header, f"{source.name}/{path}", tensor, ndim), header


def jump_threshold(threshold: torch.Tensor | None) -> torch.Tensor | None:
    """Threshold for ``relu(z) * (z > t)`` (SAELens, Gemma Scope) run as ``z * (z > t)``: clamp t at 0."""
    return None if threshold is None else threshold.clamp_min(0)


def summary(
    fmt: str,
    layers: list[int],
    d_model: int | None,
    n_features: list[int] | int | None,
    site: str | None,
    activation: str | None,
    dtype: str | None,
    **extra: Any,
) -> Summary:
    """The :class:`~sparse_clt_hf.formats.base.Summary` a format's ``describe`` returns (None extras dropped)."""
    out: dict[str, Any] = {
        "format": fmt,
        "layers": layers,
        "d_model": d_model,
        "n_features": n_features,
        "site": site,
        "activation": activation,
        "dtype": dtype,
    }
    out.update({k: v for k, v in extra.items() if v is not None})
    return out  # type: ignore[return-value]


class SafetensorsReader:
    """Memory-mapped, per-tensor reads from one safetensors file, with errors naming file and tensor."""

    def __init__(self, path: Path, label: str | None = None) -> None:
        self.path = Path(path)
        self.label = label or self.path.name
        try:
            self._handle = safe_open(str(self.path), framework="pt")
            self.keys = set(self._handle.keys())
        except Exception as exc:  # safetensors raises its own error types for corrupt headers
            raise TranscoderFormatError(
                f"{self.label}: not a readable safetensors file ({type(exc).__name__}: {exc})"
            ) from exc

    def metadata(self) -> dict[str, str]:
        return self._handle.metadata() or {}

    def get(self, name: str, shape: Iterable[int | None] | None = None, required: bool = True) -> torch.Tensor | None:
        """Read tensor ``name``; check its shape (None entries match any size)."""
        if name not in self.keys:
            if required:
                raise TranscoderFormatError(
                    f"{self.label}: missing tensor {name!r}; found {sorted(self.keys)}"
                )
            return None
        try:
            tensor = self._handle.get_tensor(name)
        except Exception as exc:
            raise TranscoderFormatError(
                f"{self.label}: tensor {name!r} could not be read (truncated or corrupt file?): {exc}"
            ) from exc
        check_tensor(name, tensor, self.label)
        return tensor if shape is None else check_shape(name, tensor, shape, self.label)


# ---------------------------------------------------------------------- HF module hook names
# (module path below the decoder layer, "input" | "output") -> our site. Anything else becomes an
# explicit site "<prefix>.layers.{layer}.<module>:<which>" (see sites.resolve_site).
HF_MODULE_SITES: dict[tuple[str, str], str] = {
    ("", "input"): "resid_pre",
    ("", "output"): "resid_post",
    ("pre_feedforward_layernorm", "input"): "resid_mid",
    ("pre_feedforward_layernorm", "output"): "mlp_in",
    ("mlp", "input"): "mlp_in",
    ("post_feedforward_layernorm", "output"): "mlp_out",
}
_HF_HOOK = re.compile(r"^(?P<prefix>(?:.+\.)?layers)\.(?P<layer>\d+|\{all\})(?:\.(?P<module>.+?))?\.(?P<which>input|output)$")


def site_from_hf_hook(hook: str) -> tuple[str, int | None]:
    """Our site and the layer for an HF module hook such as ``model.layers.5.pre_feedforward_layernorm.output``."""
    m = _HF_HOOK.match(hook) if isinstance(hook, str) else None
    if not m:
        raise TranscoderFormatError(
            f"hook point {hook!r} is not of the form '<...>.layers.N[.<module>].input|output'"
        )
    module, which = m.group("module") or "", m.group("which")
    layer = None if m.group("layer") == "{all}" else int(m.group("layer"))
    site = HF_MODULE_SITES.get((module, which))
    if site is None:
        site = f"{m.group('prefix')}.{{layer}}" + (f".{module}" if module else "") + f":{which}"
    return site, layer
