"""The whole RAG path (index, ask, eval) with the real models and every socket that is not
loopback blocked: nothing is downloaded and nothing leaves the machine.

The child process refuses ``connect`` to, and name lookups of, anything but loopback, and
records every attempt; the hub's offline switches are removed from its environment so
that they are not what keeps it offline.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.test_rag import make_docs

GUARD = r"""
import json, socket, sys
LOCAL = {"127.0.0.1", "::1", "localhost", None}
attempts = []
_connect, _connect_ex, _gai = socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo

def _check(addr):
    host = addr[0] if isinstance(addr, tuple) else None
    if isinstance(addr, tuple) and host not in LOCAL:
        attempts.append(str(addr))
        raise OSError("network blocked by the test: " + str(addr))

def connect(self, addr):
    _check(addr)
    return _connect(self, addr)

def connect_ex(self, addr):
    _check(addr)
    return _connect_ex(self, addr)

def getaddrinfo(host, *a, **k):
    if host not in LOCAL:
        attempts.append("dns " + str(host))
        raise socket.gaierror("name lookup blocked by the test: " + str(host))
    return _gai(host, *a, **k)

socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo = \
    connect, connect_ex, getaddrinfo
from slmkit.cli import main
results = []
for args in json.loads(sys.argv[1]):
    try:
        main(args)
    except SystemExit as e:
        results.append(e.code)
sys.stderr.write("RESULTS " + json.dumps({"codes": results, "attempts": attempts}) + "\n")
"""


@pytest.mark.real
def test_index_ask_and_eval_run_with_the_network_blocked(tmp_path):
    docs = make_docs(tmp_path / "docs")
    index = str(tmp_path / "index")
    questions = tmp_path / "q.jsonl"
    questions.write_text(
        json.dumps({"question": "What do beekeepers do before opening the hive?",
                    "answer": "smoke the hive", "sources": ["docs/plain.txt"]}) + "\n"
        + json.dumps({"question": "Who painted the Mona Lisa?", "answer": None}) + "\n")
    common = ["--threads", "1", "--max-tokens", "24"]
    runs = [["rag", "index", str(docs), "--out", index, "--threads", "1", "--json"],
            ["rag", "ask", index, "What do beekeepers do before opening the hive?",
             "--json", *common],
            ["rag", "eval", index, "--questions", str(questions), "--json",
             "--out", str(tmp_path / "eval"), *common]]
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    proc = subprocess.run([sys.executable, "-c", GUARD, json.dumps(runs)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600, env=env)
    status = json.loads(proc.stderr.split("RESULTS ", 1)[1])
    assert status == {"codes": [0, 0, 0], "attempts": []}, proc.stderr[-3000:]
    decoder = json.JSONDecoder()
    outputs, pos = [], 0
    text = proc.stdout
    while pos < len(text):
        if text[pos].isspace():
            pos += 1
            continue
        obj, pos = decoder.raw_decode(text, pos)
        outputs.append(obj)
    built, answered, evaluated = outputs
    assert built["added"] == 6
    assert not answered["abstained"], answered
    assert answered["citations"] and answered["citations"][0]["path"] == "docs/plain.txt"
    assert evaluated["retrieval"]["hybrid"]["recall@5"] == 1.0
    assert evaluated["answers"]["abstain_out"] == 1.0
    assert evaluated["answers"]["cited_gold"] == 1.0
    records = (tmp_path / "eval" / "answers.jsonl").read_text().splitlines()
    assert len(records) == 2 and "answer_without_rag" in json.loads(records[0])
    unknown = json.loads(records[1])                      # the out-of-corpus question
    assert unknown["abstained"] and not unknown["citations"], unknown
