"""The OpenAI-compatible server against real clients on 127.0.0.1.

A real uvicorn server runs in a thread over a tiny random Llama (context 1024, so that a
long request stays busy for a few seconds when a test needs one). Clients: the official
``openai`` package and raw ``httpx``.
"""

from __future__ import annotations

import json
import re
import threading
import time

import httpx
import pytest

from tests.conftest import build_tiny_model

openai = pytest.importorskip("openai")

NAME = "tiny"


class LiveServer:
    """uvicorn serving ``app`` on a free loopback port in a daemon thread."""

    def __init__(self, app, drain_after: float | None = None):
        import uvicorn

        from slmkit.serve.server import DrainingServer

        self.app = app
        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                access_log=False, lifespan="on", timeout_graceful_shutdown=30)
        self.server = uvicorn.Server(config) if drain_after is None else \
            DrainingServer(config, app.state.service, drain_after)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"

    @property
    def service(self):
        return self.app.state.service

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def start_server(model, tokenizer, drain_after: float | None = None, **settings) -> LiveServer:
    from slmkit.serve import ServeConfig, create_app

    config = ServeConfig(name=NAME, **{"max_concurrency": 4, **settings})
    return LiveServer(create_app(model, tokenizer, config), drain_after)


def wait_idle(live: LiveServer, timeout: float = 10.0) -> None:
    """Block until the engine holds no request (all slots free, nothing in flight)."""
    service = live.service
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if service.engine.in_flight == 0 and \
                service.engine.engine.free_slots == service.engine.engine.max_batch:
            return
        time.sleep(0.02)
    raise AssertionError(f"engine not idle: in_flight={service.engine.in_flight}, "
                         f"free={service.engine.engine.free_slots}")


@pytest.fixture(scope="module")
def serve_model(tokenizer):
    return build_tiny_model("llama", tokenizer, max_position_embeddings=1024)


@pytest.fixture(scope="module")
def live(serve_model, tokenizer):
    server = start_server(serve_model, tokenizer)
    yield server
    server.stop()


@pytest.fixture
def client(live):
    return openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0)


def reference_text(model, tokenizer, ids, max_tokens, **params):
    """The same request run directly on the engine (no server)."""
    from slmkit.engine import Engine, SamplingParams

    with Engine(model, tokenizer, max_batch=1, background=False) as engine:
        return engine.generate(ids, SamplingParams(max_tokens=max_tokens, **params))


# --------------------------------------------------------------------------- openai client

def test_models_and_health(live, client):
    assert [m.id for m in client.models.list()] == [NAME]
    assert client.models.retrieve(NAME).id == NAME
    health = httpx.get(live.url + "/health").json()
    assert health["status"] == "ok" and health["free_slots"] == 4


