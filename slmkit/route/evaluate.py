"""``slm route eval``: quality against share forwarded, for cascade, router and random.

On generation tasks with reference answers (the built-in stdlib tasks or JSONL task files),
both models answer every item greedily; each item then has the small model's quality, the
big model's quality, the cascade scores of the small answer (:mod:`slmkit.route.scores`)
and a router score from a router that never saw the item (k-fold cross-validation of
:mod:`slmkit.route.router` on the small model's hidden states, labels "the big answer
scores higher"). Forwarding the lowest-scored items first traces each strategy's curve.

Figures, as RouteLLM (Ong et al. 2024) defines them, with PGR(c) = (quality(c) -
small) / (big - small) at share c forwarded:

* **APGR**: the area under PGR(c) over c in [0, 1]; random routing scores 0.5 (its
  expected curve is the straight line), an oracle close to 1 (or above, where the small
  model beats the big one on some items);
* **CPT(95%)**: the smallest share forwarded with PGR >= 0.95 (random: 95%), and the share
  whose quality reaches 95% of the big model's own;
* **overheads**: the router's decision time per prompt (features + classifier, p50/p95),
  the cascade's scoring time and its local answer time (what an escalated request waits
  before the big model starts).

The second task set doubles as a different traffic mix: a threshold calibrated on the
first (forwarding 30%) is applied to the second and the share it forwards there reported.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from slmkit.route.calibrate import curve, share_below, threshold_at
from slmkit.route.router import HiddenFeatures, auc, fit_logistic, train_router
from slmkit.route.scores import all_scores


def pgr_figures(scores, small_q, big_q) -> dict[str, float]:
    """APGR, CPT(95%) and the share reaching 95% of the big model's quality."""
    shares, quality = curve(scores, small_q, big_q)
    small, big = float(np.mean(small_q)), float(np.mean(big_q))
    gap = big - small
    pgr = (quality - small) / gap if gap > 0 else np.zeros_like(quality)
    apgr = float(np.sum((pgr[1:] + pgr[:-1]) / 2) / (len(pgr) - 1))
    reach = np.nonzero(pgr >= 0.95 - 1e-12)[0]
    q95 = np.nonzero(quality >= 0.95 * big - 1e-12)[0]
    return {"apgr": apgr, "cpt95": float(shares[reach[0]]) if len(reach) else 1.0,
            "share_for_95pct_quality": float(shares[q95[0]]) if len(q95) else 1.0,
            "quality_at_50pct": float(np.interp(0.5, shares, quality))}


def heal(prompt: str, stop: list[str]) -> tuple[str, list[str]]:
    """A prompt without its trailing spaces, and the stops the engine can apply.

    Mined prompts end in spaces ("named: ", a new line's indent); a BPE model has never
    seen a space token before a word there, and answers nothing. The spaces are left to
    the model (the answer's leading spaces are dropped again by :func:`cut`), and stops
    that are only whitespace are applied after that, not by the engine."""
    return prompt.rstrip(" \t"), [s for s in stop if s and s.strip(" \t")]


def cut(text: str, stop: list[str]) -> str:
    """The answer: leading spaces dropped, cut at the first stop string."""
    text = text.lstrip(" \t")
    return text[:min((text.index(s) for s in stop if s and s in text), default=len(text))]


def answer_locally(model, tokenizer, items, confidence: bool, batch: int = 8):
    """Greedy answers of one model through the engine: ``(texts, confidences, seconds)``."""
    import torch

    from slmkit.engine import Engine, SamplingParams

    jobs = []
    for it in items:
        prompt, _ = heal(it["prompt"], it["stop"])
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"] or \
            [tokenizer.eos_token_id or 0]
        jobs.append((ids[-1024:], SamplingParams(max_tokens=it["max_new_tokens"], temperature=0,
                                                 stop=heal(it["prompt"], it["stop"])[1],
                                                 confidence=confidence)))
    longest = max(len(ids) + p.max_tokens + 1 for ids, p in jobs)
    engine = Engine(model, tokenizer, max_batch=batch, background=False,
                    max_seq_len=min(longest, 2048), threads=torch.get_num_threads())
    try:
        if batch == 1:   # one at a time: each duration is one answer's own latency
            done = [engine.submit(ids, p).result() for ids, p in jobs]
        else:
            handles = [engine.submit(ids, p) for ids, p in jobs]
            done = [h.result() for h in handles]
    finally:
        engine.close()
    return ([cut(c.text, it["stop"]) for c, it in zip(done, items)],
            [c.confidence for c in done],
            [c.duration_s or 0.0 for c in done])


