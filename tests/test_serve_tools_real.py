"""Agents against ``slm serve builtin:smollm2-135m``: the official client's tool loop,
streamed tool calls, JSON-schema answers and embeddings, all on 127.0.0.1."""

from __future__ import annotations

import json

import jsonschema
import numpy as np
import pytest

from tests.test_serve_cli import ServeProcess

openai = pytest.importorskip("openai")
pytestmark = [pytest.mark.real, pytest.mark.slow]

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40},
                                            "unit": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"]}
TOOLS = [{"type": "function", "function": {
             "name": "get_weather", "description": "Current weather in a city.",
             "parameters": WEATHER}},
         {"type": "function", "function": {
             "name": "add", "description": "Add two numbers.",
             "parameters": {"type": "object", "properties": {"a": {"type": "number"},
                                                             "b": {"type": "number"}},
                            "required": ["a", "b"]}}}]
SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 30},
                                      "age": {"type": "integer", "minimum": 0, "maximum": 120}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {"sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{3}$"},
                                      "price": {"type": "number", "minimum": 0,
                                                "maximum": 1000}},
     "required": ["sku", "price"], "additionalProperties": False},
]


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    server = ServeProcess(tmp_path_factory.mktemp("serve"), "builtin:smollm2-135m",
                          "--name", "smol", "--max-concurrency", "2")
    try:
        yield openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0,
                            timeout=120)
    finally:
        assert server.stop() == 0


def test_openai_tool_loop_completes(client):
    """The client's agent loop: call the tool, hand back its result, and repeat while the
    model calls again (at most 3 rounds; the last one with tool_choice 'none', an agent's
    usual iteration cap), then a plain-text answer that uses the result."""
    messages = [{"role": "user", "content": "What is the weather in Paris in celsius?"}]
    choice = "required"
    for round_ in range(4):
        r = client.chat.completions.create(model="smol", messages=messages, tools=TOOLS,
                                           tool_choice=choice, temperature=0, max_tokens=40,
                                           parallel_tool_calls=False)
        message = r.choices[0].message
        if not message.tool_calls:
            break
        assert r.choices[0].finish_reason == "tool_calls"
        (call,) = message.tool_calls
        args = json.loads(call.function.arguments)
        assert call.function.name == "get_weather" and "Paris" in args["city"]
        jsonschema.validate(args, WEATHER)
        messages += [message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id,
                      "content": json.dumps({"temperature": 18, "sky": "sunny"})}]
        choice = "auto" if round_ < 2 else "none"
    assert round_ >= 1 and message.tool_calls is None
    assert "18" in message.content or "sunny" in message.content.lower()


def test_streamed_tool_call(client):
    calls, finish = {}, None
    for chunk in client.chat.completions.create(
            model="smol", stream=True, temperature=0, max_tokens=40, tools=TOOLS,
            tool_choice={"type": "function", "function": {"name": "add"}},
            messages=[{"role": "user", "content": "What is 12 plus 30?"}]):
        for d in chunk.choices[0].delta.tool_calls or []:
            calls.setdefault(d.index, {"name": d.function.name, "arguments": ""})
            calls[d.index]["arguments"] += d.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls" and [c["name"] for c in calls.values()] == ["add"]
    args = json.loads(calls[0]["arguments"])
    assert {args["a"], args["b"]} == {12, 30}


def test_json_schema_answers_validate(client):
    prompts = ["Describe a person.", "Describe a product."]
    for schema, prompt in zip(SCHEMAS, prompts):
        r = client.chat.completions.create(
            model="smol", messages=[{"role": "user", "content": prompt}], temperature=0,
            max_tokens=120, response_format={"type": "json_schema", "json_schema": {
                "name": "answer", "schema": schema, "strict": True}})
        assert r.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(r.choices[0].message.content), schema)


def test_embeddings_put_paraphrases_closest(client):
    texts = ["The cat sat on the mat.", "A kitten is sleeping on the rug.",
             "Stock markets fell sharply on Monday.", "Shares dropped as investors panicked.",
             "How do I bake bread?", "Recipe for a simple loaf of bread"]
    out = client.embeddings.create(model="smol", input=texts)
    vectors = np.array([d.embedding for d in out.data])
    assert vectors.shape == (6, 576)
    similarity = vectors @ vectors.T
    np.fill_diagonal(similarity, -1)
    assert similarity.argmax(1).tolist() == [1, 0, 3, 2, 5, 4]


