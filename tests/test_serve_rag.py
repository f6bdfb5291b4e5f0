"""``slm serve --rag INDEX``: chat answered from local documents, on a real server.

A real uvicorn server on 127.0.0.1 over a tiny random Llama and a real index (the six-format
corpus of test_rag, the real all-MiniLM-L6-v2 embedder, SQLite + sqlite-vec, bm25s);
clients: the official ``openai`` package and raw ``httpx``. The tiny model writes noise, so
these tests check the plumbing: the retrieved sources reach the prompt (the answer equals
the engine's own on the grounded prompt), the response carries them, abstention, streaming,
refusals. The built-in real model answering with a citation is the ``real`` test at the end.
"""

from __future__ import annotations

import json

import httpx
import pytest

from tests.conftest import build_tiny_model
from tests.test_rag import make_docs
from tests.test_serve_api import NAME, start_server

openai = pytest.importorskip("openai")

QUESTION = "How often should the zebra feeder bowl be rinsed with warm water?"
OFF_TOPIC = "Which Byzantine emperor reformed the coinage in 1092?"


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory):
    from slmkit.rag.config import IndexConfig
    from slmkit.rag.index import run_index

    root = tmp_path_factory.mktemp("serve-rag")
    docs = make_docs(root / "docs")
    out = root / "index"
    run_index(IndexConfig(docs=[str(docs)], out=str(out)))
    return out


@pytest.fixture(scope="module")
def live(tokenizer, index_dir):
    model = build_tiny_model("llama", tokenizer, max_position_embeddings=1024)
    server = start_server(model, tokenizer, rag=str(index_dir), rag_min_score=0.3,
                          rag_k=3)
    server.model = model
    yield server
    server.stop()


@pytest.fixture
def client(live):
    return openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0)