def answer_remotely(url: str, items, timeout: float = 300.0) -> list[str]:
    """Greedy answers of a running OpenAI-compatible server (``/v1/completions``)."""
    import httpx

    from slmkit.route.client import base_url

    base = base_url(url)
    with httpx.Client(timeout=timeout) as client:
        model = client.get(base + "/models").json()["data"][0]["id"]
        out = []
        for it in items:
            prompt, stop = heal(it["prompt"], it["stop"])
            r = client.post(base + "/completions", json={
                "model": model, "prompt": prompt, "max_tokens": it["max_new_tokens"],
                "temperature": 0, "stop": stop[:4] or None})
            r.raise_for_status()
            out.append(cut(r.json()["choices"][0]["text"], it["stop"]))
    return out


def quality(item: dict, text: str) -> float:
    from slmkit.eval.ops import exact_match, rouge_l, token_f1

    from slmkit.rag.metrics import contains

    metric = {"exact_match": exact_match, "f1": token_f1, "rouge_l": rouge_l,
              "contains": contains}[item["metric"]]
    return float(metric(text, item["answer"]))


def cross_val_router(x: np.ndarray, labels: np.ndarray, folds: int, seed: int,
                     l2: float = 1.0, extra: tuple[np.ndarray, np.ndarray] | None = None
                     ) -> np.ndarray:
    """Each row's router score ``P(small suffices)`` from a router fitted without it.

    ``extra``: more labelled rows ``(x, labels)`` (a training split never evaluated) added
    to every fold's fit."""
    rng = np.random.default_rng(seed)
    fold = rng.permutation(len(x)) % folds
    out = np.zeros(len(x))
    for f in range(folds):
        test, train = fold == f, fold != f
        xt, yt = x[train], labels[train]
        if extra is not None:
            xt, yt = np.concatenate([xt, extra[0]]), np.concatenate([yt, extra[1]])
        if len(set(yt)) < 2:   # one class only: no ranking to learn
            out[test] = 1.0 - yt.mean()
            continue
        w, b, mean, scale = fit_logistic(xt, yt, l2)
        z = ((x[test] - mean) / scale) @ w + b
        out[test] = 1.0 / (1.0 + np.exp(np.clip(z, -60, 60)))
    return out


def decision_times(decide, texts: list[str], n: int, pause_s: float) -> dict[str, float]:
    """Wall milliseconds of ``decide(text)``, p50/p95/p99 over ``n`` decisions cycling
    ``texts``: once back to back, once paced ``pause_s`` apart (one decision per request
    arrival, as a server makes them); with the load average it ran under."""
    import os

    decide(texts[0])   # first-call costs outside the timing
    out = {}
    for how, pause in (("", pause_s), ("back_to_back_", 0.0)):
        times = np.empty(n)
        for i in range(n):
            if pause:
                time.sleep(pause)
            t0 = time.perf_counter()
            decide(texts[i % len(texts)])
            times[i] = time.perf_counter() - t0
        p50, p95, p99 = np.percentile(times * 1000, [50, 95, 99])
        out.update({f"{how}p50": float(p50), f"{how}p95": float(p95), f"{how}p99": float(p99)})
    out.update(decisions=n, pause_ms=pause_s * 1000, load_avg_1m=os.getloadavg()[0])
    return out


def answer_both(cfg, items, small_model, small_tok, cache: Path | None):
    """Both models' greedy answers (and the small one's confidence records) for ``items``,
    read from ``cache`` when an earlier run answered the same ids with the same models."""
    from slmkit.console import console
    from slmkit.models import load_model

    key = {"small": cfg.small, "big": cfg.big, "ids": [it.get("id") for it in items]}
    cached = json.loads(cache.read_text()) if cache is not None and cache.exists() else {}
    if cached.get("key") == key:   # the answers of an earlier run on the same items
        console.print(f"[dim]{len(items)} items; answers from {cache}[/dim]")
        return cached["small"], cached["big"], [
            [tuple(c) for c in conf] if conf else conf for conf in cached["confs"]]
    console.print(f"[dim]{len(items)} items; answering with the small model...[/dim]")
    small_text, confs, _ = answer_locally(small_model, small_tok, items, True)
    console.print("[dim]answering with the big model...[/dim]")
    if cfg.big.startswith(("http://", "https://")):
        big_text = answer_remotely(cfg.big, items)
    else:
        big_model, big_tok = load_model(cfg.big)
        big_text = answer_locally(big_model, big_tok, items, False)[0]
        del big_model
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps({"key": key, "small": small_text, "big": big_text,
                                     "confs": confs}))
    return small_text, big_text, [[tuple(c) for c in conf] if conf else conf
                                  for conf in confs]


