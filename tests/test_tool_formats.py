"""The model's own tool-call format: found in the chat template, used to prompt, constrain,
read calls back and fine-tune, through a real server on 127.0.0.1.

The tokenizers carry Qwen2.5-style and Llama 3.2-style templates (``tests/tool_templates.py``
says how faithful they are); the model is a tiny random Llama, so every answer that parses
does so because of the grammar.
"""

from __future__ import annotations

import json

import jsonschema
import pytest

from slmkit.engine.tool_formats import GENERIC, HERMES, LLAMA3, render_chat, tool_format
from slmkit.engine.tools import ToolFormatError, parse_tools
from tests.conftest import build_tiny_model
from tests.test_serve_api import NAME, start_server
from tests.tool_templates import with_template

openai = pytest.importorskip("openai")

from tests.test_serve_tools import ADD, ASK, PARAMS, TOOLS  # noqa: E402  (the same tools)
HISTORY = ASK + [
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Oslo", "unit": "C"}'}}]},
    {"role": "tool", "tool_call_id": "c1", "content": "3 degrees"}]


@pytest.fixture(scope="module")
def qwen(tokenizer):
    return with_template(tokenizer, "qwen2.5")


@pytest.fixture(scope="module")
def llama(tokenizer):
    return with_template(tokenizer, "llama3.2")


def assert_valid(calls, allowed=("get_weather", "add")):
    assert calls and len({c.id for c in calls}) == len(calls)
    for call in calls:
        assert call.type == "function" and call.function.name in allowed
        jsonschema.validate(json.loads(call.function.arguments), PARAMS[call.function.name])


# --------------------------------------------------------------------------- detection

def test_format_is_read_from_what_the_template_renders(tokenizer, qwen, llama):
    assert tool_format(tokenizer) == GENERIC            # ChatML without tools (as SmolLM2)
    fq, fl = tool_format(qwen), tool_format(llama)
    assert (fq.name, fq.parallel, fq.args_key) == (HERMES, True, "arguments")
    assert [fq.open_id, fq.close_id] == qwen.convert_tokens_to_ids(["<tool_call>",
                                                                    "</tool_call>"])
    assert (fl.name, fl.parallel, fl.args_key) == (LLAMA3, False, "parameters")
    # a template that knows tools but writes calls its own way, and one that raises on
    # them, get the generic format
    other = with_template(tokenizer, "qwen2.5")
    other.chat_template = qwen.chat_template.replace("<tool_call>", "[CALL]")
    assert tool_format(other) == GENERIC
    other.chat_template = "{{ raise_exception('no') if tools else '' }}" + \
        tokenizer.chat_template
    assert tool_format(other) == GENERIC


def test_history_renders_in_the_templates_own_syntax(qwen, llama):
    tools = parse_tools(TOOLS)
    conv, kwargs = render_chat(qwen, HISTORY, tools)
    text = qwen.apply_chat_template(conv, add_generation_prompt=True, tokenize=False, **kwargs)
    assert '<tools>\n{"type": "function", "function": {"name": "get_weather"' in text
    assert '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": ' \
           '{"city": "Oslo", "unit": "C"}}\n</tool_call><|im_end|>' in text
    assert "<tool_response>\n3 degrees\n</tool_response>" in text
    conv, kwargs = render_chat(llama, HISTORY, tools)
    text = llama.apply_chat_template(conv, add_generation_prompt=True, tokenize=False, **kwargs)
    assert "Environment: ipython" in text and '"name": "add"' in text
    assert '{"name": "get_weather", "parameters": {"city": "Oslo", "unit": "C"}}<|eot_id|>' \
        in text and "ipython<|end_header_id|>\n\n3 degrees" in text
    two = [ASK[0], {**HISTORY[1], "tool_calls": HISTORY[1]["tool_calls"] * 2}]
    with pytest.raises(ToolFormatError, match="one call per assistant turn"):
        render_chat(llama, two, tools)