def test_answer_comes_from_the_sources(live, client, tokenizer):
    """The answer is the engine's own on the grounded prompt (the top chunk as Document
    [1], the question, the answering system prompt), and the sources come back."""
    from slmkit.engine import Engine, SamplingParams
    from slmkit.rag.answerer import SYSTEM, source_block
    from slmkit.rag.retrieve import Retriever

    resp = client.chat.completions.create(model=NAME, messages=[
        {"role": "user", "content": QUESTION}], max_tokens=10, temperature=0)
    rag = resp.model_extra["slm_rag"]
    assert rag["question"] == QUESTION and rag["mode"] == "hybrid" and not rag["abstained"]
    assert len(rag["sources"]) == 3 and [s["n"] for s in rag["sources"]] == [1, 2, 3]
    top = rag["sources"][0]
    assert top["path"].endswith("guide.md") and "Rinse the feeder bowl" in top["text"]
    assert "Cleaning" in top["heading"]
    assert top["url"].startswith("file://") and top["url"].endswith(
        f"#L{top['start_line']}" + (f"-L{top['end_line']}"
                                    if top["end_line"] > top["start_line"] else ""))
    assert rag["best_score"] >= 0.3 and top["dense"] == pytest.approx(rag["best_score"],
                                                                       abs=1e-4)

    retriever = Retriever.open(live.app.state.config.rag)
    hits = retriever.search(QUESTION, k=3)
    retriever.close()
    messages = [{"role": "system", "content": SYSTEM},
                {"role": "user", "content": source_block(hits[:1], QUESTION)}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    from slmkit.engine.generate import chat_stop_ids

    with Engine(live.model, tokenizer, max_batch=1, background=False) as engine:
        ref = engine.generate(ids, SamplingParams(max_tokens=10, temperature=0,
                                                  stop_token_ids=chat_stop_ids(tokenizer)))
    content = resp.choices[0].message.content
    assert content.startswith(ref.text)          # plus " [n]" when a citation was attributed
    assert resp.usage.prompt_tokens == len(ids)

    # citations, annotations and the markers in the content agree
    citations = rag["citations"]
    annotations = resp.choices[0].message.annotations or []
    assert len(annotations) == sum(content.count(f"[{c['n']}]") for c in citations)
    for a in annotations:
        marker = content[a.url_citation.start_index:a.url_citation.end_index]
        n = int(marker.strip("[]"))
        assert a.type == "url_citation" and a.url_citation.url == rag["sources"][n - 1]["url"]
        assert a.url_citation.title == rag["sources"][n - 1]["location"]
    for c in citations:
        if c["attributed"]:
            assert content == ref.text.rstrip() + f" [{c['n']}]"
    g = rag["groundedness"]
    assert g is None or 0.0 <= g <= 1.0


def test_off_topic_question_abstains_without_generating(live, client):
    resp = client.chat.completions.with_raw_response.create(model=NAME, messages=[
        {"role": "user", "content": OFF_TOPIC}], max_tokens=10)
    assert resp.headers["x-slm-rag-abstained"] == "1"
    body = resp.parse()
    assert body.choices[0].message.content.startswith("I don't know")
    assert body.choices[0].finish_reason == "stop" and body.usage.completion_tokens == 0
    rag = body.model_extra["slm_rag"]
    assert rag["abstained"] and "min-score 0.3" in rag["reason"] and rag["citations"] == []
    assert rag["groundedness"] is None and rag["best_score"] < 0.3


def test_stream_carries_sources(live, client):
    chunks = list(client.chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": QUESTION}], max_tokens=10,
        temperature=0, stream=True, stream_options={"include_usage": True}))
    plain = client.chat.completions.create(model=NAME, messages=[
        {"role": "user", "content": QUESTION}], max_tokens=10, temperature=0)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    last = chunks[-1]
    assert last.choices == [] and last.model_extra["slm_rag"] == {
        **plain.model_extra["slm_rag"], "retrieve_ms": last.model_extra["slm_rag"][
            "retrieve_ms"]}
    assert [c for c in chunks if c.usage] and chunks[0].id == last.id
    # an abstention streams too
    chunks = list(client.chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": OFF_TOPIC}], stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) \
        .startswith("I don't know")
    assert chunks[-1].model_extra["slm_rag"]["abstained"]


def test_request_settings_and_rag_off(live, client):
    resp = client.chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": OFF_TOPIC}], max_tokens=4,
        extra_body={"rag": {"mode": "bm25", "k": 5, "context_chunks": 2,
                            "min_score": -1}})
    rag = resp.model_extra["slm_rag"]
    assert rag["mode"] == "bm25" and not rag["abstained"]
    assert len(rag["sources"]) <= 5
    off = client.chat.completions.create(model=NAME, messages=[
        {"role": "user", "content": OFF_TOPIC}], max_tokens=4, extra_body={"rag": False})
    assert "slm_rag" not in (off.model_extra or {})
    metrics = httpx.get(live.url + "/metrics").text
    assert 'slm_rag_requests_total{outcome="off"}' in metrics


def test_follow_up_query():
    from slmkit.rag.answerer import follow_up_query

    first = "What do beekeepers do before opening the hive?"
    assert follow_up_query([first, "Why?"]) == f"{first} Why?"                    # short
    assert follow_up_query([first, "Does the smoke calm them down for long?"]) \
        == f"{first} Does the smoke calm them down for long?"                    # pronoun
    standalone = "How should the zebra feeder bowl be rinsed every week?"
    assert follow_up_query([first, standalone]) == standalone
    assert follow_up_query(["Why?"]) == "Why?"
    assert follow_up_query(["a", "b", "c", "  "]) == "b c"      # the previous user turn only


