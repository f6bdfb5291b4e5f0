"""Perplexity, window planning, text metrics and multiple-choice scoring (slmkit.eval)."""

from __future__ import annotations

import math

import pytest
import torch

from tests.conftest import build_tiny_model


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run fastest on one thread, and the test machine is shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def llama(tokenizer):
    return build_tiny_model("llama", tokenizer, seed=1)


DOC = ('def add(a, b):\n    """Add two numbers."""\n    return a + b\n\n\n'
       "class Stack:\n    def __init__(self):\n        self.items = []\n\n"
       "    def push(self, x):\n        self.items.append(x)\n") * 3


# --------------------------------------------------------------------------- window plan

def _slow_plan(n, seq_len, stride):
    """Reference: for each target p (1..n-1), the context it should get, by brute force."""
    ctx = {}
    end, first = min(seq_len, n), True
    for p in range(1, end):
        ctx[p] = p
    while end < n:
        new_end = min(end + stride, n)
        begin = max(0, new_end - seq_len)
        for p in range(end, new_end):
            ctx[p] = p - begin
        end = new_end
    return ctx


@pytest.mark.parametrize("n,seq_len,stride", [(1, 4, 2), (2, 4, 2), (10, 4, 1), (10, 4, 3),
                                              (37, 8, 5), (8, 8, 4), (100, 16, 15)])
def test_rolling_windows_score_each_token_once(n, seq_len, stride):
    from slmkit.eval.ops import rolling_windows

    seen = {}
    for begin, end, first in rolling_windows(n, seq_len, stride):
        assert end - begin <= seq_len and begin < first <= end
        for p in range(first, end):
            assert p not in seen
            seen[p] = p - begin  # context tokens before target p inside the window
    assert seen == _slow_plan(n, seq_len, stride)
    assert sorted(seen) == list(range(1, n))
    if n > seq_len:  # every target after the first window sees >= seq_len - stride tokens
        assert min(c for p, c in seen.items() if p >= seq_len) >= seq_len - stride


def test_rolling_windows_refuses_bad_stride():
    from slmkit.eval.ops import rolling_windows

    with pytest.raises(ValueError):
        rolling_windows(10, 4, 4)


# --------------------------------------------------------------------------- perplexity

