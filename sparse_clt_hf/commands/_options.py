"""Options shared by several sub-commands, among them how a model is loaded (:func:`add_model_options`,
:func:`model_load_kwargs`, :func:`resolve_device`, :func:`load_model`): one place for every command
that loads a model. Nothing here imports torch or transformers at import time (``--help`` and argument
errors answer at once); the values are checked by argparse, the device's availability when it is used."""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..io.refs import Reference


def layers_arg(text: str | None) -> list[int] | None:
    """``"0-3,7"`` -> ``[0, 1, 2, 3, 7]``; None or '' -> None (all layers)."""
    if not text:
        return None
    out: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out += list(range(int(lo), int(hi) + 1)) if hi else [int(lo)]
    return out


def add_ref_options(parser: argparse.ArgumentParser) -> None:
    """``--format``, ``--variant`` and the Hub options of a command that reads a transcoder reference."""
    parser.add_argument("--format", default=None, help="format name (default: detected)")
    parser.add_argument(
        "--variant", default=None, help="which transcoder per layer, e.g. a Gemma Scope L0 folder"
    )
    parser.add_argument("--revision", default=None, help="Hub branch, tag or commit")
    parser.add_argument("--cache-dir", default=None, help="Hub cache folder (default: the standard HF cache)")
    parser.add_argument("--local-files-only", action="store_true", help="use the cache only, never download")


def resolve_arg(ref: str, args: argparse.Namespace) -> Reference:
    """The reference ``ref`` with the Hub options of ``args``."""
    from ..io.refs import resolve

    return resolve(
        ref, revision=args.revision, cache_dir=args.cache_dir, local_files_only=args.local_files_only
    )


def add_generation_options(parser: argparse.ArgumentParser, prompt_default: str | None) -> None:
    """Prompt and display options of ``demo`` and ``generate``."""
    parser.add_argument("--prompt", default=prompt_default, required=prompt_default is None, help="user prompt")
    parser.add_argument("--max-new-tokens", type=int, default=24, help="most tokens to generate (greedy); the answer may stop earlier at the end of text")
    parser.add_argument("--top-k", type=int, default=8, help="features recorded per token and layer (the strongest)")
    parser.add_argument("--show", type=int, default=4, help="features shown per token (strongest across layers)")
    parser.add_argument("--no-chat-template", dest="chat", action="store_false",
                        help="feed the prompt as plain text instead of through the chat template")
    parser.add_argument("--html", default=None, metavar="PATH",
                        help="also write a self-contained HTML page to explore the features token by token")
    parser.add_argument("--stats", default=None, metavar="PATH",
                        help="per-feature statistics for labels (a stats.safetensors file or a folder holding one, "
                             "e.g. an extraction; default: the stats.safetensors next to the transcoder, if any)")


# ---------------------------------------------------------------------------- loading a model
#: ``--dtype`` values -> what ``from_pretrained(dtype=...)`` gets ("auto": the checkpoint's own dtype)
DTYPES = ("auto", "bfloat16", "float16", "float32")
#: ``--attn-implementation`` values transformers ships (a Hub kernel ``org/repo`` is accepted as well)
ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flex_attention", "flash_attention_2", "flash_attention_3",
                        "flash_attention_4")
DEVICE_PATTERN = re.compile(r"^(cpu|mps|cuda(:\d+)?|xpu(:\d+)?)$")


def device_arg(text: str) -> str:
    """``--device``: cpu, cuda, cuda:N, mps or xpu[:N] (checked for availability when the model loads)."""
    if not DEVICE_PATTERN.match(text):
        raise argparse.ArgumentTypeError(f"invalid device {text!r}: expected cpu, cuda, cuda:N, mps or xpu")
    return text


def attn_arg(text: str) -> str:
    """``--attn-implementation``: one of :data:`ATTN_IMPLEMENTATIONS` or a Hub kernel ``org/repo``."""
    if text in ATTN_IMPLEMENTATIONS or re.match(r"^[\w.-]+/[\w.:-]+$", text):
        return text
    raise argparse.ArgumentTypeError(
        f"invalid attention implementation {text!r}: expected one of {', '.join(ATTN_IMPLEMENTATIONS)} "
        "or a Hub kernel such as kernels-community/flash-attn")


