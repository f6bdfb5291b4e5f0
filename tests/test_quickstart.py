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
    assert {"quickstart", "compress-hf-model"} <= names


def test_mini_overrides_validate(tmp_path):
    recipe = load_recipe(recipe_path("quickstart"), tmp_path, overrides=mini_overrides())
    teacher = next(s for s in recipe.steps if s.name == "teacher")
    assert teacher.options["model"] == "nano" and teacher.options["max_steps"] == 4


@pytest.mark.slow
def test_mini_quickstart_end_to_end(tmp_path):
    import slmkit
    from slmkit.pipeline.quickstart import run_quickstart

    out = tmp_path / "qs"
    res = run_quickstart(out, mini=True)
    assert res["steps"] == ["ran"] * 11
    results = json.loads((out / "report" / "results.json").read_text())
    labels = {m["label"] for m in results["models"]}
    assert labels == {"teacher", "teacher_int8", "teacher_int4", "student", "student_int4",
                      "pruned", "pruned_student", "pruned_student_int4"}
    assert all(m["error"] is None for m in results["models"])
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
    again = run_quickstart(out, mini=True)
    assert again["steps"] == ["cached"] * 11
