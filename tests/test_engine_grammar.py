"""Constrained decoding in the engine: every output under a grammar parses and validates.

A tiny random Llama (fast path) and GPT-2 (generic path) over the real stdlib-trained
BPE tokenizer: random weights make the model's own choices arbitrary, so if a forbidden
token ever slipped through the mask, the outputs would not parse.
"""

from __future__ import annotations

import json
import re

import jsonschema
import numpy as np
import pytest
import torch

from slmkit.engine import Engine, SamplingParams
from slmkit.engine.grammar import Grammar, GrammarError, allowed, check
from tests.conftest import build_tiny_model

#: Bounded shapes, so that a random model always finishes well inside max_tokens.
SCHEMAS = [
    {"type": "object", "properties": {"ok": {"type": "boolean"},
                                      "n": {"type": "integer", "minimum": 0, "maximum": 99}},
     "required": ["ok", "n"], "additionalProperties": False},
    {"type": "object", "properties": {
        "unit": {"enum": ["C", "F", "K"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 2},
        "code": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{2}$"}},
     "required": ["unit", "tags", "code"], "additionalProperties": False},
    {"type": "array", "items": {"type": "integer", "minimum": -5, "maximum": 5},
     "minItems": 1, "maxItems": 3},
    {"anyOf": [{"type": "object", "properties": {"a": {"const": 1}}, "required": ["a"],
                "additionalProperties": False},
               {"type": "null"}]},
]


@pytest.fixture(scope="module")
def models(tokenizer):
    return {"llama": build_tiny_model("llama", tokenizer, seed=5),
            "gpt2": build_tiny_model("gpt2", tokenizer, seed=5)}


def _prompt(tokenizer):
    return tokenizer("Answer in JSON:", add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_outputs_parse_and_validate_greedy_and_sampled(models, tokenizer, arch):
    engine = Engine(models[arch], tokenizer, max_batch=4, max_seq_len=256, background=False)
    assert engine.fast == (arch == "llama")
    handles = []
    for k, schema in enumerate(SCHEMAS):
        for temperature in (0.0, 1.3):
            params = SamplingParams(max_tokens=120, temperature=temperature, seed=k,
                                    grammar=Grammar.json_schema(schema))
            handles.append((schema, engine.submit(_prompt(tokenizer), params)))
    for schema, handle in handles:  # 8 requests through 4 slots: joins and leaves
        c = handle.result()
        assert c.finish_reason == "stop", c.text
        jsonschema.validate(json.loads(c.text), schema)
    assert engine.grammars.hits >= len(SCHEMAS)  # each schema compiled once


def test_free_rows_in_a_constrained_batch_are_untouched(models, tokenizer):
    """A grammar masks only its own row: a free request decodes exactly as it does alone."""
    model, prompt = models["llama"], _prompt(tokenizer)
    free = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    alone = Engine(model, tokenizer, max_batch=2, background=False).generate(prompt, free)
    engine = Engine(model, tokenizer, max_batch=2, background=False)
    bound = engine.submit(prompt, SamplingParams(max_tokens=60, temperature=0,
                                                 grammar=Grammar.json_schema(SCHEMAS[0])))
    loose = engine.submit(prompt, free)
    assert loose.result().token_ids == alone.token_ids
    jsonschema.validate(json.loads(bound.result().text), SCHEMAS[0])
    assert alone.text and not alone.text.lstrip().startswith("{")


def test_regex_and_lark_grammars(models, tokenizer):
    engine = Engine(models["llama"], tokenizer, max_batch=2, background=False)
    c = engine.generate(_prompt(tokenizer), SamplingParams(
        max_tokens=30, temperature=1.0, seed=1, grammar=Grammar.regex(r"(yes|no) [0-9]{3}")))
    assert re.fullmatch(r"(yes|no) [0-9]{3}", c.text), c.text
    lark = 'start: "name=" NAME\nNAME: /[a-z]{2,6}/'
    c = engine.generate(_prompt(tokenizer), SamplingParams(
        max_tokens=30, temperature=1.0, seed=2, grammar=Grammar.lark(lark)))
    assert re.fullmatch(r"name=[a-z]{2,6}", c.text), c.text


def test_logprobs_stay_those_of_the_raw_model(models, tokenizer):
    """Reported logprobs come from the unmasked logits (comparable with free decoding)."""
    model, prompt = models["llama"], _prompt(tokenizer)
    engine = Engine(model, tokenizer, max_batch=1, background=False)
    c = engine.generate(prompt, SamplingParams(
        max_tokens=8, temperature=0, logprobs=True, top_logprobs=3,
        grammar=Grammar.regex(r"[0-9]+")))
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0, -1].float()
    raw = torch.log_softmax(logits, -1)
    assert c.logprobs[0] == pytest.approx(float(raw[c.token_ids[0]]), abs=1e-4)
    assert [t for t, _ in c.top_logprobs[0]] == raw.topk(3).indices.tolist()
    assert c.text and c.text.isdigit()


def test_unenforceable_schemas_are_refused_naming_the_keyword(models, tokenizer):
    for schema, word in [({"type": "array", "uniqueItems": True}, "uniqueItems"),
                         ({"not": {"type": "string"}}, "not"),
                         ({"type": "string", "pattern": "(?=a)b"}, "look-around"),
                         ({"$ref": "#/$defs/missing"}, "/$defs/missing")]:
        with pytest.raises(GrammarError, match=re.escape(word)):
            check(Grammar.json_schema(schema))
    with pytest.raises(GrammarError, match="not valid JSON"):
        Grammar.json_schema("{oops")
    with pytest.raises(GrammarError, match="must be a JSON object"):
        Grammar.json_schema("[1]")
    engine = Engine(models["llama"], tokenizer, max_batch=1, background=False)
    with pytest.raises(GrammarError, match="uniqueItems"):
        engine.submit(_prompt(tokenizer), SamplingParams(
            grammar=Grammar.json_schema({"type": "array", "uniqueItems": True})))
    assert engine.num_running == 0


def test_bitmask_unpacking_matches_bit_order():
    words = torch.tensor([[0b101, -2 ** 31]], dtype=torch.int32)  # bits 0, 2 and 63
    ok = allowed(words, 64)
    assert ok[0].nonzero()[0].tolist() == [0, 2, 63]


@pytest.mark.parametrize("native_on", [True, False])
def test_mask_rows_forbids_exactly_the_clear_bits(native_on, monkeypatch):
    """The native loop over mask words and the numpy fallback set -inf on the same cells:
    only the listed rows, only clear bits, never past the logits' width (the mask's last
    word runs past it), and all-allowed words untouched."""
    from slmkit.engine import native
    from slmkit.engine.grammar import mask_rows_

    if native_on and native.load_library() is None:
        pytest.skip("native library unavailable")
    monkeypatch.setitem(native._ENABLED, "on", native_on)
    g = torch.Generator().manual_seed(0)
    V, words = 1000, 32                       # 32 words = 1024 bits > V
    bitmask = torch.randint(-2 ** 31, 2 ** 31 - 1, (3, words), dtype=torch.int32, generator=g)
    bitmask[1, :10] = -1                      # whole words allowed
    bitmask[2] = 0                            # nothing allowed
    logits = torch.randn(5, V, generator=g)
    want = logits.clone()
    ok = allowed(bitmask, V)
    for j, i in enumerate([4, 0, 2]):
        want[i][~torch.from_numpy(ok[j])] = float("-inf")
    mask_rows_(logits, [4, 0, 2], bitmask)
    assert torch.equal(logits, want)
    assert torch.isinf(logits[2]).all() and not torch.isinf(logits[[1, 3]]).any()


def test_slm_generate_json_schema(llama_dir, tmp_path, capsys):
    from slmkit.cli import main

    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(SCHEMAS[0]))
    with pytest.raises(SystemExit) as exit_:
        main(["generate", str(llama_dir), "Answer:", "--json-schema", str(schema), "-t", "0",
              "-n", "60", "--threads", "1"])
    assert exit_.value.code == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("Answer:")
    jsonschema.validate(json.loads(first[len("Answer:"):]), SCHEMAS[0])
    schema.write_text('{"type": "array", "uniqueItems": true}')
    with pytest.raises(SystemExit) as exit_:
        main(["generate", str(llama_dir), "x", "--json-schema", str(schema)])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err
    assert f"--json-schema {schema}" in err and "uniqueItems" in err


def test_request_stop_tokens_are_allowed_once_the_grammar_accepts(models, tokenizer):
    """A chat model may end its turn with a token other than the tokenizer's EOS."""
    from slmkit.engine.grammar import allowed

    engine = Engine(models["llama"], tokenizer, max_batch=1, background=False)
    stop = tokenizer("x", add_special_tokens=False)["input_ids"][0]  # not a digit, not EOS
    grammar = Grammar.regex(r"[0-9]{1,3}")
    state = engine.grammars.state(grammar)
    bitmask = torch.empty(1, engine.grammars.words, dtype=torch.int32)
    state.fill(bitmask)
    state.allow_stops(bitmask, 0, [stop])
    assert not allowed(bitmask, engine.vocab_size)[0, stop]  # nothing matched yet
    handle = engine.submit(_prompt(tokenizer), SamplingParams(
        max_tokens=3, temperature=0, grammar=grammar, stop_token_ids=[stop]))
    engine.step()  # prefill and the first token: one digit, so the grammar accepts
    (request,) = engine._active
    logits = torch.zeros(1, engine.vocab_size)
    engine._constrain([request], logits)
    assert logits[0, stop] == 0 and logits[0, tokenizer.eos_token_id] == 0
    assert torch.isinf(logits[0]).sum() > engine.vocab_size // 2  # the rest stays masked
    assert handle.result().text.isdigit()


#: Unbounded strings, arrays and nesting: a random model rambles in them until the budget.
OPEN_SCHEMAS = [
    {"type": "object", "properties": {
        "story": {"type": "string"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "meta": {"type": "object", "properties": {"author": {"type": "string"},
                                                  "year": {"type": "integer"}},
                 "required": ["author", "year"]}},
     "required": ["story", "tags", "meta"]},
    {"type": "array", "items": {"type": "array", "items": {"type": "string"}}},
    {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]+$"},
                                      "n": {"type": "number"}},
     "required": ["code", "n"], "additionalProperties": False},
]


