"""Server throughput with features vs without: the same model served twice side by side (one copy with
the transcoder attached, one plain), the same dynamic batching, the same concurrent greedy requests.

Rounds alternate which server goes first; each figure is the median over rounds of completion
tokens per second (the ratio is taken round by round). ``sparse-clt-hf serve --bench`` runs it.
"""

from __future__ import annotations

import copy
import socket
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from .app import create_app

BENCH_PROMPTS = (
    "Explain what a Python list comprehension is.",
    "Write a haiku about the sea.",
    "What is the capital of France, and why?",
    "List three uses of a hash map.",
    "Describe the water cycle briefly.",
    "Why is the sky blue?",
    "Give me a tip for learning to code.",
    "What does a compiler do?",
)


class ServerThread:
    """uvicorn serving ``app`` on 127.0.0.1 (a free port unless ``port``) in a daemon thread; a context
    manager whose exit shuts it down gracefully."""

    def __init__(self, app: Any, port: int = 0, graceful: int = 5) -> None:
        import uvicorn

        self.app = app
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", port))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=graceful))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)
        self.sock.close()


def _round(url: str, model: str, prompts: list[str], max_tokens: int, concurrency: int) -> tuple[float, int]:
    import httpx

    def ask(prompt: str) -> int:
        body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
                "temperature": 0}
        r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=600)
        r.raise_for_status()
        return int(r.json()["usage"]["completion_tokens"])

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        tokens = sum(pool.map(ask, prompts))
    return time.perf_counter() - start, tokens


def bench_serve(model: Any, tokenizer: Any, transcoder: Any, *, layers: Any = None, top_k: int = 8,
                attach_options: dict[str, Any] | None = None,
                requests: int = 32, max_batch: int = 8, max_tokens: int = 32, rounds: int = 3,
                prompts: tuple[str, ...] = BENCH_PROMPTS, model_name: str = "model",
                batch_wait: float = 0.05) -> dict[str, Any]:
    """Tokens/s of the server with ``transcoder`` attached vs the plain model, ``requests`` chat
    completions per round from ``max_batch`` client threads (the server batches up to ``max_batch``;
    ``batch_wait``: how long a batch waits for the clients' next wave, so that waves are whole batches)."""
    plain_model = copy.deepcopy(model)  # before attaching: a model without hooks
    kw = dict(model_name=model_name, max_batch=max_batch, max_queue=max(64, requests), max_new_tokens=max_tokens,
              batch_wait=batch_wait)
    servers = {"with_features": create_app(model, tokenizer, transcoder, layers=layers, top_k=top_k,
                                                attach_options=attach_options, **kw),
               "plain": create_app(plain_model, tokenizer, None, **kw)}
    asks = [prompts[i % len(prompts)] for i in range(requests)]
    rates: dict[str, list[float]] = {name: [] for name in servers}
    tokens: dict[str, int] = {}
    with ServerThread(servers["with_features"]) as a, ServerThread(servers["plain"]) as b:
        urls = {"with_features": a.url, "plain": b.url}
        for name in urls:  # warm-up (untimed)
            _round(urls[name], model_name, asks[:max_batch], max_tokens, max_batch)
        for r in range(rounds):
            order = list(urls) if r % 2 == 0 else list(reversed(urls))
            for name in order:
                seconds, n = _round(urls[name], model_name, asks, max_tokens, max_batch)
                rates[name].append(n / seconds)
                tokens[name] = n
        sizes = {name: dict(sorted(app.state.scheduler.batch_sizes.items())) for name, app in servers.items()}
    ratios = [w / p for w, p in zip(rates["with_features"], rates["plain"])]
    return {
        "requests": requests, "max_batch": max_batch, "max_tokens": max_tokens, "rounds": rounds,
        "tokens_per_s": {name: round(statistics.median(v), 2) for name, v in rates.items()},
        "ratio": round(statistics.median(ratios), 3), "ratios": [round(x, 3) for x in ratios],
        "completion_tokens": tokens, "batch_sizes": sizes,
    }
