"""The OpenAI-compatible server: answers equal to ``clt.generate`` on the same prompt (served alone or
batched with others), streaming, steering, overload, disconnects, bad input, auth, shutdown.

Driven with the official ``openai`` client (sync, async, streaming) against uvicorn on 127.0.0.1.
The reference for every answer is a second copy of the model (same seed) with the transcoder attached
the ordinary way: its ``Features`` per position, top-n taken by sorting ``to_records()``.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import tiny_models
import torch
from conftest import random_transcoder
from tiny_models import tiny_model

fastapi = pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from sparse_clt_hf import attach_clt  # noqa: E402
from sparse_clt_hf.serve import create_app  # noqa: E402
from sparse_clt_hf.serve.bench import ServerThread, bench_serve  # noqa: E402

K = 6  # features recorded per layer
WIDTHS = [64, 48, 64]
NAME = "tiny-llama"
SERVE_CHAT_TEMPLATE = "{% for m in messages %}[{{ m['role'][0] }}:{{ m['content'] }}]{% endfor %}>"


def char_tokenizer():
    return tiny_models.char_tokenizer(full_vocab=True, chat_template=SERVE_CHAT_TEMPLATE)


def transcoder():
    return random_transcoder(d=32, layers=(0, 1, 2), widths=WIDTHS, decoders=True, seed=3)


class Served(ServerThread):
    """uvicorn on 127.0.0.1 (a free port) in a thread; stopped (graceful shutdown) on exit."""

    def client(self, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=kw.pop("api_key", "unused"), max_retries=0, **kw)


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


@pytest.fixture(scope="module")
def served(tok):
    app = create_app(tiny_model("llama"), tok, transcoder(), top_k=K, model_name=NAME, max_batch=8,
                     max_new_tokens=40, batch_wait=0.02)
    with Served(app) as s:
        yield s


@pytest.fixture(scope="module")
def ref_model():
    return tiny_model("llama")  # the same weights as the served one (same seed)


def reference(model, tok, ids, max_new, *, top_n=K, layers=(0, 1, 2), steer=()):
    """What the request should answer, from ``clt.generate`` alone: token ids, finish reason, records."""
    with attach_clt(model, transcoder(), top_k=K) as clt:
        for s in steer:
            clt.steer(**s)
        x = torch.tensor([ids])
        out, feats = clt.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=max_new,
                                  do_sample=False, pad_token_id=0)
    seq = out[0].tolist()
    gen = seq[len(ids):]
    finish = "stop" if 1 in gen else "length"
    gen = gen[: gen.index(1)] if 1 in gen else gen
    by_pos: dict[int, list] = {}
    for r in feats.to_records():
        if r["layer"] in layers:
            by_pos.setdefault(r["position"], []).append(r)
    records = []
    for p, t in enumerate(ids + gen):
        read = p <= len(seq) - 2  # the model read this token (the last one it only wrote)
        hits = sorted(by_pos.get(p, []), key=lambda r: -r["activation"])[:top_n] if read else []
        records.append({"position": p, "token_id": t, "kind": "prompt" if p < len(ids) else "generated",
                        "features": [(h["layer"], h["feature"], h["activation"]) for h in hits]})
    return gen, finish, records


def same_records(got, want, prompt=True):
    want = want if prompt else [w for w in want if w["kind"] == "generated"]
    assert [(g["position"], g["token_id"], g["kind"]) for g in got] == \
        [(w["position"], w["token_id"], w["kind"]) for w in want]
    for g, w in zip(got, want):
        assert [(f["layer"], f["feature"]) for f in g["features"]] == [(x[0], x[1]) for x in w["features"]], g["position"]
        # batched matmuls round differently from a batch of one: activations agree to float32 rounding
        torch.testing.assert_close(torch.tensor([f["activation"] for f in g["features"]]),
                                   torch.tensor([x[2] for x in w["features"]]), atol=1e-5, rtol=1e-5)


def chat_ids(tok, text):
    return tok(tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                       add_generation_prompt=True), add_special_tokens=False)["input_ids"]


PROMPTS = ["hello", "the cat sat", "a", "features!", "0123456789", "xyz xyz"]


# ---------------------------------------------------------------------------- answers
def test_completion_and_chat_equal_generate_alone(served, tok, ref_model):
    client = served.client()
    for i, text in enumerate(PROMPTS[:3]):
        ids = tok(text)["input_ids"]
        gen, finish, want = reference(ref_model, tok, ids, 7 + i)
        r = client.completions.create(model=NAME, prompt=text, max_tokens=7 + i, temperature=0)
        choice = r.choices[0]
        assert choice.text == tok.decode(gen, skip_special_tokens=True) and choice.finish_reason == finish
        assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == len(gen)
        same_records(choice.model_extra["features"]["tokens"], want)
    ids = chat_ids(tok, "hi there")
    gen, finish, want = reference(ref_model, tok, ids, 9, top_n=3, layers=(0, 2))
    r = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi there"}],
                                       max_completion_tokens=9, temperature=0,
                                       extra_body={"features": {"top_k": 3, "layers": [2, 0], "prompt": False}})
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == NAME
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == tok.decode(gen, skip_special_tokens=True)
    feats = r.choices[0].model_extra["features"]
    assert feats["layers"] == [0, 2] and feats["top_k"] == 3
    same_records(feats["tokens"], want, prompt=False)


def test_token_id_prompts_n_and_stop(served, tok, ref_model):
    client = served.client()
    ids = [40, 41, 42, 43]
    gen, _, want = reference(ref_model, tok, ids, 6)
    r = client.completions.create(model=NAME, prompt=ids, max_tokens=6, temperature=0, n=2)
    assert len(r.choices) == 2 and r.choices[0].text == r.choices[1].text  # greedy: n identical answers
    for c in r.choices:
        same_records(c.model_extra["features"]["tokens"], want)
    text = tok.decode(gen, skip_special_tokens=True)
    stop = text[2:4]
    r = client.completions.create(model=NAME, prompt=ids, max_tokens=6, temperature=0, stop=[stop])
    assert r.choices[0].text == text[: text.index(stop)] and r.choices[0].finish_reason == "stop"
    r = client.completions.create(model=NAME, prompt=["ab", "cd"], max_tokens=3, temperature=0,
                                  extra_body={"features": False})
    assert [c.index for c in r.choices] == [0, 1] and "features" not in r.choices[0].model_extra
    for c, p in zip(r.choices, ["ab", "cd"]):
        assert c.text == tok.decode(reference(ref_model, tok, tok(p)["input_ids"], 3)[0], skip_special_tokens=True)


def test_sampling_with_a_seed_repeats(served):
    client = served.client()
    kw = dict(model=NAME, prompt="seeded", max_tokens=12, temperature=1.3, top_p=0.9, seed=1234)
    a = client.completions.create(**kw).choices[0].text
    assert a == client.completions.create(**kw).choices[0].text
    texts = {client.completions.create(**{**kw, "seed": s}).choices[0].text for s in range(4)}
    assert len(texts) > 1


def test_concurrent_requests_are_batched_exact_and_unmixed(served, tok, ref_model):
    jobs = [(PROMPTS[i % len(PROMPTS)] * (1 + i % 3), 4 + i % 9) for i in range(32)]
    want = {job: reference(ref_model, tok, tok(job[0])["input_ids"], job[1]) for job in set(jobs)}
    client = served.client()
    before = sum(n * c for n, c in served.app.state.scheduler.batch_sizes.items() if n > 1)

    def ask(job):
        r = client.completions.create(model=NAME, prompt=job[0], max_tokens=job[1], temperature=0)
        return job, r.choices[0]

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, jobs))
    for job, choice in answers:
        gen, finish, records = want[job]
        assert choice.text == tok.decode(gen, skip_special_tokens=True) and choice.finish_reason == finish
        same_records(choice.model_extra["features"]["tokens"], records)
    batched = sum(n * c for n, c in served.app.state.scheduler.batch_sizes.items() if n > 1) - before
    assert batched > 0, served.app.state.scheduler.batch_sizes  # some requests shared a generate call


# ---------------------------------------------------------------------------- streaming
def _stream_parts(chunks):
    text, tokens, prompt_events, finish = "", [], 0, None
    for ch in chunks:
        if not ch.choices:
            continue
        c = ch.choices[0]
        delta = c.delta.content if hasattr(c, "delta") else c.text
        text += delta or ""
        feats = (c.model_extra or {}).get("features")
        if feats:
            kinds = {t["kind"] for t in feats["tokens"]}
            prompt_events += "prompt" in kinds
            assert len(kinds) == 1 and (kinds == {"prompt"} or len(feats["tokens"]) == 1)
            tokens += feats["tokens"]
        finish = c.finish_reason or finish
    return text, tokens, prompt_events, finish


def test_streaming_sync_client(served, tok, ref_model):
    ids = chat_ids(tok, "stream me")
    gen, finish, want = reference(ref_model, tok, ids, 10)
    chunks = list(served.client().chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": "stream me"}], max_tokens=10, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    text, tokens, prompt_events, got_finish = _stream_parts(chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert text == tok.decode(gen, skip_special_tokens=True) and got_finish == finish and prompt_events == 1
    same_records(tokens, want)
    assert chunks[-1].usage.completion_tokens == len(gen) and chunks[-1].usage.prompt_tokens == len(ids)
    # the raw stream: server-sent events ending with [DONE]
    with httpx.stream("POST", f"{served.url}/v1/completions", json={"model": NAME, "prompt": "ab", "max_tokens": 3,
                      "temperature": 0, "stream": True}, timeout=30) as r:
        lines = [x for x in r.iter_lines() if x]
    assert all(x.startswith("data: ") for x in lines) and lines[-1] == "data: [DONE]"
    assert json.loads(lines[0][6:])["object"] == "text_completion"


def test_streaming_async_client_with_stop(served, tok, ref_model):
    ids = tok("async")["input_ids"]
    gen, _, want = reference(ref_model, tok, ids, 12)
    full = tok.decode(gen, skip_special_tokens=True)
    stop = full[5:7]

    async def go():
        client = openai.AsyncOpenAI(base_url=f"{served.url}/v1", api_key="unused", max_retries=0)
        streams = [await client.completions.create(model=NAME, prompt="async", max_tokens=12, temperature=0,
                                                   stream=True, stop=s) for s in (None, stop)]
        out = []
        for stream in streams:
            out.append([ch async for ch in stream])
        await client.close()
        return out

    plain, stopped = asyncio.run(go())
    text, tokens, _, finish = _stream_parts(plain)
    assert text == full
    same_records(tokens, want)
    text, _, _, finish = _stream_parts(stopped)
    assert text == full[: full.index(stop)] and finish == "stop"


# ---------------------------------------------------------------------------- steering
def busy_feature(model, tok, ids, layer):
    """A feature of ``layer`` that fires on the prompt (so that clamping it to 0 changes something)."""
    *_, records = reference(model, tok, ids, 1, layers=(layer,))
    return records[len(ids) - 1]["features"][0][1]


def test_steering_and_compare_equal_clt_steer(served, tok, ref_model):
    ids = tok("steer this")["input_ids"]
    feature = busy_feature(ref_model, tok, ids, 1)
    steer = {"layer": 1, "feature": feature, "value": 40.0, "mode": "clamp", "positions": "all"}
    gen_s, _, want_s = reference(ref_model, tok, ids, 10, steer=[steer])
    gen_u, _, want_u = reference(ref_model, tok, ids, 10)
    assert gen_s != gen_u  # the steer matters, so mixing rows would show
    client = served.client()

    def ask(steered):
        extra = {"steer": [steer], "compare": True} if steered else {}
        return client.completions.create(model=NAME, prompt="steer this", max_tokens=10, temperature=0, extra_body=extra)

    with ThreadPoolExecutor(4) as pool:  # steered and plain requests at once: never one batch
        answers = list(pool.map(ask, [True, False, True, False, True, False]))
    for steered, r in zip([True, False] * 3, answers):
        c = r.choices[0]
        same_records(c.model_extra["features"]["tokens"], want_s if steered else want_u)
        if steered:
            assert c.text == tok.decode(gen_s, skip_special_tokens=True)
            twin = c.model_extra["unsteered"]
            assert twin["text"] == tok.decode(gen_u, skip_special_tokens=True)
            same_records(twin["features"]["tokens"], want_u)
    # a steer at absolute positions of the request's own sequence (served alone: left padding would shift them)
    at = {**steer, "positions": slice(2, 6)}
    gen_p, _, want_p = reference(ref_model, tok, ids, 6, steer=[at])
    r = client.completions.create(model=NAME, prompt="steer this", max_tokens=6, temperature=0,
                                  extra_body={"steer": [{**steer, "positions": [2, 6]}]})
    same_records(r.choices[0].model_extra["features"]["tokens"], want_p)


# ---------------------------------------------------------------------------- overload, disconnects, shutdown
class Gate:
    """Holds the worker before each batch until released (so that requests pile up)."""

    def __init__(self, scheduler) -> None:
        self.scheduler, self.original = scheduler, scheduler._run
        self.open = threading.Event()
        self.entered = threading.Event()

    def __enter__(self):
        def run(batch):
            self.entered.set()
            self.open.wait(30)
            return self.original(batch)

        self.scheduler._run = run
        return self

    def __exit__(self, *exc):
        self.open.set()
        self.scheduler._run = self.original


def test_full_queue_answers_429_at_once_and_loses_nothing(tok):
    app = create_app(tiny_model("llama"), tok, transcoder(), top_k=K, model_name=NAME, max_batch=1, max_queue=2)
    with Served(app) as s, Gate(app.state.scheduler) as gate, ThreadPoolExecutor(3) as pool:
        client = s.client()
        ask = lambda p: client.completions.create(model=NAME, prompt=p, max_tokens=3, temperature=0)  # noqa: E731
        first = pool.submit(ask, "one")
        assert gate.entered.wait(10)
        queued = [pool.submit(ask, p) for p in ("two", "three")]
        for _ in range(200):
            if app.state.scheduler.load()["queued"] == 2:
                break
            time.sleep(0.02)
        start = time.perf_counter()
        with pytest.raises(openai.RateLimitError) as err:
            ask("four")
        assert time.perf_counter() - start < 2
        assert err.value.response.headers["retry-after"] == "1"
        assert err.value.body["code"] == "queue_full" and err.value.body["type"] == "rate_limit_error"
        gate.open.set()
        assert [f.result(timeout=30).choices[0].finish_reason for f in [first, *queued]] == ["length"] * 3


def test_a_client_that_disconnects_frees_its_row_and_the_others_go_on(tok, ref_model):
    app = create_app(tiny_model("llama"), tok, transcoder(), top_k=K, model_name=NAME, max_batch=4,
                     max_new_tokens=100, batch_wait=0.5)
    scheduler = app.state.scheduler
    step, jobs = scheduler.on_step_end, []
    scheduler.on_step_end = lambda ids: (time.sleep(0.01), step(ids))[1]  # slow enough to leave mid-stream
    submit = scheduler.submit
    scheduler.submit = lambda js: (jobs.extend(js), submit(js))[1]
    ids = tok("stay")["input_ids"]
    gen, _, want = reference(ref_model, tok, ids, 60)
    with Served(app) as s, ThreadPoolExecutor(2) as pool:
        client = s.client()
        stay = pool.submit(lambda: client.completions.create(model=NAME, prompt="stay", max_tokens=60, temperature=0))
        stream = client.completions.create(model=NAME, prompt="leave", max_tokens=100, temperature=0, stream=True)
        got = 0
        for _ in stream:
            got += 1
            if got == 5:
                break
        stream.close()
        with pytest.raises(httpx.TimeoutException):  # a whole-response client that gives up
            httpx.post(f"{s.url}/v1/completions", json=_body(prompt="quit", max_tokens=100, temperature=0), timeout=0.5)
        answer = stay.result(timeout=60).choices[0]
        leaving = [next(j for j in jobs if j.request.prompt_texts == [p]) for p in ("leave", "quit")]
        for _ in range(300):
            if all(j.state == "cancelled" for j in leaving):
                break
            time.sleep(0.02)
    assert [j.state for j in leaving] == ["cancelled", "cancelled"]
    assert scheduler.batch_sizes[2] >= 1  # they shared a batch
    assert answer.text == tok.decode(gen, skip_special_tokens=True)
    same_records(answer.model_extra["features"]["tokens"], want)


def test_graceful_shutdown_finishes_or_cancels_and_says_which(tok, caplog):
    app = create_app(tiny_model("llama"), tok, None, model_name=NAME, max_batch=1)
    scheduler = app.state.scheduler
    with Served(app) as s, Gate(scheduler) as gate, ThreadPoolExecutor(2) as pool:
        client = s.client()
        running = pool.submit(lambda: client.completions.create(model=NAME, prompt="a", max_tokens=2, temperature=0))
        assert gate.entered.wait(10)
        queued = pool.submit(lambda: client.completions.create(model=NAME, prompt="b", max_tokens=2, temperature=0))
        for _ in range(200):
            if scheduler.load()["queued"] == 1:
                break
            time.sleep(0.02)
        threading.Timer(0.3, gate.open.set).start()
        with caplog.at_level(logging.INFO, logger="sparse_clt_hf.serve"):
            summary = scheduler.close(timeout=0.1)  # the running batch waits at the gate: both are cancelled
        assert len(summary["cancelled"]) == 2 and summary["finished"] == []
        with pytest.raises(openai.InternalServerError) as err:
            queued.result(timeout=30)
        assert err.value.status_code == 503
        with pytest.raises(openai.InternalServerError):
            running.result(timeout=30)
        with pytest.raises(openai.InternalServerError):  # no new work after shutdown began
            client.completions.create(model=NAME, prompt="c", max_tokens=2)
    assert any("shutdown: 0 finished" in r.message and "2 cancelled" in r.message for r in caplog.records)


# ---------------------------------------------------------------------------- bad input, auth, logs
def _body(**kw):
    return {"model": NAME, "prompt": "hi", "max_tokens": 3, **kw}


BAD = [
    ("unknown feature layer", _body(features={"layers": [5]}), 400, "features.layers"),
    ("unknown steer layer", _body(steer=[{"layer": 9, "feature": 1, "value": 1}]), 400, "steer[0].layer"),
    ("feature out of range", _body(steer=[{"layer": 1, "feature": WIDTHS[1], "value": 1}]), 400, "steer[0].feature"),
    ("negative feature", _body(steer=[{"layer": 1, "feature": -1, "value": 1}]), 400, "steer[0].feature"),
    ("string value", _body(steer=[{"layer": 1, "feature": 1, "value": "5"}]), 400, "steer[0].value"),
    ("bool value", _body(steer=[{"layer": 1, "feature": 1, "value": True}]), 400, "steer[0].value"),
    ("bad mode", _body(steer=[{"layer": 1, "feature": 1, "value": 1, "mode": "os.system"}]), 400, "steer[0].mode"),
    ("bad positions", _body(steer=[{"layer": 1, "feature": 1, "value": 1, "positions": [5, 2]}]), 400,
     "steer[0].positions"),
    ("steered twice", _body(steer=[{"layer": 1, "feature": 1, "value": 1}] * 2), 400, "steer"),
    ("compare without steer", _body(compare=True), 400, "compare"),
    ("top_k above k", _body(features={"top_k": K + 1}), 400, "features.top_k"),
    ("top_k zero", _body(features={"top_k": 0}), 400, "features.top_k"),
    ("unknown feature option", _body(features={"stats": "/etc/passwd"}), 400, "features"),
    ("prompt longer than context", _body(prompt="x" * 200), 400, "prompt"),
    ("max_tokens past context", _body(prompt="x" * 100, max_tokens=40), 400, "max_tokens"),
    ("max_tokens above server cap", _body(max_tokens=41), 400, "max_tokens"),
    ("string max_tokens", _body(max_tokens="3"), 400, "max_tokens"),
    ("temperature type", _body(temperature="hot"), 400, "temperature"),
    ("temperature range", _body(temperature=5), 400, "temperature"),
    ("token id out of vocab", _body(prompt=[1, 500]), 400, "prompt[0]"),
    ("n too large", _body(n=9), 400, "n"),
    ("too many prompts", _body(prompt=["a"] * 9), 400, "n"),
    ("logprobs", _body(logprobs=2), 400, "logprobs"),
    ("unknown model", _body(model="/etc/passwd"), 404, "model"),
    ("missing prompt", {"model": NAME}, 400, "prompt"),
    ("not an object", [1, 2], 400, None),
]


@pytest.mark.parametrize("what,body,status,param", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_an_openai_error(served, what, body, status, param):
    r = httpx.post(f"{served.url}/v1/completions", json=body, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["param"] == param and err["message"]


def test_nonfinite_malformed_and_oversize_bodies(served):
    post = lambda content, **kw: httpx.post(f"{served.url}/v1/completions", content=content,  # noqa: E731
                                            headers={"content-type": "application/json"}, timeout=30, **kw)
    head = json.dumps({"model": NAME, "prompt": "a"})[:-1]
    r = post(head + ', "steer": [{"layer": 1, "feature": 1, "value": NaN}]}')
    assert r.status_code == 400 and r.json()["error"]["param"] == "steer[0].value"
    r = post(head + ', "temperature": Infinity}')
    assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"
    r = post('{"model": ')
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = post(json.dumps(_body(prompt="a" * (1 << 20))))
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
    r = post(iter([b'{"prompt": "', b"a" * (1 << 20), b'"}']))  # chunked: no content-length
    assert r.status_code == 413
    r = httpx.get(f"{served.url}/v1/nothing-here", timeout=30)
    assert r.status_code == 404 and r.json()["error"]["type"] == "invalid_request_error"
    with pytest.raises(openai.NotFoundError):
        served.client().chat.completions.create(model="other", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError) as err:
        served.client().chat.completions.create(model=NAME, messages=[{"role": "robot", "content": "x"}])
    assert err.value.body["param"] == "messages[0].role"


def test_models_and_health(served):
    models = served.client().models.list()
    assert [m.id for m in models.data] == [NAME]
    assert models.data[0].model_extra["features"] == {"layers": [0, 1, 2], "widths": WIDTHS, "top_k": K}
    health = httpx.get(f"{served.url}/health", timeout=30).json()
    assert health["status"] == "ok" and health["transcoder"] is True


def test_api_key_guards_every_route_but_health(tok, monkeypatch):
    app = create_app(tiny_model("llama"), tok, None, model_name=NAME, api_key="s3cret")
    with Served(app) as s:
        for path in ("/v1/models", "/v1/completions", "/v1/chat/completions", "/anything"):
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
                r = httpx.request("GET" if path.endswith("models") else "POST", s.url + path, headers=headers,
                                  json=_body(), timeout=30)
                assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", (path, headers)
        assert httpx.get(f"{s.url}/health", timeout=30).status_code == 200
        with pytest.raises(openai.AuthenticationError):
            s.client(api_key="wrong").models.list()
        r = s.client(api_key="s3cret").completions.create(model=NAME, prompt="ok", max_tokens=2, temperature=0)
        assert r.choices[0].finish_reason == "length" and "features" not in r.choices[0].model_extra
        with pytest.raises(openai.BadRequestError):  # a plain server has no features to steer
            s.client(api_key="s3cret").completions.create(model=NAME, prompt="ok", extra_body={"steer": [
                {"layer": 0, "feature": 0, "value": 1}]})


def test_one_log_line_per_request_without_prompt_text(served, caplog):
    with caplog.at_level(logging.INFO, logger="sparse_clt_hf.serve"):
        served.client().completions.create(model=NAME, prompt="secret words", max_tokens=4, temperature=0)
        httpx.post(f"{served.url}/v1/completions", json=_body(n=99), timeout=30)
    lines = [r.getMessage() for r in caplog.records if r.name == "sparse_clt_hf.serve"]
    assert len(lines) == 2 and "status=200" in lines[0] and "status=400" in lines[1]
    assert "completion_tokens=4" in lines[0] and "time=" in lines[0] and lines[0].startswith("cmpl-")
    assert not any("secret" in x for x in lines)


@pytest.mark.filterwarnings("ignore:transcoder was trained on")
def test_serve_command_builds_the_app_from_folders(tmp_path, tok, monkeypatch):
    from sparse_clt_hf import cli
    from sparse_clt_hf.commands import serve as command

    tiny_model("llama").save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    transcoder().save_pretrained(tmp_path / "clt")
    parser = cli.build_parser()
    args = parser.parse_args(["serve", "--model", str(tmp_path / "model"), "--clt", str(tmp_path / "clt"),
                              "--layers", "1-2", "--top-k", "4", "--max-batch", "2"])
    app = command.build(args)
    assert app.state.limits.layers == (1, 2) and app.state.limits.top_k == 4 and not app.state.api_key
    with pytest.raises(ValueError, match="--clt is required"):
        command.build(parser.parse_args(["serve", "--model", str(tmp_path / "model")]))
    loaded = []
    monkeypatch.setattr(command.demo, "load_model", lambda *a, **k: loaded.append(a))
    for bad in (["--clt", str(tmp_path / "nothing")], ["--clt", str(tmp_path / "clt"), "--layers", "7"],
                ["--clt", str(tmp_path / "clt"), "--stats", str(tmp_path / "none")]):
        with pytest.raises((OSError, ValueError)):
            command.build(parser.parse_args(["serve", "--model", str(tmp_path / "model"), *bad]))
    assert loaded == []  # each failed before the model loaded


def test_bench_serves_both_side_by_side(tok):
    result = bench_serve(tiny_model("llama"), tok, transcoder(), top_k=K, requests=4, max_batch=2, max_tokens=5,
                         rounds=2, prompts=("ab", "cd"))
    assert set(result["tokens_per_s"]) == {"with_features", "plain"} and len(result["ratios"]) == 2
    # the transcoder changes nothing the model writes: the same tokens either way
    assert result["completion_tokens"]["with_features"] == result["completion_tokens"]["plain"] > 0


def test_labels_from_statistics_and_a_failed_generate_is_a_500(tok):
    from sparse_clt_hf.labels import corpus_stats

    texts = ["the cat sat on the mat. " * 4, "a list comprehension builds a list. " * 4]
    stats = corpus_stats(tiny_model("llama"), tok, transcoder(), texts, tokens=256, seq_len=32, top_k=K,
                         progress=False)
    app = create_app(tiny_model("llama"), tok, transcoder(), top_k=K, model_name=NAME, stats=stats)
    with Served(app) as s:
        r = s.client().completions.create(model=NAME, prompt="the cat", max_tokens=3, temperature=0)
        hits = [f for t in r.choices[0].model_extra["features"]["tokens"] for f in t["features"]]
        assert hits and any(f["label"] for f in hits)
        for f in hits:
            top = [int(c.token_ids[c.index]) for c in stats.top_contexts(f["layer"], f["feature"]) if c.token_ids]
            if not top:
                assert f["label"] == []
                continue
            lead = max(set(top), key=lambda t: (top.count(t), -top.index(t)))  # most frequent, then strongest
            assert f["label"][0] == tok.decode([lead]) and len(f["label"]) == min(3, len(set(top)))
        scheduler = app.state.scheduler
        original = scheduler.clt.generate

        def broken(*a, **k):
            raise RuntimeError("device lost")

        scheduler.clt.generate = broken
        with pytest.raises(openai.InternalServerError) as err:
            s.client().completions.create(model=NAME, prompt="x", max_tokens=2)
        assert err.value.status_code == 500 and "device lost" in err.value.body["message"]
        scheduler.clt.generate = original
        assert s.client().completions.create(model=NAME, prompt="x", max_tokens=2).choices[0].finish_reason


@pytest.mark.slow
def test_demo_model_served_equals_clt_generate(tmp_path):
    """SmolLM2 (the demo model) with a random transcoder on 2 layers: a chat completion and its features
    equal ``clt.generate`` on the same prompt."""
    pytest.importorskip("gguf")
    from sparse_clt_hf.bench_workloads import random_transcoder as bench_transcoder
    from sparse_clt_hf.models import load_model

    try:
        model, tokenizer, name = load_model(None)
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    ref = copy.deepcopy(model)
    tc = bench_transcoder(576, [6, 9], 512)
    question = [{"role": "user", "content": "What is a list comprehension?"}]
    ids = tokenizer(tokenizer.apply_chat_template(question, tokenize=False, add_generation_prompt=True),
                    add_special_tokens=False)["input_ids"]
    with attach_clt(ref, tc, top_k=8) as clt:
        x = torch.tensor([ids])
        out, feats = clt.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=12,
                                  do_sample=False, pad_token_id=tokenizer.pad_token_id)
    app = create_app(model, tokenizer, tc, top_k=8, model_name=name)
    with Served(app) as s:
        r = s.client().chat.completions.create(model=name, messages=question, max_tokens=12, temperature=0,
                                               extra_body={"features": {"top_k": 3}})
    gen = out[0, len(ids):].tolist()
    eos = [t for t in gen if t == tokenizer.eos_token_id]
    gen = gen[: gen.index(eos[0])] if eos else gen
    assert r.choices[0].message.content == tokenizer.decode(gen, skip_special_tokens=True)
    tokens = r.choices[0].model_extra["features"]["tokens"]
    assert [t["token_id"] for t in tokens] == ids + gen
    for t in tokens[:-1]:
        recs = sorted((x for x in feats.to_records() if x["position"] == t["position"]), key=lambda x: -x["activation"])
        assert [(f["layer"], f["feature"]) for f in t["features"]] == [(x["layer"], x["feature"]) for x in recs[:3]]


@pytest.mark.slow  # a fresh interpreter imports torch and transformers: seconds, so CI runs it once
def test_serve_command_runs_logs_and_shuts_down_on_sigterm(tmp_path, tok):
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    tiny_model("llama").save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    transcoder().save_pretrained(tmp_path / "clt")
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    env = {**os.environ, "SPARSE_CLT_HF_API_KEY": "k3y", "PYTHONPATH": str(Path(__file__).parents[1])}
    proc = subprocess.Popen(
        [sys.executable, "-m", "sparse_clt_hf", "serve", "--model", str(tmp_path / "model"), "--clt",
         str(tmp_path / "clt"), "--port", str(port), "--served-model-name", NAME, "--top-k", "4"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(600):
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="k3y", max_retries=0)
        r = client.completions.create(model=NAME, prompt="secret prompt", max_tokens=3, temperature=0)
        assert len(r.choices[0].model_extra["features"]["tokens"][0]["features"]) == 4
        assert httpx.get(f"{url}/v1/models", timeout=5).status_code == 401  # the key from the environment
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode in (0, -signal.SIGTERM), out  # (newer uvicorn re-raises the signal once it shut down)
    lines = [x for x in out.splitlines() if "sparse_clt_hf.serve" in x]
    assert any("status=200" in x and "completion_tokens=3" in x for x in lines), out
    assert any("shutdown: 0 finished [], 0 cancelled []" in x for x in lines), out
    assert "secret" not in out and "POST /v1/completions" not in out  # no prompt text, no second access line


def test_create_app_takes_an_attachment_made_for_serving(tok):
    from sparse_clt_hf.serve import attach_for_serving

    model = tiny_model("llama")
    with attach_clt(model, transcoder(), top_k=K) as plain:
        with pytest.raises(ValueError, match="attach_for_serving"):
            create_app(model, tok, plain)
    with pytest.raises(ValueError, match="max_batch"):
        create_app(model, tok, None, max_batch=0)
    clt = attach_for_serving(model, transcoder(), top_k=3, layers=[2])
    app = create_app(model, tok, clt, model_name=NAME)
    with Served(app) as s:
        r = s.client().completions.create(model=NAME, prompt="mine", max_tokens=2, temperature=0)
    assert r.choices[0].model_extra["features"]["layers"] == [2]
    assert clt.attached  # the caller's attachment: the server leaves it attached
    clt.detach()
