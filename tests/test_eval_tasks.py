"""Built-in task mining (determinism, no train/val leak) and JSONL task files."""

from __future__ import annotations

import json
import re
import sysconfig
from pathlib import Path

import pytest

from slmkit.data.split import is_val
from slmkit.errors import DataError


#: A slice of the stdlib with a large validation share: both splits, fast to parse.
SUBSET = str(Path(sysconfig.get_paths()["stdlib"]) / "[a-f]*.py")
VAL_FRACTION = 0.3


@pytest.fixture(scope="module")
def mined():
    from slmkit.eval.mining import BUILTIN_TASKS, mine_tasks

    return {split: mine_tasks(BUILTIN_TASKS, data=SUBSET, split=split,
                              val_fraction=VAL_FRACTION, limit=40)
            for split in ("val", "train")}


def test_mining_is_deterministic(mined):
    from slmkit.eval.mining import BUILTIN_TASKS, mine_tasks

    again = mine_tasks(BUILTIN_TASKS, data=SUBSET, split="val", val_fraction=VAL_FRACTION,
                       limit=40)
    assert again == mined["val"]
    for name in BUILTIN_TASKS:
        assert len(mined["val"][name]) == 40, name
        assert len({it["id"] for it in mined["val"][name]}) == 40
    # the default: the stdlib corpus's own validation split, ids named after stdlib files
    first = mine_tasks(["stdlib-docstring-mc"], limit=5)["stdlib-docstring-mc"]
    assert first == mine_tasks(["stdlib-docstring-mc"], limit=5)["stdlib-docstring-mc"]
    assert all(it["source"].startswith("stdlib:") and is_val(it["source"]) for it in first)


def test_mined_items_follow_the_corpus_split(mined):
    from slmkit.eval.tasks import validate_item

    val_docs = set()
    for split, tasks in mined.items():
        for name, items in tasks.items():
            for it in items:
                assert it["split"] == split
                assert is_val(it["source"], VAL_FRACTION) == (split == "val"), it["id"]
                validate_item(dict(it), name)
                if split == "val":
                    val_docs.add(it["source"])
    train_docs = {it["source"] for items in mined["train"].values() for it in items}
    assert val_docs and not val_docs & train_docs
    # no validation text shows up in training items (prompts or distractors)
    train_text = "\n".join(json.dumps(it) for its in mined["train"].values() for it in its)
    for it in mined["val"]["stdlib-docstring"]:
        assert it["prompt"] not in train_text


def test_mined_items_carry_real_labels(mined):
    funcname = mined["val"]["stdlib-funcname"]
    for it in funcname:
        assert re.search(rf"\b{re.escape(it['answer'])}\b", it["prompt"]) is None
        assert "def ___" in it["prompt"]
    for it in mined["val"]["stdlib-docstring-mc"]:
        assert len(it["choices"]) == 4 and len(set(it["choices"])) == 4
        assert it["context"].endswith('.__doc__ = """')
    for it in mined["val"]["stdlib-nextline"]:
        assert it["answer"] == it["answer"].strip() and it["answer"]


def test_task_file_roundtrip_and_malformed_lines(tmp_path):
    from slmkit.eval.tasks import read_task_file, write_task_file

    items = [{"id": "1", "type": "multiple_choice", "context": "x =", "choices": [" 1", " 2"],
              "answer": 0}]
    path = write_task_file(tmp_path / "mine.jsonl", items)
    assert read_task_file(path) == items
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(items[0]) + "\n{not json\n")
    with pytest.raises(DataError, match="line 2 is not valid JSON"):
        read_task_file(bad)
    bad.write_text(json.dumps({**items[0], "answer": 5}) + "\n")
    with pytest.raises(DataError, match="line 1 needs 'answer'"):
        read_task_file(bad)
    bad.write_text(json.dumps({"type": "essay"}) + "\n")
    with pytest.raises(DataError, match="'type'"):
        read_task_file(bad)
    bad.write_text("\n\n")
    with pytest.raises(DataError, match="no task items"):
        read_task_file(bad)
    with pytest.raises(DataError, match="does not exist"):
        read_task_file(tmp_path / "nope.jsonl")


def test_batched_generation_gives_the_same_texts_as_one_at_a_time(tokenizer):
    """Generation tasks go through the engine in batches; the scores must not change."""
    from slmkit.eval.generate import greedy_generate, greedy_generate_many
    from slmkit.eval.tasks import score_generation
    from slmkit.engine import stream_tokens
    from tests.conftest import build_tiny_model

    model = build_tiny_model("llama", tokenizer)
    requests = [("def add(a, b):\n    return", 12, ("\n",)),
                ("import os\n", 5, ("e",)),
                ("x", 9, ("\n", "(")),
                ("class Parser:\n    def parse(self, text):\n        ", 16, ("\n",)),
                ("", 4, ("\n",))]
    one_by_one = [greedy_generate(model, tokenizer, p, n, stop) for p, n, stop in requests]
    assert greedy_generate_many(model, tokenizer, requests, batch=3) == one_by_one
    assert any(one_by_one)                        # not all empty: the comparison means something
    items = [{"prompt": p, "max_new_tokens": n, "stop": list(stop), "answer": "return a + b",
              "metric": "rouge_l", "type": "generation", "id": str(i)}
             for i, (p, n, stop) in enumerate(requests)]
    batched = score_generation(model, tokenizer, items)
    single = score_generation(model, tokenizer, items, stream=stream_tokens)
    assert batched["predictions"] == single["predictions"]
    assert batched["rouge_l"] == single["rouge_l"]
