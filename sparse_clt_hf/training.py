"""Fit a cross-layer (CLT) or per-layer (PLT) transcoder on a model's own activations.

The model runs over token sequences with hooks on the same sites that capture uses
(:func:`sparse_clt_hf.sites.resolve_site`): the *input* site of every trained layer (``mlp_in`` by
default) and the *output* site (``mlp_out``) of every target layer. The forward stops right after the
last layer needed. Activations go into a bounded buffer (never all tokens in memory) that is shuffled
and trained on in minibatches, ``epochs`` times per fill, then refilled.

The transcoder: ``a_s = relu(topk_k(x_s @ W_enc_s.T + b_enc_s))`` and
``y_t ~ b_dec_t + sum_{s <= t < s + span} a_s @ W_dec_s[:, t - s]``. Training happens in normalised
units (inputs centred and scaled to ``E|x|^2 = d``, outputs scaled so each target's variance is ``d``,
so the loss is the sum of per-target FVUs), with unit-norm decoder rows (over all of a feature's
target slices), Adam with warm-up and linear decay, data-based initialisation (features start as
real input/output pairs) and the AuxK loss (the ``aux_k`` strongest *dead* latents reconstruct the
residual error) against dead features. All scales fold exactly into the saved raw-unit weights.
``activation="jumprelu"`` trains as TopK and then sets a threshold per layer (the mean k-th largest
pre-activation on training tokens), so L0 varies per token but averages about ``k``.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import asdict
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .activations import get_activation
from .sites import find_decoder_layers, hidden_size, resolve_site
from .training_config import (  # noqa: F401  (re-exported: the public names stay here)
    TRAINABLE_ACTIVATIONS,
    TRANSFORMS,
    TrainingConfig,
    format_metrics,
    parse_layers,
)
from .training_data import file_texts, python_texts, text_source, token_sequences  # noqa: F401  (re-exported)
from .transcoder import CrossLayerTranscoder, LayerEncoder, TranscoderConfig


# ---------------------------------------------------------------------------- activation capture
class _StopForward(Exception):
    """Raised from a hook once every activation of a pass is captured, to skip the later layers."""


class ActivationCollector:
    """Hooks that capture input-site activations of ``sources`` and output-site ones of ``targets``."""

    def __init__(self, model: nn.Module, sources: Sequence[int], targets: Sequence[int], input_site: str,
                 output_site: str) -> None:
        self.model = model
        self.sources, self.targets = list(sources), list(targets)
        self.points = [("x", i, resolve_site(model, input_site, i)) for i in self.sources]
        self.points += [("y", t, resolve_site(model, output_site, t)) for t in self.targets]
        self._seen: dict[tuple[str, int], torch.Tensor] = {}

    def _store(self, key: tuple[str, int], h: torch.Tensor) -> None:
        self._seen[key] = h.detach()
        if len(self._seen) == len(self.points):
            raise _StopForward

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, skip_first: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the model on ``input_ids`` [B, T]; return x [N, S, d] and y [N, T', d] (N = B * (T - skip))."""
        handles = []
        for kind, layer, point in self.points:
            key = (kind, layer)
            if point.which == "input":
                handles.append(point.module.register_forward_pre_hook(
                    lambda mod, args, kwargs, _k=key: self._store(_k, _hidden(args, kwargs)), with_kwargs=True))
            else:
                handles.append(point.module.register_forward_hook(
                    lambda mod, args, out, _k=key: self._store(_k, out if torch.is_tensor(out) else out[0])))
        self._seen = {}
        try:
            device = next(self.model.parameters()).device
            self.model(input_ids=input_ids.to(device), use_cache=False)
        except _StopForward:
            pass
        finally:
            for h in handles:
                h.remove()
        b, t = input_ids.shape

        def stack(kind: str, layers: list[int]) -> torch.Tensor:
            parts = []
            for layer in layers:
                h = self._seen[(kind, layer)]
                # training runs on the cpu whatever the model's device (the buffer is bounded host memory)
                parts.append(h.reshape(b, t, -1)[:, skip_first:].reshape(b * (t - skip_first), -1).float().cpu())
            return torch.stack(parts, dim=1)

        x, y = stack("x", self.sources), stack("y", self.targets)
        self._seen = {}
        return x, y


