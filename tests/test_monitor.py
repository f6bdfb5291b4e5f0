"""Monitoring: per-token confidence from the engine, answer summaries and the flag, the
SQLite request log with retention, and all of it through a real server on 127.0.0.1."""

from __future__ import annotations

import json
import math
import time

import httpx
import numpy as np
import pytest
import torch

from tests.conftest import build_tiny_model
from tests.test_serve_api import NAME, start_server, wait_idle


@pytest.fixture(scope="module")
def tiny(tokenizer):
    return build_tiny_model("llama", tokenizer, seed=3)


def test_engine_confidence_matches_a_full_forward(tiny, tokenizer):
    from slmkit.engine import Engine, SamplingParams

    prompt = tokenizer("def parse(self, text):\n    ", add_special_tokens=False)["input_ids"]
    with Engine(tiny, tokenizer, max_batch=2, background=False) as engine:
        c = engine.generate(prompt, SamplingParams(max_tokens=12, temperature=0,
                                                   logprobs=True, confidence=True,
                                                   ignore_eos=True))
    assert len(c.confidence) == len(c.token_ids) == 12
    ids = torch.tensor([prompt + c.token_ids])
    with torch.no_grad():
        logits = tiny(ids).logits[0, len(prompt) - 1:-1].float()           # [12, V]
    lp = torch.log_softmax(logits, -1)
    want_lp = lp.gather(1, torch.tensor(c.token_ids)[:, None])[:, 0]
    want_ent = -(lp.exp() * lp).sum(-1)
    got = torch.tensor([x[:2] for x in c.confidence])
    torch.testing.assert_close(got[:, 0], want_lp, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(got[:, 1], want_ent, atol=2e-4, rtol=1e-4)
    # the margin: the chosen (greedy: the best) token's logprob over the best other one
    others = lp.scatter(1, torch.tensor(c.token_ids)[:, None], float("-inf"))
    want_margin = want_lp - others.max(-1).values
    got_margin = torch.tensor([x[3] for x in c.confidence])
    torch.testing.assert_close(got_margin, want_margin, atol=2e-4, rtol=1e-4)
    assert (got_margin >= 0).all()
    assert [x[0] for x in c.confidence] == c.logprobs
    offsets = [x[2] for x in c.confidence]
    assert offsets == sorted(offsets) and offsets[0] == 0 and offsets[-1] <= len(c.text)


@pytest.mark.parametrize("kind,native", [("llama", True), ("llama", False),
                                         ("qwen3", True), ("qwen3", False), ("gpt_neox", None)])
def test_engine_taps_the_answer_hidden_states(kind, native, tokenizer):
    """With a hidden-state tap after block n, a request with confidence on gets the mean of
    transformers' ``hidden_states[n]`` over its generated tokens that were fed back (all
    but the last): on the native step and on the torch loop (FastRunner and FamilyRunner),
    for two requests decoding side by side. The generic runner has no taps: None."""
    from slmkit.engine import Engine, SamplingParams, native as native_mod

    model = build_tiny_model(kind, tokenizer, seed=4)
    prompts = [tokenizer(t, add_special_tokens=False)["input_ids"]
               for t in ("def parse(self, text):\n    ", "import os\nimport")]
    params = SamplingParams(max_tokens=9, temperature=0, confidence=True, ignore_eos=True)
    if native is not None:
        native_mod.set_enabled(native)
    try:
        with Engine(model, tokenizer, max_batch=2, background=False) as engine:
            engine.set_hidden_tap(1)
            handles = [engine.submit(p, params) for p in prompts]
            while engine.step():
                pass
            done = [h.completion for h in handles]
            plain = engine.generate(prompts[0], SamplingParams(max_tokens=4, temperature=0))
    finally:
        native_mod.set_enabled(True)
    assert plain.hidden_mean is None                         # confidence off: nothing kept
    for p, c in zip(prompts, done):
        if kind == "gpt_neox":
            assert c.hidden_mean is None and c.confidence     # no taps on transformers' forward
            continue
        ids = torch.tensor([p + c.token_ids])
        with torch.no_grad():
            hs = model(ids, output_hidden_states=True).hidden_states[1][0]
        want = hs[len(p):len(p) + len(c.token_ids) - 1].mean(0)
        torch.testing.assert_close(torch.tensor(c.hidden_mean), want, atol=1e-4, rtol=1e-4)


def test_hidden_probe_fits_saves_and_applies_to_its_own_model_only(tokenizer, tmp_path):
    from slmkit.monitor.confidence import FlagModel, HiddenProbe, model_fingerprint, summarize

    rng = np.random.default_rng(1)
    wrong = [bool(rng.random() < 0.5) for _ in range(200)]
    hidden = [rng.normal(0.8 if w else 0.0, 1.0, size=8) for w in wrong]
    model, other = build_tiny_model("llama", tokenizer, seed=5), \
        build_tiny_model("llama", tokenizer, seed=6)
    probe = HiddenProbe.fit(hidden, wrong, 1, model_fingerprint(model), l2=10.0)
    risks = [probe.risk(h) for h in hidden]
    pos = [r for r, w in zip(risks, wrong) if w]
    neg = [r for r, w in zip(risks, wrong) if not w]
    assert np.mean([p > n for p in pos for n in neg]) > 0.85
    flag = FlagModel.load()
    flag.probe = probe
    again = FlagModel.load(flag.save(tmp_path / "flag.json"))
    assert again.probe == probe
    assert again.probe_for(model) == probe and again.probe_for(other) is None
    conf = [(-0.01, 0.1, 0, 3.0), (-0.2, 0.5, 3, 1.0)]
    s = summarize(conf, "Yes it", again, hidden=hidden[0], probe=probe)
    assert s["risk_from"] == "hidden state" and s["risk"] == pytest.approx(risks[0], abs=1e-4)
    assert s["flagged"] == (risks[0] >= probe.threshold)
    s = summarize(conf, "Yes it", again, hidden=None, probe=probe)   # no taps: the logprobs
    assert s["risk_from"] == "token logprobs"
    bad = json.loads((tmp_path / "flag.json").read_text())
    bad["probe"]["weights"] = bad["probe"]["weights"][:3]
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="hidden-state probe"):
        FlagModel.load(tmp_path / "bad.json")


