"""Speculative decoding: greedy output unchanged, sampled output distributed as the target's,
drafts (prompt lookup, a draft model with the same tokenizer), pay-off switch, CLI flag."""

from __future__ import annotations

import copy
import time

import pytest
import torch

from slmkit.engine import Engine, SamplingParams
from slmkit.engine.speculative import (LookupThenModel, ModelDrafter, NgramDrafter,
                                       accept_sampled)
from slmkit.errors import ConfigError
from tests.conftest import build_tiny_model

#: chi-square critical values at p = 0.001 by degrees of freedom (a correct sampler fails
#: one run in a thousand; a wrong one, e.g. always taking the draft, fails every time)
CHI2_999 = {3: 16.27, 5: 20.52, 7: 24.32}


def _chi2(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("one_hot", [False, True])
def test_rejection_rule_follows_target(one_hot):
    """Tokens from draft + rejection rule are distributed as p, whatever q is."""
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([0.05, 0.30, 0.10, 0.25, 0.20, 0.10])
    q = torch.tensor([0.40, 0.05, 0.25, 0.05, 0.05, 0.20])   # a poor draft
    counts = torch.zeros(6)
    n, accepted = 20000, 0
    for _ in range(n):
        if one_hot:
            d = 2                                           # a deterministic guess
            ok, t = accept_sampled(p, None, d, g)
        else:
            d = int(torch.multinomial(q, 1, generator=g))
            ok, t = accept_sampled(p, q, d, g)
        counts[t] += 1
        accepted += ok
    assert _chi2(counts, p) < CHI2_999[5]
    # acceptance is sum(min(p, q)) for a sampled draft, p(d) for a fixed one
    expect = float(p[2]) if one_hot else float(torch.minimum(p, q).sum())
    assert abs(accepted / n - expect) < 0.02
    # the test has power: taking every draft as is would fail it
    if not one_hot:
        wrong = torch.bincount(torch.multinomial(q, n, replacement=True, generator=g),
                               minlength=6).float()
        assert _chi2(wrong, p) > CHI2_999[5]


@pytest.fixture(scope="module")
def target(tokenizer):
    return build_tiny_model("llama", tokenizer, seed=3)


@pytest.fixture(scope="module")
def other(target):
    """A draft that mostly agrees with the target: its weights plus noise."""
    draft = copy.deepcopy(target)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2 * p.std())
    return draft


def _copy_prompt(tokenizer, n=60):
    text = "def parse(self, data):\n    return json.loads(data) # parse it\n" * 12
    return tokenizer(text, add_special_tokens=False)["input_ids"][:n]


def _engine(model, tokenizer, draft=None, **kw):
    e = Engine(model, tokenizer, max_batch=3, max_seq_len=160, background=False, draft=draft,
               threads=1)   # one thread: tiny models on a busy machine
    if e.spec is not None:
        e.spec.min_steps = 10 ** 9     # keep drafting on: these tests check correctness
        for key, value in kw.items():
            setattr(e.spec, key, value)
    return e


def _int4(model, tokenizer):
    """An int4 RTN copy (g32): the native step's integer kernels verify the drafts."""
    from slmkit.compress.quantize import make_config, quantize_model

    q = copy.deepcopy(model)
    quantize_model(q, tokenizer, make_config(method="rtn", bits=4, group_size=32))
    return q


@pytest.mark.parametrize("arch", ["llama", "llama-int4", "gpt2"])
@pytest.mark.parametrize("draft", ["ngram", "model", "model+lookup"])
def test_greedy_identical_with_drafts_batched(tokenizer, target, other, arch, draft):
    """Three concurrent requests (different lengths, one with a repetition penalty and
    logprobs) give the same tokens and logprobs with drafts as without."""
    model = {"llama": lambda: target, "llama-int4": lambda: _int4(target, tokenizer),
             "gpt2": lambda: build_tiny_model("gpt2", tokenizer, seed=3)}[arch]()
    prompts = [_copy_prompt(tokenizer, 60), _copy_prompt(tokenizer, 25)[3:],
               tokenizer("class Foo:\n    def bar(self):", add_special_tokens=False)["input_ids"]]
    params = [SamplingParams(max_tokens=40, temperature=0, ignore_eos=True),
              SamplingParams(max_tokens=33, temperature=0, ignore_eos=True,
                             repetition_penalty=1.3),
              SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, logprobs=True)]
    base = _engine(model, tokenizer)
    expected = [base.generate(p, sp) for p, sp in zip(prompts, params)]
    drafter = "ngram" if draft == "ngram" else ModelDrafter(
        model if arch == "gpt2" else other, 3, 160, base.vocab_size)
    if draft == "model+lookup":
        drafter = LookupThenModel(drafter)
    spec = _engine(model, tokenizer, drafter)
    handles = [spec.submit(p, sp) for p, sp in zip(prompts, params)]
    got = [h.result() for h in handles]
    for g, x in zip(got, expected):
        assert g.token_ids == x.token_ids
        assert g.finish_reason == x.finish_reason
    assert got[2].logprobs == pytest.approx(expected[2].logprobs, abs=1e-5)
    assert sum(g.speculative["drafted"] for g in got) > 0
    assert any(g.speculative["accepted"] > 0 for g in got)
    if draft == "model+lookup":        # the copying prompts draft by lookup, the last by model
        used = [g.speculative["sources"] for g in got]
        assert used[0]["lookup"] != "0/0" and used[2]["model"] != "0/0", used


