"""Exact frequencies of chosen features, by encoding them densely over an extraction's own tokens.

An extraction records each token's top-k features per layer, so a frequency counted from it is top-k
membership: a lower bound wherever more than k features were active (:meth:`DashboardStats.exact`
says whether that happened). For the features of interest, :func:`exact_frequency` runs the model
again over the extraction's windows (the token ids in its shards, batched as the extraction batched
them), reads the transcoder's input site with plain hooks and encodes only those features' columns
(:meth:`CrossLayerTranscoder.feature_activity`; a TopK transcoder encodes the whole layer, since top-k
membership depends on every feature), counting every position where each one is active.

On the way it checks that the model and transcoder are the extraction's (the fingerprints in its
manifest) and that every activation the extraction recorded for these features is recomputed within
rounding: a different model, dtype or transcoder is refused rather than counted. The counts are saved
in ``DIR/exact_frequency.json`` (merged with earlier ones) and the dashboard site shows them on the
features' pages. Cost: one forward pass over the corpus, plus ``d x F`` multiply-adds per token and
layer for ``F`` features (the whole layer for TopK).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import SparseCLTError
from .site import DashboardError, check_out_dir

EXACT_FILE = "exact_frequency.json"
FORMAT = "sparse-clt-hf-exact-frequency"
VERSION = 1


@dataclass(frozen=True)
class ExactFrequency:
    """How often feature ``feature`` of ``layer`` is active over an extraction's ``n_positions`` tokens:
    ``count`` by dense encoding, ``recorded`` as the extraction's top-k recorded it (<= ``count``)."""

    layer: int
    feature: int
    count: int
    recorded: int
    n_positions: int

    @property
    def frequency(self) -> float:
        return self.count / max(self.n_positions, 1)

    @property
    def recorded_frequency(self) -> float:
        return self.recorded / max(self.n_positions, 1)


def parse_features(features: Iterable[Any]) -> list[tuple[int, int]]:
    """``(layer, feature)`` pairs from pairs or ``"L/F"`` strings (distinct, sorted); raises
    :class:`DashboardError` naming a malformed entry."""
    from ..labels import parse_feature

    out = set()
    for item in features:
        if isinstance(item, str):
            try:
                out.add(parse_feature(item))
            except (SparseCLTError, ValueError) as exc:
                raise DashboardError(f"feature {item!r}: {exc}") from None
            continue
        if (not isinstance(item, (tuple, list)) or len(item) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in item)):
            raise DashboardError(f"feature {item!r}: expected (layer, feature) non-negative integers or 'L/F'")
        out.add((int(item[0]), int(item[1])))
    if not out:
        raise DashboardError("no features given: name them as (layer, feature) or 'L/F', e.g. '6/942'")
    return sorted(out)


def check_features(directory: str | os.PathLike[str], features: Iterable[Any]) -> tuple[dict[str, Any], dict[int, list[int]]]:
    """The manifest of the complete extraction in ``directory`` and ``features`` grouped by layer;
    raises :class:`DashboardError` naming a feature whose layer the extraction lacks or that is out of
    its layer's range (reads nothing but the manifest)."""
    from ..extract_folder import read_manifest

    directory = Path(directory)
    manifest = read_manifest(directory)
    if manifest.get("status") != "complete":
        raise DashboardError(f"{directory} is an unfinished extraction (status {manifest.get('status')!r}): "
                             "finish it with `sparse-clt-hf extract` first")
    layers, widths = manifest["layers"], manifest["n_features"]
    wanted: dict[int, list[int]] = {}
    for layer, feature in parse_features(features):
        if layer not in layers:
            raise DashboardError(f"feature {layer}/{feature}: layer {layer} is not in the extraction (layers {layers})")
        if feature >= widths[layers.index(layer)]:
            raise DashboardError(f"feature {layer}/{feature}: layer {layer} has {widths[layers.index(layer)]} features")
        wanted.setdefault(layer, []).append(feature)
    return manifest, wanted


