"""Bounded soak: 200 requests from 16 concurrent clients, some leaving mid-stream.

Expect no unexpected error, /metrics counts equal to what the clients saw, and an idle
engine afterwards (no leaked KV-cache slot, nothing in flight).
"""

from __future__ import annotations

import asyncio
import json
import random

import httpx
import pytest

from slmkit.serve.metrics import parse_metrics
from tests.test_serve_api import NAME, serve_model, start_server, wait_idle  # noqa: F401

REQUESTS, CLIENTS, DISCONNECTS = 200, 16, 12


def make_request(i: int, rng: random.Random) -> tuple[str, dict, bool]:
    """(path, body, disconnect_early) for request ``i``."""
    if i % (REQUESTS // DISCONNECTS) == 0 and i // (REQUESTS // DISCONNECTS) < DISCONNECTS:
        return "/v1/completions", {"model": NAME, "prompt": f"item {i}", "max_tokens": 400,
                                   "ignore_eos": True, "stream": True}, True
    stream = rng.random() < 0.5
    body = {"model": NAME, "max_tokens": rng.randint(2, 10), "temperature": 0.7,
            "seed": i, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    if rng.random() < 0.5:
        return "/v1/completions", {**body, "prompt": f"def f{i}(x):"}, False
    return "/v1/chat/completions", {**body, "messages": [{"role": "user",
                                                          "content": f"task {i}"}]}, False


async def one(client: httpx.AsyncClient, path: str, body: dict, leave: bool) -> dict:
    """Run one request; returns {"status", "usage", "left"}."""
    if not body["stream"]:
        r = await client.post(path, json=body)
        usage = r.json().get("usage") if r.status_code == 200 else None
        return {"path": path, "status": r.status_code, "usage": usage, "left": False}
    async with client.stream("POST", path, json=body) as r:
        if r.status_code != 200:
            return {"path": path, "status": r.status_code, "usage": None, "left": False}
        frames, usage, last = 0, None, None
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            frames, last = frames + 1, line
            if leave and frames == 3:  # hang up mid-stream
                return {"path": path, "status": 200, "usage": None, "left": True}
            if line != "data: [DONE]":
                chunk = json.loads(line[6:])
                assert "error" not in chunk, chunk
                usage = chunk.get("usage") or usage
        assert last == "data: [DONE]"
        return {"path": path, "status": 200, "usage": usage, "left": False}


async def soak(url: str) -> list[dict]:
    rng = random.Random(0)
    jobs = asyncio.Queue()
    for i in range(REQUESTS):
        jobs.put_nowait(make_request(i, rng))
    results = []
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        async def worker():
            while not jobs.empty():
                results.append(await one(client, *jobs.get_nowait()))

        await asyncio.gather(*(worker() for _ in range(CLIENTS)))
    return results


@pytest.mark.slow
def test_soak(serve_model, tokenizer):
    server = start_server(serve_model, tokenizer, max_concurrency=8, max_queue=64)
    try:
        results = asyncio.run(soak(server.url))
        assert len(results) == REQUESTS
        assert [r for r in results if r["status"] != 200] == []
        left = [r for r in results if r["left"]]
        done = [r for r in results if not r["left"]]
        assert len(left) == DISCONNECTS
        assert all(r["usage"] is not None for r in done)
        wait_idle(server)
        m = parse_metrics(httpx.get(server.url + "/metrics").text)

        def requests(path, status):
            return m.get(f'slm_requests_total{{endpoint="{path}",status="{status}"}}', 0)

        assert requests("/v1/completions", 499) == DISCONNECTS
        for path in ("/v1/completions", "/v1/chat/completions"):
            assert requests(path, 200) == sum(r["path"] == path for r in done)
        assert m['slm_generations_total{reason="cancelled"}'] == DISCONNECTS
        finished = sum(v for k, v in m.items() if k.startswith("slm_generations_total"))
        assert finished == REQUESTS
        # every completed request's usage is in the totals; cancelled ones add a little
        assert m["slm_completion_tokens_total"] >= sum(r["usage"]["completion_tokens"]
                                                       for r in done)
        assert m["slm_prompt_tokens_total"] > sum(r["usage"]["prompt_tokens"] for r in done)
        assert m["slm_request_duration_seconds_count"] == REQUESTS
        assert m["slm_queue_depth"] == 0 and m["slm_running_streams"] == 0
        assert m["slm_engine_free_slots"] == 8
    finally:
        server.stop()