@pytest.mark.parametrize("arch", ["qwen3", "granite", "gemma3_text"])
def test_greedy_identical_with_drafts_other_families(tokenizer, arch):
    """The family runner verifies drafts on the native step where the family has one (q/k
    norms, Granite's multipliers, Gemma's embedding scale): the same tokens as without."""
    model = build_tiny_model(arch, tokenizer, seed=3)
    prompts = [_copy_prompt(tokenizer, 40), _copy_prompt(tokenizer, 25)[5:]]
    sp = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    base = _engine(model, tokenizer)
    expected = [base.generate(p, sp).token_ids for p in prompts]
    spec = _engine(model, tokenizer, "ngram")
    assert type(spec.runner).__name__ == "FamilyRunner"
    native, calls = spec.runner.native, []
    if arch != "gemma3_text":
        assert native is not None, spec.runner.native_reason
    if native is not None:       # a spy on the real call: drafts are verified natively
        native.verify = lambda *a, real=native.verify: calls.append(1) or real(*a)
    got = [h.result() for h in [spec.submit(p, sp) for p in prompts]]
    assert [g.token_ids for g in got] == expected
    assert bool(calls) == (native is not None)
    assert sum(g.speculative["accepted"] for g in got) > 0


def test_ngram_copies_prompt(tokenizer):
    drafter = NgramDrafter()

    class R:  # the two fields the drafter reads
        prompt = [5, 6, 7, 8, 9, 10, 11, 5, 6]

        class completion:
            token_ids = [7]

    (drafts, q), = drafter.propose([R], [4])
    assert drafts == [8, 9, 10, 11] and q is None


def test_sampled_output_follows_target(tokenizer, target, other):
    """The first three tokens sampled with a (different) draft model have the target's own
    joint distribution: an exact computation over top-2 sampling's 8 outcomes."""
    prompt = _copy_prompt(tokenizer, 20)
    sp = dict(max_tokens=3, temperature=1.5, top_k=2, ignore_eos=True)
    with torch.no_grad():   # exact probabilities of every 3-token outcome under the target
        def dist(ids):
            logits = target(torch.tensor([ids])).logits[0, -1] / 1.5
            top = torch.topk(logits, 2)
            return top.indices.tolist(), torch.softmax(top.values, -1).tolist()
        exact = {}
        t1s, p1 = dist(prompt)
        for a, pa in zip(t1s, p1):
            t2s, p2 = dist(prompt + [a])
            for b, pb in zip(t2s, p2):
                t3s, p3 = dist(prompt + [a, b])
                for c, pc in zip(t3s, p3):
                    exact[(a, b, c)] = pa * pb * pc
    spec = _engine(target, tokenizer, ModelDrafter(other, 3, 160, len(tokenizer)),
                   probe_steps=0, k0=2)
    counts = dict.fromkeys(exact, 0)
    drafted = accepted = 0
    for seed in range(900):
        c = spec.generate(prompt, SamplingParams(seed=seed, **sp))
        counts[tuple(c.token_ids)] += 1
        drafted += c.speculative["drafted"]
        accepted += c.speculative["accepted"]
    assert drafted >= 900 and 0 < accepted < drafted   # drafts were made and some rejected
    keys = sorted(exact)
    probs = torch.tensor([exact[k] for k in keys])
    observed = torch.tensor([counts[k] for k in keys], dtype=torch.float)
    assert _chi2(observed, probs) < CHI2_999[7]


def test_model_drafts_start_short(tokenizer, target, other):
    """Prompt lookup starts at 4 drafts (free), a draft model at 2 (each costs its step), so a
    model draft that always fails wastes 2 + 1 + 1 + 1 drafts before the pay-off check."""
    assert _engine(target, tokenizer, "ngram").spec.k0 == 4

    class Recording(ModelDrafter):
        def propose(self, reqs, ks):
            asked.append(list(ks))
            return super().propose(reqs, ks)

    asked = []
    e = _engine(target, tokenizer, Recording(other, 3, 160, len(tokenizer)), probe_steps=0)
    e.generate(_copy_prompt(tokenizer, 30), SamplingParams(max_tokens=8, temperature=0,
                                                           ignore_eos=True))
    assert asked[0] == [2]


