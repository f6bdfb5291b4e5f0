"""Task accuracy from plain JSONL files: multiple choice and generation.

One JSON object per line; a file is one task, named after the file (``mytask.jsonl`` ->
``mytask``). Two kinds, the same format the built-in stdlib tasks are written in::

    {"id": "q1", "type": "multiple_choice", "context": "2 + 2 =",
     "choices": [" 3", " 4", " 5", " 22"], "answer": 1}
    {"id": "q2", "type": "generation", "prompt": "def add(a, b):\\n    return",
     "answer": "a + b", "stop": ["\\n"], "max_new_tokens": 16, "metric": "exact_match"}

Multiple choice is scored lm-eval style: the log-likelihood of each choice as a
continuation of the context; ``acc`` takes the most likely, ``acc_norm`` the most likely
per byte (Gao et al., lm-evaluation-harness, 2021). Generation is greedy; it is scored by
exact match, token F1 (SQuAD) and ROUGE-L, and ``metric`` names the headline figure.
Optional fields: ``source`` (where the item was mined), ``split``. A third kind,
``"function_call"`` (tools, a conversation and the expected calls, scored BFCL-style), is
described in :mod:`slmkit.eval.function_calling`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from slmkit.errors import DataError
from slmkit.eval.ops import exact_match, rouge_l, target_logprobs, token_f1

MC, GEN, FC = "multiple_choice", "generation", "function_call"
GEN_METRICS = ("exact_match", "f1", "rouge_l")


def validate_item(item: Any, where: str) -> dict[str, Any]:
    """Check one task item and fill defaults; ``where`` names it in the error."""
    fix = "see `slm eval --help` for the task format"
    if not isinstance(item, dict):
        raise DataError(f"{where} is not a JSON object; each line must be one task item ({fix}).")
    kind = item.get("type")
    if kind == MC:
        choices, answer = item.get("choices"), item.get("answer")
        if not isinstance(item.get("context"), str):
            raise DataError(f"{where} has no string 'context'; add it ({fix}).")
        if (not isinstance(choices, list) or len(choices) < 2
                or not all(isinstance(c, str) and c for c in choices)):
            raise DataError(f"{where} needs 'choices': a list of at least 2 non-empty strings.")
        if not isinstance(answer, int) or isinstance(answer, bool) \
                or not 0 <= answer < len(choices):
            raise DataError(f"{where} needs 'answer': the 0-based index of the right choice "
                            f"(0..{len(choices) - 1}).")
    elif kind == GEN:
        if not isinstance(item.get("prompt"), str) or not item["prompt"]:
            raise DataError(f"{where} has no non-empty string 'prompt'; add it ({fix}).")
        if not isinstance(item.get("answer"), str):
            raise DataError(f"{where} needs 'answer': the expected completion as a string.")
        stop = item.setdefault("stop", ["\n"])
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise DataError(f"{where} has 'stop' that is not a list of strings.")
        n = item.setdefault("max_new_tokens", 32)
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 4096:
            raise DataError(f"{where} has 'max_new_tokens' {n!r}; use an integer 1..4096.")
        if item.setdefault("metric", "exact_match") not in GEN_METRICS:
            raise DataError(f"{where} has 'metric' {item['metric']!r}; use one of "
                            f"{', '.join(GEN_METRICS)}.")
    elif kind == FC:
        from slmkit.eval.function_calling import validate_fc_item

        validate_fc_item(item, where)
    else:
        raise DataError(f"{where} has 'type' {kind!r}; use \"{MC}\", \"{GEN}\" or "
                        f"\"{FC}\".")
    return item


def read_task_file(path: str | Path) -> list[dict[str, Any]]:
    """Read and validate a JSONL task file.

    Raises:
        DataError: missing/unreadable file, malformed JSON on a line, a bad item, mixed
            task types, or no items at all.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DataError(f"Task file '{path}' does not exist; pass a .jsonl file or a "
                        "built-in task name (see `slm eval --help`).") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"Task file '{path}' cannot be read as UTF-8 text ({e}); "
                        "write it as UTF-8 JSONL.") from None
    items = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"Task file '{path}' line {n} is not valid JSON ({e.msg}); "
                            "write one JSON object per line.") from None
        items.append(validate_item(obj, f"Task file '{path}' line {n}"))
    if not items:
        raise DataError(f"Task file '{path}' holds no task items; add one JSON object per "
                        "line.")
    if len({i["type"] for i in items}) > 1:
        raise DataError(f"Task file '{path}' mixes item types "
                        f"({', '.join(sorted({i['type'] for i in items}))}); put each kind in "
                        "its own file.")
    return items


def write_task_file(path: str | Path, items: Sequence[dict[str, Any]]) -> Path:
    """Write items as JSONL (one object per line, UTF-8, keys in a readable order)."""
    path = Path(path)
    with open(path, "w", encoding="utf-8") as f:
        for item in items:
            f.write(json.dumps(item, ensure_ascii=False) + "\n")
    return path


