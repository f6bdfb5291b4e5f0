"""`slm augment`: teacher-sampled rows, filters, the output dir, bad inputs, fine-tuning on it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from slmkit.errors import ConfigError, DataError, ModelLoadError
from tests.test_finetune import write_jsonl

ROWS = [{"prompt": f"def add_{i}(x):\n    return x + {i}\n\nadd_{i}.__doc__ = \"\"\"",
         "completion": f"Add {i} to x.\"\"\"", "stop": ['"""', "\n"]} for i in range(4)]


@pytest.fixture
def task_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "task.jsonl", ROWS)


def _cfg(model, data, out, **kw):
    from slmkit.errors import validated
    from slmkit.train.augment import AugmentConfig

    base = dict(model=str(model), data=str(data), out=str(out), n_per_sample=3,
                max_new_tokens=8, temperature=1.0, top_p=1.0, seed=0, threads=1)
    return validated(AugmentConfig, **{**base, **kw})


def _read(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "data.jsonl").read_text().splitlines()]


def test_split_prompt_keeps_the_cue():
    from slmkit.train.augment import split_prompt

    assert split_prompt(ROWS[0]["prompt"]) == (
        "def add_0(x):\n    return x + 0", "\n\n", 'add_0.__doc__ = """')
    assert split_prompt("one line  ") == ("one line", "  ", "")


def test_completions_rows_are_filtered_and_deduped(llama_dir, task_file, tmp_path):
    from slmkit.models.lineage import read_record
    from slmkit.train.augment import normalise, run_augment

    out = tmp_path / "aug"
    res = run_augment(_cfg(llama_dir, task_file, out, max_length=6)).figures
    rows = _read(out)
    assert res["rows_in"] == 4 and res["generated"] == 12
    dropped = sum(res[f"dropped_{k}"] for k in ("empty", "unfinished", "length", "duplicate",
                                                  "logprob"))
    assert res["new_rows"] == 12 - dropped and res["rows_out"] == len(rows) == 4 + res["new_rows"]
    # a random tiny model rarely hits a stop within 8 tokens: the unfinished filter works
    assert res["dropped_unfinished"] > 0
    assert [r["origin"] for r in rows[:4]] == ["original"] * 4
    keys = [normalise(r["prompt"]) + "|" + normalise(r["completion"]) for r in rows]
    assert len(set(keys)) == len(keys)                       # no duplicates at all
    for r in rows[4:]:
        assert r["prompt"] in {x["prompt"] for x in ROWS}     # completions mode keeps prompts
        assert r["completion"].endswith('"""') and r["stop"] == ['"""', "\n"]
        assert r["teacher_logprob"] <= 0
    rec = read_record(out)
    assert rec["step"] == "augment" and rec["parent"] == str(llama_dir)
    assert rec["metrics"]["rows_out"] == len(rows)


def test_paraphrase_keeps_completion_and_logprob_filter_drops_all(llama_dir, task_file,
                                                                   tmp_path):
    from slmkit.train.augment import run_augment

    out = tmp_path / "para"
    res = run_augment(_cfg(llama_dir, task_file, out, mode="paraphrase")).figures
    rows = _read(out)
    assert res["generated"] == 12 and res["new_rows"] > 0
    for r in rows[4:]:
        original = next(x for x in ROWS if x["completion"] == r["completion"])
        assert r["prompt"] != original["prompt"] and r["prompt"].endswith('.__doc__ = """')
        assert r["prompt"].startswith("def add_")           # the head of the body is kept

    strict = run_augment(_cfg(llama_dir, task_file, tmp_path / "strict",
                               min_logprob=-1e-6)).figures
    assert strict["new_rows"] == 0 and strict["rows_out"] == 4       # only the originals
    assert strict["dropped_logprob"] == 12 - sum(
        strict[f"dropped_{k}"] for k in ("empty", "unfinished", "length", "duplicate"))
    with pytest.raises(ConfigError, match="filtered out"):
        run_augment(_cfg(llama_dir, task_file, tmp_path / "none", min_logprob=-1e-6,
                         keep_original=False))
    assert not (tmp_path / "none").exists()


def test_cli_augment_then_finetune_on_it(llama_dir, task_file, tmp_path, cli):
    out = tmp_path / "aug-cli"
    r = cli("augment", str(llama_dir), "--data", str(task_file), "--out", str(out),
            "-n", "2", "--max-new-tokens", "6", "--seed", "1")
    assert r.returncode == 0, r.stderr
    assert "dropped: duplicate" in r.stdout and "rows out" in r.stdout
    assert (out / "data.jsonl").exists() and (out / "slmkit.json").exists()

    ft = tmp_path / "ft"
    r = cli("finetune", str(llama_dir), "--data", str(out), "--out", str(ft), "--max-steps",
            "2", "--seq-len", "64", "--batch-size", "2", "--rank", "4")
    assert r.returncode == 0, r.stderr
    assert "chat template" in r.stdout and (ft / "adapter_config.json").exists()


@pytest.mark.parametrize("case", ["teacher", "data", "dir", "empty", "bad_row", "n"])
def test_bad_inputs_are_one_sentence_and_leave_no_dir(llama_dir, task_file, tmp_path, case):
    from slmkit.train.augment import run_augment

    out = tmp_path / "out"
    kw, err, needle = {}, DataError, None
    if case == "teacher":
        kw, err, needle = {"model": str(tmp_path / "nope")}, ModelLoadError, "nope"
    elif case == "data":
        kw, needle = {"data": str(tmp_path / "missing.jsonl")}, "does not exist"
    elif case == "dir":
        (tmp_path / "d").mkdir()
        kw, needle = {"data": str(tmp_path / "d")}, "has no data.jsonl"
    elif case == "empty":
        kw, needle = {"data": str(write_jsonl(tmp_path / "e.jsonl", []))}, "no rows"
    elif case == "bad_row":
        bad = write_jsonl(tmp_path / "b.jsonl", [ROWS[0], {"prompt": "p"}])
        kw, needle = {"data": str(bad)}, f"{bad} line 2"
    else:
        kw, err, needle = {"n_per_sample": 0}, ConfigError, "--n-per-sample"
    with pytest.raises(err) as e:
        run_augment(_cfg(**{"model": llama_dir, "data": task_file, "out": out, **kw}))
    assert needle in str(e.value) and "\n" not in str(e.value)
    assert not out.exists()
    assert not list(tmp_path.glob(".out*"))                    # no temp dir either


def test_cli_bad_input_exit_2(llama_dir, tmp_path, cli):
    r = cli("augment", str(llama_dir), "--data", str(tmp_path / "none.jsonl"), "--out",
            str(tmp_path / "o"))
    assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr
    r = cli("augment", str(llama_dir), "--data", str(tmp_path / "none.jsonl"), "--out",
            str(tmp_path / "o"), "-n", "0")
    assert r.returncode == 2 and "n-per-sample" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()


def test_augment_is_a_recipe_step():
    from slmkit.pipeline.steps import PLANNED, STEP_KINDS
    from slmkit.train.augment import AugmentConfig

    assert "augment" not in PLANNED
    assert STEP_KINDS["augment"].config_class() is AugmentConfig
    fields = set(AugmentConfig.model_fields)
    assert {"model", "data", "out", "mode", "n_per_sample", "temperature", "top_p",
            "max_new_tokens", "seed", "max_samples", "min_logprob", "keep_original"} <= fields
