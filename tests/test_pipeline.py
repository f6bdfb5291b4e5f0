"""Recipes: validation errors with file:line:field, caching, downstream invalidation."""

from __future__ import annotations

import textwrap

import pytest

from slmkit.errors import ConfigError
from slmkit.pipeline.recipe import load_recipe
from slmkit.pipeline.runner import plan, run_recipe


def _write(tmp_path, body: str, name: str = "r.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return path


def _chain(tok: str, layers: int = 2, wd: str = "work") -> str:
    return f"""\
        workdir: {wd}
        steps:
          - name: a
            step: init
            preset: nano
            tokenizer: {tok}
            set: {{num_hidden_layers: {layers}}}
          - name: b
            step: init
            preset: nano
            tokenizer: ${{a}}
          - name: c
            step: init
            preset: nano
            tokenizer: {tok}
        """


@pytest.mark.parametrize("body, line, fragment", [
    ("""\
     steps:
       - name: a
         step: teleport
     """, 3, "unknown step kind 'teleport'"),
    ("""\
     steps:
       - name: a
         step: init
         preset: nano
         tokenizer: t
         sed: 3
     """, 6, "'sed' is not an option of the 'init' step"),
    ("""\
     steps:
       - name: a
         step: init
         preset: nano
         tokenizer: t
         seed: lots
     """, 6, "field 'seed'"),
    ("""\
     steps:
       - name: a
         step: init
         preset: nano
         tokenizer: ${ghost}
     """, 5, "${ghost} names no step"),
    ("""\
     steps:
       - name: a
         step: init
         preset: nano
         tokenizer: ${b}
       - name: b
         step: init
         preset: nano
         tokenizer: ${a}
     """, None, "cycle"),
    ("""\
     steps:
       - name: a
         step: init
         preset: nano
         tokenizer: t
       - name: a
         step: init
         preset: nano
         tokenizer: t
     """, 6, "already used on line 2"),
    ("""\
     steps:
       - name: a
         step: init
         preset: nano
         tokenizer: t
         out: somewhere
     """, 6, "set by the pipeline"),
    ("steps: [oops\n", 2, "invalid YAML"),
])
def test_validation_errors_name_file_line_field(tmp_path, body, line, fragment):
    path = _write(tmp_path, body)
    with pytest.raises(ConfigError) as exc:
        load_recipe(path)
    msg = str(exc.value)
    assert msg.startswith(f"{path}:"), msg
    if line is not None:
        assert msg.startswith(f"{path}:{line}:"), msg
    assert fragment in msg


def test_cache_hits_misses_and_downstream_invalidation(tmp_path, tokenizer_dir):
    path = _write(tmp_path, _chain(tokenizer_dir, wd=str(tmp_path / "work")))
    recipe = load_recipe(path)
    assert [s.name for s in recipe.steps] == ["a", "b", "c"]
    first = run_recipe(recipe)
    assert [r.status for r in first] == ["ran", "ran", "ran"]
    again = run_recipe(load_recipe(path))
    assert [r.status for r in again] == ["cached", "cached", "cached"]
    # change an option of `a`: a and its dependant b rerun; c does not
    path = _write(tmp_path, _chain(tokenizer_dir, layers=3, wd=str(tmp_path / "work")))
    changed = load_recipe(path)
    assert [cached for _, _, cached in plan(changed)] == [False, False, True]
    third = run_recipe(changed)
    assert [r.status for r in third] == ["ran", "ran", "cached"]
    import json

    cfg = json.loads((tmp_path / "work" / "a" / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 3


def test_lost_output_reruns(tmp_path, tokenizer_dir):
    import shutil

    path = _write(tmp_path, _chain(tokenizer_dir, wd=str(tmp_path / "work")))
    run_recipe(load_recipe(path))
    shutil.rmtree(tmp_path / "work" / "c")
    assert [r.status for r in run_recipe(load_recipe(path))] == ["cached", "cached", "ran"]


def test_cli_dry_run_and_errors(cli, tmp_path, tokenizer_dir):
    path = _write(tmp_path, _chain(tokenizer_dir, wd=str(tmp_path / "work")))
    r = cli("run", path, "--dry-run")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("planned: run") == 3 and not (tmp_path / "work").exists()
    bad = _write(tmp_path, "steps:\n  - name: a\n    step: teleport\n", "bad.yaml")
    r = cli("run", bad)
    assert r.returncode == 2 and f"{bad}:3:" in r.stderr and "Traceback" not in r.stderr


def test_overrides_change_options_and_hash(tmp_path, tokenizer_dir):
    path = _write(tmp_path, _chain(tokenizer_dir, wd=str(tmp_path / "work")))
    base = plan(load_recipe(path))
    changed = load_recipe(path, overrides=["c.seed=7"])
    assert next(s for s in changed.steps if s.name == "c").options["seed"] == 7
    assert [h for _, h, _ in plan(changed)][:2] == [h for _, h, _ in base][:2]
    assert plan(changed)[2][1] != base[2][1]
    for bad, fragment in [("c.seed", "step.field=value"), ("zz.seed=1", "names no step"),
                          ("c.step=init", "cannot change")]:
        with pytest.raises(ConfigError, match=fragment):
            load_recipe(path, overrides=[bad])
    with pytest.raises(ConfigError, match="field 'seed'"):
        load_recipe(path, overrides=["c.seed=many"])


def test_recipe_variables(tmp_path, tokenizer_dir):
    body = f"""\
        vars: {{preset: nano, layers: 2}}
        workdir: {tmp_path / 'w'}
        steps:
          - name: a
            step: init
            preset: ${{vars.preset}}
            tokenizer: {tokenizer_dir}
            set: {{num_hidden_layers: "${{vars.layers}}"}}
        """
    path = _write(tmp_path, body)
    step = load_recipe(path).steps[0]
    assert step.options["preset"] == "nano" and step.options["set"]["num_hidden_layers"] == 2
    step = load_recipe(path, overrides=["vars.preset=micro"]).steps[0]
    assert step.options["preset"] == "micro"
    bad = _write(tmp_path, body.replace("${vars.preset}", "${vars.nope}"), "bad.yaml")
    with pytest.raises(ConfigError, match=r"bad.yaml:6: .*vars.nope"):
        load_recipe(bad)


def _eval_recipe(tok: str, wd, corpus: str, layers: int = 2, limit: int = 3) -> str:
    return f"""\
        workdir: {wd}
        steps:
          - name: model
            step: init
            preset: nano
            tokenizer: {tok}
            set: {{num_hidden_layers: {layers}}}
          - name: ev
            step: eval
            model: ${{model}}
            data: {corpus}
            split: all
            tasks: [stdlib-funcname]
            task_limit: {limit}
            max_bytes: 2000
            speed: false
        """


@pytest.fixture(scope="module")
def small_corpus():
    import sysconfig
    from pathlib import Path

    return str(Path(sysconfig.get_paths()["stdlib"]) / "json" / "*.py")


def test_eval_step_runs_caches_and_invalidates(tmp_path, tokenizer_dir, small_corpus):
    import json

    from slmkit.models.lineage import read_lineage, read_record

    wd = tmp_path / "work"
    path = _write(tmp_path, _eval_recipe(tokenizer_dir, wd, small_corpus))
    first = run_recipe(load_recipe(path))
    assert [r.status for r in first] == ["ran", "ran"]
    figures = first[1].metrics
    assert figures["ppl"] > 1 and 0 <= figures["task_score"] <= 1
    assert figures["task_score"] == figures["stdlib-funcname:exact_match"]
    res = json.loads((wd / "ev" / "results.json").read_text())
    assert res["perplexity"]["bytes"] == 2000 and res["tasks"]["stdlib-funcname"]["n"] == 3
    assert "speed" not in res
    # the eval dir's lineage: the model's chain plus an eval entry holding the summary
    record = read_record(wd / "ev")
    assert record["step"] == "eval" and record["parent"] == str(wd / "model")
    assert record["metrics"]["ppl"] == pytest.approx(figures["ppl"])
    assert [e["step"] for e in read_lineage(wd / "ev")][-2:] == ["init", "eval"]
    assert "ppl" not in (read_record(wd / "model").get("metrics") or {})  # record: false
    assert [r.status for r in run_recipe(load_recipe(path))] == ["cached", "cached"]
    # an eval option reruns only the eval; a changed model reruns both
    path = _write(tmp_path, _eval_recipe(tokenizer_dir, wd, small_corpus, limit=2))
    assert [r.status for r in run_recipe(load_recipe(path))] == ["cached", "ran"]
    assert json.loads((wd / "ev" / "results.json").read_text())["tasks"][
        "stdlib-funcname"]["n"] == 2
    path = _write(tmp_path, _eval_recipe(tokenizer_dir, wd, small_corpus, layers=1, limit=2))
    assert [r.status for r in run_recipe(load_recipe(path))] == ["ran", "ran"]


def test_eval_step_options_are_validated(tmp_path):
    body = """\
        steps:
          - name: ev
            step: eval
            model: somewhere
            split: test
        """
    path = _write(tmp_path, body)
    with pytest.raises(ConfigError, match=rf"{path}:5: step 'ev', field 'split'"):
        load_recipe(path)


def test_optional_steps_run_only_when_referred_to(tmp_path, tokenizer_dir):
    body = f"""\
        vars: {{model: "${{base}}"}}
        workdir: {tmp_path / 'w'}
        steps:
          - name: tok
            step: tokenizer
            optional: true
            vocab_size: 400
          - name: base
            step: init
            optional: true
            preset: nano
            tokenizer: ${{tok}}
          - name: copy
            step: init
            preset: nano
            tokenizer: ${{vars.model}}
        """
    path = _write(tmp_path, body)
    assert [s.name for s in load_recipe(path).steps] == ["tok", "base", "copy"]
    # the variable now names an outside model: base, then tok (only base used it), drop out
    recipe = load_recipe(path, overrides=[f"vars.model={tokenizer_dir}"])
    assert [s.name for s in recipe.steps] == ["copy"]
    bad = _write(tmp_path, body.replace("optional: true", "optional: maybe", 1), "bad.yaml")
    with pytest.raises(ConfigError, match=r"bad.yaml:6: step 'tok': 'optional' must be"):
        load_recipe(bad)
