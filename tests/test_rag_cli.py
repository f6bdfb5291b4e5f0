"""slm rag on the command line: every bad option value refused cleanly, the verbs' output,
and user question files checked line by line."""

from __future__ import annotations

import json
import typing

import pytest

from slmkit.cli import main
from slmkit.cli_options import _cli_type, cli_fields, flag_name
from slmkit.errors import DataError
from slmkit.rag.config import RAG_VERBS
from slmkit.rag.evalset import load_questions
from tests.test_cli_bad_input import bad_values
from tests.test_rag import make_docs


def base_args(verb: str, tmp_path) -> list[str]:
    return {"index": ["rag", "index", str(tmp_path / "docs"), "--out", str(tmp_path / "i")],
            "query": ["rag", "query", str(tmp_path / "i"), "feeder"],
            "ask": ["rag", "ask", str(tmp_path / "i"), "what is rinsed?"],
            "eval": ["rag", "eval", "--no-answers"]}[verb]


CASES = [(verb, name, value, why)
         for verb, (config, _, _) in RAG_VERBS.items()
         for name, info in cli_fields(config).items()
         if _cli_type(info.annotation) is not bool
         and typing.get_origin(_cli_type(info.annotation)) is not list
         for value, why in bad_values(name, info)]


@pytest.mark.parametrize("verb, field, value, why", CASES,
                         ids=[f"{c[0]}-{c[1]}-{c[3]}" for c in CASES])
def test_bad_value_is_refused_cleanly(verb, field, value, why, tmp_path, capsys):
    (tmp_path / "docs").mkdir()
    with pytest.raises(SystemExit) as exit_:
        main([*base_args(verb, tmp_path), flag_name(field), value])
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err
    assert (flag_name(field) in err or value in err) and "Traceback" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs"]


@pytest.mark.parametrize("args, says", [
    (["rag", "index", "DOCS", "--out", "OUT", "--embedder", "bert"], "not an embedder"),
    (["rag", "index", "DOCS", "--out", "OUT", "--overlap", "300", "--chunk-chars", "200"],
     "--overlap 300 must be smaller than --chunk-chars 200"),
    (["rag", "eval", "OUT"], "needs --questions"),
    (["rag", "eval", "--questions", "q.jsonl"], "needs the INDEX"),
    (["rag", "eval", "--modes", "tfidf"], "--modes"),
    (["rag", "eval", "--no-answers", "--min-score", "0.3"], "--min-score does not apply"),
    (["rag", "query", "OUT", "x"], "not a slmkit RAG index"),
    (["rag", "index", "MISSING", "--out", "OUT"], "does not exist"),
])
def test_messages_name_the_input(args, says, tmp_path, capsys):
    (tmp_path / "DOCS").mkdir()
    args = [str(tmp_path / a) if a in ("DOCS", "OUT", "MISSING") else a for a in args]
    with pytest.raises(SystemExit) as exit_:
        main(args)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and says in err and "Traceback" not in err, err


def test_index_then_query_on_the_command_line(tmp_path, capsys):
    docs = make_docs(tmp_path / "docs")
    with pytest.raises(SystemExit) as exit_:
        main(["rag", "index", str(docs), "--out", str(tmp_path / "i"), "--threads", "1",
              "--json"])
    built = json.loads(capsys.readouterr().out)
    assert exit_.value.code == 0 and built["added"] == 6 and built["settings"]["embedder"] \
        == "minilm"
    with pytest.raises(SystemExit):
        main(["rag", "query", str(tmp_path / "i"), "balance the telescope mount", "-k", "2",
              "--json"])
    hits = json.loads(capsys.readouterr().out)["hits"]
    assert len(hits) == 2 and hits[0]["location"].endswith("page.html:3-4 (Telescope > Mount)")


def test_question_files_are_checked_line_by_line(tmp_path):
    q = tmp_path / "q.jsonl"
    q.write_text('{"question": "Where?", "answer": "here", "sources": ["a.md:3-9", "b.md"]}\n'
                 '\n{"question": "Who?", "answer": null}\n')
    qs = load_questions(str(q))
    assert [x.answerable for x in qs] == [True, False]
    assert (qs[0].sources[0].path, qs[0].sources[0].start, qs[0].sources[0].end) == \
        ("a.md", 3, 9)
    assert qs[0].sources[0].matches("/x/a.md", "a.md", 8, 12)
    assert not qs[0].sources[0].matches("/x/a.md", "a.md", 10, 12)
    for bad, says in [('{"question": 3}', "line 1 has no 'question'"),
                      ('{"question": "x", "gold": 1}', r"unknown field\(s\) gold"),
                      ('{"question": "x", "sources": ["a:9-3"]}', "ends before it starts"),
                      ("not json", "line 1 is not JSON")]:
        q.write_text(bad + "\n")
        with pytest.raises(DataError, match=says):
            load_questions(str(q))