@pytest.mark.real
def test_shipped_probe_reads_the_built_in_models_taps():
    """The shipped flag model's hidden-state probe applies to the built-in model as `slm
    serve` loads it; the engine's taps give the answer's mean hidden state the benchmark
    fitted on (a full forward over prompt and answer); a sure right answer is passed and a
    wrong sum flagged."""
    from slmkit.engine import Engine, SamplingParams
    from slmkit.models import load_model
    from slmkit.monitor.confidence import FlagModel, summarize

    model, tok = load_model("builtin:smollm2-135m")
    flag = FlagModel.load()
    probe = flag.probe_for(model)
    assert probe is not None and probe.after == model.config.num_hidden_layers // 2
    params = SamplingParams(max_tokens=24, temperature=0, confidence=True)
    risks = {}
    with Engine(model, tok, max_batch=1, background=False) as engine:
        engine.set_hidden_tap(probe.after)
        for q in ("What is the capital of France?",
                  "What is 37 + 48? Answer with the number only."):
            msgs = [{"role": "user", "content": q}]
            ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
            prompt = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
            c = engine.generate(prompt, params)
            answer = tok(c.text, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                hs = model(torch.tensor([prompt + answer]), output_hidden_states=True)
            want = hs.hidden_states[probe.after][0, len(prompt):].mean(0)
            got = torch.tensor(c.hidden_mean)
            assert float(torch.cosine_similarity(got, want, dim=0)) > 0.999
            s = summarize(c.confidence, c.text, flag, question=q, hidden=c.hidden_mean,
                          probe=probe)
            assert s["risk_from"] == "hidden state"
            assert s["risk"] == pytest.approx(probe.risk(want.numpy()), abs=0.02)
            risks[q] = (c.text, s)
    (paris, sure), (total, guess) = risks.values()
    assert "Paris" in paris and not sure["flagged"]
    assert "85" not in total and guess["flagged"]


def test_summary_spans_and_flag_model(tmp_path):
    from slmkit.monitor.confidence import FEATURES, FlagModel, features, summarize

    text = "The answer is Paris."
    conf = [(-0.01, 0.1, 0), (-0.02, 0.2, 3), (-0.05, 0.3, 10), (-3.0, 2.5, 13),
            (-2.0, 2.0, 16), (-0.01, 0.1, 19)]
    s = summarize(conf, text)
    assert s["tokens"] == 6 and s["min_logprob"] == -3.0
    assert s["mean_logprob"] == pytest.approx(sum(c[0] for c in conf) / 6, abs=1e-4)
    assert s["low_confidence_spans"] == [{"start": 13, "end": 19, "text": " Paris",
                                          "min_logprob": -3.0, "tokens": 2}]
    assert "risk" not in s and summarize([], "") is None
    # a flag fitted where low min_logprob means wrong ranks such answers high
    rng = np.random.default_rng(0)
    rows, wrong = [], []
    for _ in range(200):
        bad = bool(rng.random() < 0.4)
        lps = rng.normal(-2.5 if bad else -0.3, 0.5, size=5).clip(max=0)
        rows.append(features([(float(x), 1.0, i) for i, x in enumerate(lps)]))
        wrong.append(bad)
    flag = FlagModel.fit(rows, wrong)
    again = FlagModel.load(flag.save(tmp_path / "flag.json"))
    risks = [again.risk(r) for r in rows]
    assert risks == [flag.risk(r) for r in rows]
    pos = [r for r, w in zip(risks, wrong) if w]
    neg = [r for r, w in zip(risks, wrong) if not w]
    assert np.mean([p > n for p in pos for n in neg]) > 0.95
    s = summarize(conf, text, again)
    assert 0 <= s["risk"] <= 1 and s["flagged"] == (s["risk"] >= again.threshold)
    shipped = FlagModel.load()
    assert len(shipped.weights) == len(shipped.features) and shipped.source["items"] > 300
    # a flag reads the features named in its file, and refuses names this slmkit lacks
    custom = FlagModel.fit(rows, wrong, names=("answer_min_logprob", "mean_margin"))
    again = FlagModel.load(custom.save(tmp_path / "custom.json"))
    assert again.features == ("answer_min_logprob", "mean_margin")
    assert [again.risk(r) for r in rows] == [custom.risk(r) for r in rows]
    bad = json.loads((tmp_path / "custom.json").read_text())
    bad["features"][0] = "no_such_feature"
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="no_such_feature"):
        FlagModel.load(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="unknown flag features"):
        FlagModel.fit(rows, wrong, names=("nope",))
    square = FlagModel.fit(rows, wrong, names=("mean_logprob", "mean_logprob^2"))
    assert FlagModel.load(square.save(tmp_path / "sq.json")).risk(rows[0]) == \
        pytest.approx(square.risk(rows[0]))


