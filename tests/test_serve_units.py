"""Pure pieces of the server: metrics math, auth comparison, key resolution, parsing."""

from __future__ import annotations

import random

import pytest

from slmkit.errors import ConfigError
from slmkit.serve.app import bearer_matches
from slmkit.serve.config import resolve_api_key
from slmkit.serve.metrics import Histogram, Metrics, parse_metrics
from slmkit.serve.protocol import APIError, ChatRequest, CompletionRequest, parse_request
from slmkit.serve.responses import LogprobFormatter, sse


def test_histogram_matches_a_slow_reference():
    rng = random.Random(0)
    buckets = (0.01, 0.1, 1.0, 10.0)
    values = [rng.choice([0.01, 0.1, 1.0]) if i % 5 == 0 else rng.expovariate(1.0)
              for i in range(500)] + [100.0]
    h = Histogram(buckets)
    for v in values:
        h.observe(v)
    rendered = parse_metrics("\n".join(h.render("x", "help")))
    for le in buckets:  # Prometheus buckets are cumulative and inclusive: value <= le
        assert rendered[f'x_bucket{{le="{le:g}"}}'] == sum(v <= le for v in values)
    assert rendered['x_bucket{le="+Inf"}'] == len(values) == rendered["x_count"]
    assert rendered["x_sum"] == pytest.approx(sum(values), abs=1e-3)


def test_metrics_text_is_valid_exposition():
    m = Metrics()
    m.record_request("/v1/completions", 200)
    m.record_request("/v1/completions", 200)
    m.record_request("/v1/chat/completions", 429)
    m.record_generation("stop", 5, 7, 0.02, 0.3)
    text = m.render(queue_depth=2, running=3, free_slots=5)
    values = parse_metrics(text)
    assert values['slm_requests_total{endpoint="/v1/completions",status="200"}'] == 2
    assert values['slm_requests_total{endpoint="/v1/chat/completions",status="429"}'] == 1
    assert values["slm_prompt_tokens_total"] == 5 and values["slm_completion_tokens_total"] == 7
    assert values["slm_queue_depth"] == 2 and values["slm_running_streams"] == 3
    names = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")}
    for line in text.splitlines():  # every sample belongs to a declared family
        if not line.startswith("#"):
            name = line.split("{")[0].split(" ")[0]
            assert any(name == n or name.startswith(n + "_") for n in names), line
    assert text.endswith("\n")


def test_bearer_matches():
    import hashlib

    digest = hashlib.sha256(b"abc").digest()
    assert bearer_matches(b"Bearer abc", digest)
    assert bearer_matches(b"bearer abc", digest)
    for wrong in (b"", b"abc", b"Bearer", b"Bearer ab", b"Bearer abcd", b"Basic abc",
                  b"Bearer  xbc"):
        assert not bearer_matches(wrong, digest), wrong


def test_resolve_api_key(tmp_path, monkeypatch):
    monkeypatch.delenv("SLM_API_KEY", raising=False)
    assert resolve_api_key(None, None) is None
    monkeypatch.setenv("SLM_API_KEY", "from-env")
    assert resolve_api_key(None, None) == "from-env"
    assert resolve_api_key("flag", None) == "flag"
    key = tmp_path / "key"
    key.write_text("  from-file\n")
    assert resolve_api_key(None, key) == "from-file"
    with pytest.raises(ConfigError, match="not both"):
        resolve_api_key("a", key)
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ConfigError, match="is empty"):
        resolve_api_key(None, tmp_path / "empty")
    with pytest.raises(ConfigError, match="Cannot read"):
        resolve_api_key(None, tmp_path / "missing")
    with pytest.raises(ConfigError, match="whitespace"):
        resolve_api_key("two words", None)


def test_parse_request_names_the_field():
    ok = parse_request(b'{"model": "m", "prompt": [1, 2], "stop": "x"}', CompletionRequest)
    assert ok.prompt == [1, 2] and ok.stop == "x"
    chat = parse_request(b'{"model": "m", "messages": [{"role": "user", "content": '
                         b'[{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],'
                         b' "unknown_new_field": 1}', ChatRequest)
    assert chat.messages[0].text() == "ab"
    cases = {b'{"model": "m", "prompt": "x", "seed": 1.5}': "seed",
             b'{"model": "m", "messages": [{"role": "user"}, {"role": 1}]}': "messages.1.role",
             b'{"model": "m", "prompt": "x", "stream_options": {"include_usage": 1}}':
                 "stream_options.include_usage"}
    for body, param in cases.items():
        schema = ChatRequest if b"messages" in body else CompletionRequest
        with pytest.raises(APIError) as info:
            parse_request(body, schema)
        assert info.value.status == 400 and info.value.param == param


def test_logprob_formatter_and_sse(tokenizer):
    fmt = LogprobFormatter(tokenizer)
    ids = tokenizer("def f(x):", add_special_tokens=False)["input_ids"]
    block = fmt.completion_block([(t, -1.0, [(t, -1.0)]) for t in ids], offset=3)
    assert "".join(block["tokens"]) == "def f(x):"
    assert block["text_offset"][0] == 3
    assert block["text_offset"][-1] == 3 + len("def f(x):") - len(block["tokens"][-1])
    entry = fmt.chat_entry(ids[0], -0.5, [(ids[0], -0.5)])
    assert bytes(entry["bytes"]).decode() == entry["token"]
    assert sse({"a": "é"}) == 'data: {"a":"é"}\n\n'.encode()
    assert sse("[DONE]") == b"data: [DONE]\n\n"
