"""``slm augment``: expand a small task set with a teacher model, then filter what it made.

Data augmentation helps a small model generalise when task data is scarce (e.g. Wang et
al. 2023, "Self-Instruct"; Gunasekar et al. 2023, "Textbooks Are All You Need", for
teacher-written training data). Two modes, both sampled through :class:`slmkit.engine.Engine`
(continuous batching; every request has its own seeded generator, so the output does not
depend on batching):

* ``completions``: ``n_per_sample`` new completions of each original prompt, sampled from
  the teacher (temperature / top-p); the prompt is kept. A completion that runs into
  ``max_new_tokens`` without reaching a stop (the row's ``stop`` strings, end-of-text, or the
  chat template's end of turn) is half an answer and is dropped.
* ``paraphrase``: ``n_per_sample`` rewritten prompts, the original completion kept. A
  small code LM cannot follow a "rewrite this" instruction, so the rewrite is what it can do
  honestly: the prompt's last line (the cue, e.g. ``name.__doc__ = \"\"\"``) is kept, the first
  ``keep_prefix`` of the body's tokens are kept, and the teacher samples the rest of the body
  (about as many tokens as it replaces, stopping at a blank line). This gives new surface
  forms of the same function head; it is only sound for tasks whose answer depends on the
  head (a docstring summary does; the next line of ``stdlib-nextline`` does not). The
  ``min_logprob`` filter then scores the ORIGINAL completion under the NEW prompt, keeping
  only rewrites under which the teacher still finds the answer likely.

Filters, in order (each counted): empty or unfinished generations; length in tokens of the
generated text (``min_length`` / ``max_length``); exact duplicates after normalisation
(lower case, runs of whitespace collapsed) against the originals and each other; the mean
per-token log-probability of the completion given its prompt under the teacher
(``min_logprob``, one batched forward pass per 8 rows, via
:func:`slmkit.eval.tasks.loglikelihoods`).

Limits: augmentation is only as good as the teacher. The log-prob filter measures how
fluent a row is *to the teacher*, not whether it is right: a weak teacher usually scores its
own samples above the real answers (on the 5M-parameter reference model, about -6.7 vs -7.7
nats/token on ``stdlib-docstring``), so a threshold mostly removes its least typical
samples. The table prints both means to help pick a threshold.

Output: ``OUT/data.jsonl`` (prompt/completion rows, originals first when ``keep_original``;
``origin`` and ``teacher_logprob`` are extra keys that training ignores) and
``OUT/slmkit.json`` (lineage: the teacher is the parent). ``slm finetune --data OUT`` reads it.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import Field

from slmkit.errors import ConfigError
from slmkit.step import ModelStep, StepResult, cli

__all__ = ["AugmentConfig", "run_augment"]


class AugmentConfig(ModelStep):
    """Options of ``slm augment`` and the ``augment`` recipe step."""

    model: str = Field(description="Teacher model dir.", json_schema_extra=cli(argument=True))
    data: str = Field(description="Task JSONL (prompt/completion rows), an augment output "
                      "dir, or a built-in task (stdlib-docstring, ...: its train split).",
                      json_schema_extra=cli(short="-d"))
    out: str | None = Field(default=None, description="Output dir (gets data.jsonl).",
                            json_schema_extra=cli(short="-o"))
    mode: Literal["completions", "paraphrase"] = Field(
        default="completions", description="completions (new completions per prompt) or "
        "paraphrase (rewritten prompts, original completion kept).")
    n_per_sample: int = Field(default=2, ge=1, description="Generations per row.",
                              json_schema_extra=cli(short="-n"))
    temperature: float = Field(default=0.8, ge=0, description="Sampling temperature.")
    top_p: float = Field(default=0.95, gt=0, le=1, description="Nucleus mass (1 = off).")
    max_new_tokens: int = Field(default=64, ge=1, description="Tokens per new completion at "
                                "most.")
    seed: int = Field(default=0, description="Sampling seed.")
    max_samples: int | None = Field(default=None, ge=1, description="Augment only the first "
                                    "N rows.")
    min_length: int = Field(default=1, ge=0, description="Drop generations shorter than this "
                            "(tokens).")
    max_length: int | None = Field(default=None, ge=1, description="Drop generations longer "
                                   "than this (tokens).")
    min_logprob: float | None = Field(default=None, le=0, description="Drop rows whose "
                                      "completion has a lower mean log-prob per token under "
                                      "the teacher (e.g. -3).")
    keep_original: bool = Field(default=True, description="Write the original rows too.")
    template: Literal["auto", "chat", "plain"] = Field(
        default="auto", description="auto, chat or plain (as in slm finetune).")
    keep_prefix: float = Field(default=0.5, gt=0, lt=1, description="Paraphrase: share of the "
                               "prompt body kept.")
    batch_size: int = Field(default=8, ge=1, description="Concurrent generations.")


def normalise(text: str) -> str:
    """The dedup key of a text: lower case, runs of whitespace collapsed."""
    return " ".join(text.split()).lower()


def split_prompt(prompt: str) -> tuple[str, str, str]:
    """``(body, separator, cue)`` with ``body + separator + cue == prompt``.

    The cue is the prompt's last line (empty for a one-line prompt), the separator the
    whitespace between body and cue.
    """
    cut = prompt.rfind("\n") + 1 if "\n" in prompt.rstrip() else len(prompt)
    body, cue = prompt[:cut], prompt[cut:]
    core = body.rstrip()
    return core, body[len(core):], cue


def _prompt_ids(tok, text: str, chat: bool) -> list[int]:
    from slmkit.engine.generate import encode_prompt

    return encode_prompt(tok, text, chat=chat)


def _context_text(tok, prompt: str, chat: bool) -> str:
    """The text the model sees before the completion (the template's generation prompt)."""
    if not chat:
        return prompt
    return tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                   add_generation_prompt=True)


