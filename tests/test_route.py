"""Hybrid serving end to end: a local server routing to a second real server on 127.0.0.1.

Two different tiny random Llamas, each behind its own uvicorn server on loopback: "big"
(seed 0) and "small" (seed 1, started with ``fallback=big``). Forwarded answers are checked
against the big server's own answer to the same greedy request, local ones against the
small server's engine, so a test passes only when the right model really answered.
"""

from __future__ import annotations

import json
import logging
import math
import time

import httpx
import numpy as np
import pytest

from tests.conftest import build_tiny_model
from tests.test_serve_api import LiveServer

openai = pytest.importorskip("openai")

PROMPT = "def parse(self, text):\n    "
CHAT = [{"role": "user", "content": "Write a function that adds two numbers."}]


def serve(model, tokenizer, name: str, **settings) -> LiveServer:
    from slmkit.serve import ServeConfig, create_app

    # the monitor's per-answer figures are another issue's; the cascade turns the engine's
    # confidence record on by itself, so these servers run without the monitor
    if "monitor" in ServeConfig.model_fields:
        settings.setdefault("monitor", False)
    config = ServeConfig(name=name, max_concurrency=4, **settings)
    return LiveServer(create_app(model, tokenizer, config))


@pytest.fixture(scope="module")
def big_model(tokenizer):
    return build_tiny_model("llama", tokenizer, seed=0)


@pytest.fixture(scope="module")
def small_model(tokenizer):
    return build_tiny_model("llama", tokenizer, seed=1)


@pytest.fixture(scope="module")
def big(big_model, tokenizer):
    server = serve(big_model, tokenizer, "big", api_key="big-secret-key")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def hybrid(small_model, tokenizer, big):
    import os

    os.environ["SLM_TEST_FALLBACK_KEY"] = "big-secret-key"
    server = serve(small_model, tokenizer, "small", fallback=big.url + "/v1",
                   fallback_model="big", fallback_key_env="SLM_TEST_FALLBACK_KEY",
                   fallback_price=0.001, fallback_timeout=20)
    yield server
    server.stop()