def _hidden(args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
    if args and torch.is_tensor(args[0]):
        return args[0]
    for value in kwargs.values():
        if torch.is_tensor(value) and value.is_floating_point():
            return value
    raise RuntimeError("the hooked module received no floating-point tensor input")


# ---------------------------------------------------------------------------- sparse autograd pieces
class _GatheredLinear(torch.autograd.Function):
    """``(x @ W.T + b)[row, idx]`` from values already computed without grad; the backward builds the
    W and b gradients from the k selected entries only (a sparse matmul) instead of a dense [B, m]."""

    @staticmethod
    def forward(ctx, values, x, idx, W, b):  # type: ignore[override]
        ctx.save_for_backward(x, idx)
        ctx.m = W.shape[0]
        return values.clone()

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        x, idx = ctx.saved_tensors
        n, k = idx.shape
        rows = torch.arange(n, device=x.device).repeat_interleave(k)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            g = torch.sparse_coo_tensor(torch.stack([idx.reshape(-1), rows]), grad.reshape(-1), (ctx.m, n))
        grad_W = torch.sparse.mm(g, x)
        grad_b = torch.zeros(ctx.m, dtype=grad.dtype, device=grad.device).index_add_(0, idx.reshape(-1), grad.reshape(-1))
        return None, None, None, grad_W, grad_b


class _Model(nn.Module):
    """Trainable transcoder in normalised units: decoder rows [m, n_out * d] of unit norm."""

    def __init__(self, cfg: TrainingConfig, d: int, g: torch.Generator) -> None:
        super().__init__()
        self.cfg, self.d = cfg, d
        m = cfg.n_features
        self.W_enc = nn.ParameterList()
        self.b_enc = nn.ParameterList()
        self.W_dec = nn.ParameterList()
        for s in cfg.layers:
            self.W_enc.append(nn.Parameter(F.normalize(torch.randn(m, d, generator=g), dim=1)))
            self.b_enc.append(nn.Parameter(torch.zeros(m)))
            self.W_dec.append(nn.Parameter(F.normalize(torch.randn(m, cfg.n_out(s) * d, generator=g), dim=1)))
        self.b_dec = nn.Parameter(torch.zeros(len(cfg.layers), d))

    def data_init(self, x: torch.Tensor, y: torch.Tensor, g: torch.Generator) -> None:
        """Features start as real (input, output) pairs of distinct tokens; b_dec as the output mean."""
        with torch.no_grad():
            self.b_dec.copy_(y.mean(0))
            m = self.cfg.n_features
            yc = y - self.b_dec
            for i, s in enumerate(self.cfg.layers):  # a different token draw per layer: ids unrelated
                pick = torch.randperm(x.shape[0], generator=g)[:m]
                n = pick.numel()
                self.W_enc[i][:n] = F.normalize(x[pick, i], dim=1)
                self.W_dec[i][:n] = F.normalize(yc[pick, i : i + self.cfg.n_out(s)].reshape(n, -1), dim=1)
            # Scale the encoders so that the initial reconstruction has the least-squares best size.
            rows = torch.randperm(x.shape[0], generator=g)[: self.cfg.batch_size]
            _, _, _, pred = self(x[rows], y[rows], None)
            p = pred - self.b_dec
            alpha = float((p * yc[rows]).sum() / p.pow(2).sum().clamp_min(1e-12))
            for W in self.W_enc:
                W.mul_(max(alpha, 1e-3))

    def forward(self, x: torch.Tensor, y: torch.Tensor, dead: list[torch.Tensor] | None):
        """Loss (sum of per-target FVUs + AuxK), the top-k indices/values per layer and the error sums."""
        cfg, d = self.cfg, self.d
        n = x.shape[0]
        pred = [self.b_dec[t].expand(n, d) for t in range(len(cfg.layers))]
        aux_pred: list[torch.Tensor | None] = [None] * len(cfg.layers)
        tops = []
        for i in range(len(cfg.layers)):
            xi = x[:, i]
            with torch.no_grad():
                z = F.linear(xi, self.W_enc[i], self.b_enc[i])
                top_v, top_i = z.topk(cfg.k, dim=-1)
            a = torch.relu(_GatheredLinear.apply(top_v, xi, top_i, self.W_enc[i], self.b_enc[i]))
            tops.append((top_i, a.detach(), top_v[:, -1]))
            out = F.embedding_bag(top_i, self.W_dec[i], per_sample_weights=a, mode="sum")
            for j, piece in enumerate(out.split(d, dim=1)):
                pred[i + j] = pred[i + j] + piece
            if dead is not None and bool(dead[i].any()):
                kk = min(cfg.aux_k, int(dead[i].sum()))
                with torch.no_grad():
                    aux_v, aux_i = z.masked_fill(~dead[i], -torch.inf).topk(kk, dim=-1)
                aa = torch.relu(_GatheredLinear.apply(aux_v, xi, aux_i, self.W_enc[i], self.b_enc[i]))
                aux_out = F.embedding_bag(aux_i, self.W_dec[i], per_sample_weights=aa, mode="sum")
                for j, piece in enumerate(aux_out.split(d, dim=1)):
                    prev = aux_pred[i + j]
                    aux_pred[i + j] = piece if prev is None else prev + piece
        stacked = torch.stack(pred, 1)
        err = stacked - y  # [n, T, d]
        sse = err.pow(2).sum(-1)  # [n, T]
        loss = sse.sum(1).mean() / d
        if any(p is not None for p in aux_pred):
            e = err.detach()
            ae = torch.stack([p if p is not None else torch.zeros_like(e[:, 0]) for p in aux_pred], 1)
            aux = (ae + e).pow(2).sum() / e.pow(2).sum().clamp_min(1e-12)  # aux should predict -err
            loss = loss + cfg.aux_coef * aux
        return loss, tops, sse.detach().sum(0), stacked

    @torch.no_grad()
    def constrain(self) -> None:
        """Drop the gradient part along each decoder row (before the step) — keeps rows on the sphere."""
        for W in self.W_dec:
            if W.grad is not None:
                W.grad -= (W.grad * W).sum(1, keepdim=True) * W

    @torch.no_grad()
    def renormalise(self) -> None:
        for W in self.W_dec:
            W.copy_(F.normalize(W, dim=1))


# ---------------------------------------------------------------------------- training
def _plan(cfg: TrainingConfig, n_train_seqs: int, per_seq: int, row_bytes: int) -> list[int]:
    """Sequences per buffer fill, bounded by ``buffer_mb``."""
    cap_tokens = max(int(cfg.buffer_mb * 2**20 // row_bytes), cfg.batch_size, per_seq * cfg.model_batch)
    per_fill = max(1, cap_tokens // per_seq)
    fills, left = [], n_train_seqs
    while left > 0:
        fills.append(min(per_fill, left))
        left -= fills[-1]
    return fills


def _collect(collector: ActivationCollector, ids: torch.Tensor, cfg: TrainingConfig, bar: Any):
    xs, ys = [], []
    for start in range(0, ids.shape[0], cfg.model_batch):
        x, y = collector(ids[start : start + cfg.model_batch], cfg.skip_first)
        xs.append(x)
        ys.append(y)
        bar.update(min(cfg.model_batch, ids.shape[0] - start))  # sequences
    x = torch.cat(xs)
    x = TRANSFORMS[cfg.input_transform](x, cfg.input_norm_eps)
    return x, torch.cat(ys)


def train_transcoder(
    model: nn.Module, tokenizer: Any, texts: Iterable[str], config: TrainingConfig
) -> tuple[CrossLayerTranscoder, dict[str, Any]]:
    """Fit a transcoder on ``model``'s activations over ``texts``; return it (raw units, decoders
    included, metrics in ``config.metrics``) and the metrics: held-out ``fvu`` per target layer,
    ``l0`` and ``dead`` per source layer, ``tokens``, ``train_seconds``."""
    cfg = config
    t0 = time.perf_counter()
    _, decoder_layers = find_decoder_layers(model)
    n_model_layers = len(decoder_layers)
    bad = [x for x in cfg.layers if not 0 <= x < n_model_layers]
    if bad:
        raise ValueError(f"layers {bad} are out of range: the model has {n_model_layers} layers (0..{n_model_layers - 1})")
    d = hidden_size(model)
    was_training = model.training
    model.eval()
    g = torch.Generator().manual_seed(cfg.seed)
    per_seq = cfg.seq_len - cfg.skip_first
    n_eval = max(1, math.ceil(cfg.eval_tokens / per_seq))
    n_train = max(1, math.ceil(cfg.tokens / per_seq))
    ids = token_sequences(tokenizer, texts, cfg.seq_len, n_eval + n_train)
    if ids.shape[0] < 2:
        raise ValueError("the text is too short: it gave fewer than 2 sequences (one held-out, one to train)")
    ids = ids[torch.randperm(ids.shape[0], generator=g)]
    n_eval = min(n_eval, max(1, ids.shape[0] // 10)) if ids.shape[0] < n_eval + n_train else n_eval
    eval_ids, train_ids = ids[:n_eval], ids[n_eval:]
    collector = ActivationCollector(model, cfg.layers, cfg.layers, cfg.input_site, cfg.output_site)
    fills = _plan(cfg, train_ids.shape[0], per_seq, 2 * len(cfg.layers) * d * 4)
    steps_per_fill = [cfg.epochs * math.ceil(n * per_seq / cfg.batch_size) for n in fills]
    total_steps = sum(steps_per_fill)

    net = _Model(cfg, d, g)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, betas=(0.9, 0.999))
    warm, decay_from = max(1, int(cfg.warmup * total_steps)), int((1 - cfg.decay) * total_steps)

    def lr_at(step: int) -> float:
        if step < warm:
            return cfg.lr * (step + 1) / warm
        if step >= decay_from:
            return cfg.lr * max(0.0, (total_steps - step) / max(1, total_steps - decay_from))
        return cfg.lr

    m = cfg.n_features
    since_fired = [torch.zeros(m, dtype=torch.long) for _ in cfg.layers]
    cutoff_sum = torch.zeros(len(cfg.layers), dtype=torch.float64)
    cutoff_n = 0
    scale_in = scale_out = mean_in = None
    step, seen = 0, 0
    # One bar at a time (one per phase and buffer fill), none when not on a terminal: nested bars leave
    # cursor escapes in logs. disable=None is tqdm's "only on a terminal".
    show = None if cfg.progress else True
    of = f" {{}}/{len(fills)}" if len(fills) > 1 else ""
    try:
        offset = 0
        for fill, n_seq in enumerate(fills):
            with tqdm(total=n_seq, desc="collect activations" + of.format(fill + 1), unit="seq",
                      disable=show) as collect_bar:
                x, y = _collect(collector, train_ids[offset : offset + n_seq], cfg, collect_bar)
            offset += n_seq
            if scale_in is None:  # normalisation from the first fill, folded into the weights at the end
                mean_in = x.mean(0)
                scale_in = (d / (x - mean_in).pow(2).sum(-1).mean(0)).sqrt()  # [S]
                scale_out = (d / (y - y.mean(0)).pow(2).sum(-1).mean(0)).sqrt()  # [T]
            x = (x - mean_in) * scale_in[None, :, None]
            y = y * scale_out[None, :, None]
            if fill == 0:
                net.data_init(x, y, g)
            bar = tqdm(total=steps_per_fill[fill], desc="train transcoder" + of.format(fill + 1), unit="step",
                       disable=show)
            for epoch in range(cfg.epochs):
                order = torch.randperm(x.shape[0], generator=g)
                last_pass = fill == len(fills) - 1 and epoch == cfg.epochs - 1
                for start in range(0, x.shape[0], cfg.batch_size):
                    rows = order[start : start + cfg.batch_size]
                    dead = [c >= cfg.dead_tokens for c in since_fired]
                    for group in opt.param_groups:
                        group["lr"] = lr_at(step)
                    loss, tops, _, _ = net(x[rows], y[rows], dead if cfg.aux_coef > 0 else None)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    net.constrain()
                    opt.step()
                    net.renormalise()
                    for i, (top_i, a, kth) in enumerate(tops):
                        fired = torch.zeros(m, dtype=torch.bool)
                        fired[top_i[a > 0]] = True
                        since_fired[i] += rows.numel()
                        since_fired[i][fired] = 0
                        if last_pass:
                            cutoff_sum[i] += kth.double().sum()
                    if last_pass:
                        cutoff_n += rows.numel()
                    step += 1
                    seen += rows.numel()
                    if step % 10 == 0 or step == total_steps:
                        n_dead = sum(int((c >= cfg.dead_tokens).sum()) for c in since_fired)
                        bar.set_postfix(fvu=f"{float(loss.detach()) / len(cfg.layers):.3f}",
                                        dead=f"{n_dead}/{m * len(cfg.layers)}")
                    bar.update(1)
            bar.close()
            del x, y
        train_seconds = time.perf_counter() - t0
        thresholds = None
        if get_activation(cfg.activation).needs_threshold:
            thresholds = (cutoff_sum / max(1, cutoff_n)).clamp_min(0).float()
        tc = _export(net, cfg, d, n_model_layers, mean_in, scale_in, scale_out, thresholds, model)
        with tqdm(total=len(eval_ids), desc="held-out eval", unit="seq", disable=show) as eval_bar:
            fvu, l0 = evaluate(tc, collector, eval_ids, cfg, eval_bar)
    finally:
        model.train(was_training)
    metrics = {
        "fvu": fvu,
        "l0": l0,
        "dead": {s: int((since_fired[i] >= cfg.dead_tokens).sum()) for i, s in enumerate(cfg.layers)},
        "tokens": int(train_ids.shape[0] * per_seq),
        "token_views": int(seen),
        "eval_tokens": int(eval_ids.shape[0] * per_seq),
        "steps": int(step),
        "train_seconds": round(time.perf_counter() - t0, 2),
        "fit_seconds": round(train_seconds, 2),
        "dead_window_tokens": cfg.dead_tokens,
        "training": {k: v for k, v in asdict(cfg).items() if k not in ("progress", "extra", "layers")},
    }
    tc.config.metrics = metrics
    return tc, metrics


@torch.no_grad()
def _export(net: _Model, cfg: TrainingConfig, d: int, n_layers: int, mean_in, scale_in, scale_out,
            thresholds, model: nn.Module) -> CrossLayerTranscoder:
    """Fold the normalisation into raw-unit weights and build the :class:`CrossLayerTranscoder`."""
    encoders = {}
    for i, s in enumerate(cfg.layers):
        W = net.W_enc[i] * scale_in[i]
        b = net.b_enc[i] - W @ mean_in[i]
        n_out = cfg.n_out(s)
        W_dec = net.W_dec[i].view(-1, n_out, d) / scale_out[i : i + n_out].view(1, n_out, 1)
        thr = None if thresholds is None else torch.full((cfg.n_features,), float(thresholds[i]))
        encoders[s] = LayerEncoder(W.clone(), b.clone(), threshold=thr, W_dec=W_dec.clone(),
                                   b_dec=(net.b_dec[i] / scale_out[i]).clone())
    tc_cfg = TranscoderConfig(
        d_model=d,
        layers=list(cfg.layers),
        n_features=[cfg.n_features] * len(cfg.layers),
        activation=cfg.activation,
        k=cfg.k,
        input_site=cfg.input_site,
        output_site=cfg.output_site,
        input_transform=cfg.input_transform,
        input_norm_eps=cfg.input_norm_eps,
        span=cfg.span if cfg.span else len(cfg.layers),
        n_layers=n_layers,
        model_name=cfg.model_name or getattr(model, "name_or_path", None) or None,
    )
    return CrossLayerTranscoder(tc_cfg, encoders)


@torch.no_grad()
def evaluate(tc: CrossLayerTranscoder, collector: ActivationCollector, ids: torch.Tensor,
             cfg: TrainingConfig, bar: Any) -> tuple[dict[int, float], dict[int, float]]:
    """Held-out FVU per target layer and mean L0 per source layer, with the exported transcoder's own
    encode/decode on raw activations (so the weight folding is checked too); ``bar`` counts sequences."""
    layers = tc.layers
    sse = torch.zeros(len(layers), dtype=torch.float64)
    s1 = torch.zeros(len(layers), tc.config.d_model, dtype=torch.float64)
    s2 = torch.zeros(len(layers), dtype=torch.float64)
    l0 = torch.zeros(len(layers), dtype=torch.float64)
    n = 0
    for start in range(0, ids.shape[0], cfg.model_batch):
        x, y = collector(ids[start : start + cfg.model_batch], cfg.skip_first)
        acts = {s: tc.encode(x[:, i], s) for i, s in enumerate(layers)}
        recon = tc.decode(acts)
        for i, t in enumerate(layers):
            yt = y[:, i].double()
            sse[i] += (recon[t].double() - yt).pow(2).sum()
            s1[i] += yt.sum(0)
            s2[i] += yt.pow(2).sum()
            l0[i] += (acts[t] != 0).sum()
        n += x.shape[0]
        bar.update(min(cfg.model_batch, ids.shape[0] - start))
    var = s2 - s1.pow(2).sum(-1) / n
    fvu = {t: round(float(sse[i] / var[i]), 4) for i, t in enumerate(layers)}
    return fvu, {s: round(float(l0[i] / n), 2) for i, s in enumerate(layers)}
