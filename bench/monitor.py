"""Monitoring on the built-in model: the hallucination flag, drift detection and its cost.

Three parts (``--parts flag,drift,cost``), all offline on real models:

1. **flag**: greedy chat answers of ``builtin:smollm2-135m`` (its chat template, as the
   server runs it) to questions whose answers are known by construction: which stdlib
   module provides a function (from the running interpreter: 600 questions) and integer
   arithmetic (400), every ``--qa-every``-th kept; an answer is wrong when it does not
   name the module / end in the right number. (The mined stdlib completion tasks did not
   serve: the instruct model continues their raw-text prompts with a newline or a code
   fence, so nearly every answer was empty.) The flag's risk model
   (:class:`slmkit.monitor.confidence.FlagModel`) is fitted on the questions' hash-split
   *train* 60% (``--fit`` writes ``slmkit/monitor/flag_model.json``) and scored on the
   other 40%: AUROC of "this answer is wrong" for the risk and for the plain mean token
   log-probability (the baseline), and precision/recall at the shipped threshold.
   Bar: AUROC >= 0.70 and >= 5 points above the baseline.
2. **drift**: request streams whose prompts come from one domain (stdlib code: function
   sources) and, after ``--shift-at`` requests, from another (stdlib prose: docstrings and
   pydoc topics; a second scenario: text-handling modules' code -> concurrency modules'
   code); the reference is the stream's first ``--reference`` requests. The
   detector (:class:`slmkit.monitor.drift.DriftDetector`, MMD permutation test on MiniLM
   prompt embeddings) checks every ``--every`` requests. Over ``--seeds`` seeds: the share
   of shifted streams caught within 200 requests of the shift and the share of unshifted
   streams (same length, one domain) with any alarm. Bar: caught in all, false alarms <= 5%.
3. **cost**: the engine's decode speed with monitoring on (per-token confidence) vs off,
   the same greedy requests, runs interleaved A B A B; and the server end to end
   (confidence + SQLite request log with prompt embeddings) vs ``monitor=False``, over
   real HTTP on 127.0.0.1. Bar: >= 0.95x.

Run (writes ``bench/results/monitor.json``)::

    nice -n 10 .venv/bin/python bench/monitor.py [--fit]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results"
MODEL = "builtin:smollm2-135m"


def args_threads() -> int:
    """Torch threads for the engine: ``SLM_BENCH_THREADS`` or 1 (on a 2-core machine shared
    with other jobs, two threads wait on each other at every op's barrier)."""
    import os

    return int(os.environ.get("SLM_BENCH_THREADS", "1"))


def auroc(scores, positive) -> float:
    """P(score of a random positive > score of a random negative), ties half (Mann-Whitney U)."""
    from scipy.stats import mannwhitneyu

    pos = [s for s, p in zip(scores, positive) if p]
    neg = [s for s, p in zip(scores, positive) if not p]
    return float(mannwhitneyu(pos, neg).statistic / (len(pos) * len(neg)))


STDLIB_MODULES = ("os", "os.path", "json", "re", "math", "random", "string", "itertools",
                  "functools", "shutil", "datetime", "time", "urllib.parse", "hashlib",
                  "base64", "textwrap", "statistics", "heapq", "bisect", "glob", "fnmatch",
                  "copy", "inspect", "operator", "tempfile", "zlib", "gzip", "struct",
                  "socket", "logging", "difflib", "calendar", "keyword", "shlex", "secrets",
                  "platform", "locale", "html", "unicodedata", "binascii", "colorsys", "gc",
                  "sys", "io", "codecs", "pprint", "warnings", "traceback", "contextlib")


def qa_items() -> list[dict]:
    """Chat questions with answers known by construction: which stdlib module defines a
    function (from the running interpreter), and integer arithmetic of growing size."""
    import hashlib
    import importlib
    import random

    items = []
    for name in STDLIB_MODULES:
        mod = importlib.import_module(name)
        for fn in sorted(vars(mod)):
            obj = getattr(mod, fn)
            if fn.startswith("_") or not callable(obj) or isinstance(obj, type) \
                    or getattr(obj, "__module__", None) not in (name, mod.__name__):
                continue
            items.append({"kind": "module", "answer": name, "name": fn,
                          "question": f"In the Python standard library, which module provides "
                                      f"the function `{fn}`? Answer with the module name only."})
    rng = random.Random(0)
    for i in range(400):
        digits = 1 + i % 3
        a, b = rng.randrange(10 ** (digits - 1), 10 ** digits), rng.randrange(1, 10 ** digits)
        op = "+-*"[i % 3]
        items.append({"kind": "arithmetic", "answer": str(eval(f"{a}{op}{b}")),
                      "question": f"What is {a} {op} {b}? Answer with the number only."})
    for it in items:  # a stable 60/40 split by the question's hash
        h = int(hashlib.blake2b(it["question"].encode(), digest_size=4).hexdigest(), 16)
        it["split"], it["id"], it["h"] = ("train" if h % 10 < 6 else "val"), it["question"], h // 10
    return items


def is_right(item: dict, text: str) -> bool:
    import re

    if item["kind"] == "arithmetic":
        tail = text.rsplit("=", 1)[-1]  # "15 - 34 = -19": the result after the last "="
        m = re.search(r"-?\d[\d,]*", tail)
        return bool(m) and m.group(0).replace(",", "") == item["answer"]
    mods = re.findall(r"[A-Za-z_][\w.]*", text.replace("`", " "))
    return any(m.rstrip(".") == item["answer"] or m.startswith(item["answer"] + "." + item["name"])
               for m in mods)


def answer_chat(model, tok, items, batch: int = 8) -> list[dict]:
    """Greedy chat answers (the template the server uses) with the confidence the server
    returns: every generated token of the answer."""
    from slmkit.engine import Engine, SamplingParams
    from slmkit.engine.generate import chat_stop_ids
    from slmkit.monitor.confidence import features

    engine = Engine(model, tok, max_batch=batch, background=False, max_seq_len=512,
                    threads=args_threads())
    stops = chat_stop_ids(tok)
    handles = []
    for it in items:
        ids = tok.apply_chat_template([{"role": "user", "content": it["question"]}],
                                      add_generation_prompt=True, tokenize=True)
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        handles.append(engine.submit(ids, SamplingParams(max_tokens=24, temperature=0,
                                                         stop_token_ids=stops,
                                                         confidence=True)))
    rows, t0 = [], time.time()
    for i, (it, h) in enumerate(zip(items, handles)):
        c = h.result()
        if (i + 1) % 100 == 0:
            print(f"[flag] {i + 1}/{len(items)} answered ({time.time() - t0:.0f} s)", flush=True)
        if c.confidence:
            rows.append({"id": it["id"], "task": it["kind"], "answer": it["answer"],
                         "prediction": c.text, "wrong": not is_right(it, c.text),
                         **features(c.confidence)})
    engine.close()
    return rows


def part_flag(args) -> dict:
    from slmkit.models import load_model
    from slmkit.monitor.confidence import FlagModel

    model, tok = load_model(MODEL)
    cache = RESULTS / "monitor_labels_qa.json"
    if cache.exists():
        rows = json.loads(cache.read_text())
    else:
        items = [it for it in qa_items() if it["h"] % args.qa_every == 0]
        print(f"[flag] {len(items)} questions", flush=True)
        rows = answer_chat(model, tok, items)
        split = {it["id"]: it["split"] for it in items}
        for r in rows:
            r["split"] = split[r["id"]]
        cache.write_text(json.dumps(rows))
    train = [r for r in rows if r["split"] == "train"]
    val = [r for r in rows if r["split"] == "val"]
    path = ROOT / "slmkit" / "monitor" / "flag_model.json"
    if args.fit:
        flag = FlagModel.fit(train, [r["wrong"] for r in train], source={
            "model": MODEL, "tasks": ["stdlib module of a function", "integer arithmetic"],
            "split": "train", "items": len(train),
            "wrong": sum(r["wrong"] for r in train), "fitted_by": "bench/monitor.py --fit"})
        flag.save(path)
        print(f"[flag] fitted on {len(train)} train answers -> {path}")
    flag = FlagModel.load(path)
    out = {"train_answers": len(train), "train_wrong": sum(r["wrong"] for r in train),
           "val_answers": len(val), "val_wrong": sum(r["wrong"] for r in val), "splits": {}}
    for name, rows in (("val", val), ("train", train)):
        wrong = [r["wrong"] for r in rows]
        risk = [flag.risk(r) for r in rows]
        flagged = [x >= flag.threshold for x in risk]
        tp = sum(f and w for f, w in zip(flagged, wrong))
        res = {"auroc_flag": auroc(risk, wrong),
               "auroc_mean_logprob": auroc([-r["mean_logprob"] for r in rows], wrong),
               "auroc_min_logprob": auroc([-r["min_logprob"] for r in rows], wrong),
               "auroc_mean_entropy": auroc([r["mean_entropy"] for r in rows], wrong),
               "threshold": flag.threshold, "flagged": sum(flagged),
               "precision_at_threshold": tp / max(1, sum(flagged)),
               "recall_at_threshold": tp / max(1, sum(wrong)), "per_task": {}}
        for task in ("module", "arithmetic"):
            sub = [r for r in rows if r["task"] == task]
            w = [r["wrong"] for r in sub]
            if 0 < sum(w) < len(w):
                res["per_task"][task] = {
                    "n": len(sub), "wrong": sum(w),
                    "auroc_flag": auroc([flag.risk(r) for r in sub], w),
                    "auroc_mean_logprob": auroc([-r["mean_logprob"] for r in sub], w)}
        out["splits"][name] = res
    v = out["splits"]["val"]
    out["bar"] = {"auroc_ge_0.70": v["auroc_flag"] >= 0.70,
                  "gain_ge_5_points": v["auroc_flag"] - v["auroc_mean_logprob"] >= 0.05}
    print(json.dumps(out, indent=1), flush=True)
    return out


# --------------------------------------------------------------------------- drift

#: stdlib areas of the second scenario (one area of code -> another).
TEXT_AREAS = ("email/", "html/", "xml/", "json/", "csv.py", "string", "textwrap.py",
              "difflib.py", "tomllib/", "gettext.py", "locale.py")
CONC_AREAS = ("asyncio/", "concurrent/", "multiprocessing/", "threading.py", "queue.py",
              "selectors.py", "subprocess.py", "socketserver.py")


def prompt_pools(per_pool: int) -> dict[str, list[str]]:
    """Prompts of four kinds: stdlib code, stdlib prose, text-handling and concurrency code."""
    import random

    from slmkit.data.corpus import iter_documents
    from slmkit.eval.mining import iter_functions

    pools: dict[str, list[str]] = {"code": [], "prose": [], "text_code": [], "conc_code": []}
    for doc in iter_documents("stdlib", split="all"):
        rel = doc.id.split(":", 1)[1]
        for fn in iter_functions(doc.id, doc.text):
            src = fn["source"][:1500]
            pools["code"].append(src)
            if rel.startswith(TEXT_AREAS):
                pools["text_code"].append(src)
            elif rel.startswith(CONC_AREAS):
                pools["conc_code"].append(src)
    for doc in iter_documents("stdlib-prose", split="all"):
        for para in doc.text.split("\n\n"):
            para = " ".join(para.split())
            if 80 <= len(para) <= 1500:
                pools["prose"].append(para)
    rng = random.Random(0)
    return {k: rng.sample(v, min(per_pool, len(v))) for k, v in pools.items()}


def run_stream(a, b, shifted: bool, args, seed: int) -> dict:
    """One stream: ``--reference`` + more from pool ``a``, then from ``b`` at ``--shift-at``
    (``shifted``); returns the first alarm's position after the shift and any earlier ones."""
    import numpy as np

    from slmkit.monitor.drift import DriftDetector

    rng = np.random.default_rng(seed)
    n_a = args.shift_at if shifted else args.length
    stream = np.concatenate([a[rng.integers(0, len(a), n_a)],
                             b[rng.integers(0, len(b), args.length - n_a)]])
    det = DriftDetector(stream[:args.reference], window=args.window, seed=seed)
    alarms = []
    for t in range(args.reference + args.window, args.length + 1, args.every):
        if det.check(stream[args.reference:t])["drift"]:
            alarms.append(t)
    before = [t for t in alarms if not shifted or t <= args.shift_at]
    after = [t for t in alarms if shifted and t > args.shift_at]
    return {"false_alarm": bool(before),
            "delay": (after[0] - args.shift_at) if after else None}


def part_drift(args) -> dict:
    import numpy as np

    from slmkit.rag.embed import Embedder

    cache = RESULTS / f"monitor_pools_{args.pool}.npz"
    if cache.exists():
        emb = dict(np.load(cache))
    else:
        t0 = time.time()
        pools = prompt_pools(args.pool)
        embedder = Embedder("minilm")
        emb = {k: embedder.encode(v) for k, v in pools.items()}
        np.savez(cache, **emb)
        print(f"[drift] embedded {sum(map(len, pools.values()))} prompts in "
              f"{time.time() - t0:.0f} s", flush=True)
    out = {"pool_sizes": {k: len(v) for k, v in emb.items()}, "seeds": args.seeds,
           "reference": args.reference, "window": args.window, "every": args.every,
           "shift_at": args.shift_at, "length": args.length, "scenarios": {}}
    for name, (a, b) in {"code->prose": ("code", "prose"),
                         "text code->concurrency code": ("text_code", "conc_code")}.items():
        t0 = time.time()
        shifted = [run_stream(emb[a], emb[b], True, args, s) for s in range(args.seeds)]
        steady = [run_stream(emb[a], emb[a], False, args, 10_000 + s)
                  for s in range(args.seeds)]
        delays = [r["delay"] for r in shifted if r["delay"] is not None]
        res = {"detected_within_200": sum(d <= 200 for d in delays) / args.seeds,
               "detected": len(delays) / args.seeds,
               "delay_median": float(np.median(delays)) if delays else None,
               "delay_max": max(delays) if delays else None,
               "false_alarm_rate_unshifted": sum(r["false_alarm"] for r in steady) / args.seeds,
               "false_alarm_rate_before_shift": sum(r["false_alarm"] for r in shifted)
               / args.seeds, "seconds": round(time.time() - t0, 1)}
        res["bar"] = res["detected_within_200"] == 1.0 and \
            res["false_alarm_rate_unshifted"] <= 0.05
        out["scenarios"][name] = res
        print(f"[drift] {name}: {json.dumps(res)}", flush=True)
    return out


# --------------------------------------------------------------------------- cost

COST_PROMPTS = ["Explain what a Python list comprehension is.",
                "Write a function that reverses a string.",
                "What is the capital of France?", "Give three tips for writing clear code.",
                "Summarise the plot of a detective story in two sentences.",
                "How do I open a file in Python?", "What does HTTP status 404 mean?",
                "Name the planets of the solar system."]


def part_cost(args) -> dict:
    """Decode speed with monitoring on vs off: the engine alone, then the server over HTTP."""
    import statistics
    import tempfile

    import torch

    from slmkit.engine import Engine, SamplingParams
    from slmkit.models import load_model

    model, tok = load_model(MODEL)
    prompts = [tok.apply_chat_template([{"role": "user", "content": p}],
                                       add_generation_prompt=True, tokenize=True)
               for p in COST_PROMPTS]
    prompts = [list(p["input_ids"] if hasattr(p, "keys") else p) for p in prompts]
    engine = Engine(model, tok, max_batch=4, background=False, max_seq_len=512,
                    threads=args_threads())

    def engine_round(on: bool) -> float:
        t0 = time.perf_counter()
        hs = [engine.submit(p, SamplingParams(max_tokens=args.cost_tokens, temperature=0,
                                              ignore_eos=True, confidence=on))
              for p in prompts]
        n = sum(h.result().completion_tokens for h in hs)
        return n / (time.perf_counter() - t0)

    engine_round(False)  # warm-up
    off, on = [], []
    for _ in range(args.cost_rounds):
        off.append(engine_round(False))
        on.append(engine_round(True))
    engine.close()
    ratios = [b / a for a, b in zip(off, on)]
    out = {"engine": {"tok_s_off": off, "tok_s_on": on, "ratio_median":
                      statistics.median(ratios), "ratios": ratios}}
    print(f"[cost] engine: {json.dumps(out['engine'])}", flush=True)

    import httpx

    from slmkit.serve import ServeConfig, create_app
    from tests.test_serve_api import LiveServer

    work = Path(tempfile.mkdtemp(prefix="slm-monitor-bench-"))
    servers = {
        "off": LiveServer(create_app(model, tok, ServeConfig(
            name="m", max_concurrency=4, monitor=False, max_seq_len=512))),
        "on": LiveServer(create_app(model, tok, ServeConfig(
            name="m", max_concurrency=4, max_seq_len=512,
            request_log=str(work / "requests.db"), log_embedder="minilm")))}

    def server_round(key: str) -> float:
        import concurrent.futures as cf

        live = servers[key]

        def ask(p):
            r = httpx.post(live.url + "/v1/chat/completions", timeout=600, json={
                "model": "m", "messages": [{"role": "user", "content": p}],
                "max_tokens": args.cost_tokens, "temperature": 0, "ignore_eos": True})
            return r.json()["usage"]["completion_tokens"]

        t0 = time.perf_counter()
        with cf.ThreadPoolExecutor(4) as pool:
            n = sum(pool.map(ask, COST_PROMPTS))
        if live.service.request_log is not None:
            live.service.request_log.flush()  # the embedding and the write count too
        return n / (time.perf_counter() - t0)

    server_round("off"), server_round("on")  # warm-up (MiniLM loads here)
    off, on = [], []
    for _ in range(args.cost_rounds):
        off.append(server_round("off"))
        on.append(server_round("on"))
    for live in servers.values():
        live.stop()
    ratios = [b / a for a, b in zip(off, on)]
    out["server"] = {"tok_s_off": off, "tok_s_on": on, "ratio_median":
                     statistics.median(ratios), "ratios": ratios}
    out["bar"] = min(out["engine"]["ratio_median"], out["server"]["ratio_median"]) >= 0.95
    print(f"[cost] server: {json.dumps(out['server'])}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--parts", default="flag,drift,cost")
    ap.add_argument("--fit", action="store_true", help="refit slmkit/monitor/flag_model.json "
                    "on the train split before scoring")
    ap.add_argument("--seeds", type=int, default=100)
    ap.add_argument("--reference", type=int, default=100)
    ap.add_argument("--shift-at", type=int, default=300)
    ap.add_argument("--length", type=int, default=600)
    ap.add_argument("--every", type=int, default=20)
    ap.add_argument("--window", type=int, default=100)
    ap.add_argument("--pool", type=int, default=1500, help="prompts per domain pool")
    ap.add_argument("--cost-rounds", type=int, default=4)
    ap.add_argument("--cost-tokens", type=int, default=64)
    ap.add_argument("--out", default=str(RESULTS / "monitor.json"))
    ap.add_argument("--qa-every", type=int, default=3, help="keep every Nth question (the "
                    "full set is 999; a busy 2-core machine answers ~25 a minute)")
    args = ap.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    out_path = Path(args.out)
    parts = {"flag": part_flag, "drift": part_drift, "cost": part_cost}
    for name in args.parts.split(","):
        result = parts[name](args)
        results = json.loads(out_path.read_text()) if out_path.exists() else {}
        results[name] = result  # read just before writing: parts may run in parallel
        out_path.write_text(json.dumps(results, indent=1))
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
