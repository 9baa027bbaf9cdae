"""The sources of an attribution graph: active features (with their encoder and decoder vectors), error vectors and
token vectors, read from one pass of the local replacement model; and the transcoder they come from."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import TranscoderFormatError
from ..io.refs import resolve
from ..layer_encoder import check_compatible
from ..loading import choose_input_transform, load_decoder_parts, load_decoder_rows, load_for_model
from ..sites import model_dims
from ..transcoder import CrossLayerTranscoder
from .replacement import LocalReplacement, transform_backward, transform_linear

RowSource = dict[str, Any]  #: where decoder rows are read lazily: {"source": Reference, "format", "variant"}
#: A transcoder given by reference or folder keeps no decoder in memory: its output biases and skip matrices are read
#: up front (checking every layer has a decoder), the rows of the active features only after the forward pass,
#: through load_decoder_rows (safetensors slices for the native layouts; other formats one layer at a time).


def _as_transcoder(model: nn.Module, transcoder: Any) -> tuple[CrossLayerTranscoder, str, RowSource | None]:
    """(transcoder, a name for the graph's metadata, where to read decoder rows lazily or None: in memory)."""
    layers = None
    fmt = variant = None
    if isinstance(transcoder, CrossLayerTranscoder):
        return transcoder, transcoder.config.model_name or "in-memory transcoder", None
    source = getattr(transcoder, "_source", None)
    if isinstance(source, dict) and hasattr(transcoder, "layers"):  # an attachment
        layers = list(transcoder.layers)
        fmt, variant = source.get("format"), source.get("variant")
        transcoder = source.get("source")
        if isinstance(transcoder, CrossLayerTranscoder):
            return transcoder.select_layers(layers), transcoder.config.model_name or "in-memory transcoder", None
    ref = resolve(transcoder)
    tc = load_for_model(ref, model, layers=layers, format=fmt, variant=variant)
    for layer in tc.layers:  # checks every decoder before any work; reads the small tensors, no decoder row
        parts = load_decoder_parts(ref, layer, [], format=fmt, variant=variant)
        tc.encoder(layer).set_decoder(None, parts.b_dec, parts.W_skip)
    return tc, ref.name, {"source": ref, "format": fmt, "variant": variant}


def resolve_transcoder(
    model: nn.Module, transcoder: Any, device: torch.device
) -> tuple[CrossLayerTranscoder, str, RowSource | None]:
    """The transcoder checked against ``model`` (width, layers, decoders), its input transform settled for the
    model, in float32 on ``device``, and where its decoder rows are read lazily (None: in memory); raises before
    any work if a layer has no decoder."""
    tc, name, rows_from = _as_transcoder(model, transcoder)
    check_compatible(tc.config, *model_dims(model))
    for layer in tc.layers:
        if rows_from is None and tc.encoder(layer).W_dec is None:
            raise TranscoderFormatError(
                f"layer {layer}: the transcoder has no decoder (W_dec), which attribution needs; load it with "
                "decoders (CrossLayerTranscoder.from_pretrained(..., decoders=True)) or pass its reference"
            )
    config = choose_input_transform(tc.select_layers(tc.layers).config, model)
    encoders = {layer: tc.encoder(layer).converted(device, torch.float32) for layer in tc.layers}
    return CrossLayerTranscoder(config, encoders), name, rows_from


@dataclass
class ActiveFeatures:
    """Active features in node order (layer, position, feature id), and every source vector of the graph."""

    layers: torch.Tensor  #: [n] source layer of each feature
    positions: torch.Tensor  #: [n]
    ids: torch.Tensor  #: [n] feature id within its layer
    values: torch.Tensor  #: [n] activations
    encoder_vectors: torch.Tensor  #: [n, d] what to inject at the input site for the feature's pre-activation
    token_vectors: torch.Tensor  #: [T, d] the embedding's output
    error_vectors: torch.Tensor  #: [L, T, d] real MLP output minus reconstruction (zero at position 0)
    _writers: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  #: target layer -> (node, position, a * W_dec)

    @property
    def n_features(self) -> int:
        return int(self.layers.shape[0])

    @property
    def n_positions(self) -> int:
        return int(self.token_vectors.shape[0])

    @property
    def decoder_floats(self) -> int:
        return sum(int(v.numel()) for _, _, v in self._writers.values())

    def writers(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(feature nodes, positions, activation x decoder vector) of the features writing into ``layer``'s output."""
        if layer in self._writers:
            return self._writers[layer]
        empty = torch.zeros(0, dtype=torch.long, device=self.values.device)
        return empty, empty, torch.zeros(0, self.token_vectors.shape[1], device=self.values.device)

    def injection(self, nodes: torch.Tensor) -> torch.Tensor:
        return self.encoder_vectors[nodes]

    def table(self) -> torch.Tensor:
        return torch.stack([self.layers, self.positions, self.ids], 1).long().cpu()


def find_active_features(
    rep: LocalReplacement, tc: CrossLayerTranscoder, device: torch.device, rows_from: RowSource | None = None,
    zero_positions: int = 1,
) -> ActiveFeatures:
    """Features active at positions >= ``zero_positions`` of the pass ``rep`` just recorded (batch row 0), with
    their vectors; decoder rows from the transcoder, or read for the active features only from ``rows_from``.
    The first ``zero_positions`` positions (the BOS / attention sink; Gemma-3-it's chat prefix) have no
    features and zero error vectors, as in circuit-tracer."""
    n_layers = rep.n_layers
    emb = rep.embed[0].detach().to(device).float()
    T, d = emb.shape
    layers, positions, ids, values, enc_vecs = [], [], [], [], []
    recon = torch.zeros(n_layers, T, d, device=device)
    covered = torch.zeros(n_layers, dtype=torch.bool)
    dec: dict[int, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {}
    start = 0
    for layer in tc.layers:
        x = rep.inputs[layer][0].detach().to(device).float()
        z = tc.pre_activations(x, layer)
        if not (torch.isfinite(x).all() and torch.isfinite(z).all()):
            raise ValueError(f"layer {layer}: the transcoder's input or pre-activations are not finite on this prompt")
        a = tc.activate(z, layer)
        a[:zero_positions] = 0  # position 0 (BOS / attention sink) has no features, as in circuit-tracer
        pos, feat = torch.nonzero(a, as_tuple=True)
        act = a[pos, feat]
        enc = tc.encoder(layer)
        n = len(pos)
        layers.append(torch.full((n,), layer, dtype=torch.long, device=device))
        positions.append(pos)
        ids.append(feat)
        values.append(act)
        enc_vecs.append(transform_backward(tc, layer, x[pos], enc.W_enc[feat]))
        if rows_from is None:
            dec_rows = enc.W_dec[feat]
        else:
            unique, inverse = torch.unique(feat, return_inverse=True)
            dec_rows = load_decoder_rows(rows_from["source"], layer, unique.tolist(), format=rows_from["format"],
                                         variant=rows_from["variant"]).to(device)[inverse]
        rows = dec_rows.float() * act[:, None, None]  # [n, n_out, d]
        nodes = torch.arange(start, start + n, device=device)
        for offset in range(rows.shape[1]):
            target = layer + offset
            if target >= n_layers:
                raise TranscoderFormatError(f"layer {layer}: its decoder writes to layer {target}, past the model's {n_layers}")
            dec.setdefault(target, []).append((nodes, pos, rows[:, offset]))
            recon[target].index_add_(0, pos, rows[:, offset])
            covered[target] = True
        if enc.W_skip is not None:
            recon[layer] += transform_linear(tc, layer, x) @ enc.W_skip.float().T
            covered[layer] = True
        start += n
    for layer in tc.layers:
        b = tc.encoder(layer).b_dec
        if b is not None and covered[layer]:
            recon[layer] += b.float()
    errors = torch.stack([rep.outputs[t][0].detach().to(device).float() for t in range(n_layers)]) - recon
    errors[:, :zero_positions] = 0  # zero error vectors there (their error nodes stay, without edges)
    if not torch.isfinite(errors).all():
        raise ValueError("the MLP outputs or their reconstruction are not finite on this prompt")
    writers = {t: tuple(torch.cat([w[i] for w in ws]) for i in range(3)) for t, ws in dec.items()}
    cat = lambda xs, dt=None: torch.cat(xs) if xs else torch.zeros(0, dtype=dt or torch.long, device=device)  # noqa: E731
    return ActiveFeatures(
        layers=cat(layers),
        positions=cat(positions),
        ids=cat(ids),
        values=cat(values, torch.float32),
        encoder_vectors=torch.cat(enc_vecs) if enc_vecs else torch.zeros(0, d, device=device),
        token_vectors=emb,
        error_vectors=errors,
        _writers=writers,  # type: ignore[arg-type]
    )
