"""Function calling: BFCL-style scoring, the built-in task set, tool conversations in SFT."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from slmkit.errors import DataError
from slmkit.eval import function_calling as fc
from slmkit.train.ops import IGNORE_INDEX

CALC = fc.TOOLS[0]["function"]["parameters"]


# --------------------------------------------------------------------------- the checker

@pytest.mark.parametrize("expected,got,schema,ok", [
    (7, 7.0, {"type": "number"}, True),            # numbers as numbers
    (7, 7.0, {"type": "integer"}, False),          # a float for an integer parameter
    (2.5, 2.5000000000001, {"type": "number"}, True),
    (7, "7", {"type": "number"}, False),           # a string is not a number
    (True, 1, {}, False),                          # booleans only as booleans
    ("New York", "new york", {}, True),            # BFCL string normalisation
    ("New-York", "NewYork", {}, True),
    ("Paris", "Parise", {}, False),
    ([1, 2], [1, 2.0], {"items": {"type": "number"}}, True),
    ([1, 2], [2, 1], {}, False),
    ({"a": 1}, {"a": 1, "b": 2}, {}, False),
])
def test_values_are_compared_as_parsed_values(expected, got, schema, ok):
    assert fc.values_match(expected, got, schema) is ok


def test_call_matching_needs_every_argument_and_nothing_else():
    want = {"name": "calculator", "arguments": {"operation": "add", "a": 2, "b": 3}}
    assert fc.call_matches(want, ("calculator", {"b": 3.0, "a": 2, "operation": "ADD"}), CALC)
    assert not fc.call_matches(want, ("calculator", {"operation": "add", "a": 2}), CALC)
    assert not fc.call_matches(want, ("calculator", {**want["arguments"], "c": 1}), CALC)
    assert not fc.call_matches(want, ("add", want["arguments"]), CALC)
    weather = {"name": "get_weather", "arguments": {"city": "Oslo"}}
    params = fc.TOOLS[3]["function"]["parameters"]
    opt = {"unit": "celsius"}                      # may be left out or carry its default
    assert fc.call_matches(weather, ("get_weather", {"city": "Oslo", "unit": "celsius"}),
                           params, opt)
    assert not fc.call_matches(weather, ("get_weather", {"city": "Oslo", "unit": "fahrenheit"}),
                               params, opt)


def test_parse_and_item_verdicts():
    text = '{"tool_calls": [{"name": "calculator", "arguments": {"operation": "add", ' \
           '"a": 2, "b": 3}}]}'
    assert fc.parse_calls("```json\n" + text + "\n```") == [
        ("calculator", {"operation": "add", "a": 2, "b": 3})]
    assert fc.parse_calls(text[:-3]) is None and fc.parse_calls("The answer is 5.") is None
    item = fc.validate_fc_item({
        "type": "function_call", "messages": [{"role": "user", "content": "2+3 and 4*5"}],
        "tools": fc.TOOLS, "answer": [
            {"name": "calculator", "arguments": {"operation": "add", "a": 2, "b": 3}},
            {"name": "calculator", "arguments": {"operation": "multiply", "a": 4, "b": 5}}]},
        "x")
    two = [("calculator", {"operation": "multiply", "a": 4, "b": 5}),
           ("calculator", {"operation": "add", "a": 2, "b": 3})]
    assert fc.check_item(item, two)["exact"]                       # order free
    assert not fc.check_item(item, two[:1])["exact"] and fc.check_item(item, None) == {
        "exact": False, "parsed": False, "name": False}
    irrelevant = {**item, "answer": []}
    assert fc.check_item(irrelevant, None)["exact"]
    assert not fc.check_item(irrelevant, two)["exact"]


@pytest.mark.parametrize("change,needle", [
    ({"answer": [{"name": "nope", "arguments": {}}]}, "'answer'"),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools.0.function.name"),
    ({"tool_choice": "none"}, "'tool_choice'"),
    ({"messages": [{"role": "tool", "tool_call_id": "x", "content": "1"}]}, "tool_call_id"),
])
def test_bad_items_are_refused_with_the_field(change, needle):
    item = {"type": "function_call", "messages": [{"role": "user", "content": "hi"}],
            "tools": fc.TOOLS, "answer": [], **change}
    with pytest.raises(DataError, match=needle.replace(".", r"\.")):
        fc.validate_fc_item(item, "t.jsonl line 1")


# --------------------------------------------------------------------------- the built-in set

def test_builtin_set_is_deterministic_split_and_valid():
    import jsonschema

    val, train = fc.builtin_items("val"), fc.builtin_items("train")
    assert val == fc.builtin_items("val") and len(val) >= 100 and len(train) >= 4 * len(val) - 50
    texts = lambda items: {i["messages"][0]["content"] for i in items}  # noqa: E731
    assert not texts(val) & texts(train)           # held out: no request in both splits
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in fc.TOOLS}
    for item in val + train:
        for call in item["answer"]:
            jsonschema.validate(call["arguments"], schemas[call["name"]])
    tools_used = {c["name"] for i in val for c in i["answer"]}
    assert tools_used == set(schemas) and any(not i["answer"] for i in val)
    # find_module answers with the running stdlib
    rows = fc.training_rows("train")
    looked_up = [r for r in rows if r["messages"][1].get("tool_calls") and
                 r["messages"][1]["tool_calls"][0]["function"]["name"] == "find_module"]
    result = json.loads(looked_up[0]["messages"][2]["content"])
    import importlib
    assert all(hasattr(importlib.import_module(m), result["function"]) for m in result["modules"])


# --------------------------------------------------------------------------- scoring a model

def _pick_items():
    tools = [{"type": "function", "function": {"name": "pick", "parameters": {
        "type": "object", "properties": {"x": {"enum": ["red", "green", "blue"]}},
        "required": ["x"], "additionalProperties": False}}}]
    return [fc.validate_fc_item({
        "id": f"p{i}", "type": "function_call", "tools": tools,
        "messages": [{"role": "user", "content": f"Pick {c}."}],
        "answer": [{"name": "pick", "arguments": {"x": c}}], "tool_choice": "required",
        "parallel_tool_calls": False, "max_new_tokens": 96}, f"item {i}")
        for i, c in enumerate(["red", "blue", "green"])]


def test_scoring_a_real_model_constrained_and_free(tokenizer):
    from tests.conftest import build_tiny_model

    tok = tokenizer                         # the tools' system prompt needs > 256 positions
    model = build_tiny_model("llama", tok, max_position_embeddings=512)
    items = _pick_items()
    with pytest.raises(DataError, match="over the model's context of 320"):
        fc.score_function_calls(build_tiny_model("llama", tok, max_position_embeddings=320),
                                tok, items)
    res = fc.score_function_calls(model, tok, items, batch=2)
    assert res["type"] == "function_call" and res["n"] == 3 and res["metric"] == "exact_call"
    assert res["parsed"] == 1.0 and res["name_match"] == 1.0     # the grammar: always a call
    preds = res["predictions"]
    got = [fc.parse_calls(p["prediction"])[0][1]["x"] for p in preds]
    assert res["exact_call"] == sum(g == it["answer"][0]["arguments"]["x"]
                                    for g, it in zip(got, items)) / 3
    # the same items with the model's own picks as answers: all right; others: all wrong
    mine = [{**it, "answer": [{"name": "pick", "arguments": {"x": g}}]}
            for it, g in zip(items, got)]
    again = fc.score_function_calls(model, tok, mine, modes=("constrained",), batch=2)
    assert again["exact_call"] == 1.0 and "exact_call_unconstrained" not in again
    wrong = [{**it, "answer": [{"name": "pick", "arguments": {"x": g.upper() + "x"}}]}
             for it, g in zip(items, got)]
    assert fc.score_function_calls(model, tok, wrong, modes=("constrained",),
                                   batch=2)["exact_call"] == 0.0
    # free decoding of a random model: scored from its text, whatever it wrote
    assert res["exact_call_unconstrained"] == sum(
        fc.check_item(it, fc.parse_calls(p["prediction_unconstrained"]))["exact"]
        for it, p in zip(items, preds)) / 3


def test_eval_reads_function_call_task_files(tmp_path):
    from slmkit.eval.evaluate import resolve_tasks

    path = tmp_path / "calls.jsonl"
    path.write_text("".join(json.dumps(i) + "\n" for i in _pick_items()))
    tasks = resolve_tasks([str(path), "function-calling"], limit=5)
    assert len(tasks["calls"]) == 3 and len(tasks["function-calling"]) == 5
    assert tasks["function-calling"] == fc.builtin_items("val")[:5]


# --------------------------------------------------------------------------- fine-tuning data

ROW = {"tools": [{"type": "function", "function": {"name": "add", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}}}}],
       "messages": [
           {"role": "user", "content": "2+3?"},
           {"role": "assistant", "content": None, "tool_calls": [
               {"id": "c1", "type": "function",
                "function": {"name": "add", "arguments": "{\"a\": 2, \"b\": 3}"}}]},
           {"role": "tool", "tool_call_id": "c1", "content": "5"},
           {"role": "assistant", "content": "It is 5."}]}


def _write(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_tool_conversations_train_on_assistant_turns_only(tokenizer, tmp_path):
    from slmkit.engine.tools import conversation, parse_tools
    from slmkit.train.sft import load_sft_examples, masked_labels

    ex, = load_sft_examples(str(_write(tmp_path / "tools.jsonl", [ROW])), tokenizer, 1024)
    inputs, labels = masked_labels(ex)
    trained = tokenizer.decode([t for t in labels if t != IGNORE_INDEX])
    assert trained == ('{"tool_calls": [{"name": "add", "arguments": {"a": 2, "b": 3}}]}'
                       "<|im_end|>\nIt is 5.<|im_end|>\n")
    # the prompt is the server's rendering: tools in the system prompt, the result as a turn
    full = tokenizer.decode(ex.ids)
    rendered = conversation(ROW["messages"], parse_tools(ROW["tools"]))
    assert full == tokenizer.apply_chat_template(rendered, tokenize=False)
    assert "You can call these tools" in full and "add: 5" in full
    masked = [t for t, lab in zip(ex.ids[1:], labels) if lab == IGNORE_INDEX]
    assert "It is 5." not in tokenizer.decode(masked) and "2+3?" in tokenizer.decode(masked)


@pytest.mark.parametrize("row,needle", [
    ({**ROW, "messages": ROW["messages"][:1] + [{"role": "tool", "tool_call_id": "zz",
                                                  "content": "5"}]}, "messages.1.tool_call_id"),
    ({**ROW, "tools": [{"function": {"name": "a b"}}]}, "tools.0.function.name"),
    ({**ROW, "messages": ROW["messages"][:3]}, "last message must be the assistant"),
    ({**ROW, "messages": [{"role": "user", "content": None}] + ROW["messages"][1:]},
     "malformed message 0"),
    ({"tools": ROW["tools"], "text": "x"}, "'tools' without 'messages'"),
])
def test_bad_tool_rows_name_file_line_and_field(tokenizer, tmp_path, row, needle):
    from slmkit.train.sft import load_sft_examples

    path = _write(tmp_path / "tools.jsonl", [ROW, row])
    with pytest.raises(DataError, match="line 2") as e:
        load_sft_examples(str(path), tokenizer, 1024)
    assert needle in str(e.value)


def test_cli_finetune_on_tool_conversations(tokenizer, tmp_path, cli):
    from slmkit.models import save_model
    from tests.conftest import build_tiny_model

    # the tools' system prompt needs more than the shared tiny models' 256 positions
    llama_dir = save_model(build_tiny_model("llama", tokenizer, max_position_embeddings=512),
                           tokenizer, tmp_path / "llama512", step="init", params={})
    data = _write(tmp_path / "tools.jsonl", [ROW] * 4)
    out = tmp_path / "ft-tools"
    r = cli("finetune", str(llama_dir), "--data", str(data), "--out", str(out),
            "--max-steps", "2", "--seq-len", "400", "--batch-size", "2", "--rank", "2")
    assert r.returncode == 0, r.stderr
    assert "samples" in r.stdout and (out / "adapter_config.json").exists()
    bad = _write(tmp_path / "bad.jsonl", [ROW, {**ROW, "messages": ROW["messages"][2:]}])
    r = cli("finetune", str(llama_dir), "--data", str(bad), "--out", str(tmp_path / "x"),
            "--max-steps", "2", "--seq-len", "400")
    assert r.returncode == 2 and "line 2" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "x").exists()