def _independent_ppl(model, tokenizer, text):
    """Plain transformers: one forward over [eos] + tokens, labels = inputs (HF shift)."""
    ids = [tokenizer.eos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"]
    x = torch.tensor([ids])
    with torch.no_grad():
        out = model(input_ids=x, labels=x)
    return math.exp(float(out.loss)), len(ids) - 1


def test_perplexity_matches_plain_transformers(llama, tokenizer):
    from slmkit.eval.perplexity import perplexity

    text = DOC[:400]
    ref_ppl, n = _independent_ppl(llama, tokenizer, text)
    assert n < 256
    got = perplexity(llama, tokenizer, data=[("doc", text)], seq_len=256)
    assert got["tokens"] == n
    assert abs(got["ppl"] - ref_ppl) / ref_ppl < 1e-3
    assert got["bytes"] == len(text.encode())
    assert got["bits_per_byte"] == pytest.approx(got["nll"] / math.log(2) / got["bytes"])


def test_sliding_window_equals_full_context_when_window_covers(llama, tokenizer):
    from slmkit.eval.perplexity import perplexity

    text = DOC[:400]
    full = perplexity(llama, tokenizer, data=[("d", text)], seq_len=256, stride=128)
    n = full["tokens"]
    for stride in (1, 7, n // 2):
        got = perplexity(llama, tokenizer, data=[("d", text)], seq_len=n + 1, stride=stride)
        assert got["tokens"] == n
        assert got["loss"] == pytest.approx(full["loss"], rel=1e-5)
    # a window shorter than the document changes the context, not the token count
    short = perplexity(llama, tokenizer, data=[("d", text)], seq_len=16, stride=8)
    assert short["tokens"] == n and short["loss"] != pytest.approx(full["loss"], rel=1e-6)


def test_sliding_window_matches_per_token_reference(llama, tokenizer):
    """Small window: every token scored with exactly the context the plan promises."""
    from slmkit.eval.ops import rolling_windows
    from slmkit.eval.perplexity import perplexity

    text = DOC[:300]
    seq_len, stride = 12, 5
    ids = [tokenizer.eos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"]
    nll = 0.0
    with torch.no_grad():
        for begin, end, first in rolling_windows(len(ids), seq_len, stride):
            for p in range(first, end):  # one forward per target, context ids[begin:p]
                logits = llama(input_ids=torch.tensor([ids[begin:p]])).logits[0, -1]
                nll -= float(torch.log_softmax(logits, -1)[ids[p]])
    got = perplexity(llama, tokenizer, data=[("d", text)], seq_len=seq_len, stride=stride)
    assert got["nll"] == pytest.approx(nll, rel=1e-4)


def test_perplexity_budgets_and_documents(llama, tokenizer):
    from slmkit.eval.perplexity import perplexity

    docs = [("a", DOC), ("b", DOC[::-1])]
    both = perplexity(llama, tokenizer, data=docs, seq_len=64)
    assert both["documents"] == 2
    assert both["bytes"] == sum(len(t.encode()) for _, t in docs)
    cut = perplexity(llama, tokenizer, data=docs, seq_len=64, max_tokens=50)
    assert cut["tokens"] == 50 and cut["documents"] == 1 and 0 < cut["bytes"] < len(DOC)
    small = perplexity(llama, tokenizer, data=docs, seq_len=64, max_bytes=100)
    assert small["bytes"] == 100 and small["documents"] == 1


def test_perplexity_bad_input(llama, tokenizer):
    from slmkit.errors import ConfigError, DataError
    from slmkit.eval.perplexity import perplexity

    with pytest.raises(DataError, match="holds no text"):
        perplexity(llama, tokenizer, data=[("empty", "")])
    with pytest.raises(ConfigError, match="--stride"):
        perplexity(llama, tokenizer, data=[("d", DOC)], seq_len=32, stride=32)
    with pytest.raises(ConfigError, match="context"):
        perplexity(llama, tokenizer, data=[("d", DOC)], seq_len=10_000)


# --------------------------------------------------------------------------- metrics

def test_text_metrics_against_hand_values():
    from slmkit.eval.ops import exact_match, lcs_length, pareto_front, rouge_l, token_f1

    assert exact_match(" foo(x) ", "foo(x)") == 1.0 and exact_match("foo", "Foo") == 0.0
    assert token_f1("the cat sat", "a cat sat down") == pytest.approx(2 * 1 * (2 / 3) / (5 / 3))
    assert token_f1("", "") == 1.0 and token_f1("x", "") == 0.0
    assert lcs_length("ABCBDAB", "BDCABA") == 4
    # LCS of [return, the, parsed, value] vs [parse, the, value] -> [the, value]
    p, r = 2 / 4, 2 / 3
    assert rouge_l("Return the parsed value", "parse the value") == pytest.approx(
        2 * p * r / (p + r))
    pts = [(1, 5), (2, 2), (3, 3), (5, 1), (2, 2)]
    assert pareto_front(pts) == [True, True, False, True, True]


# --------------------------------------------------------------------------- multiple choice

def test_multiple_choice_picks_highest_loglikelihood(llama, tokenizer):
    from slmkit.eval.tasks import loglikelihoods, score_multiple_choice

    context = "def add(a, b):\n    return"
    choices = [" a + b", " a - b * 3", "\n\nclass X", " b"]
    lls = loglikelihoods(llama, tokenizer, [(context, c) for c in choices])
    # each equals an independent forward over [eos] + context + choice
    for c, ll in zip(choices, lls):
        ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
        whole = tokenizer(context + c, add_special_tokens=False)["input_ids"]
        x = torch.tensor([[tokenizer.eos_token_id] + whole])
        with torch.no_grad():
            lp = torch.log_softmax(llama(input_ids=x).logits[0, :-1], -1)
        want = sum(float(lp[i, x[0, i + 1]]) for i in range(len(ctx), len(whole)))
        assert ll == pytest.approx(want, rel=1e-4)
    best = max(range(4), key=lls.__getitem__)
    worst = min(range(4), key=lls.__getitem__)
    items = [{"type": "multiple_choice", "context": context, "choices": choices,
              "answer": best},
             {"type": "multiple_choice", "context": context, "choices": choices,
              "answer": worst}]
    res = score_multiple_choice(llama, tokenizer, items)
    assert [p["pick"] for p in res["predictions"]] == [best, best]
    assert res["acc"] == 0.5 and res["n"] == 2


def test_generation_scoring_uses_greedy_completion(llama, tokenizer):
    from slmkit.eval.generate import greedy_generate
    from slmkit.eval.tasks import score_generation

    prompt = "def add(a, b):\n    return"
    text = greedy_generate(llama, tokenizer, prompt, max_new_tokens=8, stop=["\n"])
    assert "\n" not in text
    items = [{"type": "generation", "prompt": prompt, "answer": text, "stop": ["\n"],
              "max_new_tokens": 8, "metric": "exact_match"},
             {"type": "generation", "prompt": prompt, "answer": text + " zzz", "stop": ["\n"],
              "max_new_tokens": 8, "metric": "exact_match"}]
    res = score_generation(llama, tokenizer, items)
    assert res["exact_match"] == 0.5 and res["score"] == 0.5
