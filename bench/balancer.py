"""Two `slm serve` replicas behind nginx on loopback, one replica stopped mid-load.

The deployment recipe of the README, run for real: two ``slm serve`` processes on free
ports, nginx (the Debian package) in front with the config of :func:`nginx_conf` (streams
unbuffered; a request that failed before any answer byte -- refused connection, reset, or a
draining replica's 503 -- is retried on the other replica), and ``--clients`` threads that
send ``--requests`` streaming completions through nginx. After a third of the requests
finished, replica B is stopped: ``--stop kill`` (SIGKILL, a crash) or ``--stop term``
(SIGTERM: it drains, then finishes its in-flight streams).

Every request ends in one of:

* ``whole``: 200, ``data: [DONE]``, ``finish_reason == "length"`` and the usage's
  ``completion_tokens == max_tokens`` (``ignore_eos``, so that is exact);
* ``cut``: the answer had started (200 and some frames) when its replica died; no balancer
  can retry these, since the client already holds part of the answer;
* ``lost``: anything else -- a non-200, or a connection that failed before an answer. The
  bar is ``lost == 0``: every request the balancer could retry was retried.

Usage::

    .venv/bin/python bench/balancer.py MODEL [--requests 60 --clients 4 --stop kill]

Writes ``bench/results/balancer.json``. Needs ``nginx`` (``apt-get install nginx-light``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

NGINX = """worker_processes 1;
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 512; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    upstream slm {{
{servers}
        keepalive 16;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://slm;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;              # tokens reach the client as they are made
            proxy_read_timeout 300s;
            # a request that got no answer byte yet (refused, reset, a draining replica's
            # 503) is safe to send again: generation has no side effect
            proxy_next_upstream error timeout http_502 http_503 non_idempotent;
            proxy_next_upstream_tries 3;
        }}
    }}
}}
"""


def nginx_conf(port: int, upstreams: list[int], prefix: Path) -> str:
    """nginx config: ``127.0.0.1:port`` in front of the replicas on ``upstreams``."""
    servers = "\n".join(f"        server 127.0.0.1:{p} max_fails=1 fail_timeout=10s;"
                        for p in upstreams)
    return NGINX.format(prefix=prefix, servers=servers, port=port)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Replica:
    """``slm serve MODEL --port 0 ...`` as a subprocess; ``url`` once it listens."""

    def __init__(self, model: str, workdir: Path, name: str, *args: str,
                 env: dict | None = None):
        workdir.mkdir(parents=True, exist_ok=True)
        self.out, self.err = workdir / f"{name}.out", workdir / f"{name}.err"
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "slmkit.cli", "serve", model, "--port", "0",
                 "--name", "slm", *args],
                stdout=out, stderr=err,
                env={**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200", **(env or {})})
        self.url = self.port = None

    def wait_ready(self, timeout: float = 180) -> "Replica":
        deadline = time.monotonic() + timeout
        while not (m := re.search(r"http://127\.0\.0\.1:(\d+)/v1", self.out.read_text())):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                raise RuntimeError(f"slm serve did not start:\n{self.err.read_text()[-2000:]}")
            time.sleep(0.1)
        self.port = int(m.group(1))
        self.url = f"http://127.0.0.1:{self.port}"
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


class Nginx:
    """nginx in the foreground with :func:`nginx_conf` under ``prefix``."""

    def __init__(self, upstreams: list[int], prefix: Path):
        binary = shutil.which("nginx") or "/usr/sbin/nginx"
        prefix.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        conf = prefix / "nginx.conf"
        conf.write_text(nginx_conf(self.port, upstreams, prefix))
        self.proc = subprocess.Popen([binary, "-p", str(prefix), "-c", str(conf)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 20
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"nginx did not start: {self.proc.stderr.read()}")
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)      # graceful
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def stream_once(url: str, i: int, max_tokens: int, timeout: float = 120) -> dict:
    """One streaming completion; its outcome (whole, cut or lost) and figures."""
    body = {"model": "slm", "prompt": f"{i}: def main():", "max_tokens": max_tokens,
            "ignore_eos": True, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    rec = {"i": i, "status": None, "frames": 0, "done": False, "finish_reason": None,
           "completion_tokens": None, "error": None}
    t0 = time.perf_counter()
    try:
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=timeout) as r:
            rec["status"] = r.status_code
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    rec["done"] = True
                    continue
                rec["frames"] += 1
                frame = json.loads(line[6:])
                for choice in frame.get("choices") or []:
                    if choice.get("finish_reason"):
                        rec["finish_reason"] = choice["finish_reason"]
                if frame.get("usage"):
                    rec["completion_tokens"] = frame["usage"]["completion_tokens"]
                if "error" in frame:
                    rec["error"] = frame["error"].get("message")
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        rec["error"] = f"{type(e).__name__}: {e}"
    rec["seconds"] = round(time.perf_counter() - t0, 3)
    whole = (rec["status"] == 200 and rec["done"] and rec["finish_reason"] == "length"
             and rec["completion_tokens"] == max_tokens and rec["error"] is None)
    started = rec["status"] == 200 and rec["frames"] > 0
    rec["outcome"] = "whole" if whole else "cut" if started else "lost"
    return rec


def load(url: str, n_requests: int, clients: int, max_tokens: int,
         on_done=None) -> list[dict]:
    """``n_requests`` streams over ``clients`` threads; ``on_done(count)`` after each."""
    count, lock, results = [0], threading.Lock(), []

    def one(i: int) -> dict:
        rec = stream_once(url, i, max_tokens)
        with lock:
            count[0] += 1
            results.append(rec)
            n = count[0]
        if on_done:
            on_done(n)
        return rec

    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(one, range(n_requests)))
    return sorted(results, key=lambda r: r["i"])


def run(model: str, workdir: Path, n_requests: int = 60, clients: int = 4,
        max_tokens: int = 32, stop: str = "kill", drain_seconds: float = 2.0,
        serve_args: tuple[str, ...] = ()) -> dict:
    """The whole recipe: 2 replicas + nginx + load, replica B stopped after a third."""
    args = ("--drain-seconds", str(drain_seconds), "--max-concurrency", str(clients),
            *serve_args)
    a = Replica(model, workdir, "a", *args)
    b = Replica(model, workdir, "b", *args)
    nginx = None
    stopped_at = {}
    try:
        a.wait_ready()
        b.wait_ready()
        nginx = Nginx([a.port, b.port], workdir / "nginx")
        sig = signal.SIGKILL if stop == "kill" else signal.SIGTERM

        def maybe_stop(done: int) -> None:
            if done >= n_requests // 3 and not stopped_at:
                stopped_at["after"] = done
                b.proc.send_signal(sig)

        t0 = time.perf_counter()
        results = load(nginx.url, n_requests, clients, max_tokens, maybe_stop)
        wall = time.perf_counter() - t0
        try:                     # B's own exit (a second signal would cut its drain short)
            b_exit = b.proc.wait(60) if stopped_at else b.stop()
        except subprocess.TimeoutExpired:
            b_exit = None
    finally:
        if nginx is not None:
            nginx.stop()
        a.stop()
        b.stop(signal.SIGKILL, timeout=10)
    counts = {k: sum(r["outcome"] == k for r in results) for k in ("whole", "cut", "lost")}
    return {"model": model, "requests": n_requests, "clients": clients,
            "max_tokens": max_tokens, "stop": stop, "drain_seconds": drain_seconds,
            "stopped_after": stopped_at.get("after"), "replica_b_exit": b_exit,
            "wall_s": round(wall, 2), **counts,
            "errors": [r for r in results if r["outcome"] != "whole"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--requests", type=int, default=60)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--stop", choices=["kill", "term", "both"], default="both")
    p.add_argument("--drain-seconds", type=float, default=2.0)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/slm-balancer"))
    p.add_argument("--serve-arg", action="append", default=[],
                   help="one more `slm serve` argument for both replicas (repeatable)")
    a = p.parse_args(argv)
    rows = []
    for stop in (["kill", "term"] if a.stop == "both" else [a.stop]):
        res = run(a.model, a.workdir / stop, a.requests, a.clients, a.max_tokens, stop,
                  a.drain_seconds, tuple(a.serve_arg))
        rows.append(res)
        print(f"stop={stop:4s} requests={res['requests']} whole={res['whole']} "
              f"cut={res['cut']} lost={res['lost']} (replica B stopped after "
              f"{res['stopped_after']} done, exit {res['replica_b_exit']}; "
              f"{res['wall_s']} s)")
    out = Path(__file__).parent / "results" / "balancer.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(rows, indent=1))
    print(f"wrote {out}")
    return 0 if all(r["lost"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