def test_hermes_blocks_stream_and_parallel_needs_the_flag(qwen):
    """Two <tool_call> blocks: read back call by call from any split of the text, and
    allowed by the grammar only when parallel calls are."""
    from slmkit.engine.grammar import GrammarCompiler
    from slmkit.serve.structured import ToolCallReader

    fmt = tool_format(qwen)
    text = '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>\n' \
           '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": ' \
           '"C"}}\n</tool_call>'
    for size in (1, 5, len(text)):
        reader = ToolCallReader(fmt)
        deltas = []
        for i in range(0, len(text), size):
            content, calls = reader.feed(text[i:i + size])
            assert content == ""
            deltas += calls
        assert reader.complete and [d["function"].get("name") for d in deltas if "id" in d] \
            == ["add", "get_weather"]
        assert [(c["function"]["name"], json.loads(c["function"]["arguments"]))
                for c in reader.tool_calls()] == [("add", {"a": 1, "b": 2}),
                                                   ("get_weather", {"city": "Oslo", "unit": "C"})]
    compiler = GrammarCompiler(qwen, len(qwen))
    ids = qwen(text, add_special_tokens=False)["input_ids"]
    for parallel in (True, False):
        m = compiler.state(fmt.grammar(parse_tools(TOOLS), True, parallel)).matcher
        assert (m.try_consume_tokens(ids) == len(ids) and m.is_accepting()) is parallel


def test_parse_reads_each_format():
    from slmkit.engine.tool_formats import ToolFormat

    hermes = ToolFormat(HERMES)
    text = '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>\n' \
           '<tool_call>\n{"name": "add", "arguments": {"a": 3, "b": 4}}\n</tool_call>'
    assert hermes.parse(text) == [("add", {"a": 1, "b": 2}), ("add", {"a": 3, "b": 4})]
    assert hermes.parse("Hello.") is None and hermes.parse(text[:-14]) == [
        ("add", {"a": 1, "b": 2})]  # a block cut before its close tag is not read
    llama = ToolFormat(LLAMA3, "parameters", False)
    assert llama.parse('{"name": "add", "parameters": {"a": 1, "b": 2}}') == [
        ("add", {"a": 1, "b": 2})]
    assert llama.parse('{"name": "add", "parameters": {"a": 1') is None
    assert GENERIC.parse('{"tool_calls": [{"name": "add", "arguments": {}}]}') == \
        [("add", {})]


# --------------------------------------------------------------------------- the server

@pytest.fixture(scope="module")
def qwen_server(qwen):
    server = start_server(build_tiny_model("llama", qwen, max_position_embeddings=1024), qwen)
    yield openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    server.stop()


@pytest.fixture(scope="module")
def llama_server(llama):
    server = start_server(build_tiny_model("llama", llama, max_position_embeddings=1024), llama)
    yield openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    server.stop()


def test_qwen_format_required_named_auto_and_parallel(qwen_server):
    c = qwen_server
    counts = set()
    for seed in range(4):
        r = c.chat.completions.create(model=NAME, messages=HISTORY, tools=TOOLS, seed=seed,
                                      tool_choice="required", temperature=1.0, max_tokens=160)
        assert r.choices[0].finish_reason == "tool_calls"
        assert r.choices[0].message.content is None
        assert_valid(r.choices[0].message.tool_calls)
        counts.add(len(r.choices[0].message.tool_calls))
    assert counts  # how many calls a random model makes is its business (here: 1 and 2)
    r = c.chat.completions.create(model=NAME, messages=ASK, tools=TOOLS, temperature=1.0,
                                  seed=0, max_tokens=80, tool_choice={
                                      "type": "function", "function": {"name": "add"}})
    assert r.choices[0].finish_reason == "tool_calls"
    assert_valid(r.choices[0].message.tool_calls, allowed=("add",))
    assert len(r.choices[0].message.tool_calls) == 1     # a named function: one call
    for seed in range(4):
        r = c.chat.completions.create(model=NAME, messages=ASK, tools=TOOLS, seed=seed,
                                      temperature=1.0, max_tokens=80, parallel_tool_calls=False)
        m = r.choices[0].message
        if m.tool_calls:
            assert len(m.tool_calls) == 1 and r.choices[0].finish_reason == "tool_calls"
            assert_valid(m.tool_calls)
        else:
            assert m.content and m.content[0] not in "<{" and not m.content[0].isspace()
    r = c.chat.completions.create(model=NAME, messages=HISTORY, tools=TOOLS, seed=0,
                                  tool_choice="none", temperature=1.0, max_tokens=8)
    assert r.choices[0].message.tool_calls is None and r.choices[0].message.content[0] not in "<{"