def test_shipped_flag_passes_a_sure_right_answer_and_flags_a_guess():
    """The report behind the refit: the old flag gave this right, sure "Paris" risk 0.84.
    The record is builtin:smollm2-135m's own (greedy chat answer to "What is the capital of
    France?": logprob, entropy, offset, margin per token, from bench/monitor.py's cache)."""
    from slmkit.monitor.confidence import FlagModel, summarize

    text = "The capital of France is Paris."
    sure = [(-1.8827, 3.587, 0, 0.0821), (-0.0197, 0.1586, 3, 4.6617),
            (-0.0115, 0.078, 11, 4.7483), (-0.0109, 0.0848, 14, 5.0446),
            (-0.0388, 0.1923, 21, 3.3734), (-0.05, 0.3805, 24, 4.653),
            (-0.5656, 0.7637, 30, 0.2976)]
    flag = FlagModel.load()
    s = summarize(sure, text, flag, question="What is the capital of France?")
    assert not s["flagged"] and s["risk"] < 0.5
    # the same words said unsurely (the answer's own token at p = 0.08, a close second)
    guess = list(sure)
    guess[5] = (-2.5, 3.0, 24, 0.05)
    g = summarize(guess, text, flag, question="What is the capital of France?")
    assert g["risk"] > s["risk"] and g["flagged"]


