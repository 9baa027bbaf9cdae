"""``attribute()``: the attribution graph of one prompt, circuit-tracer's method on any model in the site tables.

Phases: check every argument -> one plain forward in the local replacement model (activations of the transcoder's
features, error vectors, token vectors, logits, targets) -> a memory estimate -> one forward with the prompt
replicated ``batch_size`` times -> batched backward passes, one attributed node per batch row (the logits first,
then features chosen greedily by influence, as circuit-tracer does) -> the graph, its columns limited to the
attributed features. Never an N x N matrix: the adjacency is ``rows x columns``.
"""

from __future__ import annotations

import functools
import importlib.metadata
import inspect
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import SparseCLTError
from ..sites import find_decoder_layers, text_config
from .active import ActiveFeatures, find_active_features, resolve_transcoder
from .graph import AttributionGraph
from .layout import GraphLayout
from .prune import partial_influences
from .replacement import LocalReplacement

TargetsLike = Sequence[int | str] | Sequence["CustomTarget"] | torch.Tensor | int | str | None


class AttributionMemoryError(SparseCLTError, MemoryError):
    """An attribution would need more memory than is available (or than ``max_memory`` allows)."""


def _tokens(prompt: Any, tokenizer: Any, vocab: int) -> torch.Tensor:
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ValueError("prompt is text: pass tokenizer=... (or give the prompt as token ids)")
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if ids and ids[0] not in set(tokenizer.all_special_ids):  # circuit-tracer: a special token at position 0
            special = [tokenizer.bos_token_id, tokenizer.pad_token_id, tokenizer.eos_token_id, *tokenizer.all_special_ids]
            first = next((t for t in special if t), None)  # as circuit-tracer: the first non-zero id
            ids = ([first] if first is not None else []) + list(ids)
        tokens = torch.tensor(ids, dtype=torch.long)
    else:
        tokens = torch.as_tensor(prompt)
        if tokens.ndim == 2 and tokens.shape[0] == 1:
            tokens = tokens[0]
        if tokens.ndim != 1 or (tokens.numel() and tokens.is_floating_point()):
            raise ValueError(f"prompt must be text or a 1-D sequence of token ids, got shape {tuple(tokens.shape)}")
        tokens = tokens.long().cpu()
    if tokens.numel() == 0:
        raise ValueError("prompt is empty: attribution needs at least one token")
    bad = tokens[(tokens < 0) | (tokens >= vocab)]
    if bad.numel():
        raise ValueError(f"prompt holds token ids {bad.tolist()[:5]} outside the vocabulary [0, {vocab})")
    return tokens


class CustomTarget(NamedTuple):
    """A target that is a direction rather than one token's logit (circuit-tracer's ``CustomTarget``, same
    fields): the graph explains ``vec . h``, ``h`` the final residual stream at the last position after the
    final norm (frozen), e.g. ``vec = W_U[a] - W_U[b]`` for the logit difference of tokens ``a`` and ``b``
    (:func:`logit_difference`). ``token_str`` labels its node; ``prob`` is its weight in influence, pruning
    and scores (a token target's weight is its probability). Its node id is ``vocab_size + i`` for the
    ``i``-th custom target, as in circuit-tracer. The vector is used as given (token targets subtract the
    mean unembedding row, which a difference of two rows cancels anyway)."""

    token_str: str
    prob: float
    vec: torch.Tensor


