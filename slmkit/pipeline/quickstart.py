"""``slm quickstart`` (what ``make demo`` runs): the shipped quickstart recipe, end to end.

By default it takes the built-in real model, SmolLM2-135M-Instruct (``builtin:smollm2-135m``,
no network), quantizes it to int8 and 4-bit GPTQ, compares the three side by side
(perplexity, bits/byte, two mined stdlib tasks, decode speed, size, memory), prints each
model's answers to a few chat prompts, and exports the 4-bit model to GGUF with an Ollama
Modelfile. ``--model`` runs the same job on another model. ``--from-scratch`` runs the
from-scratch recipe instead: a tokenizer and models trained on the stdlib, distilled,
pruned, quantized, fine-tuned and compared (``--mini``: the same with tiny budgets). Every
step is cached by config hash, so a second run takes seconds.
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
    """Budgets for a miniature from-scratch run (tests/CI): nano teacher, a few steps per stage, one
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


#: What the real-model quickstart asks every model, greedily, in the chat template.
PROMPTS = ("What is the capital of France?",
           "Write a Python function that returns the square of a number.",
           "Give me two tips for writing clear emails.")


def run_quickstart(out: Path | None = None, model: str | None = None,
                   from_scratch: bool = False, mini: bool = False, force: bool = False,
                   dry_run: bool = False) -> dict[str, Any]:
    """Run the quickstart recipe (real model) or the from-scratch one, and summarise."""
    from slmkit.errors import ConfigError
    from slmkit.pipeline.recipe import load_recipe
    from slmkit.pipeline.runner import print_summary, run_recipe

    from_scratch = from_scratch or mini
    if from_scratch and model is not None:
        raise ConfigError("--model runs the real-model quickstart on your model; drop "
                          "--from-scratch/--mini or --model.")
    if from_scratch:
        recipe = load_recipe(recipe_path("from-scratch"), out,
                             overrides=mini_overrides() if mini else None)
    else:
        recipe = load_recipe(recipe_path("quickstart"), out,
                             overrides=[f"vars.model={model}"] if model else None)
    results = run_recipe(recipe, dry_run=dry_run, force=force)
    print_summary(results, title="slm quickstart" + (" (dry run)" if dry_run else ""))
    if dry_run:
        return {"workdir": str(recipe.workdir), "steps": [r.status for r in results]}
    report = recipe.out_dir("report")
    table = final_table(report)
    print_table("models (held-out stdlib text; Pareto plot: "
                f"{report / 'quality_vs_size.png'})", table["rows"], header=table["header"])
    summary = table["markdown"]
    if not from_scratch:
        answers = chat_answers(report)
        print_table("chat (greedy, chat template)", answers, header=("model", "prompt",
                                                                      "answer"))
        summary += "\n| model | prompt | answer |\n|---|---|---|\n" + "".join(
            f"| {m} | {p} | {a.replace('|', '/')} |\n" for m, p, a in answers)
    (recipe.workdir / "summary.md").write_text(summary, encoding="utf-8")
    gguf = recipe.out_dir("gguf")
    console.print(f"report: [bold]{report / 'report.html'}[/]   summary: "
                  f"{recipe.workdir / 'summary.md'}")
    export = next((s.options for s in recipe.steps if s.kind == "export"), {})
    best = _best_dir(report, export.get("max_size_mb"))
    console.print(f"serve it:  [bold]slm serve {best}[/]   chat: [bold]slm chat {best}[/]")
    console.print(f"llama.cpp / Ollama: {gguf / 'model.gguf'}  (`ollama create slm -f "
                  f"{gguf / 'Modelfile'}`)")
    return {"workdir": str(recipe.workdir), "report": str(report), "table": table,
            "steps": [r.status for r in results]}


def chat_answers(report: Path, max_tokens: int = 48) -> list[tuple[str, str, str]]:
    """Each compared model's greedy answer to each of :data:`PROMPTS`."""
    from slmkit.engine import SamplingParams
    from slmkit.engine.generate import chat_stop_ids, generate_text
    from slmkit.models import load_model

    rows = []
    for m in _models(report):
        if m.get("error"):
            continue
        lm, tok = load_model(m["path"])
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0,
                                stop_token_ids=chat_stop_ids(tok))
        for prompt in PROMPTS:
            text = generate_text(lm, tok, prompt, params, chat=True).text
            rows.append((m["label"], prompt, " ".join(text.split())))
    return rows


def _best_dir(report: Path, max_size_mb: float | None) -> str:
    """The model to serve: the one the export step picks (best bits/byte under its size
    cap), so the commands printed and the GGUF written are the same model."""
    from slmkit.errors import ConfigError
    from slmkit.export.step import ranked_candidates

    try:
        return ranked_candidates(str(report), max_size_mb)[0]["path"]
    except ConfigError:                    # nothing fits the cap: the best of all
        return ranked_candidates(str(report), None)[0]["path"]


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
