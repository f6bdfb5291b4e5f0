"""``/v1/embeddings`` on a real server (tiny random Llama) with the official client."""

from __future__ import annotations

import base64

import httpx
import numpy as np
import pytest
import torch

from tests.test_serve_api import NAME, serve_model, start_server  # noqa: F401
from tests.test_serve_limits import assert_error

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def live(serve_model, tokenizer):  # noqa: F811
    server = start_server(serve_model, tokenizer, max_prompt_tokens=64)
    yield server
    server.stop()


def reference(model, tokenizer, text):
    """Mean of the last hidden state over the text's tokens, unit length."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        hidden = model.model(input_ids=torch.tensor([ids])).last_hidden_state[0]
    return torch.nn.functional.normalize(hidden.mean(0), dim=0).numpy()


def test_vectors_are_mean_pooled_hidden_states(live, serve_model, tokenizer):
    client = openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0)
    texts = ["def parse(self, text):", "import os", "return the value of x + y"]
    out = client.embeddings.create(model=NAME, input=texts)  # the client asks for base64
    assert [d.index for d in out.data] == [0, 1, 2]
    counts = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    assert out.usage.prompt_tokens == out.usage.total_tokens == sum(counts)
    for text, d in zip(texts, out.data):
        v = np.array(d.embedding)
        assert v.shape == (serve_model.config.hidden_size,)
        assert np.linalg.norm(v) == pytest.approx(1.0, abs=1e-5)
        np.testing.assert_allclose(v, reference(serve_model, tokenizer, text), atol=2e-5)
    # alone (no padding) == in a batch with longer inputs (right padding is invisible)
    alone = client.embeddings.create(model=NAME, input=texts[1]).data[0].embedding
    np.testing.assert_allclose(alone, out.data[1].embedding, atol=2e-5)


def test_float_base64_and_token_ids_agree(live, tokenizer):
    url = live.url + "/v1/embeddings"
    ids = tokenizer("import os", add_special_tokens=False)["input_ids"]
    floats = httpx.post(url, json={"model": NAME, "input": "import os"}).json()
    assert floats["object"] == "list" and floats["model"] == NAME
    packed = httpx.post(url, json={"model": NAME, "input": [ids, ids[:1]],
                                   "encoding_format": "base64"}).json()
    decoded = np.frombuffer(base64.b64decode(packed["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_allclose(decoded, floats["data"][0]["embedding"], atol=1e-6)
    assert packed["usage"]["prompt_tokens"] == len(ids) + 1
    same_dim = httpx.post(url, json={"model": NAME, "input": "x", "dimensions": 64})
    assert same_dim.status_code == 200


@pytest.mark.parametrize("body,param", [
    ({"input": "x", "dimensions": 32}, "dimensions"),
    ({"input": ""}, "input"),
    ({"input": []}, "input"),
    ({"input": ["ok", ""]}, "input.1"),
    ({"input": [[1, 99999]]}, "input.0"),
    ({"input": "word " * 200}, "input"),
    ({"input": "x", "encoding_format": "int8"}, "encoding_format"),
    ({"input": "x", "model": "other"}, "model"),
])
def test_bad_embedding_requests_name_the_field(live, body, param):
    r = httpx.post(live.url + "/v1/embeddings", json={"model": NAME, **body})
    assert_error(r, 400, param)