def _requests(cfg: AugmentConfig, tok, rows: list[dict], chat: bool, context: int):
    """``(row index, prompt ids, SamplingParams, paraphrase parts)`` for every generation."""
    from slmkit.engine import SamplingParams
    from slmkit.engine.generate import chat_stop_ids

    out, skipped = [], 0
    for i, row in enumerate(rows):
        parts = None
        if cfg.mode == "completions":
            ids = _prompt_ids(tok, row["prompt"], chat)
            limit, stop = cfg.max_new_tokens, list(row.get("stop") or [])
        else:
            body, sep, cue = split_prompt(row["prompt"])
            body_ids = tok(body, add_special_tokens=False)["input_ids"]
            keep = max(1, round(len(body_ids) * cfg.keep_prefix))
            ids, limit = body_ids[:keep], max(1, len(body_ids) - keep)
            stop = [] if "\n\n" in body else ["\n\n"]
            parts = (tok.decode(ids), sep, cue)
        if not ids or len(ids) + limit + 1 > context:
            skipped += 1
            continue
        for j in range(cfg.n_per_sample):
            params = SamplingParams(max_tokens=limit, temperature=cfg.temperature,
                                    top_p=cfg.top_p, seed=cfg.seed * 1_000_003 + i * 1009 + j,
                                    stop=stop)
            if chat and cfg.mode == "completions":
                params.stop_token_ids = chat_stop_ids(tok)
            out.append((i, ids, params, parts))
    return out, skipped


def _generate(model, tok, requests, cfg: AugmentConfig) -> list[Any]:
    """Run every request through one continuous-batching engine; completions in order."""
    from slmkit.console import progress
    from slmkit.engine import Engine

    if not requests:
        return []
    longest = max(len(ids) + p.max_tokens + 1 for _, ids, p, _ in requests)
    engine = Engine(model, tok, max_batch=cfg.batch_size, background=False,
                    max_seq_len=longest, threads=cfg.threads)
    try:
        handles = [engine.submit(ids, p) for _, ids, p, _ in requests]
        done = []
        with progress(f"augment ({cfg.mode})", total=len(handles)) as update:
            for h in handles:
                done.append(h.result())
                update(1)
        return done
    finally:
        engine.close()


def _mean_logprobs(model, tok, pairs: list[tuple[str, str]], chat: bool) -> list[float]:
    """Mean per-token log-prob of each completion given its prompt under ``model``."""
    from slmkit.eval.tasks import loglikelihoods

    if not pairs:
        return []
    sums = loglikelihoods(model, tok, [(_context_text(tok, p, chat), c) for p, c in pairs])
    return [s / max(1, len(tok(c, add_special_tokens=False)["input_ids"]))
            for s, (_, c) in zip(sums, pairs)]