def test_output_parses_when_max_tokens_runs_out(models, tokenizer):
    """Tight budgets: the closing plan takes over before the last token, so every output
    still parses and validates (finish reason 'length' when the model had not finished).
    The guard sits where every path records a token, so one path is tested here."""
    engine = Engine(models["llama"], tokenizer, max_batch=4, max_seq_len=256, background=False)
    handles, lengths = [], set()
    for k, schema in enumerate(OPEN_SCHEMAS):
        grammar = Grammar.json_schema(schema)
        engine.grammars.state(grammar, budget=200)
        need = engine.grammars._need[grammar]  # the shortest output, in tokens
        assert need is not None and need < 60
        for max_tokens in (need, need + 1, need + 15):
            for temperature in (0.0, 1.5):
                params = SamplingParams(max_tokens=max_tokens, temperature=temperature,
                                        seed=k, grammar=grammar, ignore_eos=True)
                handles.append((schema, max_tokens, engine.submit(_prompt(tokenizer), params)))
        with pytest.raises(GrammarError, match="below the shortest output"):
            engine.submit(_prompt(tokenizer), SamplingParams(max_tokens=need - 1,
                                                             grammar=grammar))
    for schema, max_tokens, handle in handles:
        c = handle.result()
        assert c.finish_reason in ("stop", "length") and len(c.token_ids) <= max_tokens
        jsonschema.validate(json.loads(c.text), schema)
        lengths.add(c.finish_reason)
    assert "length" in lengths  # the budget did run out, on some request