def _tolerance(dtype: torch.dtype) -> tuple[float, float]:
    """(atol, rtol) between a recorded activation and its recomputation: rounding of the dtype."""
    return (1e-5, 1e-4) if torch.finfo(dtype).bits >= 32 else (2e-2, 2e-2)


def exact_frequency(
    model: torch.nn.Module,
    transcoder: Any,
    directory: str | os.PathLike[str],
    features: Iterable[Any],
    *,
    save: bool = True,
    progress: bool = True,
) -> list[ExactFrequency]:
    """Exact activity counts of ``features`` (``(layer, feature)`` pairs or ``"L/F"`` strings) over the
    extraction in ``directory``, by dense encoding (see the module doc). ``transcoder``: a
    :class:`CrossLayerTranscoder` or a reference :func:`attach_clt` takes. Every check (the folder, the
    features against its layers and widths, the model and transcoder against its fingerprints) runs
    before the first forward pass."""
    from tqdm.auto import tqdm

    from ..attach import settle_transcoder
    from ..capture.sitehooks import hook_sites
    from ..extract import forward_kwargs, input_device, shard_batches
    from ..extract_folder import model_fingerprint, transcoder_fingerprint
    from ..extracted import iter_extracted
    from ..loading import load_for_model

    directory = Path(directory)
    manifest, wanted = check_features(directory, features)
    layers, widths = manifest["layers"], manifest["n_features"]
    if save:
        check_out_dir(directory, "the extraction folder")
    if not hasattr(transcoder, "encoder"):
        transcoder = load_for_model(transcoder, model)
    settled, points = settle_transcoder(model, transcoder, layers)  # as the extraction ran it
    inputs = manifest.get("inputs") or {}
    if inputs.get("transcoder") is not None:
        if transcoder_fingerprint(settled) != inputs["transcoder"]:
            raise DashboardError(f"this transcoder is not the one {directory} was extracted with "
                                 f"({manifest.get('transcoder')!r}; its encoders, in the model's dtype, differ)")
    if inputs.get("model") is not None and model_fingerprint(model) != inputs["model"]:
        raise DashboardError(f"this model is not the one {directory} was extracted with ({manifest.get('model')!r}, "
                             "in the same dtype): its parameters differ")

    cols = {layer: torch.tensor(f, dtype=torch.long) for layer, f in wanted.items()}
    count = {layer: torch.zeros(len(f), dtype=torch.int64) for layer, f in wanted.items()}
    recorded = {layer: torch.zeros(len(f), dtype=torch.int64) for layer, f in wanted.items()}
    column = {}  # feature id -> its column among the wanted ones, -1 elsewhere
    for layer, c in cols.items():
        column[layer] = torch.full((widths[layers.index(layer)] + 1,), -1, dtype=torch.long)
        column[layer][c] = torch.arange(c.numel())
    seen: dict[int, torch.Tensor] = {}

    def read(layer: int, hidden: torch.Tensor) -> None:
        if layer in cols:
            seen[layer] = hidden.detach()

    batch_size = int(manifest["arguments"]["batch_size"])
    device, fwd = input_device(model), forward_kwargs(model)
    n_positions = 0
    handles = hook_sites({layer: points[layer] for layer in cols}, read)
    try:
        bar = tqdm(total=int(manifest["n_windows"]), desc="exact frequency", unit="window",
                   disable=not progress)
        for shard in iter_extracted(directory):
            f = shard.features
            lengths = f.mask.sum(1).tolist()
            for rows in shard_batches(lengths, batch_size):
                t = int(lengths[rows[0]])
                bar.update(len(rows))
                if t == 0:
                    continue
                valid = f.mask[rows, :t].bool()
                ids = torch.where(valid, f.token_ids[rows, :t], 0)
                seen.clear()
                with torch.no_grad():
                    model(input_ids=ids.to(device), attention_mask=valid.long().to(device), **fwd)
                n_positions += int(valid.sum())
                for layer, c in cols.items():
                    if layer not in seen:
                        raise DashboardError(f"the forward pass did not reach layer {layer}'s input site")
                    h = seen[layer]
                    x = h.reshape(-1, h.shape[-1])[valid.reshape(-1).to(h.device)]
                    z, active = settled.feature_activity(x, layer, c)
                    count[layer] += active.sum(0).cpu()
                    _check_recorded(f, rows, t, valid, layers.index(layer), layer, column[layer], c, z.float().cpu(),
                                    recorded[layer], shard, _tolerance(z.dtype))
        bar.close()
    finally:
        for handle in handles:
            handle.remove()
    if n_positions != int(manifest["n_tokens"]):
        raise DashboardError(f"read {n_positions} positions but the manifest of {directory} says {manifest['n_tokens']}")
    result = [ExactFrequency(layer, int(feat), int(count[layer][j]), int(recorded[layer][j]), n_positions)
              for layer in sorted(cols) for j, feat in enumerate(cols[layer].tolist())]
    if save:
        _save(directory, result, manifest)
    return result