def run_augment(cfg: AugmentConfig) -> StepResult:
    """Augment ``cfg.data`` with the teacher ``cfg.model`` and write ``cfg.out``.

    Returns:
        Figures: ``rows_in``, ``generated``, ``dropped_*`` per filter, ``rows_out``, the mean
        teacher log-prob of originals and of kept generations.

    Raises:
        ConfigError, DataError, ModelLoadError, OutputError: one sentence each; no output
        directory is left behind.
    """
    import torch

    from slmkit.models import load_model
    from slmkit.models.arch import context_length
    from slmkit.models.io import atomic_dir, resolve_ref
    from slmkit.models.lineage import make_record, read_lineage, write_record
    from slmkit.train.task_data import AUGMENT_FILE, default_template, read_rows

    cfg.check_output()
    cfg.apply_threads()
    rows = read_rows(cfg.data, cfg.max_samples)
    model, tok = load_model(cfg.model, dtype="fp32")
    template = default_template(cfg.data) if cfg.template == "auto" else cfg.template
    chat = template == "chat" and bool(getattr(tok, "chat_template", None))
    context = context_length(model.config) or 2048
    torch.manual_seed(cfg.seed)

    requests, too_long_prompts = _requests(cfg, tok, rows, chat, context)
    results = _generate(model, tok, requests, cfg)
    counts = dict.fromkeys(("empty", "unfinished", "length", "duplicate", "logprob"), 0)
    seen = {normalise(r["prompt"]) + "\x00" + normalise(r["completion"]) for r in rows}
    kept: list[dict] = []
    for (i, _, params, parts), c in zip(requests, results):
        row = rows[i]
        text = c.text
        if not text.strip():
            counts["empty"] += 1
            continue
        if cfg.mode == "completions":
            if c.finish_reason != "stop":
                counts["unfinished"] += 1
                continue
            stop = row.get("stop") or []
            new = {"prompt": row["prompt"], "completion": text + (stop[0] if stop else "")}
            generated = text
        else:
            head, sep, cue = parts
            generated = head + text.rstrip()
            new = {"prompt": generated + sep + cue, "completion": row["completion"]}
        n_tok = len(tok(generated, add_special_tokens=False)["input_ids"])
        if n_tok < cfg.min_length or (cfg.max_length is not None and n_tok > cfg.max_length):
            counts["length"] += 1
            continue
        key = normalise(new["prompt"]) + "\x00" + normalise(new["completion"])
        if key in seen:
            counts["duplicate"] += 1
            continue
        seen.add(key)
        if row.get("stop"):
            new["stop"] = row["stop"]
        kept.append(new)

    model.eval()
    scores = _mean_logprobs(model, tok, [(r["prompt"], r["completion"]) for r in kept], chat)
    out_rows = []
    for r, s in zip(kept, scores):
        if cfg.min_logprob is not None and s < cfg.min_logprob:
            counts["logprob"] += 1
            continue
        out_rows.append({**r, "origin": cfg.mode, "teacher_logprob": round(s, 4)})
    originals = [{k: v for k, v in r.items() if k != "where"} for r in rows]
    orig_scores = _mean_logprobs(model, tok, [(r["prompt"], r["completion"]) for r in rows],
                                 chat)
    if cfg.keep_original:
        out_rows = [{**r, "origin": "original", "teacher_logprob": round(s, 4)}
                    for r, s in zip(originals, orig_scores)] + out_rows
    n_new = len(out_rows) - (len(rows) if cfg.keep_original else 0)
    metrics = {
        "rows_in": len(rows), "generated": len(results),
        "skipped_long_prompts": too_long_prompts * cfg.n_per_sample,
        **{f"dropped_{k}": v for k, v in counts.items()},
        "new_rows": n_new, "rows_out": len(out_rows), "template": template,
        "teacher_logprob_original": sum(orig_scores) / len(orig_scores),
        "teacher_logprob_new": (sum(r["teacher_logprob"] for r in out_rows[-n_new:]) / n_new
                                if n_new else None),
    }
    if not out_rows:
        raise ConfigError(f"All {len(results)} generations were filtered out and "
                          "--no-keep-original leaves no rows; relax --min-logprob or the "
                          "length limits.")
    record = make_record("augment", cfg.lineage(), metrics, read_lineage(resolve_ref(cfg.model),
                                                                   ref=cfg.model))
    with atomic_dir(cfg.out, overwrite=cfg.overwrite) as tmp:
        with open(tmp / AUGMENT_FILE, "w", encoding="utf-8") as f:
            for r in out_rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        write_record(tmp, record)
    return StepResult("augment", str(cfg.out), metrics, _rows({**metrics, "out": cfg.out}))


def _rows(res: dict[str, Any]) -> list[tuple[str, Any]]:
    """The result table of ``slm augment``."""
    rows = [("rows in", res["rows_in"]), ("generated", res["generated"])]
    if res["skipped_long_prompts"]:
        rows.append(("skipped (prompt too long)", res["skipped_long_prompts"]))
    names = {"empty": "dropped: empty", "unfinished": "dropped: unfinished (max tokens)",
             "length": "dropped: length", "duplicate": "dropped: duplicate",
             "logprob": "dropped: teacher log-prob"}
    rows += [(label, res[f"dropped_{k}"]) for k, label in names.items()]
    lp_new = res["teacher_logprob_new"]
    rows += [("new rows kept", res["new_rows"]), ("rows out", res["rows_out"]),
             ("teacher log-prob/token", f"originals {res['teacher_logprob_original']:.3f}, new "
                                        + (f"{lp_new:.3f}" if lp_new is not None else "-")),
             ("prompt template", res["template"]), ("written to", res["out"])]
    return rows