def test_qwen_format_streams_the_same_calls(qwen_server):
    kwargs = dict(model=NAME, messages=HISTORY, tools=TOOLS, tool_choice="required",
                  temperature=1.0, seed=1, max_tokens=160)
    whole = qwen_server.chat.completions.create(**kwargs).choices[0].message.tool_calls
    calls, finish = {}, None
    for chunk in qwen_server.chat.completions.create(stream=True, **kwargs):
        for d in chunk.choices[0].delta.tool_calls or []:
            if d.id:
                calls[d.index] = {"name": d.function.name, "arguments": ""}
            calls[d.index]["arguments"] += d.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls"
    assert [(c["name"], c["arguments"]) for c in calls.values()] == \
        [(c.function.name, c.function.arguments) for c in whole]


def test_qwen_call_closes_within_a_small_budget(qwen_server, qwen):
    """max_tokens just above the shortest call: the call still closes its </tool_call>."""
    from slmkit.engine import Engine, SamplingParams
    from slmkit.engine.tool_formats import tool_format as fmt_of

    fmt = fmt_of(qwen)
    grammar = fmt.grammar(parse_tools(TOOLS[1:]), required=True)
    model = build_tiny_model("llama", qwen, max_position_embeddings=1024)
    conv, kwargs = render_chat(qwen, ASK, parse_tools(TOOLS[1:]))
    ids = qwen.apply_chat_template(conv, add_generation_prompt=True, tokenize=True, **kwargs)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    with Engine(model, qwen, max_batch=2, background=False) as engine:
        need = len(engine.grammars.closing_plan(engine.grammars._prototype(grammar)))
        for budget in (need, need + 3):
            c = engine.generate(ids, SamplingParams(max_tokens=budget, temperature=1.0,
                                                    seed=budget, grammar=grammar))
            calls = fmt.parse(c.text)
            assert calls and calls[0][0] == "add", c.text
            jsonschema.validate(calls[0][1], ADD)


def test_llama_format_one_call_per_turn(llama_server):
    c = llama_server
    for seed in range(3):
        r = c.chat.completions.create(model=NAME, messages=HISTORY, tools=TOOLS, seed=seed,
                                      tool_choice="required", temperature=1.0, max_tokens=120)
        assert r.choices[0].finish_reason == "tool_calls"
        assert len(r.choices[0].message.tool_calls) == 1     # the format carries one
        assert_valid(r.choices[0].message.tool_calls)
    chunks = list(c.chat.completions.create(
        model=NAME, messages=ASK, tools=TOOLS, temperature=0, max_tokens=80, stream=True,
        tool_choice={"type": "function", "function": {"name": "add"}}))
    args = "".join(d.function.arguments or "" for ch in chunks
                   for d in ch.choices[0].delta.tool_calls or [])
    jsonschema.validate(json.loads(args), ADD)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    two = [ASK[0], {**HISTORY[1], "tool_calls": HISTORY[1]["tool_calls"] * 2}]
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model=NAME, messages=two, tools=TOOLS, max_tokens=4)
    assert e.value.body["param"] == "messages.1.tool_calls"


# --------------------------------------------------------------------------- fine-tuning