@pytest.mark.real
@pytest.mark.slow
def test_builtin_model_output_parses_at_small_max_tokens():
    """SmolLM2-135M asked for a long story inside JSON: cut at 30 tokens, it still parses."""
    from slmkit import load_model

    model, tok = load_model("builtin:smollm2-135m")
    engine = Engine(model, tok, max_batch=2, background=False)
    schema = OPEN_SCHEMAS[0]
    ids = tok.apply_chat_template([{"role": "user", "content": "Write a very long story "
                                    "about a dragon, as JSON with story, tags and meta."}],
                                  add_generation_prompt=True, tokenize=False)
    prompt = tok(ids, add_special_tokens=False)["input_ids"]
    reasons = set()
    for max_tokens, temperature in ((30, 0.0), (45, 1.0), (60, 0.7)):
        c = engine.submit(prompt, SamplingParams(max_tokens=max_tokens, temperature=temperature,
                                                 seed=3, grammar=Grammar.json_schema(schema))
                          ).result()
        jsonschema.validate(json.loads(c.text), schema)
        assert len(c.token_ids) <= max_tokens
        reasons.add(c.finish_reason)


def test_closing_plan_ends_unbounded_numbers_and_patterns(models, tokenizer):
    """The closing policy must not write digits, or the longest token a pattern's ``+``
    allows, for ever: its plan from the start state is a short valid answer."""
    engine = Engine(models["llama"], tokenizer, max_batch=1, background=False)
    for schema in ({"type": "object", "properties": {"id": {"type": "integer"},
                                                     "roles": {"type": "array"}},
                    "required": ["id", "roles"]},
                   {"type": "object", "properties": {"ratio": {
                       "type": "string", "pattern": "^[a-z]+-[0-9]{1,3}$"}},
                    "required": ["ratio"]},
                   {"type": "object", "properties": {"email": {"type": "string",
                                                               "format": "email"}},
                    "required": ["email"]}):
        grammar = Grammar.json_schema(schema)
        plan = engine.grammars.closing_plan(engine.grammars._prototype(grammar))
        assert plan is not None and len(plan) < 80
        jsonschema.validate(json.loads(tokenizer.decode(plan)), schema)