def _check_recorded(f, rows, t, valid, li, layer, column, cols, z, recorded, shard, tol) -> None:
    """Count the extraction's recorded entries of the wanted features in these rows, and refuse when one
    is not what the recomputation gives (another model, dtype or transcoder)."""
    idx = f.indices[rows, :t, li][valid].long()  # [N, k], valid positions in the order of z's rows
    vals = f.values[rows, :t, li][valid].float()
    j = column[idx]  # -1: not wanted (or an empty slot, -1, reading the extra last entry)
    n, slot = (j >= 0).nonzero(as_tuple=True)
    if n.numel() == 0:
        return
    jj = j[n, slot]
    recorded += torch.bincount(jj, minlength=recorded.numel())
    got, want = z[n, jj], vals[n, slot]
    bad = ((got - want).abs() > tol[0] + tol[1] * want.abs()).nonzero().squeeze(1)
    if bad.numel():
        i = int(bad[0])
        r, p = valid.nonzero()[int(n[i])].tolist()
        row = rows[r]
        raise DashboardError(
            f"feature {layer}/{int(cols[int(jj[i])])} at document {int(shard.documents[row])} position "
            f"{int(shard.offsets[row]) + p}: the extraction recorded {float(want[i]):.6g} but this model and "
            f"transcoder give {float(got[i]):.6g} ({bad.numel()} such entries): not the extraction's model, "
            "dtype or transcoder")


def _save(directory: Path, result: list[ExactFrequency], manifest: dict[str, Any]) -> Path:
    """Merge ``result`` into ``DIR/exact_frequency.json`` (written atomically)."""
    from ..extract_folder import write_json_atomic

    previous = {(e.layer, e.feature): e for e in load_exact(directory)}
    previous.update({(e.layer, e.feature): e for e in result})
    data = {"format": FORMAT, "version": VERSION, "model": manifest.get("model"),
            "transcoder": manifest.get("transcoder"), "n_tokens": manifest.get("n_tokens"),
            "features": [asdict(previous[key]) for key in sorted(previous)]}
    path = directory / EXACT_FILE
    write_json_atomic(path, data)
    return path


def load_exact(directory: str | os.PathLike[str]) -> list[ExactFrequency]:
    """The exact frequencies saved in ``directory`` (empty when there are none); refuses a damaged file."""
    from ..io.structured import load_json_object

    path = Path(directory) / EXACT_FILE
    if not path.is_file():
        return []
    data = load_json_object(path.read_bytes(), str(path), error=DashboardError)
    if data.get("format") != FORMAT or data.get("version") != VERSION or not isinstance(data.get("features"), list):
        raise DashboardError(f"{path} is not an exact-frequency file of version {VERSION}")
    out = []
    for e in data["features"]:
        try:
            item = ExactFrequency(**{k: e[k] for k in ("layer", "feature", "count", "recorded", "n_positions")})
        except (KeyError, TypeError):
            raise DashboardError(f"{path}: entry {json.dumps(e)[:80]} is not an exact frequency") from None
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in asdict(item).values()) \
                or item.recorded > item.n_positions or item.count > item.n_positions:
            raise DashboardError(f"{path}: entry {json.dumps(e)[:80]} has invalid counts")
        out.append(item)
    return out