def test_training_turns_are_what_the_server_grammar_allows(qwen, llama):
    """A tool conversation is trained on exactly the call text the server constrains to:
    each trained call turn (end-of-turn token aside) is accepted by the format's grammar,
    and the server reads the same calls back out of it."""
    import llguidance

    from slmkit.data.corpus import Document
    from slmkit.engine.grammar import GrammarCompiler
    from slmkit.train.sft import format_example

    messages = HISTORY + [{"role": "assistant", "content": "It is 3 degrees."}]
    for tok in (qwen, llama):
        fmt = tool_format(tok)
        ex = format_example(tok, Document("d:1", "", messages=messages, tools=TOOLS))
        call_span, answer_span = ex.spans
        call_ids = ex.ids[call_span[0]:call_span[1]]
        while tok.decode(call_ids[-1:], skip_special_tokens=True).strip() == "":
            call_ids.pop()                  # the end of turn (<|im_end|>\n, <|eot_id|>)
        assert tok.decode(ex.ids[answer_span[0]:answer_span[1]],
                          skip_special_tokens=True).strip() == "It is 3 degrees."
        compiler = GrammarCompiler(tok, len(tok))
        matcher = compiler.state(fmt.grammar(parse_tools(TOOLS), required=False)).matcher
        assert isinstance(matcher, llguidance.LLMatcher)
        assert matcher.try_consume_tokens(call_ids) == len(call_ids) and \
            matcher.is_accepting(), tok.decode(call_ids)
        assert fmt.parse(tok.decode(call_ids, skip_special_tokens=True)) == [
            ("get_weather", {"city": "Oslo", "unit": "C"})]


def test_call_arguments_take_only_the_listed_parameters(tokenizer, qwen):
    """Parameters that say nothing about other keys allow none (a function's signature);
    a schema that sets additionalProperties keeps its choice."""
    from slmkit.engine.grammar import GrammarCompiler

    open_ = {"type": "object", "properties": {"x": {"type": "integer"},
                                              "o": {"type": "object",
                                                    "properties": {"y": {"type": "integer"}}}}}
    free = {**open_, "additionalProperties": True}
    cases = [(tokenizer, '{"tool_calls": [{"name": "f", "arguments": %s}]}'),
             (qwen, '<tool_call>\n{"name": "f", "arguments": %s}\n</tool_call>')]
    for tok, shape in cases:
        fmt, compiler = tool_format(tok), GrammarCompiler(tok, len(tok))

        def accepts(parameters, args: str) -> bool:
            tools = parse_tools([{"type": "function", "function": {
                "name": "f", "parameters": parameters}}])
            m = compiler.state(fmt.grammar(tools, required=True)).matcher
            ids = tok(shape % args, add_special_tokens=False)["input_ids"]
            return m.try_consume_tokens(ids) == len(ids) and m.is_accepting()

        assert accepts(open_, '{"x": 1, "o": {"y": 2}}')
        assert not accepts(open_, '{"x": 1, "z": 2}')
        assert not accepts(open_, '{"x": 1, "o": {"y": 2, "z": 3}}')
        assert accepts(free, '{"x": 1, "z": 2}')


def test_function_calling_eval_scores_in_the_models_own_format(qwen, llama):
    """slm eval's function-calling task prompts, constrains and reads replies in the
    template's format: under the grammar every reply of a required item is a parsed call."""
    from slmkit.eval import function_calling as fc
    from tests.test_function_calling import _pick_items

    for tok in (qwen, llama):
        items = _pick_items()
        model = build_tiny_model("llama", tok, max_position_embeddings=1024)
        res = fc.score_function_calls(model, tok, items, modes=("constrained",), batch=3)
        assert res["parsed"] == 1.0 and res["name_match"] == 1.0
        texts = [p["prediction"] for p in res["predictions"]]
        assert all(t.startswith("<tool_call>") if tok is qwen else t.startswith('{"name": ')
                   for t in texts), texts
