"""Dynamic batching: one worker thread owns the model and runs one ``generate`` call at a time.

Requests wait in a bounded queue (full: 429 at once). The worker takes the oldest request, waits a few
milliseconds for others that generate alike (same steers, same sampling settings: see
:meth:`GenerationRequest.batch_key`), left-pads their prompts into one batch of at most ``max_batch``
rows and generates. A stopping criterion ends each row on its own (its ``max_tokens``, a stop string,
end of text, or a client that went away), and the attachment's ``on_step`` callback hands over each
pass's features, so every token is sent with its features as soon as the model has read it. Steers are
set on the attachment for one batch and cleared after it, so requests with different steers never
share a batch.

Events go to each request's ``asyncio.Queue`` (thread-safe, through its loop): ``prompt`` (the prompt's
token records), ``token``, ``end`` (finish reason) per row, ``error``, and ``done`` when every row ended.
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

from ..features import Features
from .payload import FeatureReader, decode, find_stop, padded_rows, token_record
from .schemas import APIError, GenerationRequest, SteerSpec

log = logging.getLogger("sparse_clt_hf.serve")


@dataclass(eq=False)
class Job:
    """One request (or, with ``compare``, one of its two halves) and where its events go."""

    id: str
    request: GenerationRequest
    steer: tuple[SteerSpec, ...]
    send: Callable[[dict[str, Any]], None]
    key: tuple = ()
    arrived: float = field(default_factory=time.monotonic)
    cancelled: bool = False
    state: str = "queued"  # queued | running | finished | cancelled

    @property
    def rows(self) -> int:
        return len(self.request.prompts) * self.request.n


@dataclass(eq=False)
class _Row:
    job: Job
    choice: int
    prompt: list[int]
    pad: int  # left padding in the batch
    b: int  # batch row
    generated: list[int] = field(default_factory=list)
    pending: int | None = None  # the newest token: sent once the model has read it (or the row ends)
    pending_features: list[dict[str, Any]] | None = None
    done: bool = False


class Scheduler:
    """The queue and the worker (see the module docstring). ``clt`` None: a plain model, no features."""

    def __init__(self, model: Any, tokenizer: Any, clt: Any, *, labels: Any, max_batch: int, max_queue: int,
                 context: int, batch_wait: float = 0.005) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.clt = clt
        self.labels = labels
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.context = context
        self.batch_wait = batch_wait
        self.pad_id, self.eos_ids = _special_ids(model, tokenizer)
        self._pending: list[Job] = []
        self._running: list[Job] = []
        self._cond = threading.Condition()
        self._closing = False
        self._stopped = False
        self._thread: threading.Thread | None = None
        self._unique = itertools.count()
        self._rows: list[_Row] = []
        #: rows per generate call so far (how well requests were batched)
        self.batch_sizes: collections.Counter[int] = collections.Counter()
        self._seen = 0
        self._longest = 0

    # ------------------------------------------------------------------ submitting (event loop side)
    def submit(self, jobs: list[Job]) -> None:
        """Queue ``jobs`` (all or none): 503 while shutting down, 429 when the queue is full."""
        with self._cond:
            if self._closing:
                raise APIError(503, "the server is shutting down", code="shutting_down")
            if len(self._pending) + len(jobs) > self.max_queue:
                raise APIError(429, f"the queue is full ({self.max_queue} requests waiting); retry shortly",
                               code="queue_full", headers={"Retry-After": "1"})
            for job in jobs:
                job.key = job.request.batch_key(job.steer, next(self._unique))
                self._pending.append(job)
            self._start()
            self._cond.notify_all()

    def cancel(self, job: Job) -> None:
        """The client went away: drop the job from the queue, or end its rows at the next step."""
        with self._cond:
            job.cancelled = True
            if job in self._pending:
                self._pending.remove(job)
                job.state = "cancelled"

    def load(self) -> dict[str, int]:
        with self._cond:
            return {"queued": len(self._pending), "running": len(self._running)}

    def _start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="sparse-clt-hf-serve", daemon=True)
            self._thread.start()

    def close(self, timeout: float = 30.0) -> dict[str, list[str]]:
        """Graceful shutdown: refuse new requests, let the queued and running ones finish for up to
        ``timeout`` seconds, then cancel the rest (their clients get a 503 error). Returns and logs which
        requests finished and which were cancelled."""
        with self._cond:
            self._closing = True
            waiting = [j.id for j in self._pending] + [j.id for j in self._running]
            deadline = time.monotonic() + timeout
            while (self._pending or self._running) and time.monotonic() < deadline:
                self._cond.wait(min(0.05, max(0.0, deadline - time.monotonic())))
            left = self._pending + self._running
            for job in left:
                job.cancelled = True
                job.state = "cancelled"
                job.send({"type": "error", "error": APIError(503, "the server shut down before this request finished",
                                                             code="shutting_down")})
            self._pending = []
            self._stopped = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=max(1.0, timeout))
        cancelled = sorted({j.id for j in left})
        finished = [i for i in dict.fromkeys(waiting) if i not in cancelled]
        log.info("shutdown: %d finished %s, %d cancelled %s", len(finished), finished, len(cancelled), cancelled)
        return {"finished": finished, "cancelled": cancelled}

    # ------------------------------------------------------------------ the worker
    def _loop(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            try:
                self._run(batch)
            except APIError as exc:
                self._fail(batch, exc)
            except Exception as exc:  # noqa: BLE001 - every request of the batch gets a 500, the server goes on
                log.exception("generate failed for %s", [j.id for j in batch])
                self._fail(batch, APIError(500, f"generation failed: {type(exc).__name__}: {exc}"[:500],
                                           code="generation_failed"))
            finally:
                with self._cond:
                    for job in batch:
                        job.state = "cancelled" if job.cancelled else "finished"
                    self._running = []
                    self._cond.notify_all()

    def _next_batch(self) -> list[Job] | None:
        with self._cond:
            while not self._pending:
                if self._stopped:
                    return None
                self._cond.wait()
            first = self._pending[0]
            deadline = first.arrived + self.batch_wait
            while time.monotonic() < deadline and self._fits(first) < self.max_batch:
                self._cond.wait(max(0.0, deadline - time.monotonic()))
            if first not in self._pending:  # cancelled while waiting
                return []
            batch, rows, longest, new = [], 0, 0, 0
            for job in list(self._pending):
                if job.key != first.key or rows + job.rows > self.max_batch:
                    continue
                p = max(len(x) for x in job.request.prompts)
                m = max(new, job.request.max_new_tokens)
                if batch and max(longest, p) + m > self.context:
                    continue
                batch.append(job)
                rows, longest, new = rows + job.rows, max(longest, p), m
            for job in batch:
                self._pending.remove(job)
                job.state = "running"
            self._running = batch
            return batch

    def _fits(self, first: Job) -> int:
        return sum(j.rows for j in self._pending if j.key == first.key)

    def _fail(self, batch: list[Job], error: APIError) -> None:
        for job in batch:
            if not job.cancelled:
                job.send({"type": "error", "error": error})

    def _run(self, batch: list[Job]) -> None:
        if not batch:
            return
        req = batch[0].request
        rows: list[_Row] = []
        for job in batch:
            for i in range(job.rows):
                rows.append(_Row(job, i, job.request.prompts[i // job.request.n], 0, len(rows)))
        ids, mask = padded_rows([r.prompt for r in rows], self.pad_id)
        for r in rows:
            r.pad = ids.shape[1] - len(r.prompt)
        self._rows, self._seen, self._longest = rows, 0, ids.shape[1]
        self.batch_sizes[len(rows)] += 1
        device = _input_device(self.model)
        config = self._generation_config(max(j.request.max_new_tokens for j in batch), req)
        stops = StoppingCriteriaList([_RowStops(self)])
        start = time.perf_counter()
        try:
            if self.clt is not None:
                for s in batch[0].steer:
                    try:
                        self.clt.steer(**s.as_kwargs())
                    except (ValueError, RuntimeError) as exc:
                        raise APIError(400, f"steer: {exc}", param="steer", code="invalid_steer") from exc
            if req.seed is not None:
                torch.manual_seed(req.seed)
            call = self.clt.generate if self.clt is not None else self.model.generate
            call(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config,
                 stopping_criteria=stops)
        finally:
            if self.clt is not None:
                self.clt.clear_steering()
                self.clt.reset()
            self._rows = []
        for r in rows:  # generate ended: a row still open ran out of tokens
            if not r.done:
                self._end(r, "length")
        for job in batch:
            if not job.cancelled:
                job.send({"type": "done", "seconds": time.perf_counter() - start, "batch": len(rows)})

    def _generation_config(self, max_new: int, req: GenerationRequest) -> GenerationConfig:
        settings: dict[str, Any] = dict(max_new_tokens=max_new, num_beams=1, pad_token_id=self.pad_id,
                                        eos_token_id=self.eos_ids or None, do_sample=not req.greedy)
        if not req.greedy:
            settings.update(temperature=req.temperature, top_p=req.top_p, top_k=0)
        bos = getattr(getattr(self.model, "generation_config", None), "bos_token_id", None)
        return GenerationConfig(bos_token_id=bos, **settings)

    # ------------------------------------------------------------------ per pass and per step
    def on_step(self, piece: Features) -> None:
        """The attachment's callback after every forward pass: attach features to the tokens just read."""
        rows = self._rows
        if not rows:
            return
        start, n = self._seen, piece.num_positions
        self._seen += n
        wanted = [r for r in rows if r.job.request.features.enabled and not r.done and not r.job.cancelled]
        if not wanted:
            return
        reader = FeatureReader(piece)
        for r in wanted:
            opts = r.job.request.features
            for t in range(n):
                pos = start + t
                if pos < self._longest:  # a prompt position
                    if opts.prompt and pos >= r.pad and pos == self._longest - 1:
                        self._send_prompt(r, reader, start)
                    continue
                if r.pending is not None and pos - self._longest == len(r.generated) - 1:
                    r.pending_features = reader.top(r.b, t, opts.layers, opts.top_k, self.labels)

    def _send_prompt(self, r: _Row, reader: FeatureReader, start: int) -> None:
        opts = r.job.request.features
        if start > r.pad:
            raise RuntimeError("the prompt was read in several forward passes; the server expects one prefill pass")
        records = []
        for pos in range(r.pad, self._longest):
            feats = reader.top(r.b, pos - start, opts.layers, opts.top_k, self.labels)
            records.append(token_record(self.tokenizer, pos - r.pad, r.prompt[pos - r.pad], "prompt", feats))
        r.job.send({"type": "prompt", "row": r.choice, "tokens": records})

    def on_step_end(self, input_ids: torch.Tensor) -> torch.Tensor:
        """After every step (the stopping criterion): send tokens, end rows; True where a row is done."""
        new = input_ids[:, -1].tolist()
        for r, token in zip(self._rows, new):
            if r.done:
                continue
            if r.job.cancelled:
                r.done = True
                continue
            self._flush_pending(r)
            if token in self.eos_ids:
                self._end(r, "stop")
                continue
            r.generated.append(token)
            r.pending, r.pending_features = token, None
            req = r.job.request
            if req.stop and find_stop(decode(self.tokenizer, r.generated), req.stop) is not None:
                self._end(r, "stop")
            elif len(r.generated) >= req.max_new_tokens:
                self._end(r, "length")
        return torch.tensor([r.done for r in self._rows], dtype=torch.bool, device=input_ids.device)

    def _flush_pending(self, r: _Row, with_features: bool = True) -> None:
        if r.pending is None:
            return
        position = len(r.prompt) + len(r.generated) - 1
        feats = r.pending_features if with_features else None
        if r.job.request.features.enabled:
            record = token_record(self.tokenizer, position, r.pending, "generated", feats)
        else:
            record = None
        r.job.send({"type": "token", "row": r.choice, "token_id": r.pending, "record": record})
        r.pending, r.pending_features = None, None

    def _end(self, r: _Row, reason: str) -> None:
        """End a row: its last token was never read by the model, so it goes out without features."""
        self._flush_pending(r, with_features=False)
        r.done = True
        if not r.job.cancelled:
            r.job.send({"type": "end", "row": r.choice, "finish_reason": reason})


class _RowStops(StoppingCriteria):
    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        return self.scheduler.on_step_end(input_ids)  # type: ignore[return-value]


def _special_ids(model: Any, tokenizer: Any) -> tuple[int, list[int]]:
    """The pad token id and every end-of-text id (the model's generation config and the tokenizer's)."""
    config = getattr(model, "generation_config", None)
    eos: list[int] = []
    for source in (getattr(config, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        for x in source if isinstance(source, (list, tuple)) else [source]:
            if isinstance(x, int) and x not in eos:
                eos.append(x)
    pad = getattr(tokenizer, "pad_token_id", None)
    if not isinstance(pad, int):
        pad = getattr(config, "pad_token_id", None)
    if not isinstance(pad, int):
        pad = eos[0] if eos else 0
    return pad, eos


def _input_device(model: Any) -> torch.device:
    try:
        return model.get_input_embeddings().weight.device
    except (AttributeError, NotImplementedError):
        return next(model.parameters()).device
