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
    server = ServeProcess(tmp_path, str(llama_dir), "--drain-seconds", "3", "--name", "m")
    try:
        ready = httpx.get(server.url + "/health", timeout=10)
        assert ready.status_code == 200 and ready.json()["status"] == "ok"
        body = {"model": "m", "prompt": "x", "max_tokens": 120, "ignore_eos": True,
                "stream": True, "stream_options": {"include_usage": True}}
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as s:
            lines = s.iter_lines()
            assert next(lines).startswith("data: ")
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
        frames = [json.loads(x[6:]) for x in rest if x.startswith("data: {")]
        assert rest[-1] == "data: [DONE]"
        assert frames[-1]["usage"]["completion_tokens"] == 120    # the stream finished whole
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
