"""``slm quickstart`` (what ``make demo`` runs): the shipped quickstart recipe, end to end.

On the built-in stdlib corpus with no network: tokenizer, teacher, distilled and
prune-then-distilled students, int8/int4 quantization, a LoRA fine-tune of the teacher on
``stdlib-docstring`` rows that the teacher itself augmented (``slm augment``), a side-by-side comparison (perplexity, bits/byte, three mined tasks,
speed) and a GGUF export of the best model under 10 MB. Every step is cached by config hash, so a second run
takes seconds. ``--model`` runs the compression-and-evaluation half
(``compress-hf-model.yaml``) on a real pretrained model instead.
"""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path
from typing import Any

from slmkit.console import console, human_count, print_table

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


def recipe_path(name: str) -> Path:
    return RECIPES / f"{name}.yaml"


def mini_overrides() -> list[str]:
    """Budgets for a miniature run (tests/CI): nano teacher, a few steps per stage, one
    small stdlib package as the corpus."""
    corpus = str(Path(sysconfig.get_paths()["stdlib"]) / "email" / "*.py")
    small = ["data", "seq_len=64", "batch_size=4", "eval_every=2", "eval_tokens=1024"]
    out = ["tokenizer.vocab_size=512", f"tokenizer.data={corpus}", "teacher.model=nano",
           "teacher.max_steps=4", "student.max_steps=2", "pruned_student.max_steps=2",
           "pruned.target_params=0.6", "pruned.calib_samples=2", "pruned.calib_seq_len=64",
           "report.task_limit=3", "report.max_bytes=4000", "report.decode_tokens=4",
           "report.split=all", "teacher_lora.max_steps=2", "teacher_lora.max_minutes=null",
           "teacher_lora.seq_len=512", "teacher_lora.batch_size=4",
           "docstring_data.max_samples=8", "docstring_data.max_new_tokens=8",
           "docstring_data.min_logprob=null"]
    for step in ("teacher", "student", "pruned_student"):
        out.append(f"{step}.max_minutes=null")
        out += [f"{step}.{o}" if "=" in o else f"{step}.{o}={corpus}" for o in small]
    for step in ("teacher_int4", "student_int4", "pruned_student_int4"):
        out += [f"{step}.calib_samples=2", f"{step}.calib_seq_len=64", f"{step}.calib_data={corpus}"]
    out += [f"pruned.calib_data={corpus}", f"report.data={corpus}"]
    return out


def run_quickstart(out: Path | None = None, model: str | None = None, mini: bool = False,
                   force: bool = False, dry_run: bool = False) -> dict[str, Any]:
    """Run the quickstart (or, with ``model``, the compress-hf-model recipe) and summarise."""
    from slmkit.pipeline.recipe import load_recipe
    from slmkit.pipeline.runner import print_summary, run_recipe

    if model is not None:
        recipe = load_recipe(recipe_path("compress-hf-model"), out or "runs/quickstart-model",
                             overrides=[f"vars.model={model}"])
    else:
        recipe = load_recipe(recipe_path("quickstart"), out,
                             overrides=mini_overrides() if mini else None)
    results = run_recipe(recipe, dry_run=dry_run, force=force)
    print_summary(results, title="slm quickstart" + (" (dry run)" if dry_run else ""))
    if dry_run:
        return {"workdir": str(recipe.workdir), "steps": [r.status for r in results]}
    report = recipe.out_dir("report")
    table = final_table(report)
    print_table("models (held-out stdlib text; Pareto plot: "
                f"{report / 'quality_vs_size.png'})", table["rows"], header=table["header"])
    (recipe.workdir / "summary.md").write_text(table["markdown"], encoding="utf-8")
    gguf = recipe.out_dir("gguf")
    console.print(f"report: [bold]{report / 'report.html'}[/]   summary: "
                  f"{recipe.workdir / 'summary.md'}")
    console.print(f"serve it:  [bold]slm serve {_best_dir(report)}[/]   chat: "
                  f"[bold]slm chat {_best_dir(report)}[/]")
    console.print(f"llama.cpp / Ollama: {gguf / 'model.gguf'}  (`ollama create slm -f "
                  f"{gguf / 'Modelfile'}`)")
    return {"workdir": str(recipe.workdir), "report": str(report), "table": table,
            "steps": [r.status for r in results]}


def _best_dir(report: Path) -> str:
    models = _models(report)
    ok = [m for m in models if not m.get("error") and m.get("perplexity")]
    best = min(ok, key=lambda m: m["perplexity"]["bits_per_byte"]) if ok else models[0]
    return best["path"]


def _models(report: Path) -> list[dict[str, Any]]:
    return json.loads((report / "results.json").read_text())["models"]


def final_table(report: Path) -> dict[str, Any]:
    """Model, parameters, size (MB), perplexity, bits/byte, task score, decode tok/s."""
    header = ["model", "params", "size MB", "ppl", "bits/byte", "task score", "decode tok/s"]
    rows = []
    for m in _models(report):
        if m.get("error"):
            rows.append([m["label"], "–", "–", "–", "–", "–", f"failed: {m['error'][:40]}"])
            continue
        ppl = m.get("perplexity") or {}
        speed = m.get("speed") or {}
        rows.append([m["label"], human_count(m["params"]), f"{m['size_on_disk'] / 1e6:.2f}",
                     f"{ppl.get('ppl', float('nan')):.1f}",
                     f"{ppl.get('bits_per_byte', float('nan')):.3f}", _task_score(m),
                     f"{speed.get('decode_tok_s') or float('nan'):.0f}"])
    md = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return {"header": header, "rows": rows, "markdown": "\n".join(md) + "\n"}


def _task_score(m: dict[str, Any]) -> str:
    """Mean of each task's main score (``score``: accuracy for multiple choice, the task's
    own metric for generation, e.g. exact match for stdlib-funcname, ROUGE-L for
    stdlib-docstring)."""
    scores = [res["score"] for res in (m.get("tasks") or {}).values()
              if isinstance(res, dict) and isinstance(res.get("score"), (int, float))]
    return f"{sum(scores) / len(scores):.1%}" if scores else "–"