def test_draft_model_needs_the_same_tokenizer(tmp_path, tokenizer, target, other):
    from slmkit.models import save_model

    changed = copy.deepcopy(tokenizer)
    changed.add_tokens(["<not-in-the-target>"])
    d = save_model(other, changed, tmp_path / "draft", step="init", params={})
    with pytest.raises(ConfigError, match="different tokenizer"):
        Engine(target, tokenizer, max_batch=1, max_seq_len=64, background=False, draft=str(d),
               threads=1)
    with pytest.raises(ConfigError, match="needs the target's tokenizer"):
        Engine(target, None, max_batch=1, max_seq_len=64, background=False, draft=str(d),
               threads=1)


def test_drafting_turns_itself_off_when_it_does_not_pay(tokenizer, target):
    """A draft that is slow and always wrong is switched off; the output is unchanged."""

    class SlowWrong(NgramDrafter):
        name = "slow-wrong"

        def propose(self, reqs, ks):
            time.sleep(0.02)
            return [([(r.completion.token_ids[-1] + 1) % 500] * k, None)
                    for r, k in zip(reqs, ks)]

    prompt = _copy_prompt(tokenizer, 30)
    sp = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    expected = _engine(target, tokenizer).generate(prompt, sp).token_ids
    e = Engine(target, tokenizer, max_batch=1, max_seq_len=160, background=False,
               draft=SlowWrong(), threads=1)
    c = e.generate(prompt, sp)
    assert c.token_ids == expected
    assert c.speculative["off"] and "did not pay" in c.speculative["off"]
    assert c.speculative["spec_steps"] == e.spec.min_steps   # off right at the first check


def test_grammar_requests_decode_without_drafts(tokenizer, target):
    from slmkit.engine.grammar import Grammar

    e = _engine(target, tokenizer, "ngram")
    c = e.generate(_copy_prompt(tokenizer, 20),
                   SamplingParams(max_tokens=8, temperature=0, grammar=Grammar.regex("[ab]+")))
    assert c.speculative["drafted"] == 0 and "grammar" in c.speculative["off"]


def test_generic_path_refuses_sliding_window(tokenizer):
    """The generic path cannot drop rejected drafts from a sliding-window cache: refused."""
    model = build_tiny_model("mistral", tokenizer)
    with pytest.raises(ConfigError, match="sliding-window"):
        Engine(model, tokenizer, max_batch=1, max_seq_len=64, background=False, draft="ngram",
               threads=1, fast=False)


@pytest.mark.slow
def test_cli_generate_with_ngram_draft(cli, llama_dir):
    base = cli("generate", llama_dir, "def parse(data): return parse(data) def parse(",
               "-n", "24", "-t", "0", "--ignore-eos")
    res = cli("generate", llama_dir, "def parse(data): return parse(data) def parse(",
              "-n", "24", "-t", "0", "--ignore-eos", "--draft", "ngram")
    assert res.returncode == 0, res.stderr
    assert "drafts accepted" in res.stdout
    text = res.stdout.split("slm generate")[0]
    assert text == base.stdout.split("slm generate")[0]
    bad = cli("generate", llama_dir, "x", "--draft", str(llama_dir / "nope"))
    assert bad.returncode == 2


@pytest.mark.slow
def test_serve_with_ngram_draft_concurrent_requests(tokenizer):
    """`slm serve --draft ngram`: concurrent greedy completions over HTTP equal the engine's
    output without drafts."""
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    from tests.test_serve_api import reference_text, start_server

    model = build_tiny_model("llama", tokenizer, seed=3, max_position_embeddings=1024)
    prompts = ["def parse(self, data):\n    return json.loads(data)\ndef parse(self, data):",
               "class Foo:\n    def bar(self):\n        return 1\nclass Foo:\n    def bar",
               "import os\nimport sys\nimport os\nimport"]
    live = start_server(model, tokenizer, draft="ngram", max_concurrency=3)
    try:
        def ask(prompt):
            r = httpx.post(live.url + "/v1/completions", timeout=60, json={
                "model": "tiny", "prompt": prompt, "max_tokens": 24, "temperature": 0})
            return r.json()["choices"][0]["text"]

        with ThreadPoolExecutor(3) as pool:
            got = list(pool.map(ask, prompts))
        assert live.service.engine.engine.spec is not None
    finally:
        live.stop()
    for prompt, text in zip(prompts, got):
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        assert text == reference_text(model, tokenizer, ids, 24, temperature=0).text
