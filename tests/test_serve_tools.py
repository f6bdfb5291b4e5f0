"""response_format and tools through a real server on 127.0.0.1 and the official client.

The model is the tiny random Llama of test_serve_api: its choices are arbitrary, so every
answer that parses and validates does so because of the grammar, not the model.
"""

from __future__ import annotations

import json

import httpx
import jsonschema
import pytest

from slmkit.engine.tools import ToolCallScanner, render_calls
from tests.test_serve_api import NAME, client, live, serve_model  # noqa: F401
from tests.test_serve_limits import assert_error

openai = pytest.importorskip("openai")

PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 8},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2}},
    "required": ["name", "age", "tags"], "additionalProperties": False}
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                            "unit": {"enum": ["C", "F"]}},
           "required": ["city", "unit"], "additionalProperties": False}
ADD = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9},
                                        "b": {"type": "integer", "minimum": 0, "maximum": 9}},
       "required": ["a", "b"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather.",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "add", "parameters": ADD}}]
PARAMS = {"get_weather": WEATHER, "add": ADD}
ASK = [{"role": "user", "content": "What is the weather in Oslo?"}]


def assert_valid_calls(calls, allowed=("get_weather", "add"), at_most=None):
    assert calls and (at_most is None or len(calls) <= at_most)
    assert len({c.id for c in calls}) == len(calls)
    for call in calls:
        assert call.type == "function" and call.function.name in allowed
        jsonschema.validate(json.loads(call.function.arguments), PARAMS[call.function.name])


def test_json_schema_and_json_object_answers_validate(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON,
                                                  "strict": True}}
    for seed in range(3):
        r = client.chat.completions.create(model=NAME, messages=ASK, response_format=fmt,
                                           temperature=1.0, seed=seed, max_tokens=80)
        assert r.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(r.choices[0].message.content), PERSON)
    r = client.completions.create(model=NAME, prompt="Person:", temperature=0, max_tokens=80,
                                  extra_body={"response_format": fmt})
    jsonschema.validate(json.loads(r.choices[0].text), PERSON)
    # json_object: any object; a random model may run out of tokens inside a string, so
    # only a finished answer is checked (the seeds below finish)
    r = client.chat.completions.create(model=NAME, messages=ASK, max_tokens=200, seed=3,
                                       temperature=0.7, response_format={"type": "json_object"})
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_required_and_named_tool_choice(client):
    for seed in range(3):
        r = client.chat.completions.create(model=NAME, messages=ASK, tools=TOOLS, seed=seed,
                                           tool_choice="required", temperature=1.0,
                                           max_tokens=120, parallel_tool_calls=False)
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        assert_valid_calls(choice.message.tool_calls, at_most=1)
    r = client.chat.completions.create(
        model=NAME, messages=ASK, tools=TOOLS, temperature=0, max_tokens=120,
        tool_choice={"type": "function", "function": {"name": "add"}})
    assert r.choices[0].finish_reason == "tool_calls"
    assert_valid_calls(r.choices[0].message.tool_calls, allowed=("add",), at_most=1)


def test_auto_is_text_or_a_valid_call(client):
    kinds = set()
    for seed in range(6):
        r = client.chat.completions.create(model=NAME, messages=ASK, tools=TOOLS, seed=seed,
                                           temperature=1.0, max_tokens=120,
                                           parallel_tool_calls=False)  # a call always fits
        message = r.choices[0].message
        if message.tool_calls:
            assert r.choices[0].finish_reason == "tool_calls"
            assert_valid_calls(message.tool_calls)
            kinds.add("call")
        else:
            assert message.content and not message.content.startswith("{")
            kinds.add("text")
    assert kinds  # which kinds a random model picks is its business; both are legal


def test_streamed_tool_calls_reassemble_to_the_whole_answer(client):
    kwargs = dict(model=NAME, messages=ASK, tools=TOOLS, tool_choice="required",
                  temperature=0, max_tokens=120, parallel_tool_calls=False)
    whole = client.chat.completions.create(**kwargs).choices[0].message.tool_calls
    calls, finish, first = {}, None, None
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        delta = chunk.choices[0].delta
        first = first or delta
        for d in delta.tool_calls or []:
            if d.id:  # OpenAI's layout: the first delta of a call carries id and name
                calls[d.index] = {"id": d.id, "name": d.function.name, "arguments": ""}
            calls[d.index]["arguments"] += d.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert first.role == "assistant" and first.content is None
    assert finish == "tool_calls"
    assert [(c["name"], c["arguments"]) for c in calls.values()] == \
        [(c.function.name, c.function.arguments) for c in whole]


