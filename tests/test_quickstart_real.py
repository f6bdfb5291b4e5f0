"""The real-model quickstart (what `make demo` runs) end to end, with tiny budgets, on the
built-in SmolLM2-135M-Instruct."""

from __future__ import annotations

import json

import pytest

from slmkit.pipeline.quickstart import PROMPTS, chat_answers, recipe_path
from slmkit.pipeline.recipe import load_recipe
from slmkit.pipeline.runner import run_recipe

TINY = ["gptq4.calib_samples=2", "gptq4.calib_seq_len=64", "awq4.calib_samples=2",
        "awq4.calib_seq_len=64", "report.task_limit=2",
        "report.max_bytes=3000", "report.decode_tokens=4",
        "report.tasks=[stdlib-docstring-mc]"]


@pytest.mark.real
@pytest.mark.slow
@pytest.mark.timeout(900)    # five steps on a real model: about 3 minutes on 2 idle cores
def test_real_quickstart_recipe_end_to_end(tmp_path):
    recipe = load_recipe(recipe_path("quickstart"), tmp_path, overrides=TINY)
    assert [s.name for s in recipe.steps] == ["int8", "gptq4", "awq4", "report", "gguf"]
    results = run_recipe(recipe)
    assert [r.status for r in results] == ["ran"] * 5
    report = json.loads((tmp_path / "report" / "results.json").read_text())
    sizes = {m["label"]: m["size_on_disk"] for m in report["models"]}
    assert all(m["error"] is None for m in report["models"])
    # the 4-bit model is the smallest, int8 next, the imported fp32 model the largest
    base = next(k for k in sizes if k not in ("int8", "gptq4", "awq4"))
    assert sizes["gptq4"] == pytest.approx(sizes["awq4"], rel=0.01)
    assert sizes["gptq4"] < sizes["int8"] < sizes[base]
    # the export took the better 4-bit model (lowest bits/byte) that fits the size cap
    bpb = {m["label"]: m["perplexity"]["bits_per_byte"] for m in report["models"]}
    best = min(("gptq4", "awq4"), key=bpb.get)
    import gguf

    name = gguf.GGUFReader(tmp_path / "gguf" / "model.gguf").fields["general.name"]
    assert bytes(name.parts[name.data[0]]).decode() == best
    assert (tmp_path / "gguf" / "model.gguf").read_bytes()[:4] == b"GGUF"
    assert (tmp_path / "gguf" / "Modelfile").is_file()
    answers = chat_answers(tmp_path / "report", max_tokens=12)
    assert len(answers) == 4 * len(PROMPTS)
    paris = {m: a for m, p, a in answers if p == PROMPTS[0]}
    assert "Paris" in paris[base] and "Paris" in paris["int8"], paris
    assert all(a.strip() for m, p, a in answers)       # 2-sample GPTQ answers too