def test_answer_tokens_margins_and_consistency():
    from slmkit.monitor.confidence import answer_tokens, consistency, features

    # "The capital of France is Paris.": only " Paris" is the answer's own word
    text = "The capital of France is Paris."
    offs = [0, 3, 11, 14, 21, 24, 30]
    conf = [(-0.1, 0.5, o, 3.0) for o in offs]
    conf[5] = (-1.5, 2.0, 24, 0.2)
    mask = answer_tokens(conf, text, "What is the capital of France?")
    assert mask.tolist() == [False, False, False, False, False, True, False]
    f = features(conf, text, "What is the capital of France?")
    assert f["answer_mean_logprob"] == f["answer_min_logprob"] == -1.5
    assert f["answer_min_margin"] == pytest.approx(0.2) and f["answer_tokens"] == 1
    assert f["mean_logprob"] == pytest.approx((6 * -0.1 - 1.5) / 7)
    # no text, or no own word: every token counts
    assert features(conf)["answer_mean_logprob"] == pytest.approx(f["mean_logprob"])
    # a 3-tuple record (an older cache) gets the margin's lower bound log p - log(1 - p)
    old = features([(-0.1, 0.5, 0)])
    assert old["mean_margin"] == pytest.approx(-0.1 - math.log(1 - math.exp(-0.1)))
    # consistency: the share of the answer's own words the samples say again
    q = "What is the capital of France?"
    assert consistency("Paris.", ["It is Paris", "Paris!"], q) == 1.0
    assert consistency("Paris.", ["Lyon", "Paris"], q) == 0.5
    assert consistency("The capital of France.", ["Lyon"], q) == 1.0  # nothing of its own


def test_language_labels():
    from slmkit.monitor.text import language

    assert language("def f(x):\n    return x + 1\n") == "code"
    assert language("What is the capital of France and why is it there?") == "en"
    assert language("Wie spät ist es und wo ist der Bahnhof in der Stadt?") == "de"
    assert language("Привет, как дела?") == "cyrillic"
    assert language("12345 !!!") == "none"


def test_request_log_retention_by_age_and_size(tmp_path):
    from slmkit.monitor.log import RequestLog, connect, read_rows

    path = tmp_path / "req.db"
    log = RequestLog(path, embed=lambda texts: np.ones((len(texts), 4), np.float32),
                     embedder="ones", max_days=1.0)
    now = time.time()
    log.record({"ts": now - 3 * 86400, "model": "m"}, prompt="old", answer="a")
    log.record({"ts": now, "model": "m", "mean_logprob": -0.5, "flagged": True},
               prompt="What is the capital of France?", answer="Paris")
    log.flush()
    rows = read_rows(path)
    assert len(rows) == 1  # the three-day-old row is gone
    r = rows[0]
    assert r["prompt"] is None and r["answer"] is None  # no text without the opt-in
    assert r["prompt_chars"] == 30 and r["language"] == "en" and r["flagged"] == 1
    assert r["embedding"].tolist() == [1, 1, 1, 1] and r["embedder"] == "ones"
    log.close()
    # size: 2000 rows of ~2 KB embeddings under a 1 MB cap
    log = RequestLog(path, embed=lambda texts: np.zeros((len(texts), 512), np.float32),
                     store_text=True, max_mb=1.0)
    for i in range(2000):
        log.record({"ts": time.time(), "model": "m"}, prompt=f"prompt {i}", answer="x")
    log.flush()
    log.close()
    assert path.stat().st_size <= 1.05 * (1 << 20)
    rows = read_rows(path)
    assert 100 < len(rows) < 2000 and rows[-1]["prompt"] == "prompt 1999"
    assert rows[-1]["answer"] == "x"
    with pytest.raises(Exception, match="not an slmkit request log"):
        import sqlite3
        other = tmp_path / "other.db"
        sqlite3.connect(other).execute("CREATE TABLE t (x)").connection.commit()
        connect(other)


def _sse_chunks(text: str) -> list[dict]:
    return [json.loads(line[6:]) for line in text.splitlines()
            if line.startswith("data: {")]


