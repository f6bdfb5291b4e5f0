"""`slm serve` replicas behind a load balancer: /health ready -> draining, graceful drain,
and the nginx recipe of the README with one replica stopped mid-load (bench/balancer.py)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time

import httpx
import pytest

from tests.test_serve_cli import ServeProcess


def test_drain_health_refuses_new_work_and_finishes_streams(llama_dir, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    # One slot and five requests queued behind the stream: the tiny model decodes a request
    # in a fraction of a second, so the queue is what keeps work in flight while the drain
    # starts (uvicorn notices the signal on its next 0.1 s tick).
    server = ServeProcess(tmp_path, str(llama_dir), "--drain-seconds", "3", "--name", "m",
                          "--max-concurrency", "1")
    queued = {"model": "m", "prompt": "z", "max_tokens": 200, "ignore_eos": True}
    try:
        ready = httpx.get(server.url + "/health", timeout=10)
        assert ready.status_code == 200 and ready.json()["status"] == "ok"
        body = {"model": "m", "prompt": "x", "max_tokens": 200, "ignore_eos": True,
                "stream": True, "stream_options": {"include_usage": True}}
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as s, \
                ThreadPoolExecutor(5) as pool:
            lines = s.iter_lines()
            assert next(lines).startswith("data: ")
            behind = [pool.submit(httpx.post, server.url + "/v1/completions", json=queued,
                                  timeout=60) for _ in range(5)]
            deadline = time.monotonic() + 10
            # all five admitted behind the stream (waiting for "queued" >= 4 let the drain
            # start before the fifth arrived, which it then refused: a flaky 503)
            while sum(httpx.get(server.url + "/health", timeout=10).json()[k]
                      for k in ("running", "queued")) < 6:
                assert time.monotonic() < deadline, "the five requests were never queued"
                time.sleep(0.01)
            server.proc.send_signal(signal.SIGTERM)
            t0 = time.monotonic()
            while True:              # the drain starts within a tick of the signal
                health = httpx.get(server.url + "/health", timeout=10)
                if health.status_code == 503 or time.monotonic() - t0 > 2:
                    break
                time.sleep(0.05)
            assert health.status_code == 503, health.text
            assert health.json()["status"] == "draining"
            assert health.json()["in_flight"] >= 1
            refused = httpx.post(server.url + "/v1/completions", timeout=10,
                                 json={"model": "m", "prompt": "y", "max_tokens": 2})
            assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
            assert refused.json()["error"]["code"] == "shutting_down"
            rest = [line for line in lines if line]
            answers = [f.result() for f in behind]
        frames = [json.loads(x[6:]) for x in rest if x.startswith("data: {")]
        assert rest[-1] == "data: [DONE]"
        assert frames[-1]["usage"]["completion_tokens"] == 200    # the stream finished whole
        # the queued requests were admitted before the drain, so they finish whole too
        assert [a.status_code for a in answers] == [200] * 5
        assert [a.json()["usage"]["completion_tokens"] for a in answers] == [200] * 5
        assert server.proc.wait(60) == 0
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
    events = [e for e in server.log_lines() if "event" in e]
    assert {"event": "draining", "seconds": 3.0} in events
    assert events[-1] == {"event": "shutdown", "clean": True, "refused_while_draining": 1}


def test_drain_seconds_is_validated():
    from slmkit.errors import ConfigError, validated
    from slmkit.serve.config import ServeCommand

    with pytest.raises(ConfigError, match="--drain-seconds"):
        validated(ServeCommand, model="m", drain_seconds=-1)
    assert validated(ServeCommand, model="m").server_config().drain_seconds == 0.0


nginx = pytest.mark.skipif(shutil.which("nginx") is None and
                           not os.path.exists("/usr/sbin/nginx"),
                           reason="nginx is not installed (apt-get install nginx-light)")


@pytest.mark.slow
@nginx
@pytest.mark.parametrize("stop", ["kill", "term"])
def test_nginx_in_front_of_two_replicas(llama_dir, tmp_path, stop):
    from bench.balancer import run

    res = run(str(llama_dir), tmp_path, n_requests=24, clients=4, max_tokens=24, stop=stop,
              drain_seconds=1.0)
    assert res["lost"] == 0, res["errors"]                 # every retryable request retried
    assert res["whole"] + res["cut"] == 24
    if stop == "term":                                     # a drained replica cuts nothing
        assert res["cut"] == 0 and res["replica_b_exit"] == 0, res["errors"]
    else:
        assert res["replica_b_exit"] == -signal.SIGKILL
        assert res["cut"] <= 4                             # at most its in-flight streams


@pytest.mark.slow                 # two servers: ~40 s on the loaded 2-core box
def test_two_replicas_share_one_request_log(llama_dir, tmp_path):
    """The monitoring state replicas share is one SQLite request log (WAL: concurrent
    writers on one host, `slm monitor` reading meanwhile): both replicas' requests land in it."""
    from slmkit.monitor.log import read_rows

    db = tmp_path / "requests.db"
    servers = [ServeProcess(tmp_path / name, str(llama_dir), "--name", "m", "--request-log",
                            str(db), "--log-embedder", "none")
               for name in ("a", "b") if (tmp_path / name).mkdir() is None]
    try:
        for i in range(6):
            url = servers[i % 2].url
            r = httpx.post(url + "/v1/completions", timeout=30,
                           json={"model": "m", "prompt": f"x{i}", "max_tokens": 3})
            assert r.status_code == 200, r.text
        assert all(s.stop() == 0 for s in servers)    # a clean stop flushes the log
    finally:
        for s in servers:
            if s.proc.poll() is None:
                s.proc.kill()
    rows = read_rows(db)
    assert len(rows) == 6 and len({r["request_id"] for r in rows}) == 6
