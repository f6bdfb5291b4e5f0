"""Shipped recipes validate; a miniature quickstart runs end to end and then caches."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from slmkit.pipeline.quickstart import RECIPES, mini_overrides, recipe_path
from slmkit.pipeline.recipe import load_recipe


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_validates(path, tmp_path):
    recipe = load_recipe(path, tmp_path)
    assert recipe.steps
    assert (Path(__file__).parent.parent / "recipes" / path.name).is_file()


def test_required_recipes_are_shipped():
    names = {p.stem for p in RECIPES.glob("*.yaml")}
    assert {"quickstart", "from-scratch", "compress-hf-model", "distill", "finetune-lora"} <= names


@pytest.mark.parametrize("name, var, dropped", [
    ("distill", "teacher", {"tokenizer", "teacher"}),
    ("finetune-lora", "model", {"tokenizer", "base"}),
])
def test_recipe_input_var_replaces_the_built_in_model(name, var, dropped, tmp_path):
    """Offline by default (the recipe trains its own model); a given model drops those steps."""
    own = {s.name for s in load_recipe(recipe_path(name), tmp_path).steps}
    assert dropped <= own
    given = load_recipe(recipe_path(name), tmp_path, overrides=[f"vars.{var}=/models/mine"])
    assert not dropped & {s.name for s in given.steps}
    assert any(s.options.get("model") == "/models/mine" or s.options.get("teacher") ==
               "/models/mine" for s in given.steps)


def test_task_score_is_the_mean_of_each_tasks_main_score():
    from slmkit.pipeline.quickstart import _task_score

    m = {"tasks": {"mc": {"metric": "acc", "acc": 0.25, "score": 0.25},
                   "gen": {"metric": "rouge_l", "exact_match": 0.0, "rouge_l": 0.5,
                           "score": 0.5}}}
    assert _task_score(m) == "37.5%"
    assert _task_score({"tasks": {}}) == "–"


def tiny_finetune_overrides() -> list[str]:
    """finetune-lora.yaml in seconds: nano base, a few steps, one small stdlib package."""
    import sysconfig

    corpus = str(Path(sysconfig.get_paths()["stdlib"]) / "json" / "*.py")
    out = ["tokenizer.vocab_size=400", f"tokenizer.data={corpus}", "base.model=nano",
           "base.max_steps=3", "base.max_minutes=null", f"base.data={corpus}",
           "base.seq_len=64", "base.batch_size=4", "base.eval_every=3", "base.eval_tokens=512",
           "lora.max_steps=3", "lora.max_minutes=null", "lora.max_samples=12",
           "lora.seq_len=128", "lora.batch_size=4"]
    for ev in ("before", "after"):
        out += [f"{ev}.task_limit=3", f"{ev}.max_bytes=2000", f"{ev}.data={corpus}",
                f"{ev}.split=all"]
    return out


@pytest.mark.slow
def test_finetune_lora_recipe_end_to_end(tmp_path):
    import slmkit
    from slmkit.models.lineage import read_lineage
    from slmkit.pipeline.runner import run_recipe

    recipe = load_recipe(recipe_path("finetune-lora"), tmp_path, tiny_finetune_overrides())
    results = run_recipe(recipe)
    assert [(r.name, r.status) for r in results] == [
        ("tokenizer", "ran"), ("base", "ran"), ("before", "ran"), ("lora", "ran"),
        ("after", "ran")]
    before, after = (json.loads((tmp_path / n / "results.json").read_text()) for n in
                     ("before", "after"))
    assert before["tasks"]["stdlib-docstring"]["n"] == after["tasks"]["stdlib-docstring"]["n"]
    assert before["perplexity"]["bytes"] == after["perplexity"]["bytes"] == 2000
    # the merged LoRA model is a plain dense model: loads without the adapter
    assert not (tmp_path / "lora" / "adapter_config.json").exists()
    model, _ = slmkit.load_model(tmp_path / "lora")
    assert model is not None
    assert [e["step"] for e in read_lineage(tmp_path / "after")][-3:] == [
        "train", "finetune", "eval"]
    assert all(r.status == "cached" for r in run_recipe(recipe))


def test_mini_overrides_validate(tmp_path):
    recipe = load_recipe(recipe_path("from-scratch"), tmp_path, overrides=mini_overrides())
    teacher = next(s for s in recipe.steps if s.name == "teacher")
    assert teacher.options["model"] == "nano" and teacher.options["max_steps"] == 4


@pytest.mark.slow
def test_mini_quickstart_end_to_end(tmp_path):
    import slmkit
    from slmkit.pipeline.quickstart import run_quickstart

    out = tmp_path / "qs"
    res = run_quickstart(out, mini=True)
    assert res["steps"] == ["ran"] * 14
    results = json.loads((out / "report" / "results.json").read_text())
    labels = {m["label"] for m in results["models"]}
    assert labels == {"teacher", "teacher_int8", "teacher_int4", "teacher_lora", "student",
                      "student_int4", "pruned", "pruned_student", "pruned_student_int8",
                      "pruned_student_int4"}
    assert all(m["error"] is None for m in results["models"])
    assert set(results["tasks"]) == {"stdlib-docstring-mc", "stdlib-funcname", "stdlib-docstring"}
    for name in labels:
        model, tok = slmkit.load_model(out / name)
        assert model is not None and tok is not None
    for f in ("report.html", "report.md", "quality_vs_size.png", "quality_vs_speed.png"):
        assert (out / "report" / f).stat().st_size > 0
    gguf = out / "gguf" / "model.gguf"
    assert gguf.read_bytes()[:4] == b"GGUF" and (out / "gguf" / "Modelfile").is_file()
    assert "| model |" in (out / "summary.md").read_text()
    # lineage: the int4 prune-then-distill student descends from init -> train -> prune -> ...
    steps = [e["step"] for e in slmkit.models.lineage.read_lineage(out / "pruned_student_int4")]
    assert steps[-3:] == ["prune", "distill", "quantize"]
    assert [e["step"] for e in slmkit.models.lineage.read_lineage(out / "teacher_lora")][-2:] \
        == ["train", "finetune"]
    augmented = (out / "docstring_data" / "data.jsonl").read_text().splitlines()
    assert len(augmented) >= 8  # the 8 originals are kept
    again = run_quickstart(out, mini=True)
    assert again["steps"] == ["cached"] * 14