def post(server, path: str, body: dict, key: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(server.url + path, json=body, headers=headers, timeout=60)


def sse(server, path: str, body: dict) -> tuple[httpx.Headers, list[dict | str]]:
    with httpx.stream("POST", server.url + path, json={**body, "stream": True},
                      timeout=60) as r:
        assert r.status_code == 200, r.read()
        frames = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
        headers = r.headers
    return headers, [f if f == "[DONE]" else json.loads(f) for f in frames]


def text_of(frames: list) -> str:
    out = ""
    for f in frames:
        if isinstance(f, dict) and f.get("choices"):
            c = f["choices"][0]
            out += c.get("text") or (c.get("delta") or {}).get("content") or ""
    return out


GREEDY = {"max_tokens": 8, "temperature": 0, "ignore_eos": True}


def test_cascade_keeps_or_escalates_by_threshold(hybrid, big):
    body = {"model": "small", "prompt": PROMPT, **GREEDY}
    direct_big = post(big, "/v1/completions", {**body, "model": "big"}, "big-secret-key").json()
    kept = post(hybrid, "/v1/completions", {**body, "route": {"mode": "cascade",
                                                               "threshold": -1e9}})
    assert kept.status_code == 200 and kept.headers["x-slm-route"] == "local"
    info = kept.json()["slm_route"]
    assert info["answered_by"] == "local" and info["model"] == "small"
    assert info["signal"] == "mean" and info["score"] < 0        # mean token log-prob
    assert float(kept.headers["x-slm-route-score"]) == info["score"]
    # a random 512-token model is unsure: its mean log-prob is near log(1/512)
    assert -math.log(512) - 3 < info["score"] < -1
    escalated = post(hybrid, "/v1/completions", {**body, "route": {"mode": "cascade",
                                                                    "threshold": 0.0}})
    assert escalated.headers["x-slm-route"] == "fallback"
    out = escalated.json()
    assert out["slm_route"]["answered_by"] == "fallback" and out["slm_route"]["model"] == "big"
    assert out["slm_route"]["score"] == info["score"]            # same local draft, scored
    assert out["choices"][0]["text"] == direct_big["choices"][0]["text"]
    assert out["choices"][0]["text"] != kept.json()["choices"][0]["text"]
    # other signals: quantiles and entropy, per request
    q10 = post(hybrid, "/v1/completions", {**body, "route": {"mode": "cascade", "signal": "q10",
                                                              "threshold": -1e9}}).json()
    assert q10["slm_route"]["signal"] == "q10" and q10["slm_route"]["score"] <= info["score"]
    ent = post(hybrid, "/v1/completions", {**body, "route": {"mode": "cascade",
                                                              "signal": "entropy",
                                                              "threshold": -1e9}}).json()
    assert -math.log(512) - 0.01 <= ent["slm_route"]["score"] < 0   # minus entropy <= log V


def test_streaming_both_paths_and_chat(hybrid, big):
    client = openai.OpenAI(base_url=big.url + "/v1", api_key="big-secret-key", max_retries=0)
    ref = client.chat.completions.create(model="big", messages=CHAT, **{
        k: v for k, v in GREEDY.items() if k != "ignore_eos"}, extra_body={"ignore_eos": True})
    # forwarded chat stream: the big model's deltas, then our route chunk, then [DONE]
    headers, frames = sse(hybrid, "/v1/chat/completions",
                          {"model": "small", "messages": CHAT, **GREEDY, "route": "fallback"})
    assert headers["x-slm-route"] == "fallback"
    assert text_of(frames) == ref.choices[0].message.content
    assert frames[-1] == "[DONE]" and frames[-2]["slm_route"]["answered_by"] == "fallback"
    assert not any(f.get("usage") for f in frames[:-1] if not f.get("choices"))  # not asked
    # cascade kept locally, replayed as a stream; same text as the non-streamed answer
    route = {"mode": "cascade", "threshold": -1e9}
    local = post(hybrid, "/v1/chat/completions", {"model": "small", "messages": CHAT,
                                                  **GREEDY, "route": route}).json()
    headers, frames = sse(hybrid, "/v1/chat/completions",
                          {"model": "small", "messages": CHAT, **GREEDY, "route": route,
                           "stream_options": {"include_usage": True}})
    assert headers["x-slm-route"] == "local"
    assert text_of(frames) == local["choices"][0]["message"]["content"]
    assert frames[-2]["slm_route"]["answered_by"] == "local"
    assert frames[-3]["usage"]["completion_tokens"] == 8
    # router-less local mode streams straight from the engine, tagged too
    headers, frames = sse(hybrid, "/v1/completions", {"model": "small", "prompt": PROMPT,
                                                      **GREEDY, "route": "local"})
    assert headers["x-slm-route"] == "local" and frames[-2]["slm_route"]["mode"] == "local"
    # the official client reads every kind of frame (our extra chunk has no choices)
    hc = openai.OpenAI(base_url=hybrid.url + "/v1", api_key="x", max_retries=0)
    stream = hc.chat.completions.create(model="small", messages=CHAT, stream=True,
                                        max_tokens=8, temperature=0,
                                        extra_body={"ignore_eos": True, "route": "fallback"})
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == \
        ref.choices[0].message.content


def test_route_field_refusals_and_metrics(hybrid, big, small_model, tokenizer, caplog):
    caplog.set_level(logging.INFO, logger="slmkit.serve.access")
    base = {"model": "small", "prompt": PROMPT, **GREEDY}
    for route, needle in ((42, "route"), ({"mode": "psychic"}, "psychic"),
                          ({"mode": "cascade", "signal": "vibes"}, "vibes"),
                          ({"mode": "local", "threshold": 1}, "threshold"),
                          ({"mode": "router"}, "router"),
                          ({"mode": "cascade", "extra": 1}, "route")):
        r = post(hybrid, "/v1/completions", {**base, "route": route})
        assert r.status_code == 400 and needle in r.json()["error"]["message"], (route, r.text)
    # a server without --fallback refuses the field instead of ignoring it
    plain = serve(small_model, tokenizer, "plain")
    try:
        r = post(plain, "/v1/completions", {**base, "model": "plain", "route": "local"})
        assert r.status_code == 400 and "--fallback" in r.json()["error"]["message"]
    finally:
        plain.stop()
    before = httpx.get(hybrid.url + "/metrics").text
    post(hybrid, "/v1/completions", {**base, "route": "fallback"})
    text = httpx.get(hybrid.url + "/metrics").text
    from slmkit.serve.metrics import parse_metrics

    m0, m1 = parse_metrics(before), parse_metrics(text)
    key = 'slm_route_requests_total{mode="fallback",answered_by="fallback",reason="forced"}'
    assert m1[key] == m0.get(key, 0) + 1
    assert m1["slm_route_forwarded_completion_tokens_total"] - \
        m0["slm_route_forwarded_completion_tokens_total"] == 8
    tokens = m1["slm_route_forwarded_prompt_tokens_total"] + \
        m1["slm_route_forwarded_completion_tokens_total"]
    assert m1["slm_route_forwarded_cost_total"] == pytest.approx(tokens * 0.001)
    assert "big-secret-key" not in caplog.text and "big-secret-key" not in text


def test_flags_are_refused_without_fallback():
    from slmkit.errors import ConfigError
    from slmkit.serve import ServeConfig

    with pytest.raises(ValueError, match="--route-mode.*--fallback"):
        ServeConfig(route_mode="router")
    with pytest.raises(ValueError, match="--router DIR"):
        ServeConfig(fallback="http://127.0.0.1:1", route_mode="router")
    with pytest.raises(ValueError, match="http"):
        ServeConfig(fallback="127.0.0.1:1")
    from slmkit.serve.config import ServeCommand

    cmd = ServeCommand(model="m", fallback="http://127.0.0.1:1/v1", route_threshold=-2.0)
    assert cmd.server_config().route_threshold == -2.0
    from slmkit.route.client import FallbackClient

    assert "secret" not in repr(FallbackClient("http://h:1", api_key="secret"))
    with pytest.raises(ConfigError, match="UNSET_VAR"):
        from slmkit.serve.hybrid import Hybrid

        Hybrid(None, ServeConfig(fallback="http://h:1", fallback_key_env="UNSET_VAR"),
               None, None)


def test_big_model_down_mid_run(big_model, small_model, tokenizer):
    """Requests keep being answered (locally, flagged) after the big server stops."""
    big2 = serve(big_model, tokenizer, "big")
    small = serve(small_model, tokenizer, "small", fallback=big2.url, fallback_timeout=3,
                  fallback_retries=1)
    try:
        body = {"model": "small", "prompt": PROMPT, **GREEDY}
        up = post(small, "/v1/completions", {**body, "route": "fallback"}).json()
        assert up["slm_route"]["answered_by"] == "fallback"        # model id from /v1/models
        local_ref = post(small, "/v1/completions", {**body, "route": "local"}).json()
        big2.stop()
        for route in ("fallback", {"mode": "cascade", "threshold": 0.0}):
            start = time.monotonic()
            r = post(small, "/v1/completions", {**body, "route": route})
            assert r.status_code == 200 and time.monotonic() - start < 10
            out = r.json()
            assert out["slm_route"]["answered_by"] == "local"
            assert out["slm_route"]["fallback_error"]
            assert r.headers["x-slm-route"] == "local"
            assert out["choices"][0]["text"] == local_ref["choices"][0]["text"]
            assert len(out["choices"]) == 1
        headers, frames = sse(small, "/v1/completions", {**body, "route": "fallback"})
        assert headers["x-slm-route"] == "local" and frames[-2]["slm_route"]["fallback_error"]
        assert text_of(frames) == local_ref["choices"][0]["text"]
        m = httpx.get(small.url + "/metrics").text
        assert "slm_route_fallback_errors_total 3" in m
    finally:
        small.stop()
        big2.stop()


def test_scores_and_calibration_math():
    from slmkit.route.calibrate import curve, pick_threshold, share_below, threshold_at
    from slmkit.route.evaluate import pgr_figures
    from slmkit.route.scores import all_scores

    conf = [(-0.1, 0.5, 0), (-2.0, 1.5, 3), (-0.5, 0.2, 5), (-4.0, 3.0, 9)]
    s = all_scores(conf)
    assert s["mean"] == pytest.approx(-1.65) and s["min"] == -4.0
    assert s["entropy"] == pytest.approx(-1.3) and s["max_entropy"] == -3.0
    assert s["q50"] == pytest.approx(-1.25) and s["min"] <= s["q05"] <= s["q10"] <= s["q25"]
    assert all_scores([])["mean"] == float("-inf")
    # with the local model's hidden-state probe and the answer's tapped mean, 'flag' reads
    # the probe (as the monitor does); without them, the token-logprob flag
    from slmkit.monitor.confidence import HiddenProbe

    probe = HiddenProbe([1.0, -2.0], 0.5, [0.0, 0.0], [1.0, 1.0], after=1)
    assert all_scores(conf, [0.3, 0.1], probe)["flag"] == pytest.approx(
        1 - probe.risk([0.3, 0.1]))
    assert all_scores(conf, None, probe)["flag"] == all_scores(conf)["flag"]
    scores = np.array([0.9, 0.1, 0.5, 0.3])
    small = np.array([1.0, 0.0, 1.0, 0.0])
    big = np.array([1.0, 1.0, 1.0, 1.0])
    shares, q = curve(scores, small, big)
    assert list(q) == pytest.approx([0.5, 0.75, 1.0, 1.0, 1.0])
    fig = pgr_figures(scores, small, big)
    assert fig["apgr"] == pytest.approx((0.25 + 0.75 + 1 + 1) / 4)
    assert fig["cpt95"] == 0.5
    t = threshold_at(scores, 2)
    assert share_below(scores, t) == 0.5
    data = {"score": scores, "small": small, "big": big}
    assert share_below(scores, pick_threshold(data, None, 0.95)) == 0.5
    assert share_below(scores, pick_threshold(data, 0.25, None)) == 0.25
    random_fig = pgr_figures(np.zeros(4) + np.arange(4)[::-1], small, big)
    assert random_fig["apgr"] < fig["apgr"]


@pytest.mark.slow
def test_router_train_and_router_mode(tmp_path, small_model, tokenizer, big, cli, llama_dir,
                                      monkeypatch):
    """slm route train on labelled prompts, then a server routing by it."""
    monkeypatch.setenv("SLM_TEST_FALLBACK_KEY", "big-secret-key")
    from slmkit.route.router import HiddenFeatures, Router

    code = [f"def f{i}(x):\n    return x + {i}" for i in range(12)]
    prose = [f"Please tell me a long story about dragon number {i} and its friends."
             for i in range(12)]
    rows = [{"prompt": p, "label": 0} for p in code] + \
        [{"messages": [{"role": "user", "content": p}], "small_score": 0.1, "big_score": 0.9}
         for p in prose]
    data = tmp_path / "route.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "router"
    r = cli("route", "train", str(llama_dir), "--data", str(data), "--out", str(out),
            "--layers", "1", "--json")
    assert r.returncode == 0, r.stderr
    figures = json.loads(r.stdout)
    assert figures["rows"] == 24 and figures["held_out_auc"] is not None
    router = Router.load(out)
    assert router.features == "hidden" and router.layers == 1
    # bad data is one sentence, exit 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x", "label": 3}\n')
    r = cli("route", "train", str(llama_dir), "--data", str(bad), "--out", str(tmp_path / "r2"))
    assert r.returncode == 2 and "label" in r.stderr + r.stdout
    # the router's own feature view leaves the served model whole
    from slmkit.models import load_model

    model, tok = load_model(llama_dir)
    n_layers = len(model.model.layers)
    feats = HiddenFeatures(model, tok, 1, 64)
    x = feats(["def g(x):\n    return x", "Please tell me a long story about dragons."])
    assert x.shape == (2, model.config.hidden_size + 1) and len(model.model.layers) == n_layers
    # a router trained for another width is refused at start-up
    other = build_tiny_model("llama", tokenizer, hidden_size=32, intermediate_size=64)
    from slmkit.errors import ConfigError

    with pytest.raises(ConfigError, match="trained for another model"):
        router.featurizer(other, tokenizer)
    # router mode over the llama_dir model: code stays local, prose goes to the big model
    server = serve(model, tok, "small", fallback=big.url, fallback_model="big",
                   route_mode="router", router=str(out),
                   fallback_key_env="SLM_TEST_FALLBACK_KEY")
    try:
        local = post(server, "/v1/completions", {"model": "small", "prompt": code[3], **GREEDY})
        away = post(server, "/v1/chat/completions", {"model": "small", **GREEDY,
                                                     "messages": [{"role": "user",
                                                                   "content": prose[3]}]})
        assert local.json()["slm_route"]["mode"] == "router"
        assert local.headers["x-slm-route"] == "local", local.json()["slm_route"]
        assert away.headers["x-slm-route"] == "fallback", away.json()["slm_route"]
        assert away.json()["slm_route"]["decision_ms"] < 1000
        headers, frames = sse(server, "/v1/chat/completions", {
            "model": "small", **GREEDY, "messages": [{"role": "user", "content": prose[5]}]})
        assert headers["x-slm-route"] == "fallback" and frames[-1] == "[DONE]"
        assert "slm_route_decision_seconds_count 3" in httpx.get(server.url + "/metrics").text
    finally:
        server.stop()


def test_cross_validated_router_with_a_training_split():
    """Every item is scored by a router fitted without it; extra rows join each fit."""
    from slmkit.route.evaluate import cross_val_router
    from slmkit.route.router import auc

    rng = np.random.default_rng(0)
    labels = np.array([0, 1] * 10)
    x = rng.normal(size=(20, 3)) + labels[:, None] * 2.0
    alone = cross_val_router(x, labels, 4, 0)
    assert auc(-alone, labels == 1) > 0.9      # P(small suffices) is low where big is needed
    # a training split with the opposite rule drags the held-out scores the other way
    flipped = cross_val_router(x, labels, 4, 0, extra=(np.repeat(x, 5, 0),
                                                       np.repeat(1 - labels, 5)))
    assert auc(-flipped, labels == 1) < 0.5


def test_token_router_is_the_router(tokenizer):
    """The served decision for a 0-layer router (embeddings folded per vocabulary token,
    the prompt's tail tokenized) gives the trained router's own scores, for a dense and a
    4-bit embedding table and for a prompt far longer than max_tokens."""
    from slmkit.nn.quant_embedding import QuantEmbedding
    from slmkit.route.router import HiddenFeatures, TokenRouter, train_router

    texts = [f"def f{i}(x):\n    return x * {i}" for i in range(6)] + \
        [f"Tell me a story about dragon {i}." for i in range(6)] + \
        ["", "word " * 2000 + "the end"]
    labels = np.array([0] * 6 + [1] * 6 + [0, 1])
    for quantized in (False, True):
        model = build_tiny_model("llama", tokenizer, seed=2)
        if quantized:
            model.set_input_embeddings(QuantEmbedding.from_embedding(
                model.get_input_embeddings(), 4, 16, False))
        feats = HiddenFeatures(model, tokenizer, 0, 16)
        router = train_router(feats, texts, labels, kind="hidden", layers=0, max_tokens=16)
        decide = router.decider(model, tokenizer)
        assert isinstance(decide, TokenRouter) and decide.lean
        want = router.scores(feats(texts))
        assert len(set(np.round(want, 6))) > 2   # a router that ranks, not a constant
        assert [decide(t) for t in texts] == pytest.approx(want, rel=1e-5, abs=1e-9)


def test_server_routes_by_a_token_router(tmp_path, small_model, tokenizer, big,
                                         monkeypatch):
    """A 0-layer router served on the lean path: the decision the server reports is the
    router's own score, and it picks the side."""
    from slmkit.route.router import HiddenFeatures, prompt_text, train_router

    code = [f"def f{i}(x):\n    return x + {i}" for i in range(10)]
    prose = [f"Please tell me a long story about dragon number {i} and its friends."
             for i in range(10)]
    feats = HiddenFeatures(small_model, tokenizer, 0, 128)
    router = train_router(feats, code + prose, np.array([0] * 10 + [1] * 10), kind="hidden",
                          layers=0, max_tokens=128)
    router.save(tmp_path)
    monkeypatch.setenv("SLM_TEST_FALLBACK_KEY", "big-secret-key")
    server = serve(small_model, tokenizer, "small", fallback=big.url, fallback_model="big",
                   route_mode="router", router=str(tmp_path),
                   fallback_key_env="SLM_TEST_FALLBACK_KEY")
    try:
        local = post(server, "/v1/completions", {"model": "small", "prompt": code[3], **GREEDY})
        body = {"model": "small", **GREEDY, "messages": [{"role": "user", "content": prose[3]}]}
        away = post(server, "/v1/chat/completions", body)
        assert local.headers["x-slm-route"] == "local", local.json()["slm_route"]
        assert away.headers["x-slm-route"] == "fallback", away.json()["slm_route"]
        want = router.scores(feats([code[3], prompt_text(body)]))
        got = [local.json()["slm_route"]["score"], away.json()["slm_route"]["score"]]
        assert got == pytest.approx(want, abs=1e-4)
    finally:
        server.stop()


def test_calibrate_cli(tmp_path, cli):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("".join(json.dumps({"scores": {"mean": -i / 10}, "small_quality": i % 2,
                                     "big_quality": 1}) + "\n" for i in range(20)))
    b.write_text("".join(json.dumps({"scores": {"mean": -i / 5}}) + "\n" for i in range(20)))
    r = cli("route", "calibrate", str(a), "--signal", "mean", "--target-share", "0.3",
            "--check", str(b), "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["share"] == pytest.approx(0.3) and out["check_share"] > out["share"]
    r = cli("route", "calibrate", str(a), "--target-share", "0.3")
    assert r.returncode == 2 and "--signal" in r.stderr + r.stdout


def test_forwarded_body():
    """What the big model receives: its model id, no 'route', the draft as a turn, usage on."""
    from slmkit.serve.hybrid import DRAFT_PROMPT, Hybrid

    body = {"model": "small", "messages": CHAT, "route": "cascade", "stream": True,
            "stream_options": {"include_usage": False}, "temperature": 0}
    out = Hybrid._forward_body(None, body, "big", "def add(a, b): ...")
    assert out["model"] == "big" and "route" not in out and out["temperature"] == 0
    assert out["messages"][:1] == CHAT and out["messages"][1] == {
        "role": "assistant", "content": "def add(a, b): ..."}
    assert out["messages"][2] == {"role": "user", "content": DRAFT_PROMPT}
    assert out["stream_options"] == {"include_usage": True}
    assert body["messages"] == CHAT and body["route"] == "cascade"   # the original is kept


def test_route_eval_on_two_models(tiny_model_dirs, tmp_path):
    """slm route eval's pipeline: both models answer, every strategy gets figures, the
    per-item rows feed slm route calibrate, and a second run reuses the answers."""
    from slmkit.route.config import CalibrateConfig, EvalConfig
    from slmkit.route.calibrate import run_calibrate
    from slmkit.route.evaluate import run_eval

    words = ["def", "return", "import", "class", "self", "print", "for", "if"]
    items = [{"type": "generation", "id": f"t{i}", "prompt": f"{w} x = {i} ", "answer": w,
              "stop": ["\n", " "], "max_new_tokens": 4, "metric": "contains"}
             for i, w in enumerate(words)]
    tasks = {"a": items[:4], "b": [dict(it, id="b" + it["id"]) for it in items[4:]]}
    cfg = EvalConfig(small=str(tiny_model_dirs["qwen2"]), big=str(tiny_model_dirs["llama"]),
                     tasks=["a", "b"], layers=[0, 1], folds=2, decisions=20,
                     out=str(tmp_path / "ev"))
    result = run_eval(cfg, tasks)
    data = result.data
    assert data["items"] == 8 and set(data["tasks"]) == {"a", "b"}
    assert {"cascade:mean", "cascade:q10", "router-l0", "router-l1", "oracle"} <= \
        set(data["strategies"])
    for fig in data["strategies"].values():
        assert 0 <= fig["cpt95"] <= 1
    assert data["overhead"]["router_decision_ms"]["router-l0"]["p95"] > 0
    assert set(data["calibration_shift"]["cascade:mean"]) >= {"share_there",
                                                               "share_there_check"}
    rows = [json.loads(line) for line in (tmp_path / "ev" / "scores.jsonl").open()]
    assert len(rows) == 8 and {"mean", "router-l0"} <= set(rows[0]["scores"])
    cal = run_calibrate(CalibrateConfig(scores=str(tmp_path / "ev" / "scores.jsonl"),
                                        signal="mean", target_share=0.5))
    assert cal.figures["share"] == 0.5
    again = run_eval(cfg, tasks).data     # answers come from the cache: same figures
    assert again["strategies"]["cascade:mean"] == data["strategies"]["cascade:mean"]