def test_completion_matches_engine(live, client, serve_model, tokenizer):
    prompt = "def parse(self, text):\n    "
    out = client.completions.create(model=NAME, prompt=prompt, max_tokens=12, temperature=0,
                                    logprobs=3)
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    ref = reference_text(serve_model, tokenizer, ids, 12, temperature=0, logprobs=True,
                         top_logprobs=3)
    choice = out.choices[0]
    assert choice.text == ref.text
    assert out.object == "text_completion" and out.id.startswith("cmpl-")
    assert out.usage.prompt_tokens == len(ids)
    assert out.usage.completion_tokens == len(ref.token_ids)
    assert out.usage.total_tokens == len(ids) + len(ref.token_ids)
    assert choice.finish_reason == ("length" if len(ref.token_ids) == 12 else "stop")
    lp = choice.logprobs
    n = len(lp.tokens)
    assert n == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) > 0
    assert lp.token_logprobs == pytest.approx(ref.logprobs[:n], abs=1e-5)
    for top, ref_top, chosen in zip(lp.top_logprobs, ref.top_logprobs, lp.token_logprobs):
        assert 1 <= len(top) <= 3
        assert max(top.values()) == pytest.approx(max(chosen, ref_top[0][1]), abs=1e-5)
        assert all(any(abs(v - r) < 1e-5 for _, r in ref_top) for v in top.values())
    # streaming gives the same text, piece by piece, ending with a finish reason
    chunks = list(client.completions.create(model=NAME, prompt=prompt, max_tokens=12,
                                            temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == ref.text
    assert chunks[-1].choices[0].finish_reason == choice.finish_reason
    assert len({c.id for c in chunks}) == 1


def test_chat_non_streaming_and_streaming(live, client):
    messages = [{"role": "system", "content": "You write Python."},
                {"role": "user", "content": "Write a loop."}]
    out = client.chat.completions.create(model=NAME, messages=messages, max_tokens=16,
                                         temperature=0.8, seed=7, logprobs=True, top_logprobs=2)
    again = client.chat.completions.create(model=NAME, messages=messages, max_tokens=16,
                                           temperature=0.8, seed=7)
    msg = out.choices[0].message
    assert out.object == "chat.completion" and msg.role == "assistant"
    assert msg.content == again.choices[0].message.content  # seeded sampling is reproducible
    entries = out.choices[0].logprobs.content
    assert 0 < len(entries) <= out.usage.completion_tokens
    assert all(len(e.top_logprobs) == 2 and e.logprob <= 0 for e in entries)
    stream = client.chat.completions.create(model=NAME, messages=messages, max_tokens=16,
                                            temperature=0.8, seed=7, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == msg.content
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == out.usage.total_tokens


def test_stop_strings_and_token_prompt(live, client, tokenizer):
    prompt = "import os\n"
    full = client.completions.create(model=NAME, prompt=prompt, max_tokens=24, temperature=0)
    text = full.choices[0].text
    if len(text) < 4:
        pytest.skip("the random model stopped too early to place a stop string")
    stop = text[2:4]
    cut = client.completions.create(model=NAME, prompt=prompt, max_tokens=24, temperature=0,
                                    stop=[stop])
    assert cut.choices[0].text == text[:text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    by_ids = client.completions.create(model=NAME, prompt=ids, max_tokens=24, temperature=0)
    assert by_ids.choices[0].text == text


# --------------------------------------------------------------------------- raw SSE bytes

def test_chat_sse_bytes(live):
    body = {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", live.url + "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"] == "text/event-stream; charset=utf-8"
        raw = b"".join(r.iter_raw())
    frames = raw.decode().split("\n\n")
    assert frames[-1] == "" and frames[-2] == "data: [DONE]"
    first = json.loads(frames[0][len("data: "):])
    rid, created = first["id"], first["created"]
    assert rid.startswith("chatcmpl-")
    head = ('data: {"id":"%s","object":"chat.completion.chunk","created":%d,"model":"tiny",'
            '"system_fingerprint":null,"choices":[{"index":0,' % (rid, created))
    deltas = [json.loads(f[len("data: "):]) for f in frames[1:-3]]
    pieces = [d["choices"][0]["delta"]["content"] for d in deltas[:-1]]
    finish = deltas[-1]["choices"][0]["finish_reason"]
    usage = json.loads(frames[-3][len("data: "):])["usage"]
    expected = head + '"delta":{"role":"assistant","content":""},"logprobs":null,' \
        '"finish_reason":null}],"usage":null}\n\n'
    for piece in pieces:
        expected += head + '"delta":{"content":%s},"logprobs":null,"finish_reason":null}],' \
            '"usage":null}\n\n' % json.dumps(piece, ensure_ascii=False)
    # the last chunk carries the documented extra field (slm serve's per-answer confidence)
    last = frames[-4]
    prefix = head + '"delta":{},"logprobs":null,"finish_reason":"%s","confidence":' % finish
    tail = '}],"usage":null}'
    assert last.startswith(prefix) and last.endswith(tail), last
    confidence = json.loads(last[len(prefix):-len(tail)])
    assert {"mean_logprob", "min_logprob", "flagged"} <= set(confidence)
    expected += last + "\n\n"
    expected += ('data: {"id":"%s","object":"chat.completion.chunk","created":%d,'
                 '"model":"tiny","system_fingerprint":null,"choices":[],"usage":'
                 '{"prompt_tokens":%d,"completion_tokens":%d,"total_tokens":%d}}\n\n'
                 % (rid, created, usage["prompt_tokens"], usage["completion_tokens"],
                    usage["prompt_tokens"] + usage["completion_tokens"]))
    expected += "data: [DONE]\n\n"
    assert raw.decode() == expected
    assert finish in ("stop", "length") and usage["completion_tokens"] >= len(pieces)


def test_completion_sse_bytes_without_usage(live):
    body = {"model": NAME, "prompt": "x = ", "max_tokens": 4, "temperature": 0,
            "stream": True, "ignore_eos": True}
    raw = httpx.post(live.url + "/v1/completions", json=body).content.decode()
    frames = raw.split("\n\n")
    assert frames[-2:] == ["data: [DONE]", ""]
    chunks = [json.loads(f[len("data: "):]) for f in frames[:-2]]
    for c in chunks:
        assert list(c) == ["id", "object", "created", "model", "system_fingerprint", "choices"]
        keys = ["text", "index", "logprobs", "finish_reason"]
        if c is chunks[-1]:          # slm serve's documented per-answer confidence, last
            keys.append("confidence")
        assert list(c["choices"][0]) == keys
        assert c["object"] == "text_completion"
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])


def test_chat_page_is_one_self_contained_file(live):
    r = httpx.get(live.url + "/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    page = r.text
    assert "/v1/chat/completions" in page and "Authorization" in page
    # no CDN, no external script/style/font: nothing is fetched from another origin
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)
    assert "@import" not in page and "default-src 'self'" in r.headers["content-security-policy"]