def test_first_allowed_is_the_argmax_of_scores_over_the_mask():
    """A closing-plan step's token search (the head of the score order, else only the
    mask's nonzero words, else one full pass) picks what ``np.where(mask, scores,
    min).argmax()`` picks: ties go to the lower id, ids past the vocabulary never count,
    and None when nothing is allowed."""
    from slmkit.engine.grammar import _first_allowed

    rng = np.random.default_rng(0)
    n = 4096 + 17  # not a multiple of 32: the last mask word has bits past the vocabulary
    size = (n + 31) // 32 * 32
    for trial in range(300):
        scores = rng.integers(-40, 40, n).astype(np.int64)  # many ties
        order = np.argsort(-scores, kind="stable").astype(np.int32)
        bits = rng.random(size) < rng.choice([0.0, 1e-4, 2e-3, 0.03, 0.5, 1.0])
        if trial % 50 == 0:  # only ids past the vocabulary allowed
            bits[:] = False
            bits[n:] = True
        words = np.packbits(bits, bitorder="little").view(np.uint32)
        ok = bits[:n]
        want = int(np.where(ok, scores, np.iinfo(np.int64).min).argmax()) if ok.any() else None
        for head, few in ((512, 64), (8, 2), (1, 0)):  # each path of the search
            assert _first_allowed(words, order, scores, head, few) == want, (trial, head)