def run_eval(cfg, tasks: dict[str, list[dict]] | None = None,
             train: dict[str, list[dict]] | None = None):
    """Answer, score, route; the table of figures (and results.json / scores.jsonl).

    ``tasks``: generation items prepared by the caller (``{task: items}``; their
    ``metric`` may also be ``contains``: the normalised gold text appears in the answer)
    instead of ``cfg.tasks``. ``train``: more items of the same kind, answered by both
    models and used only to fit the routers (a separate split: never scored)."""
    import torch

    from slmkit.console import console
    from slmkit.eval.evaluate import resolve_tasks
    from slmkit.models import load_model
    from slmkit.step import StepResult, Table

    cfg.apply_threads()
    tasks = tasks or resolve_tasks(cfg.tasks, limit=cfg.limit)
    for name, items in tasks.items():
        if items[0]["type"] != "generation":
            from slmkit.errors import ConfigError

            raise ConfigError(f"Task '{name}' is {items[0]['type']}; routing is measured on "
                              "generation tasks (the answers are generated).")
    items = [dict(it, task=name) for name, its in tasks.items() for it in its]
    small_model, small_tok = load_model(cfg.small)
    cache = Path(cfg.out) / "answers.json" if cfg.out else None
    small_text, big_text, confs = answer_both(cfg, items, small_model, small_tok, cache)
    # what an escalated request waits for before the big model starts: one local answer
    # alone (the batched runs queue items behind each other)
    alone = answer_locally(small_model, small_tok, items[:8], True, batch=1)[2]
    small_q = np.array([quality(it, t) for it, t in zip(items, small_text)])
    big_q = np.array([quality(it, t) for it, t in zip(items, big_text)])

    # cascade scores (and how long scoring one answer takes)
    all_scores(confs[0])   # loads the monitor's flag model once, outside the timing
    start = time.perf_counter()
    per_item = [all_scores(c) for c in confs]
    score_us = (time.perf_counter() - start) * 1e6 / len(items)
    # routers: features of each prompt from the small model, k-fold, one per depth; the
    # training split's items (answered by both models, never scored) join every fold's fit
    labels = (big_q > small_q).astype(int)
    extra_items, extra_labels = [], None
    if train:
        extra_items = [dict(it, task=name) for name, its in train.items() for it in its]
        tcache = Path(cfg.out) / "answers-train.json" if cfg.out else None
        ts, tb, _ = answer_both(cfg, extra_items, small_model, small_tok, tcache)
        extra_labels = np.array([quality(it, b) > quality(it, a)
                                 for it, a, b in zip(extra_items, ts, tb)], dtype=int)
    torch.set_num_threads(1)
    routers, decision_ms, spread = {}, {}, {}
    texts = [it["prompt"] for it in items]
    for layers in cfg.layers:
        feats = HiddenFeatures(small_model, small_tok, layers, 128)
        x = feats(texts)
        extra = None if extra_labels is None else \
            (feats([it["prompt"] for it in extra_items]), extra_labels)
        name = f"router-l{layers}"
        routers[name] = cross_val_router(x, labels, cfg.folds, cfg.seed, extra=extra)
        # how much the figure owes to one assignment of folds
        apgrs = [pgr_figures(cross_val_router(x, labels, cfg.folds, seed, extra=extra),
                             small_q, big_q)["apgr"] for seed in range(10)]
        spread[name] = {"mean": float(np.mean(apgrs)), "sd": float(np.std(apgrs)),
                        "min": float(np.min(apgrs)), "max": float(np.max(apgrs))}
        # the decision as the server makes it (Router.decider: the folded token router
        # for 0 layers), fitted on every item here only to be timed
        xs, ys = (x, labels) if extra is None else \
            (np.concatenate([x, extra[0]]), np.concatenate([labels, extra[1]]))
        router = train_router(lambda _: xs, [], ys, kind="hidden", layers=layers,
                              max_tokens=128)
        decide = router.decider(small_model, small_tok)
        decision_ms[name] = decision_times(decide, texts, cfg.decisions if layers == 0 else
                                           min(cfg.decisions, 40), 0.005)

    strategies = {f"cascade:{s}": np.array([p[s] for p in per_item]) for s in cfg.signals
                  if s in per_item[0]}
    strategies.update(routers)
    rng = np.random.default_rng(cfg.seed)
    strategies["oracle"] = -(big_q - small_q) + rng.random(len(items)) * 1e-9
    results = {"small": cfg.small, "big": cfg.big, "items": len(items),
               "tasks": {k: len(v) for k, v in tasks.items()},
               "small_quality": float(small_q.mean()), "big_quality": float(big_q.mean()),
               "big_better": int((big_q > small_q).sum()),
               "small_better": int((small_q > big_q).sum()),
               "router_auc": {k: auc(-v, labels == 1) for k, v in routers.items()},
               "strategies": {"random (expected)": {"apgr": 0.5, "cpt95": 0.95,
                                                    "share_for_95pct_quality": None}}}
    for name, s in strategies.items():
        results["strategies"][name] = pgr_figures(s, small_q, big_q)
        if name.startswith("cascade:"):
            results["strategies"][name]["auc"] = auc(-s, labels == 1)
        if name in spread:
            results["strategies"][name]["apgr_over_10_fold_seeds"] = spread[name]
    if extra_items:
        results["router_training"] = {"extra_items": len(extra_items),
                                      "extra_needs_big": int(extra_labels.sum())}
    q95 = 0.95 * big_q.mean()
    gap = big_q.mean() - small_q.mean()
    results["strategies"]["random (expected)"]["share_for_95pct_quality"] = \
        float(min(1.0, max(0.0, (q95 - small_q.mean()) / gap))) if gap > 0 else None
    results["overhead"] = {
        "router_decision_ms": decision_ms,
        "cascade_scoring_us": score_us,
        "cascade_local_answer_ms_mean": float(np.mean(alone) * 1000)}
    # calibration on the first task, checked on the second (another traffic mix)
    names = list(tasks)
    if len(names) >= 2:
        shift = {}
        a = np.array([it["task"] == names[0] for it in items])
        for name, s in strategies.items():
            if name == "oracle":
                continue
            t = threshold_at(s[a], int(round(0.3 * a.sum())))
            shift[name] = {"calibrated_on": names[0], "share_there": share_below(s[a], t),
                           "checked_on": names[1], "share_there_check": share_below(s[~a], t)}
        results["calibration_shift"] = shift

    table = Table("quality vs share forwarded", header=(
        "strategy", "APGR", "CPT(95%)", "share for 95% of big quality", "quality at 50%"),
        rows=[(name, f"{r['apgr']:.3f}", f"{r['cpt95']:.1%}",
               "-" if r.get("share_for_95pct_quality") is None
               else f"{r['share_for_95pct_quality']:.1%}",
               f"{r['quality_at_50pct']:.4f}" if "quality_at_50pct" in r else "-")
              for name, r in results["strategies"].items()])
    tables = [table]
    if "calibration_shift" in results:
        tables.append(Table("threshold for 30% forwarded, calibrated on one task, checked "
                            "on the other", header=("strategy", f"share on {names[0]}",
                                                    f"share on {names[1]}"),
                            rows=[(k, f"{v['share_there']:.1%}",
                                   f"{v['share_there_check']:.1%}")
                                  for k, v in results["calibration_shift"].items()]))
    o = results["overhead"]
    best = max((k for k in results["strategies"] if k != "oracle"),
               key=lambda k: results["strategies"][k]["apgr"])
    per_task = ", ".join(f"{k}: {v}" for k, v in results["tasks"].items())
    aucs = {k: "n/a" if v is None else f"{v:.3f}" for k, v in results["router_auc"].items()}
    rows = [("items", f"{len(items)} ({per_task})"),
            ("small / big quality", f"{small_q.mean():.4f} / {big_q.mean():.4f} (big better on "
                                    f"{results['big_better']}, small on "
                                    f"{results['small_better']})"),
            ("best mode", f"{best}: APGR {results['strategies'][best]['apgr']:.3f}"),
            *[(f"{k}: AUC (cross-validated), APGR over 10 fold seeds",
               f"{aucs[k]}, {spread[k]['mean']:.3f} +- {spread[k]['sd']:.3f}")
              for k in routers],
            *[(f"{k}: decision p50 / p95 / p99", f"{v['p50']:.2f} / {v['p95']:.2f} / "
               f"{v['p99']:.2f} ms ({v['decisions']}, {v['pause_ms']:.0f} ms apart; back to "
               f"back p95 {v['back_to_back_p95']:.2f} ms; load {v['load_avg_1m']:.1f})")
              for k, v in o["router_decision_ms"].items()],
            ("cascade scoring / local answer", f"{o['cascade_scoring_us']:.0f} us / "
                                               f"{o['cascade_local_answer_ms_mean']:.0f} ms "
                                               "mean")]
    out = None
    if cfg.out:
        out = Path(cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
        with open(out / "scores.jsonl", "w", encoding="utf-8") as f:
            for i, it in enumerate(items):
                scores = {k.removeprefix("cascade:"): float(v[i]) for k, v in
                          strategies.items() if k != "oracle"}
                scores.update({k: float(v) for k, v in per_item[i].items()})
                f.write(json.dumps({"id": it.get("id"), "task": it["task"],
                                    "prompt": it["prompt"], "scores": scores,
                                    "small_quality": float(small_q[i]),
                                    "big_quality": float(big_q[i]),
                                    "small_answer": small_text[i], "big_answer": big_text[i]})
                        + "\n")
        rows.append(("written", f"{out}/results.json, {out}/scores.jsonl"))
    return StepResult("route eval", out=str(out) if out else None,
                      figures={"best_apgr": results["strategies"][best]["apgr"]},
                      rows=rows, tables=tables, data=results)