def test_a_follow_up_is_retrieved_with_the_turn_before(live, client):
    """"Why?" alone matches nothing (abstains); after a question about bees it retrieves
    the beekeeping file, and the prompt still asks the user's own words."""
    first = "What do beekeepers do before opening the hive?"
    alone = client.chat.completions.create(model=NAME, max_tokens=4, messages=[
        {"role": "user", "content": "Why?"}]).model_extra["slm_rag"]
    assert alone["abstained"] and alone["query"] == "Why?"
    rag = client.chat.completions.create(model=NAME, max_tokens=4, messages=[
        {"role": "user", "content": first},
        {"role": "assistant", "content": "They smoke the hive."},
        {"role": "user", "content": "Why?"}]).model_extra["slm_rag"]
    assert rag["question"] == "Why?" and rag["query"] == f"{first} Why?"
    assert not rag["abstained"] and rag["sources"][0]["path"].endswith("plain.txt")
    assert rag["best_score"] > alone["best_score"] + 0.3


@pytest.mark.parametrize("body, param, words", [
    ({"rag": {"top": 3}}, "rag", "mode, k, context_chunks, min_score"),
    ({"rag": "yes"}, "rag", "true, false"),
    ({"rag": {"mode": "fuzzy"}}, "rag.mode", "hybrid, bm25, dense"),
    ({"rag": {"k": 0}}, "rag.k", "1..100"),
    ({"rag": {"min_score": 2}}, "rag.min_score", "[-1, 1]"),
    ({"rag": {"k": 2, "context_chunks": 3}}, "rag.context_chunks", "more than"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]},
     "tools", "\"rag\": false"),
    ({"response_format": {"type": "json_object"}}, "response_format", "no [n] citations"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant",
                                                        "content": "Hello"}]},
     "messages", "last user message"),
])
def test_refusals(live, body, param, words):
    payload = {"model": NAME, "messages": [{"role": "user", "content": QUESTION}],
               "max_tokens": 4, **body}
    r = httpx.post(live.url + "/v1/chat/completions", json=payload, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and words in err["message"]


def test_rag_on_completions_and_without_index_refused(live, tokenizer):
    r = httpx.post(live.url + "/v1/completions", json={
        "model": NAME, "prompt": "x", "max_tokens": 2, "rag": True}, timeout=30)
    assert r.status_code == 400 and "chat/completions only" in r.json()["error"]["message"]
    plain = start_server(build_tiny_model("llama", tokenizer), tokenizer)
    try:
        for path, extra in (("/v1/chat/completions",
                             {"messages": [{"role": "user", "content": "hi"}]}),
                            ("/v1/completions", {"prompt": "hi"})):
            r = httpx.post(plain.url + path, json={"model": NAME, "max_tokens": 2,
                                                   "rag": False, **extra}, timeout=30)
            assert r.status_code == 400 and "--rag INDEX" in r.json()["error"]["message"]
    finally:
        plain.stop()


def test_embeddings_serve_the_index_model(live, client):
    """/v1/embeddings also serves MiniLM under its own id: the index's own vectors."""
    import numpy as np

    from slmkit.rag.embed import Embedder

    assert [m.id for m in client.models.list()] == [NAME, "all-MiniLM-L6-v2"]
    assert client.models.retrieve("all-MiniLM-L6-v2").id == "all-MiniLM-L6-v2"
    texts = ["Rinse the feeder bowl with warm water.", "Spring tides follow the full moon."]
    out = client.embeddings.create(model="all-MiniLM-L6-v2", input=texts)   # base64 on the wire
    ref = Embedder("minilm").encode(texts)
    got = np.array([d.embedding for d in out.data], dtype=np.float32)
    assert got.shape == (2, 384) and np.allclose(got, ref, atol=1e-5)
    assert out.model == "all-MiniLM-L6-v2" and out.usage.prompt_tokens > 10
    floats = httpx.post(live.url + "/v1/embeddings", json={
        "model": "all-MiniLM-L6-v2", "input": texts[0], "encoding_format": "float"}).json()
    assert np.allclose(floats["data"][0]["embedding"], ref[0], atol=1e-6)
    own = client.embeddings.create(model=NAME, input="hello")             # the LM's, as before
    assert len(own.data[0].embedding) == 64
    for body, param in (({"input": [1, 2, 3]}, "input.0"), ({"input": ""}, "input"),
                        ({"input": "x", "dimensions": 100}, "dimensions")):
        r = httpx.post(live.url + "/v1/embeddings", json={"model": "all-MiniLM-L6-v2",
                                                           **body})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_config_refusals(tmp_path, index_dir):
    from slmkit.serve.config import ServeConfig

    with pytest.raises(ValueError, match="not a slmkit RAG index"):
        ServeConfig(rag=str(tmp_path))
    with pytest.raises(ValueError, match="--rag-k needs --rag INDEX"):
        ServeConfig(rag_k=5)
    with pytest.raises(ValueError, match="cannot be combined"):
        ServeConfig(rag=str(index_dir), fallback="http://127.0.0.1:9/v1")
    with pytest.raises(ValueError, match="more than --rag-k"):
        ServeConfig(rag=str(index_dir), rag_k=1, rag_context_chunks=2)


def test_cli_refuses_a_folder_that_is_not_an_index(cli, llama_dir, tmp_path):
    """`slm serve MODEL --rag DIR` on a non-index says so before loading anything."""
    r = cli("serve", llama_dir, "--rag", tmp_path, "--port", "0", timeout=120)
    assert r.returncode == 2 and "is not a slmkit RAG index" in r.stderr, r.stderr
    assert "slm rag index" in r.stderr and "Traceback" not in r.stderr


def test_groundedness():
    from slmkit.rag.answerer import groundedness

    source = ["Rinse the feeder bowl with warm water every Tuesday."]
    assert groundedness("Rinse the bowl with warm water [1].", source) == 1.0
    assert groundedness("Rinse the bowl with cold milk.", source) == pytest.approx(2 / 4)
    assert groundedness("It is the [1].", source) is None          # no content words
    assert groundedness("Rinsing bowls", source) == 1.0           # stems match


@pytest.mark.real
def test_builtin_model_cites_the_source(index_dir):
    """SmolLM2-135M behind the server answers from the index and cites guide.md."""
    from slmkit.models import load_model

    model, tok = load_model("builtin:smollm2-135m")
    server = start_server(model, tok, rag=str(index_dir), rag_min_score=0.3)
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        resp = client.chat.completions.create(model=NAME, messages=[
            {"role": "user", "content": "When should I rinse the feeder bowl?"}],
            max_tokens=40, temperature=0)
    finally:
        server.stop()
    content = resp.choices[0].message.content
    rag = resp.model_extra["slm_rag"]
    assert "tuesday" in content.lower(), content
    assert rag["citations"] and rag["citations"][0]["path"].endswith("guide.md")
    assert resp.choices[0].message.annotations[0].url_citation.title.startswith(
        rag["citations"][0]["path"])
    assert rag["groundedness"] is not None and rag["groundedness"] >= 0.5, (content, rag)
    print(json.dumps({"content": content, "groundedness": rag["groundedness"]}))


@pytest.mark.slow
def test_chat_page_lists_the_sources(live):
    """The web page shows the sources under a grounded answer and the reason under an
    abstention (headless Chromium; skipped where it is not installed)."""
    from pathlib import Path

    from tests import test_serve_browser as page

    if not page.CHROMIUM.exists() or not Path(page.DRIVER).exists():
        pytest.skip("headless Chromium (/usr/bin/chromium + chromedriver) is not installed")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    options = webdriver.ChromeOptions()
    options.binary_location = str(page.CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(page.DRIVER), options=options)
    try:
        driver.get(live.url + "/")
        page._send(driver, QUESTION)
        reply = page._wait_done(driver, 1)[-1]
        sources = reply.find_element(By.CLASS_NAME, "sources")
        items = sources.find_elements(By.TAG_NAME, "li")
        assert len(items) == 3 and "guide.md" in items[0].text
        assert sources.text.startswith("Sources")
        page._send(driver, OFF_TOPIC)
        reply = page._wait_done(driver, 2)[-1]
        assert "I don't know" in reply.find_element(By.CLASS_NAME, "content").text
        assert "Not in the documents" in reply.find_element(By.CLASS_NAME, "sources").text
    finally:
        driver.quit()