def test_langchain_agent_tool_loop(client):
    """LangChain's ChatOpenAI(...).bind_tools(...) with a tool loop, as an agent runs it."""
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    @tool
    def get_weather(city: str, unit: str) -> str:
        """Current weather in a city (unit: celsius or fahrenheit)."""
        return json.dumps({"city": city, "temperature": 18, "sky": "sunny"})

    llm = ChatOpenAI(base_url=str(client.base_url), api_key="unused", model="smol",
                     temperature=0, max_tokens=40, max_retries=0)
    messages = [HumanMessage("What is the weather in Paris in celsius?")]
    choice = "required"
    for round_ in range(4):  # the same loop as above, LangChain's way
        ai = llm.bind_tools([get_weather], tool_choice=choice,
                            parallel_tool_calls=False).invoke(messages)
        if not ai.tool_calls:
            break
        (call,) = ai.tool_calls
        assert call["name"] == "get_weather" and "Paris" in call["args"]["city"]
        messages += [ai, ToolMessage(get_weather.invoke(call["args"]),
                                     tool_call_id=call["id"])]
        choice = "auto" if round_ < 2 else "none"
    assert round_ >= 1 and not ai.tool_calls
    assert "18" in ai.content or "sunny" in ai.content.lower()


ADD_ARGS = TOOLS[1]["function"]["parameters"]
TWO_SUMS = [{"role": "user", "content": "Add 1 and 2, and add 3 and 4."}]


def test_openai_parallel_calls_whole_and_streamed(client):
    """tool_choice 'required' with parallel calls (the generic format carries several):
    the model calls add twice with the two pairs, and the stream carries the same calls
    at indices 0, 1, ... (the 135M model then repeats calls until max_tokens, where the
    budget closes the list: finish 'length', every returned call complete)."""
    kwargs = dict(model="smol", messages=TWO_SUMS, tools=TOOLS, tool_choice="required",
                  temperature=0, max_tokens=80)
    r = client.chat.completions.create(**kwargs)
    calls = r.choices[0].message.tool_calls
    assert len(calls) >= 2 and len({c.id for c in calls}) == len(calls)
    args = [json.loads(c.function.arguments) for c in calls]
    assert [c.function.name for c in calls[:2]] == ["add", "add"]
    assert args[:2] == [{"a": 1, "b": 2}, {"a": 3, "b": 4}]
    for call, a in zip(calls, args):
        jsonschema.validate(a, TOOLS[[t["function"]["name"] for t in TOOLS].index(
            call.function.name)]["function"]["parameters"])
    streamed = {}
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        for d in chunk.choices[0].delta.tool_calls or []:
            if d.id:
                streamed[d.index] = [d.function.name, ""]
            streamed[d.index][1] += d.function.arguments or ""
    assert [tuple(v) for v in streamed.values()][:len(calls)] == \
        [(c.function.name, c.function.arguments) for c in calls]


def test_openai_auto_answers_small_talk_in_text_and_named_forces_the_call(client):
    ask = [{"role": "user", "content": "Thank you for your help!"}]
    r = client.chat.completions.create(model="smol", messages=ask, tools=TOOLS,
                                       tool_choice="auto", temperature=0, max_tokens=30)
    assert r.choices[0].message.tool_calls is None and r.choices[0].message.content
    r = client.chat.completions.create(
        model="smol", temperature=0, max_tokens=40, tools=TOOLS,
        messages=[{"role": "user", "content": "What is the weather in Paris in celsius?"}],
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    (call,) = r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris", "unit": "celsius"}


def test_langchain_named_choice_parallel_calls_and_streaming(client):
    """LangChain's ChatOpenAI: a named tool_choice, parallel calls, and the same calls
    assembled from a stream of tool_call_chunks."""
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    @tool
    def add(a: float, b: float) -> float:
        """Add two numbers."""
        return a + b

    @tool
    def get_weather(city: str, unit: str) -> str:
        """Current weather in a city (unit: celsius or fahrenheit)."""
        return "sunny"

    llm = ChatOpenAI(base_url=str(client.base_url), api_key="unused", model="smol",
                     temperature=0, max_tokens=80, max_retries=0)
    ai = llm.bind_tools([get_weather, add], tool_choice="add").invoke(
        "What is 12 plus 30?")
    (call,) = ai.tool_calls                # a named function: exactly one call
    assert call["name"] == "add" and {call["args"]["a"], call["args"]["b"]} == {12, 30}
    assert add.invoke(call["args"]) == 42
    bound = llm.bind_tools([get_weather, add], tool_choice="required")
    ai = bound.invoke(TWO_SUMS[0]["content"])
    assert [c["args"] for c in ai.tool_calls[:2]] == [{"a": 1, "b": 2}, {"a": 3, "b": 4}]
    total = None
    for chunk in bound.stream(TWO_SUMS[0]["content"]):
        total = chunk if total is None else total + chunk
    assert [(c["name"], c["args"]) for c in total.tool_calls] == \
        [(c["name"], c["args"]) for c in ai.tool_calls]