def test_server_reports_confidence_metrics_and_logs(tiny, tokenizer, tmp_path):
    path = tmp_path / "requests.db"
    live = start_server(tiny, tokenizer, request_log=str(path), log_embedder="none")
    try:
        with httpx.Client(base_url=live.url, timeout=60) as client:
            body = client.post("/v1/chat/completions", json={
                "model": NAME, "messages": [{"role": "user", "content": "hello there"}],
                "max_tokens": 8, "temperature": 0, "ignore_eos": True}).json()
            conf = body["choices"][0]["confidence"]
            assert conf["tokens"] == 8 and conf["min_logprob"] <= conf["mean_logprob"] <= 0
            assert 0 <= conf["risk"] <= 1 and isinstance(conf["flagged"], bool)
            assert conf["mean_entropy"] >= 0
            body = client.post("/v1/completions", json={
                "model": NAME, "prompt": "import os\n", "max_tokens": 6, "temperature": 0,
                "ignore_eos": True, "logprobs": 1}).json()
            choice = body["choices"][0]
            assert choice["confidence"]["mean_logprob"] == pytest.approx(
                sum(choice["logprobs"]["token_logprobs"]) / 6, abs=1e-3)
            stream = client.post("/v1/chat/completions", json={
                "model": NAME, "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 5, "temperature": 0, "ignore_eos": True, "stream": True}).text
            chunks = _sse_chunks(stream)
            assert all("confidence" not in c["choices"][0] for c in chunks[:-1])
            assert chunks[-1]["choices"][0]["finish_reason"] == "length"
            assert chunks[-1]["choices"][0]["confidence"]["tokens"] == 5
            wait_idle(live)
            metrics = client.get("/metrics").text
        assert "slm_answers_scored_total 3" in metrics
        assert "slm_answer_mean_logprob_count 3" in metrics
        assert "slm_recent_flag_rate" in metrics
        live.service.request_log.flush()
        from slmkit.monitor.log import read_rows

        rows = read_rows(path)
        assert [r["endpoint"] for r in rows] == ["chat", "completions", "chat"]
        assert [r["completion_tokens"] for r in rows] == [8, 6, 5]
        assert all(r["prompt"] is None and r["answer"] is None for r in rows)
        assert rows[0]["prompt_chars"] == len("hello there") and rows[0]["latency_ms"] > 0
        assert rows[1]["language"] == "code"
        assert rows[0]["mean_logprob"] == pytest.approx(conf["mean_logprob"])
    finally:
        live.stop()


def test_server_stores_text_only_when_asked_and_monitor_off(tiny, tokenizer, tmp_path):
    path = tmp_path / "requests.db"
    live = start_server(tiny, tokenizer, request_log=str(path), log_embedder="none",
                        log_prompts=True)
    try:
        with httpx.Client(base_url=live.url, timeout=60) as client:
            body = client.post("/v1/completions", json={
                "model": NAME, "prompt": "x = ", "max_tokens": 3, "temperature": 0}).json()
        live.service.request_log.flush()
        from slmkit.monitor.log import read_rows

        (row,) = read_rows(path)
        assert row["prompt"] == "x = " and row["answer"] == body["choices"][0]["text"]
    finally:
        live.stop()
    live = start_server(tiny, tokenizer, monitor=False)
    try:
        with httpx.Client(base_url=live.url, timeout=60) as client:
            body = client.post("/v1/completions", json={
                "model": NAME, "prompt": "x = ", "max_tokens": 3, "temperature": 0}).json()
            assert "confidence" not in body["choices"][0]
            assert "slm_answers_scored_total 0" in client.get("/metrics").text
    finally:
        live.stop()


def test_mmd_drift_detector_and_signals():
    from slmkit.monitor.drift import DriftDetector, compare

    rng = np.random.default_rng(0)
    ref = rng.normal(size=(100, 16))
    det = DriftDetector(ref, window=100)
    same = det.check(rng.normal(size=(100, 16)))
    moved = det.check(np.concatenate([rng.normal(size=(60, 16)),
                                      rng.normal(loc=0.6, size=(40, 16))]))
    assert same["p_value"] > 0.01 and not same["drift"]
    assert moved["p_value"] <= 0.001 and moved["drift"] and moved["mmd2"] > same["mmd2"]

    def rows(n, loc, chars, lang, lp, flag):
        return [{"embedding": rng.normal(loc=loc, size=16), "prompt_chars": int(c),
                 "language": lang, "mean_logprob": float(m), "flagged": bool(f)}
                for c, m, f in zip(rng.normal(chars, 10, n), rng.normal(lp, 0.1, n),
                                   rng.random(n) < flag)]
    ref_rows = rows(100, 0.0, 100, "en", -0.5, 0.1)
    steady = compare(ref_rows, rows(100, 0.0, 100, "en", -0.5, 0.1))
    assert not any(s["drift"] for s in steady.values())
    shifted = compare(ref_rows, rows(100, 0.6, 300, "code", -1.5, 0.6))
    assert all(s["drift"] for s in shifted.values()), shifted
    assert shifted["language"]["recent"] == {"code": 100}


def _fake_log(path, n_ref=120, n_new=120, shift=1.0):
    from slmkit.monitor.log import RequestLog

    rng = np.random.default_rng(1)
    log = RequestLog(path, drift_every=0)
    t = time.time() - 3600
    for i in range(n_ref + n_new):
        late = i >= n_ref
        row = {"ts": t + i, "model": "m", "endpoint": "chat", "prompt_tokens": 10,
               "completion_tokens": 5, "latency_ms": 50.0,
               "mean_logprob": float(rng.normal(-1.2 if late else -0.4, 0.1)),
               "min_logprob": -2.0, "mean_entropy": 1.0, "risk": 0.3,
               "flagged": bool(rng.random() < (0.7 if late else 0.1)),
               "embedding": rng.normal(loc=shift if late else 0.0, size=8).astype(
                   np.float32).tobytes(), "embedder": "minilm"}
        prompt = "def f(x):\n    return x\n" if late else "What is the weather like today?"
        log.record(row, prompt=prompt, answer="ok")
    log.flush()
    log.close()


@pytest.mark.slow
def test_slm_monitor_cli_report_gauges_and_refusals(tmp_path, cli):
    path = tmp_path / "req.db"
    _fake_log(path)
    report, prom = tmp_path / "report.html", tmp_path / "slm.prom"
    r = cli("monitor", str(path), "--reference", "100", "--window", "100", "-o", str(report),
            "--prometheus", str(prom), "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert set(data["drift"]) == {"embedding", "length", "language", "confidence",
                                  "flag_rate"}
    page = report.read_text()
    assert page.count("<img") == 3 and "DRIFT" in page
    assert 'slm_drift_alarm{signal="embedding"} 1' in prom.read_text()
    r = cli("monitor", str(tmp_path / "missing.db"))
    assert r.returncode == 2 and "does not exist" in r.stderr + r.stdout
    from slmkit.errors import ConfigError
    from slmkit.monitor.config import MonitorConfig
    from slmkit.monitor.report import run

    small = run(MonitorConfig(log=str(path), reference=100, window=20))
    assert "embedding" in small.data["drift"] and small.data["recent"] == 20
    with pytest.raises(ConfigError, match="too few"):
        run(MonitorConfig(log=str(path), reference=1000))


def test_slm_monitor_model_answers_prompts_offline(tiny_model_dirs, tmp_path, cli):
    """`slm monitor MODEL --prompts FILE`: the model answers every prompt (greedy, with the
    confidence figures and flag the server reports) into a request log, which the same
    drift report reads; code prompts then prose ones drift in length. Flags that only a
    model takes are refused for a log, and a model needs --prompts."""
    from slmkit.monitor.log import read_rows

    code = [f"def f{i}(x):\n    return x * {i} + len(str(x))" for i in range(12)]
    prose = [f"the cat number {i} sat" for i in range(12)]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in code + prose))
    saved = tmp_path / "logs" / "offline.db"
    model = tiny_model_dirs["llama"]
    r = cli("monitor", str(model), "--prompts", str(prompts), "--reference", "12",
            "--window", "12", "--max-tokens", "6", "--save-log", str(saved), "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["requests"] == 24 and "length" in data["drift"]
    rows = read_rows(saved)
    assert len(rows) == 24 and all(row["completion_tokens"] == 6 for row in rows)
    assert all(row["mean_logprob"] is not None and row["risk"] is not None for row in rows)
    assert [row["prompt_chars"] for row in rows] == [len(p) for p in code + prose]
    assert all(row["embedding"] is not None and row["embedder"] == "minilm" for row in rows)
    again = cli("monitor", str(saved), "--reference", "12", "--window", "12", "--json")
    assert json.loads(again.stdout)["drift"] == data["drift"]
    for args, what in (((str(saved), "--prompts", str(prompts)), "--prompts is for a MODEL"),
                       ((str(model),), "pass --prompts"),
                       ((str(model), "--prompts", str(prompts), "--save-log", str(saved)),
                        "already exists")):
        bad = cli("monitor", *args, "--reference", "12")
        assert bad.returncode == 2 and what in bad.stderr and "Traceback" not in bad.stderr


def test_live_drift_gauges_from_the_request_log(tmp_path):
    from slmkit.monitor.log import RequestLog
    from slmkit.serve.metrics import Metrics

    metrics = Metrics()
    rng = np.random.default_rng(2)

    def gauges(signals):
        for name, s in signals.items():
            metrics.set_gauge("drift_alarm", float(s["drift"]), "x", signal=name)

    log = RequestLog(tmp_path / "r.db", embed=lambda texts: rng.normal(
        loc=float("code" in texts[0]), size=(len(texts), 8)).astype(np.float32),
        drift_reference=60, drift_window=40, drift_every=20, on_drift=gauges)
    for i in range(60):
        log.record({"ts": time.time()}, prompt="a question")
        log.flush()  # one row per batch: the embedding is drawn per row
    for i in range(40):
        log.record({"ts": time.time()}, prompt="code here")
        log.flush()
    log.close()
    assert log.last_drift["embedding"]["drift"]
    assert 'slm_drift_alarm{signal="embedding"} 1' in metrics.render(0, 0, 1)


def test_canary_scores_alerts_and_posts_the_webhook(tiny, tokenizer, tmp_path):
    import http.server
    import threading

    received = []

    class Hook(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *a):
            pass

    hook = http.server.HTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=hook.serve_forever, daemon=True).start()
    from slmkit.engine import Engine, SamplingParams

    prompts = ["def main():\n", "import sys\n", "class A:\n"]
    with Engine(tiny, tokenizer, max_batch=3, background=False) as engine:
        answers = [engine.generate(tokenizer(p, add_special_tokens=False)["input_ids"],
                                   SamplingParams(max_tokens=4, temperature=0)).text
                   for p in prompts]
    tasks = tmp_path / "canary.jsonl"
    tasks.write_text("".join(json.dumps({"type": "generation", "prompt": p, "answer": a,
                                         "stop": [], "max_new_tokens": 4}) + "\n"
                             for p, a in zip(prompts, answers)))
    live = start_server(tiny, tokenizer, canary=str(tasks), canary_every="1s",
                        canary_drop=0.5,
                        canary_webhook=f"http://127.0.0.1:{hook.server_port}/alert")
    try:
        canary = live.app.state.canary
        deadline = time.monotonic() + 30
        while canary.runs < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert canary.history[0]["score"] == 1.0 and not received
        for item in canary.items:  # the answers change: as if the model had got worse
            item["answer"] = "something else entirely"
        while not received and time.monotonic() < deadline:
            time.sleep(0.05)
        assert received and received[0]["event"] == "canary_alert"
        assert received[0]["score"] == 0.0 and received[0]["baseline"] == 1.0
        metrics = httpx.get(live.url + "/metrics").text
        assert 'slm_canary_alert{task="canary"} 1' in metrics
        assert 'slm_canary_baseline{task="canary"} 1' in metrics
        assert "slm_answers_scored_total 0" in metrics  # canaries stay out of the gauges
    finally:
        live.stop()
        hook.shutdown()