def loglikelihoods(model, tokenizer, requests: Sequence[tuple[str, str]],
                   batch_size: int = 8) -> list[float]:
    """Sum of log-probabilities of each continuation given its context (lm-eval style).

    Context and continuation are tokenized together and split where the context's own
    tokens end, so a merge across the boundary does not change the text scored. Every
    input starts with the end-of-text token (as documents do in perplexity and training),
    and inputs longer than the model's context keep their most recent tokens.

    Args:
        requests: ``[(context, continuation), ...]``.

    Returns:
        One float (nats, <= 0) per request.
    """
    import torch

    from slmkit.models.arch import context_length

    limit = context_length(model.config) or 2048
    prefix = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    encoded = []
    for context, continuation in requests:
        ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
        whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
        n_ctx = len(ctx)
        while n_ctx > 0 and whole[:n_ctx] != ctx[:n_ctx]:
            n_ctx -= 1  # the boundary merged: score from the last shared token
        cont = whole[n_ctx:]
        if not cont:
            cont = tokenizer(continuation, add_special_tokens=False)["input_ids"]
            whole = ctx + cont
            n_ctx = len(ctx)
        seq = ([prefix] + whole)[-(limit + 1):]
        encoded.append((seq, len(cont)))
    device = next(model.parameters()).device
    out = [0.0] * len(encoded)
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]))
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            width = len(encoded[idx[0]][0]) - 1
            # right padding needs no mask: causal attention never looks ahead
            x = torch.full((len(idx), width), prefix, dtype=torch.long)  # (B, W)
            for row, i in enumerate(idx):
                seq = encoded[i][0][:-1]
                x[row, :len(seq)] = torch.tensor(seq)
            logits = model(input_ids=x.to(device)).logits  # (B, W, V)
            for row, i in enumerate(idx):
                seq, n_cont = encoded[i]
                inputs_len = len(seq) - 1
                n_cont = min(n_cont, inputs_len)  # a continuation longer than the context
                targets = torch.tensor(seq[-n_cont:], device=device)  # (n_cont,)
                lp = target_logprobs(logits[row, inputs_len - n_cont:inputs_len], targets)
                out[i] = float(lp.double().sum())
    return out


def score_multiple_choice(model, tokenizer, items: Sequence[dict[str, Any]],
                          batch_size: int = 8) -> dict[str, Any]:
    """Accuracy of picking the most likely choice; ``acc_norm`` divides by choice bytes."""
    requests = [(it["context"], c) for it in items for c in it["choices"]]
    scores = loglikelihoods(model, tokenizer, requests, batch_size)
    correct = correct_norm = 0
    predictions = []
    k = 0
    for it in items:
        n = len(it["choices"])
        ll = scores[k:k + n]
        k += n
        per_byte = [s / max(1, len(c.encode("utf-8"))) for s, c in zip(ll, it["choices"])]
        pick = max(range(n), key=ll.__getitem__)
        pick_norm = max(range(n), key=per_byte.__getitem__)
        correct += pick == it["answer"]
        correct_norm += pick_norm == it["answer"]
        predictions.append({"id": it.get("id"), "pick": pick, "answer": it["answer"],
                            "loglikelihoods": ll})
    n = len(items)
    return {"type": MC, "n": n, "acc": correct / n, "acc_norm": correct_norm / n,
            "metric": "acc", "score": correct / n, "predictions": predictions}


def score_generation(model, tokenizer, items: Sequence[dict[str, Any]],
                     stream=None) -> dict[str, Any]:
    """Greedy completions scored by exact match, token F1 and ROUGE-L (means over items)."""
    from slmkit.console import progress
    from slmkit.eval.generate import greedy_generate, greedy_generate_many

    totals = dict.fromkeys(GEN_METRICS, 0.0)
    predictions = []
    with progress("generation", total=len(items)) as update:
        if stream is None:  # batched through the engine: same greedy texts, several at once
            texts = greedy_generate_many(
                model, tokenizer, [(it["prompt"], it["max_new_tokens"], it["stop"])
                                   for it in items], on_done=lambda: update(1))
        else:
            texts = []
            for it in items:
                texts.append(greedy_generate(model, tokenizer, it["prompt"],
                                             it["max_new_tokens"], it["stop"], stream=stream))
                update(1)
        for it, text in zip(items, texts):
            em, f1, rl = (exact_match(text, it["answer"]), token_f1(text, it["answer"]),
                          rouge_l(text, it["answer"]))
            totals["exact_match"] += em
            totals["f1"] += f1
            totals["rouge_l"] += rl
            predictions.append({"id": it.get("id"), "prediction": text,
                                "answer": it["answer"]})
    n = len(items)
    metric = items[0]["metric"]
    result = {k: v / n for k, v in totals.items()}
    return {"type": GEN, "n": n, **result, "metric": metric, "score": result[metric],
            "predictions": predictions}


def score_task(model, tokenizer, items: Sequence[dict[str, Any]], stream=None
               ) -> dict[str, Any]:
    """Score one task (all items of one type)."""
    if items[0]["type"] == MC:
        return score_multiple_choice(model, tokenizer, items)
    if items[0]["type"] == FC:
        from slmkit.eval.function_calling import score_function_calls

        return score_function_calls(model, tokenizer, items)
    return score_generation(model, tokenizer, items, stream=stream)