def add_model_options(parser: argparse.ArgumentParser, *, device_map: bool = True,
                      dtype_help: str | None = None) -> None:
    """``--device``, ``--dtype``, ``--device-map`` (unless ``device_map=False``; exclusive with
    ``--device``) and ``--attn-implementation``, as transformers' own tools take them (``dtype_help``:
    a command's own words for its dtype default)."""
    group = parser.add_argument_group("model loading")
    where = group.add_mutually_exclusive_group() if device_map else group
    where.add_argument("--device", type=device_arg, default=None,
                       help="where the model runs: cpu, cuda, cuda:N, mps (default: cuda when available, else cpu)")
    if device_map:
        where.add_argument("--device-map", default=None, metavar="MAP",
                           help="split the model across devices as from_pretrained(device_map=MAP) does, e.g. "
                                "'auto' for a model larger than one GPU (instead of --device)")
    group.add_argument("--dtype", choices=DTYPES, default=None,
                       help=dtype_help or "model dtype; auto = the checkpoint's own (default: auto on a GPU, "
                                          "float32 on the cpu; the transcoder follows the model)")
    group.add_argument("--attn-implementation", type=attn_arg, default=None, metavar="IMPL",
                       help=f"attention kernel: {', '.join(ATTN_IMPLEMENTATIONS)} or a Hub kernel "
                            "(default: transformers' choice)")


def _accelerator_available(kind: str) -> bool:
    import torch

    if kind == "cuda":
        return torch.cuda.is_available()
    if kind == "mps":
        return bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()
    if kind == "xpu":
        return hasattr(torch, "xpu") and torch.xpu.is_available()
    return True


def resolve_device(args: argparse.Namespace) -> str | None:
    """The device the model goes to: ``--device``, else cuda when available, else cpu; None with
    ``--device-map`` (the map places the layers; inputs go to ``model.device``). Raises ValueError
    when the device asked for is not available here."""
    if getattr(args, "device_map", None) is not None:
        return None
    device = getattr(args, "device", None)
    if device is None:
        return "cuda" if _accelerator_available("cuda") else "cpu"
    if not _accelerator_available(device.partition(":")[0]):
        raise ValueError(f"--device {device}: no {device.partition(':')[0]} device is available here (use --device cpu)")
    return device


def model_load_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The ``from_pretrained`` keyword arguments of the model options: ``dtype`` (a torch dtype or
    "auto"; float32 on the cpu when not given, "auto" elsewhere), ``device_map`` (``--device-map``, or the
    single device of :func:`resolve_device` other than the cpu, so that the weights load straight onto it) and
    ``attn_implementation`` when given."""
    import torch

    device = resolve_device(args)
    name = getattr(args, "dtype", None) or ("float32" if device == "cpu" else "auto")
    kwargs: dict[str, Any] = {"dtype": name if name == "auto" else getattr(torch, name)}
    placement = getattr(args, "device_map", None) or (None if device == "cpu" else device)
    if placement is not None:  # the cpu is where from_pretrained loads anyway
        kwargs["device_map"] = placement
    if getattr(args, "attn_implementation", None):
        kwargs["attn_implementation"] = args.attn_implementation
    return kwargs


def load_model(args: argparse.Namespace, name_or_path: str | None = None, **overrides: Any):
    """``(model, tokenizer, name)`` of ``name_or_path`` (None: the default model) loaded as the model
    options of ``args`` say (:func:`model_load_kwargs`, with ``overrides`` on top)."""
    from ..models import load_model as load

    return load(name_or_path, **{**model_load_kwargs(args), **overrides})


# ---------------------------------------------------------------------------- reading saved outputs
def find_tokenizer(model: str | None, folders: list[Path]):
    """The tokenizer of saved outputs (statistics, an extraction): ``model``'s (``--model``) when given, else
    one saved in a folder's ``tokenizer/``, else that of the model a folder's manifest.json / config.yaml
    names, else the default model's."""
    from ..labels import TOKENIZER_DIR
    from ..models import load_tokenizer

    if model is not None:
        return load_tokenizer(model)
    for folder in folders:
        if (folder / TOKENIZER_DIR).is_dir():
            return load_tokenizer(str(folder / TOKENIZER_DIR))
    for folder in folders:
        for name, key in (("manifest.json", "model"), ("config.yaml", "model_name")):
            path = folder / name
            if path.is_file():
                from ..errors import SparseCLTError
                from ..io.structured import load_json, load_yaml

                read = load_json if name.endswith(".json") else load_yaml
                data = read(path.read_bytes(), str(path), error=SparseCLTError)
                named = data.get(key) if isinstance(data, dict) else None
                if isinstance(named, str) and named:
                    return load_tokenizer(named)
    return load_tokenizer(None)