def test_tool_results_feed_the_next_turn(client, live):
    """The openai client's tool loop: call, result as a tool message, next answer."""
    first = client.chat.completions.create(model=NAME, messages=ASK, tools=TOOLS,
                                           tool_choice="required", temperature=0,
                                           parallel_tool_calls=False,
                                           max_tokens=120).choices[0].message
    history = ASK + [first.model_dump(exclude_none=True)] + [
        {"role": "tool", "tool_call_id": c.id, "content": '{"temp": 21}'}
        for c in first.tool_calls]
    r = client.chat.completions.create(model=NAME, messages=history, tools=TOOLS,
                                       tool_choice="none", temperature=0, max_tokens=8)
    assert r.choices[0].message.tool_calls is None and r.choices[0].message.content
    assert not r.choices[0].message.content.startswith("{")  # no call written out as text
    # the history really reached the prompt: it is longer than the question alone
    bare = client.chat.completions.create(model=NAME, messages=ASK, max_tokens=1)
    assert r.usage.prompt_tokens > bare.usage.prompt_tokens + 10


def test_prompt_describes_tools_and_replays_calls(tokenizer):
    from slmkit.engine.tools import conversation
    from slmkit.serve.protocol import ChatRequest
    from slmkit.serve.structured import chat_messages, output_plan

    req = ChatRequest.model_validate({
        "model": "m", "tools": TOOLS, "tool_choice": "required", "messages": [
            {"role": "system", "content": "Be brief."}, *ASK,
            {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function", "function": {
                "name": "get_weather", "arguments": '{"city": "Oslo", "unit": "C"}'}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "3 degrees"}]})
    plan = output_plan(req)
    messages, kwargs = chat_messages(req, plan, tokenizer)
    assert kwargs == {}  # ChatML knows no tools: the generic format, tools in the system turn
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "tool"]
    assert messages[3]["content"] == "get_weather: 3 degrees"
    messages = conversation([m.model_dump(exclude_none=True) for m in req.messages],
                            plan.tools, plan.required, tool_role=False)
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert messages[0]["content"].startswith("Be brief.\n\nYou can call these tools:")
    assert '"name": "get_weather"' in messages[0]["content"]
    assert "You must call a tool now." in messages[0]["content"]
    assert messages[2]["content"] == render_calls([("get_weather", {"city": "Oslo",
                                                                    "unit": "C"})])
    assert messages[3]["content"] == "Result of get_weather (c1): 3 degrees"


def test_scanner_streams_names_then_arguments_in_any_split():
    text = render_calls([("f", {"s": 'a "}{" b\\', "n": [1, {"x": []}]}), ("g", {})])
    for size in (1, 3, len(text)):
        scanner, seen = ToolCallScanner(), {}
        for i in range(0, len(text), size):
            for d in scanner.feed(text[i:i + size]):
                if d.name is not None:
                    seen[d.index] = [d.name, ""]
                seen[d.index][1] += d.arguments
        assert list(seen.values()) == scanner.calls and scanner.complete
        assert [(n, json.loads(a)) for n, a in scanner.calls] == \
            [("f", {"s": 'a "}{" b\\', "n": [1, {"x": []}]}), ("g", {})]


BAD = [
    ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "array", "uniqueItems": True}}}},
     "response_format.json_schema.schema", "uniqueItems"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "response_format.json_schema.schema", "give the JSON schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "a b", "schema": {}}}},
     "response_format.json_schema.name", "letters"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema", "needs"),
    ({"tool_choice": "auto"}, "tool_choice", "needs 'tools'"),
    ({"parallel_tool_calls": False}, "parallel_tool_calls", "needs 'tools'"),
    ({"tools": []}, "tools", "at least one tool"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice.function.name", "'nope' is not one of"),
    ({"tools": [TOOLS[0], TOOLS[0]]}, "tools.1.function.name", "listed twice"),
    ({"tools": [{"type": "function", "function": {"name": "f(x)"}}]}, "tools.0.function.name",
     "letters"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "string"}}}]}, "tools.0.function.parameters", "object schema"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"not": {}}}}}}]},
     "tools.0.function.parameters", "Unimplemented keys"),
    ({"tools": TOOLS, "response_format": {"type": "json_object"}}, "response_format",
     "tool_choice 'none'"),
    ({"messages": [*ASK, {"role": "tool", "tool_call_id": "x", "content": "1"}]},
     "messages.1.tool_call_id", "earlier assistant"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"id": "c", "type": "function",
                    "function": {"name": "f", "arguments": "{bad"}}]}]},
     "messages.0.tool_calls.0.function.arguments", "JSON object"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": [{"id": "c", "type":
                    "function", "function": {"name": "f", "arguments": "{}"}}]}]},
     "messages.0.tool_calls", "only assistant"),
]


@pytest.mark.parametrize("extra,param,words", BAD, ids=[b[1] + ":" + b[2] for b in BAD])
def test_what_cannot_be_honoured_is_a_400_naming_it(live, extra, param, words):
    body = {"model": NAME, "messages": ASK, "max_tokens": 4, **extra}
    r = httpx.post(live.url + "/v1/chat/completions", json=body, timeout=30)
    assert_error(r, 400, param)
    assert words in r.json()["error"]["message"]