@pytest.mark.parametrize("head,few", [(512, 64), (4, 1), (1, 0)])
def test_closing_plan_takes_the_best_allowed_token_at_every_step(models, tokenizer, monkeypatch,
                                                                  head, few):
    """The plan is the policy's: from states a random walk reaches, every step of it is
    the allowed token of the best score for the JSON lexical state, and it ends accepting
    (each path of the token search; the tiny vocabulary fits in one head of 512)."""
    import functools

    from slmkit.engine import grammar as g

    monkeypatch.setattr(g, "_first_allowed", functools.partial(g._first_allowed, head=head,
                                                                few=few))
    engine = Engine(models["llama"], tokenizer, max_batch=1, background=False)
    compiler = engine.grammars
    scores, ends = compiler._lexer()
    vocab = compiler.vocab_size
    bitmask = torch.empty(1, compiler.words, dtype=torch.int32)
    rng = np.random.default_rng(1)
    checked = 0
    for schema in SCHEMAS + OPEN_SCHEMAS:
        state = compiler.state(Grammar.json_schema(schema))
        for _ in range(8):
            plan = compiler._plan_with(state.matcher, state.lex, 256, short=False)
            if plan is not None:
                m, lex = state.matcher.deep_copy(), state.lex
                for token in plan:
                    m.unsafe_compute_mask_ptr(bitmask.data_ptr(), compiler.words * 4)
                    ok = allowed(bitmask, vocab)[0]
                    assert token == int(np.where(ok, scores[lex][:vocab],
                                                 np.iinfo(np.int64).min).argmax())
                    assert m.consume_token(token)
                    lex = int(ends[lex, token])
                assert m.is_accepting()
                checked += 1
            state.fill(bitmask)
            choices = np.flatnonzero(allowed(bitmask, vocab)[0])
            if state.matcher.is_accepting() or not len(choices):
                break
            assert state.advance(int(rng.choice(choices)))
    assert checked >= 20


#: Where one token can grow the closing plan a lot (an object of required keys in an
#: array) or the long-token policy never closes (an unbounded lowercase pattern).
GROWING_SCHEMAS = [
    {"type": "array", "items": {"type": "object", "properties": {
        "a": {"type": "string"}, "b": {"type": "integer"},
        "c": {"type": "array", "items": {"type": "string"}}},
        "required": ["a", "b", "c"], "additionalProperties": False}},
    {"type": "object", "properties": {"w": {"type": "array", "items": {
        "type": "string", "pattern": "^[a-z]+$"}}, "id": {"type": "string"}},
     "required": ["w", "id"]},
]


def test_output_parses_at_every_budget_near_the_shortest(models, tokenizer):
    """The guarantee at many budgets (the shortest output up to 20 more), sampled hot so
    that the model keeps leaving the held plan: every output parses and validates within
    max_tokens, and the budget does close some of them. (Before every token was checked,
    an array of objects failed here: its shortest output ``[]`` set a 20-token margin, and
    the model opened ``[{`` at 22 tokens left, unchecked.)"""
    engine = Engine(models["llama"], tokenizer, max_batch=8, max_seq_len=256, background=False)
    handles, reasons = [], set()
    for k, schema in enumerate(OPEN_SCHEMAS + GROWING_SCHEMAS):
        grammar = Grammar.json_schema(schema)
        engine.grammars.state(grammar, budget=200)
        need = engine.grammars._need[grammar]
        for extra in range(0, 21, 4):
            for temperature in (1.0, 2.0):
                params = SamplingParams(max_tokens=need + extra, temperature=temperature,
                                        seed=100 * k + extra, grammar=grammar, ignore_eos=True)
                handles.append((schema, need + extra, engine.submit(_prompt(tokenizer), params)))
    for schema, max_tokens, handle in handles:
        c = handle.result()
        assert c.finish_reason in ("stop", "length") and len(c.token_ids) <= max_tokens
        jsonschema.validate(json.loads(c.text), schema)
        reasons.add(c.finish_reason)
    assert "length" in reasons