def _head_shape(model: nn.Module) -> tuple[int, int]:
    """(vocabulary size, hidden size) of the model's LM head; raises when it has none (attribution explains logits)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or getattr(head, "weight", None) is None:
        raise ValueError(f"{type(model).__name__} has no output embedding (LM head): attribution explains logits")
    return int(head.weight.shape[0]), int(head.weight.shape[1])


def logit_difference(model: nn.Module, a: int | str, b: int | str, *, tokenizer: Any = None,
                     prob: float = 1.0) -> CustomTarget:
    """The :class:`CustomTarget` of ``logit(a) - logit(b)`` (token ids, or one-token strings with ``tokenizer``):
    why the model prefers ``a`` to ``b``."""
    vocab, _ = _head_shape(model)
    ia, ib = _target_ids([a, b], tokenizer, vocab)
    W_u = unembedding_matrix(model)
    label = " - ".join(repr(t) if isinstance(t, str) else str(t) for t in (a, b))  # "' Paris' - ' London'"
    return CustomTarget(label, float(prob), (W_u[ia] - W_u[ib]).detach().float().cpu())


def _custom_targets(items: list, d_model: int) -> list[CustomTarget] | None:
    """The items as custom targets (all of them, or None when none is one); refuses a mix and bad fields."""
    custom = [isinstance(t, CustomTarget) or (isinstance(t, tuple) and len(t) == 3 and torch.is_tensor(t[2]))
              for t in items]
    if not any(custom):
        return None
    if not all(custom):
        raise ValueError("targets mixes CustomTarget directions with tokens: give one kind (a token's direction "
                         "is CustomTarget(label, prob, W_U[token]))")
    out = []
    for i, t in enumerate(items):
        label, prob, vec = t
        if not isinstance(label, str):
            raise ValueError(f"custom target {i}: token_str must be a str, got {type(label).__name__}")
        if isinstance(prob, bool) or not isinstance(prob, (int, float)) or not math.isfinite(prob) or prob < 0:
            raise ValueError(f"custom target {i} ({label!r}): prob must be a finite number >= 0, got {prob!r}")
        if tuple(vec.shape) != (d_model,):
            raise ValueError(f"custom target {i} ({label!r}): vec has shape {list(vec.shape)}; expected [{d_model}] "
                             "(the model's hidden size)")
        if not vec.is_floating_point() or not bool(torch.isfinite(vec).all()):
            raise ValueError(f"custom target {i} ({label!r}): vec must be finite floating point")
        out.append(CustomTarget(label, float(prob), vec.detach()))
    if sum(t.prob for t in out) <= 0:
        raise ValueError("custom targets' probs are all 0: give each target a positive weight")
    return out


def _target_ids(targets: TargetsLike, tokenizer: Any, vocab: int) -> list[int] | None:
    if targets is None:
        return None
    if isinstance(targets, (int, str)):
        targets = [targets]
    items = targets.flatten().tolist() if isinstance(targets, torch.Tensor) else list(targets)
    if not items:
        raise ValueError("targets is empty: give token ids or strings, or None for the most likely tokens")
    ids = []
    for t in items:
        if isinstance(t, str):
            if tokenizer is None:
                raise ValueError(f"target {t!r} is text: pass tokenizer=... (or give token ids)")
            enc = tokenizer(t, add_special_tokens=False)["input_ids"]
            if len(enc) != 1:
                raise ValueError(f"target {t!r} is {len(enc)} tokens ({enc}); each target must be exactly one token")
            t = enc[0]
        if not 0 <= int(t) < vocab:
            raise ValueError(f"target token id {t} is outside the vocabulary [0, {vocab})")
        ids.append(int(t))
    return ids


GEMMA3_IT_PREFIX = (2, 105, 2364, 107)  # <bos><start_of_turn>user\n in Gemma 3's vocabulary (circuit-tracer's)


def _zero_positions(model: nn.Module, tokens: torch.Tensor, zero_positions: int | None) -> int:
    """Leading positions without features or errors: ``zero_positions`` when given, else circuit-tracer's rule
    (by the model's name): 4 for a Gemma 3 "-it" model, whose prompt must start with its chat prefix, else 1."""
    n = int(tokens.numel())
    if zero_positions is not None:
        if isinstance(zero_positions, bool) or not isinstance(zero_positions, int) or not 0 <= zero_positions < n:
            raise ValueError(f"zero_positions must be an integer in [0, {n}) for this {n}-token prompt, "
                             f"got {zero_positions!r}")
        return zero_positions
    name = str(getattr(model.config, "_name_or_path", "") or "")
    if "gemma-3" in name.lower() and name.endswith("-it"):
        if tuple(tokens[:4].tolist()) != GEMMA3_IT_PREFIX:
            raise ValueError(f"{name} is an instruction-tuned Gemma 3: as in circuit-tracer, its prompt must start "
                             f"with its chat prefix <bos><start_of_turn>user\\n (ids {list(GEMMA3_IT_PREFIX)}), whose 4 "
                             f"positions carry no features; got ids {tokens[:4].tolist()}. Use the chat template, or "
                             "pass zero_positions=1 to attribute raw text")
        return 4
    return 1


def _context_length(model: nn.Module) -> int | None:
    cfg = text_config(model)
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(cfg, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _parse_bytes(value: int | float | str) -> int:
    if isinstance(value, (int, float)):
        return int(value)
    units = {"kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "b": 1}
    text = value.strip().lower().replace(" ", "")
    for unit in sorted(units, key=len, reverse=True):
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * units[unit])
    return int(float(text))


def input_device(model: nn.Module) -> torch.device:
    """Where the model wants its input ids: an accelerate hook's execution device, else the embedding's device."""
    for mod in (model, model.get_input_embeddings()):
        dev = getattr(getattr(mod, "_hf_hook", None), "execution_device", None)
        if dev is not None:
            return torch.device(f"cuda:{dev}" if isinstance(dev, int) else dev)
    weight = model.get_input_embeddings().weight
    return weight.device if weight.device.type != "meta" else torch.device("cpu")


@torch.no_grad()
def unembedding_matrix(model: nn.Module) -> torch.Tensor:
    """[V, d] unembedding weights; for an offloaded head (weights on the meta device) read through its forward."""
    head = model.get_output_embeddings()
    if head.weight.device.type != "meta":
        return head.weight.detach()
    d = int(head.weight.shape[1])
    eye = torch.eye(d, device=input_device(model))
    return (head(eye) - head(torch.zeros_like(eye))).T.contiguous()


def available_memory(device: torch.device) -> int | None:
    """Free bytes on ``device`` (CUDA: the driver's free memory; CPU: MemAvailable), None where unknown."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def estimate_memory(model: nn.Module, n_rows: int, n_cols: int, n_positions: int, batch_size: int, decoder_floats: int) -> int:
    """Bytes an attribution needs: the fp32 adjacency rows x columns (twice: before and after choosing columns),
    the decoder vectors, and the replicated forward's saved activations and attention patterns."""
    cfg = text_config(model)
    d = int(getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", 0) or 0)
    heads = int(getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", 1) or 1)
    _, layers = find_decoder_layers(model)
    per_layer = batch_size * n_positions * 24 * d * 4 + 4 * heads * n_positions * n_positions * 4
    return 2 * n_rows * n_cols * 4 + decoder_floats * 4 + len(layers) * per_layer


class _Rows:
    """Direct-effect rows of batches of attributed nodes, from one replicated forward (contractions of the
    gradients at every MLP output leaf and at the embedding with the source vectors)."""

    def __init__(self, rep: LocalReplacement, feats: ActiveFeatures, n_cols: int, device: torch.device) -> None:
        self.rep, self.f, self.n_cols, self.device = rep, feats, n_cols, device

    def compute(self, sites: list[int | None], positions: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
        """Rows [n, n_cols] for injections ``vectors`` [n, d] at (``sites[i]``: transcoder input layer, or None for
        the unembedding's input; ``positions[i]``), one per batch row."""
        rep, f = self.rep, self.f
        n = len(sites)
        loss = torch.zeros((), device=self.device)
        for site in set(sites):
            idx = torch.tensor([i for i, s in enumerate(sites) if s == site])
            x = rep.final if site is None else rep.inputs[site]
            pos = torch.full_like(idx, -1) if site is None else positions[idx]
            picked = x[idx.to(x.device), pos.to(x.device)].float()
            loss = loss + (picked * vectors[idx].to(picked.device)).sum().to(self.device)
        leaves = [rep.embed, *(rep.outputs[t] for t in range(rep.n_layers))]
        grads = torch.autograd.grad(loss, leaves, retain_graph=True, allow_unused=True)
        out = torch.zeros(n, self.n_cols, device=self.device)
        g_emb = grads[0]
        T = f.n_positions
        if g_emb is not None:
            ts = f.n_features + rep.n_layers * T
            out[:, ts : ts + T] = torch.einsum("btd,td->bt", g_emb[:n].to(self.device).float(), f.token_vectors)
        for t in range(rep.n_layers):
            g = grads[1 + t]
            if g is None:
                continue
            g = g[:n].to(self.device).float()
            es = f.n_features + t * T
            out[:, es : es + T] = torch.einsum("btd,td->bt", g, f.error_vectors[t])
            cols, pos, vecs = f.writers(t)
            step = max(1, (1 << 24) // max(1, n * vecs.shape[-1]))
            for c0 in range(0, len(cols), step):
                c1 = c0 + step
                contrib = (g[:, pos[c0:c1]] * vecs[c0:c1]).sum(-1)
                out.index_add_(1, cols[c0:c1], contrib)
        return out


def attribute(
    model: nn.Module,
    transcoder: Any,
    prompt: str | Sequence[int] | torch.Tensor,
    *,
    tokenizer: Any = None,
    targets: TargetsLike = None,
    max_n_logits: int = 10,
    desired_logit_prob: float = 0.95,
    max_feature_nodes: int | None = None,
    batch_size: int | None = None,
    max_memory: int | str | None = None,
    update_interval: int = 4,
    progress: bool | None = None,
    zero_positions: int | None = None,
) -> AttributionGraph:
    """The attribution graph of ``prompt``'s next-token logits in the transcoder's local replacement model.

    ``transcoder``: what :func:`~sparse_clt_hf.attach_clt` accepts (a :class:`CrossLayerTranscoder` with decoders,
    a folder, a Hub reference) or an attachment. ``prompt``: text (needs ``tokenizer``; a special token is put
    first as circuit-tracer does) or token ids, used exactly as given. ``targets``: token ids or one-token strings
    whose logits to explain; by default the most likely tokens until their probability reaches
    ``desired_logit_prob`` (at most ``max_n_logits``). ``max_feature_nodes``: attribute at most this many features,
    chosen greedily by influence. ``batch_size``: attributed nodes per backward pass (default: 64, halved while the estimate does not fit). ``max_memory``: a limit in
    bytes (or "8GB"), checked with an estimate before the work starts (default: the free memory).
    ``zero_positions``: how many leading positions have no features and no error (default as circuit-tracer:
    1, the BOS / attention sink; 4 for a Gemma 3 instruction-tuned model, whose prompts must then start with
    its chat prefix ``<bos><start_of_turn>user\\n``).
    """
    vocab, d_model = _head_shape(model)
    tokens = _tokens(prompt, tokenizer, vocab)
    context = _context_length(model)
    if context is not None and len(tokens) > context:
        raise ValueError(f"prompt has {len(tokens)} tokens but the model's context is {context} positions")
    listed = [targets] if isinstance(targets, CustomTarget) else list(targets) if isinstance(targets, (list, tuple)) else None
    custom = _custom_targets(listed, d_model) if listed else None
    target_ids = None if custom is not None else _target_ids(targets, tokenizer, vocab)
    zero = _zero_positions(model, tokens, zero_positions)
    if max_feature_nodes is not None and (isinstance(max_feature_nodes, bool) or int(max_feature_nodes) < 1):
        raise ValueError(f"max_feature_nodes must be a positive integer or None, got {max_feature_nodes!r}")
    auto_batch = batch_size is None
    batch_size = 64 if batch_size is None else batch_size
    if isinstance(batch_size, bool) or int(batch_size) < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if max_n_logits < 1 or not 0.0 < desired_logit_prob <= 1.0:
        raise ValueError("max_n_logits must be >= 1 and desired_logit_prob in (0, 1]")
    if update_interval < 1:
        raise ValueError(f"update_interval must be >= 1, got {update_interval}")
    if model.training:
        raise ValueError("the model is in training mode (dropout): call model.eval() before attributing")
    limit = None if max_memory is None else _parse_bytes(max_memory)
    device = input_device(model)
    tc, source_name, rows_from = resolve_transcoder(model, transcoder, device)

    with LocalReplacement(model, tc) as rep:
        with torch.no_grad():
            out = model(input_ids=tokens[None].to(device), use_cache=False)
        logits = out.logits[0, -1].float()
        if not torch.isfinite(logits).all():
            raise ValueError("the model's logits are not finite on this prompt")
        work = rep.embed.device
        feats = find_active_features(rep, tc, work, rows_from, zero)
        probs = torch.softmax(logits, -1).to(work)
        if custom is not None:  # virtual ids after the vocabulary, as circuit-tracer numbers them
            ids = torch.arange(vocab, vocab + len(custom), dtype=torch.long)
            u = torch.stack([t.vec.float() for t in custom]).to(work)
            target_probs = torch.tensor([t.prob for t in custom], dtype=torch.float32, device=work)
        else:
            if target_ids is None:
                top_p, top_i = torch.topk(probs, min(max_n_logits, vocab))
                cutoff = int(torch.searchsorted(torch.cumsum(top_p, 0), desired_logit_prob)) + 1
                ids = top_i[:cutoff].cpu()
            else:
                ids = torch.tensor(target_ids, dtype=torch.long)
            W_u = unembedding_matrix(model)
            u = (W_u[ids.to(W_u.device)].float() - W_u.float().mean(0, keepdim=True)).to(work)
            target_probs = probs[ids.to(work)].float()
        n_logits = len(ids)
        n_active = feats.n_features
        n_feat_rows = n_active if max_feature_nodes is None else min(int(max_feature_nodes), n_active)
        full = GraphLayout(n_active, rep.n_layers, len(tokens), n_logits)
        B = min(int(batch_size), max(n_feat_rows, n_logits, 1))
        free = limit if limit is not None else available_memory(work)

        def need_at(b: int) -> int:
            return estimate_memory(model, n_feat_rows + n_logits, full.n_nodes, len(tokens), b, feats.decoder_floats)

        while auto_batch and free is not None and B > 1 and need_at(B) > free:
            B //= 2
        need = need_at(B)
        if free is not None and need > free:
            raise AttributionMemoryError(
                f"attribution needs about {need / 2**30:.2f} GiB ({n_feat_rows + n_logits} rows x {full.n_nodes} "
                f"columns fp32 + activations at batch_size={B}) but {free / 2**30:.2f} GiB "
                f"{'is allowed (max_memory)' if limit is not None else 'is free'}: lower max_feature_nodes or batch_size"
            )

        keep = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
        model(input_ids=tokens[None].expand(B, -1).to(device), use_cache=False, **keep)  # only the last logits
        rows_of = _Rows(rep, feats, full.logit_start, work)
        edges = torch.zeros(n_feat_rows + n_logits, full.n_nodes, device=work)
        row_nodes = torch.zeros(n_feat_rows + n_logits, dtype=torch.long, device=work)
        n_batches = -(-n_logits // B) + -(-n_feat_rows // B)
        bar = tqdm(total=n_batches, desc="attribution (backward batches)", disable=(not progress) if progress is not None else None)
        try:
            for i in range(0, n_logits, B):
                j = min(i + B, n_logits)
                edges[i:j, : full.logit_start] = rows_of.compute([None] * (j - i), torch.zeros(j - i, dtype=torch.long), u[i:j])
                row_nodes[i:j] = torch.arange(i, j, device=work) + full.logit_start
                bar.update(1)
            visited = torch.zeros(n_active, dtype=torch.bool, device=work)
            st = n_logits
            while st - n_logits < n_feat_rows:
                if n_feat_rows == n_active:
                    pending = torch.arange(n_active, device=work)
                else:
                    infl = partial_influences(edges[:st], row_nodes[:st], target_probs)
                    rank = torch.argsort(infl[:n_active], descending=True)
                    size = min(update_interval * B, n_feat_rows - (st - n_logits))
                    pending = rank[~visited[rank]][:size]
                for k in range(0, len(pending), B):
                    batch = pending[k : k + B]
                    vecs = feats.injection(batch)
                    layer_of = feats.layers[batch].tolist()
                    edges[st : st + len(batch), : full.logit_start] = rows_of.compute(layer_of, feats.positions[batch], vecs)
                    row_nodes[st : st + len(batch)] = batch
                    visited[batch] = True
                    st += len(batch)
                    bar.update(1)
        finally:
            bar.close()

    selected = torch.nonzero(visited).flatten()
    cols = torch.cat([selected, torch.arange(n_active, full.n_nodes, device=work)])
    adjacency = edges[:, cols]
    new_index = torch.full((n_active,), -1, dtype=torch.long, device=work)
    new_index[selected] = torch.arange(len(selected), device=work)
    is_feature = row_nodes < n_active
    new_rows = row_nodes - n_active + len(selected)
    if n_active:
        new_rows = torch.where(is_feature, new_index[row_nodes.clamp(max=n_active - 1)], new_rows)
    order = torch.argsort(new_rows)
    return AttributionGraph(
        tokens=tokens,
        features=feats.table()[selected.cpu()],
        activations=feats.values[selected].float().cpu(),
        logit_ids=ids.long(),
        logit_probs=target_probs.cpu(),
        adjacency=adjacency[order].cpu(),
        row_nodes=new_rows[order].cpu(),
        n_layers=rep.n_layers,
        token_strings=_decode_each(tokenizer, tokens),
        logit_strings=[t.token_str for t in custom] if custom is not None else _decode_each(tokenizer, ids),
        meta={
            "model": getattr(model.config, "_name_or_path", None) or type(model).__name__,
            "model_type": getattr(text_config(model), "model_type", None),
            "transcoder": source_name,
            "transcoder_kind": "plt" if tc.config.span == 1 else "clt",
            "n_active_features": n_active,
            "max_feature_nodes": max_feature_nodes,
            "desired_logit_prob": desired_logit_prob,
            "max_n_logits": max_n_logits,
            "vocab_size": vocab,
            "custom_targets": custom is not None,
            "zero_positions": zero,
            "versions": {p: _version(p) for p in ("sparse-clt-hf", "torch", "transformers")},
        },
    )


def _decode_each(tokenizer: Any, ids: torch.Tensor) -> list[str] | None:
    return None if tokenizer is None else [tokenizer.decode([int(t)]) for t in ids.tolist()]


@functools.cache
def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _check_row_prompt(sequences: torch.Tensor, row: int, position: int) -> None:
    if sequences.ndim != 2:
        raise ValueError(f"sequences must be [batch, length] token ids, got shape {tuple(sequences.shape)}")
    if not 0 <= row < sequences.shape[0]:
        raise ValueError(f"row {row} is out of range: sequences has {sequences.shape[0]} rows")
    if not 1 <= position < sequences.shape[1]:
        raise ValueError(f"position {position} is out of range: it must be in [1, {sequences.shape[1]})")


def attribute_generated(
    model: nn.Module,
    transcoder: Any,
    sequences: torch.Tensor,
    *,
    row: int = 0,
    position: int = -1,
    attention_mask: torch.Tensor | None = None,
    pad_token_id: int | None = None,
    **kwargs: Any,
) -> AttributionGraph:
    """Why the model produced ``sequences[row, position]`` (e.g. a token ``generate()`` returned): the prompt is the
    row's tokens before ``position`` without left padding (``attention_mask`` if given, else leading
    ``pad_token_id`` tokens, by default the model's), the target that token."""
    sequences = torch.as_tensor(sequences)
    position = position + sequences.shape[-1] if position < 0 else position
    _check_row_prompt(sequences, row, position)
    seq = sequences[row].cpu()
    if attention_mask is not None:
        start = int(torch.nonzero(torch.as_tensor(attention_mask)[row].cpu()[:position]).min()) if bool(
            torch.as_tensor(attention_mask)[row][:position].any()
        ) else position
    else:
        pad = pad_token_id
        if pad is None:
            gen = getattr(model, "generation_config", None)
            pad = getattr(gen, "pad_token_id", None) if gen is not None else None
            pad = getattr(model.config, "pad_token_id", None) if pad is None else pad
        start = 0
        if pad is not None:
            while start < position and int(seq[start]) == int(pad):
                start += 1
    if start >= position:
        raise ValueError(f"row {row} has no prompt tokens before position {position} (all padding)")
    if "targets" in kwargs:
        raise ValueError("attribute_generated explains the token at `position`; do not pass targets")
    return attribute(model, transcoder, seq[start:position], targets=[int(seq[position])], **kwargs)