def test_serve_refuses_bad_monitor_flags(tmp_path):
    from pydantic import ValidationError

    from slmkit.serve import ServeConfig

    with pytest.raises(ValidationError, match="need --canary"):
        ServeConfig(canary_every="5m")
    with pytest.raises(ValidationError, match="not an interval"):
        ServeConfig(canary="x.jsonl", canary_every="soon")
    with pytest.raises(ValidationError, match="http"):
        ServeConfig(canary="x.jsonl", canary_webhook="ftp://x")


def test_grafana_dashboard_uses_only_metrics_the_server_exports():
    import re
    from pathlib import Path

    from slmkit.serve.metrics import Metrics

    root = Path(__file__).resolve().parent.parent
    dash = json.loads((root / "docs" / "grafana" / "slmkit-dashboard.json").read_text())
    used = {re.sub(r"_(bucket|sum|count)$", "", n) for p in dash["panels"]
            for t in p["targets"] for n in re.findall(r"slm_\w+", t["expr"])}
    m = Metrics()
    m.record_request("/v1/completions", 200)
    m.record_generation("stop", 3, 4, 0.1, 0.2)
    m.record_answer({"mean_logprob": -0.5, "min_logprob": -2, "mean_entropy": 1.0,
                     "risk": 0.2, "flagged": False})
    exported = {re.sub(r"_(bucket|sum|count)$", "", line.split("{")[0].split(" ")[0])
                for line in m.render(0, 0, 1).splitlines() if not line.startswith("#")}
    source = "".join(p.read_text() for p in (root / "slmkit" / "serve").glob("*.py"))
    exported |= {"slm_" + n for n in re.findall(r'set_gauge\("(\w+)"', source)}
    assert used and used <= exported, used - exported
