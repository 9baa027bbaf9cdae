"""One call from a statistics folder to a site and exports: :func:`build_dashboard` (the ``dashboard``
command's body). Every input is checked before anything is computed or written."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from ..feature_stats import STATS_FILE, FeatureStats, FeatureStatsError
from ..io.structured import load_json_object, load_yaml
from .accumulate import dashboard_stats
from .site import DashboardError, build_site, check_out_dir
from .stats import DASHBOARD_FILE, DashboardStats

TOKENIZER_DIR = "tokenizer"  # as in sparse_clt_hf.labels


def source_info(directory: Path) -> dict[str, Any]:
    """What the statistics in ``directory`` were computed with: ``kind`` (extraction | transcoder),
    ``model`` and ``transcoder`` (None where not recorded)."""
    manifest = directory / "manifest.json"
    if manifest.is_file():
        m = load_json_object(manifest.read_bytes(), str(manifest), error=FeatureStatsError)
        return {"kind": "extraction", "model": m.get("model"), "transcoder": m.get("transcoder"),
                "layers": m.get("layers"), "n_features": m.get("n_features"), "top_k": m.get("top_k")}
    config = directory / "config.yaml"
    if config.is_file():
        cfg = load_yaml(config.read_bytes(), str(config), error=FeatureStatsError) or {}
        cfg = cfg if isinstance(cfg, dict) else {}
        return {"kind": "transcoder", "model": cfg.get("model_name"), "transcoder": str(directory)}
    return {"kind": "stats", "model": None, "transcoder": None}


def _same_ref(a: str, b: str) -> bool:
    pa, pb = Path(os.path.expanduser(a)), Path(os.path.expanduser(b))
    if pa.exists() and pb.exists():
        return pa.resolve() == pb.resolve()
    return a.rstrip("/") == b.rstrip("/")


def _check_belongs(directory: Path, info: dict[str, Any], clt: str | None, model: str | None) -> None:
    """Refuse a transcoder or model other than the one the statistics were computed with."""
    if clt is not None and info.get("transcoder") and not _same_ref(str(clt), str(info["transcoder"])):
        raise DashboardError(f"the statistics in {directory} were computed with transcoder {info['transcoder']}, "
                             f"not {clt}: pass that transcoder, or compute statistics for {clt}")
    if model is not None and info.get("model") and not _same_ref(str(model), str(info["model"])):
        raise DashboardError(f"the statistics in {directory} were computed on model {info['model']}, not {model}: "
                             "pass that model, or compute statistics with this one")


def _check_widths(directory: Path, layers: list[int], widths: list[int], transcoder: Any, clt: str) -> None:
    for layer, width in zip(layers, widths):
        if layer not in transcoder.layers:
            raise DashboardError(f"the statistics in {directory} have layer {layer}; transcoder {clt} has layers "
                                 f"{transcoder.layers}: they belong to another transcoder")
        have = transcoder.encoder(layer).n_features
        if have != width:
            raise DashboardError(f"the statistics in {directory} have {width} features in layer {layer}; transcoder "
                                 f"{clt} has {have}: they belong to another transcoder")


def _check_token_ids(directory: Path, stats: DashboardStats) -> None:
    t = stats._t
    used = t["example_document"] >= 0
    center = t["example_tokens"][..., stats.base.context]
    if bool(used.any()) and bool((center[used] < 0).all()):
        raise DashboardError(f"the statistics in {directory} hold no token ids (every example's token is unknown): "
                             "recompute them from features recorded with input_ids")


def load_tokenizer_for(directory: Path, info: dict[str, Any], tokenizer: str | None, model: str | None):
    """``tokenizer``, else ``model``'s, else ``DIR/tokenizer``, else the recorded model's."""
    from ..models import load_tokenizer

    for ref, what in ((tokenizer, "--tokenizer"), (model, "--model"),
                      (directory / TOKENIZER_DIR if (directory / TOKENIZER_DIR).is_dir() else None, "saved tokenizer"),
                      (info.get("model"), "the model the statistics name")):
        if ref is None:
            continue
        try:
            return load_tokenizer(str(ref))
        except Exception as exc:  # noqa: BLE001  (any loader failure becomes one clear error)
            raise DashboardError(f"cannot load the tokenizer from {what} {ref}: {exc}") from None
    raise DashboardError(f"no tokenizer for the statistics in {directory}: pass --tokenizer or --model")


def build_dashboard(
    directory: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    clt: str | None = None,
    model: str | None = None,
    tokenizer: str | Any | None = None,
    which: str = "sum",
    logit_k: int = 10,
    neuronpedia: str | os.PathLike[str] | None = None,
    circuit_tracer: str | os.PathLike[str] | None = None,
    scan: str | None = None,
    stats_options: dict[str, int] | None = None,
    title: str | None = None,
    lm: Any = None,
    log=None,
) -> dict[str, Any]:
    """Build the site of the statistics in ``directory`` into ``out`` (computing the dashboard statistics
    of an extraction first when missing), with logit effects when ``clt`` (loaded with decoders) and a
    model are known, and the Neuronpedia / circuit-tracer exports when asked. ``lm``: the model itself
    when already loaded (its unembedding is used instead of loading ``model``). Returns a summary."""
    log = log or (lambda *a: print(*a, file=sys.stderr))
    directory = Path(directory)
    out = check_out_dir(out)
    for flag, path in (("--neuronpedia", neuronpedia), ("--circuit-tracer", circuit_tracer)):
        if path is not None:
            check_out_dir(path, flag)
    if not directory.is_dir():
        raise DashboardError(f"{directory} is not a folder (expected an extraction or a transcoder folder with "
                             f"{STATS_FILE})")
    info = source_info(directory)
    _check_belongs(directory, info, clt, model)
    have = (directory / DASHBOARD_FILE).is_file()
    if have and info["kind"] == "extraction" and not DashboardStats.is_current(directory / DASHBOARD_FILE):
        have = False  # an older version: computed again below
    if not have and info["kind"] != "extraction":
        raise DashboardError(f"{directory} holds no {DASHBOARD_FILE}: compute it with `sparse-clt-hf stats DIR "
                             "--dashboard` (an extraction)" + (" or `sparse-clt-hf demo --dashboard SITE`"
                                                               if info["kind"] == "transcoder" else ""))
    tok = tokenizer if tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike)) else \
        load_tokenizer_for(directory, info, None if tokenizer is None else str(tokenizer), model)
    model_ref = model or info.get("model")
    transcoder = None
    if clt is not None:
        if model_ref is None and lm is None:
            raise DashboardError("logit effects need the model's unembedding: pass --model")
        from ..transcoder import CrossLayerTranscoder

        transcoder = CrossLayerTranscoder.from_pretrained(clt, decoders=True)
    stats = DashboardStats.load(directory) if have else None
    if transcoder is not None:
        layers, widths = (stats.layers, stats.base.n_features) if stats else (info["layers"], info["n_features"])
        _check_widths(directory, layers, widths, transcoder, str(clt))
    W_U = None
    if transcoder is not None:  # the model loads (or fails) before the statistics are computed
        from ..models import load_model
        from .logits import unembedding_of

        if lm is None:
            lm, _, _ = load_model(model_ref)
        W_U = unembedding_of(lm)
        if W_U.shape[1] != transcoder.config.d_model:
            raise DashboardError(f"model {model_ref or type(lm).__name__} has width {W_U.shape[1]}; transcoder {clt} "
                                 f"has d_model {transcoder.config.d_model}: they do not belong together")
    if stats is None:
        log(f"computing dashboard statistics of {directory} (once; saved as {directory / DASHBOARD_FILE})")
        options = dict(stats_options or {})
        if (directory / STATS_FILE).is_file():  # keep the statistics already there (their top_n and context)
            base = FeatureStats.load(directory / STATS_FILE)
            options.update(top_n=base.top_n, context=base.context)
        stats = dashboard_stats(directory, **options)
    _check_token_ids(directory, stats)
    logits, notes = {}, []
    if transcoder is not None:
        from .logits import logit_effects

        logits, notes = logit_effects(transcoder, W_U, layers=stats.layers, k=logit_k, which=which)
    else:
        notes.append("no transcoder given: logit effects need --clt (with decoders) and the model")
    source = {k: info.get(k) for k in ("kind", "model", "transcoder")}
    from .exact import load_exact

    exact = load_exact(directory)
    index = build_site(stats, out, tok, logits=logits, notes=notes, source=source, exact=exact,
                       title=title or f"Feature dashboards: {info.get('transcoder') or directory}")
    summary: dict[str, Any] = {"site": str(index), "layers": stats.layers, "n_features": stats.base.n_features,
                               "logit_effects": sorted(logits), "notes": notes}
    if neuronpedia is not None or circuit_tracer is not None:
        from .exports import export_circuit_tracer, export_neuronpedia

        if neuronpedia is not None:
            summary["neuronpedia"] = str(export_neuronpedia(stats, neuronpedia, tok, logits=logits, source=source,
                                                            exact=exact))
        if circuit_tracer is not None:
            summary["circuit_tracer"] = str(export_circuit_tracer(stats, circuit_tracer, tok, logits=logits,
                                                                  source=source, scan=scan, exact=exact))
    return summary
