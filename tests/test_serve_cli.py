"""``slm serve`` as a user runs it: a real subprocess, SIGTERM, logs, keys, adapters."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import run_cli


class ServeProcess:
    """``python -m slmkit.cli serve ...`` on a free port; stdout/stderr go to files."""

    def __init__(self, tmp: Path, *args: str, env: dict | None = None):
        self.out, self.err = tmp / "stdout.txt", tmp / "stderr.txt"
        full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200", **(env or {})}
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "slmkit.cli", "serve", *args,
                                          "--port", "0"], stdout=out, stderr=err, env=full_env)
        deadline = time.monotonic() + 120
        while not (m := re.search(r"http://127\.0\.0\.1:(\d+)/v1", self.out.read_text())):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                raise AssertionError(f"slm serve did not start:\n{self.err.read_text()}")
            time.sleep(0.1)
        self.url = f"http://127.0.0.1:{m.group(1)}"

    def stop(self, timeout: float = 60) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def log_lines(self) -> list[dict]:
        return [json.loads(line) for line in self.err.read_text().splitlines()
                if line.startswith("{")]


@pytest.mark.slow
def test_serve_graceful_sigterm_logs_and_key_file(llama_dir, tmp_path):
    key_file = tmp_path / "key.txt"
    key_file.write_text("k-123\n")
    server = ServeProcess(tmp_path, str(llama_dir), "--api-key-file", str(key_file),
                          "--name", "tiny-llama", "--max-concurrency", "2")
    try:
        auth = {"Authorization": "Bearer k-123"}
        secret = "SECRET-PROMPT-TEXT"
        r = httpx.post(server.url + "/v1/completions", headers=auth, timeout=60,
                       json={"model": "tiny-llama", "prompt": secret, "max_tokens": 4,
                             "ignore_eos": True})   # the count below must not hinge on EOS
        assert r.status_code == 200, r.text
        assert httpx.post(server.url + "/v1/completions", json={}).status_code == 401
        # SIGTERM while a stream is in flight: the stream still ends properly, exit 0
        with httpx.stream("POST", server.url + "/v1/completions", headers=auth, timeout=60,
                          json={"model": "tiny-llama", "prompt": "x", "max_tokens": 200,
                                "ignore_eos": True, "stream": True}) as s:
            lines = s.iter_lines()
            assert next(lines).startswith("data: ")
            server.proc.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"
        assert server.proc.wait(60) == 0
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
    stdout, stderr = server.out.read_text(), server.err.read_text()
    assert "stopped" in stdout and "cleanly" in stdout
    assert secret not in stderr and "Traceback" not in stderr
    logs = server.log_lines()
    requests = [entry for entry in logs if "path" in entry]
    assert [e["status"] for e in requests] == [200, 401, 200]
    assert requests[0]["prompt_tokens"] > 0 and requests[0]["completion_tokens"] == 4
    assert requests[2]["finish_reason"] == "length" and requests[2]["stream"] is True
    assert all({"request_id", "duration_ms", "client"} <= set(e) for e in requests)


@pytest.mark.slow
def test_serve_lora_adapter_env_key_and_log_prompts(llama_dir, tokenizer, tmp_path):
    peft = pytest.importorskip("peft")
    import torch

    from slmkit.engine import Engine, SamplingParams
    from slmkit.models import load_model

    base, _ = load_model(llama_dir)
    torch.manual_seed(0)
    lora = peft.get_peft_model(base, peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    with torch.no_grad():  # make the adapter's effect large enough to change greedy output
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.mul_(50)
    adapter = tmp_path / "adapter"
    lora.save_pretrained(adapter)
    merged = lora.merge_and_unload().eval()
    prompt = "def main():"
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    with Engine(merged, tokenizer, max_batch=1, background=False) as engine:
        expected = engine.generate(ids, params).text
    fresh, _ = load_model(llama_dir)
    with Engine(fresh, tokenizer, max_batch=1, background=False) as engine:
        assert engine.generate(ids, params).text != expected  # the adapter matters

    server = ServeProcess(tmp_path, str(llama_dir), "--adapter", str(adapter), "--log-prompts",
                          env={"SLM_API_KEY": "env-key"})
    try:
        r = httpx.post(server.url + "/v1/completions", timeout=60,
                       headers={"Authorization": "Bearer env-key"},
                       json={"model": llama_dir.name, "prompt": prompt, "max_tokens": 8,
                             "temperature": 0, "ignore_eos": True})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == expected
        assert server.stop() == 0
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
    logged = [e for e in server.log_lines() if e.get("path") == "/v1/completions"]
    assert logged[0]["prompt"] == prompt


def test_serve_bad_options_exit_2(llama_dir, tmp_path):
    r = run_cli("serve", str(llama_dir), "--api-key", "a", "--api-key-file", "x.txt")
    assert r.returncode == 2 and "either --api-key or --api-key-file" in r.stderr
    r = run_cli("serve", str(llama_dir), "--adapter", str(tmp_path))
    assert r.returncode == 2 and "not a PEFT adapter" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.slow
def test_serve_port_in_use_exit_2(llama_dir):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = run_cli("serve", str(llama_dir), "--port", str(port))
    assert r.returncode == 2 and f"127.0.0.1:{port}" in r.stderr, r.stderr
