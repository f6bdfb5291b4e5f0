"""Monitoring on the built-in model: the hallucination flag, drift detection and its cost.

Three parts (``--parts flag,drift,cost``), all offline on real models:

1. **flag**: greedy chat answers of ``builtin:smollm2-135m`` (its chat template and stop
   tokens, as the server runs it) to ~700 questions whose answers are checked offline
   (:func:`label_items`, :func:`is_right`): arithmetic in eight levels from one-digit sums
   to two-digit products, capitals of 94 countries, opposites of 60 words, which stdlib
   module provides a function (mostly wrong), and the built-in RAG questions
   (bench/routing.py's set) with the retrieved source in the prompt and without. Answers
   and per-token records are cached (``bench/results/monitor_labels_v2.jsonl``), so a
   refit or a new feature costs no generation; ``--samples K`` adds K sampled answers per
   question (``monitor_samples_v2.jsonl``) for the consistency check. The flag's feature
   set is picked by 5-fold cross-validation on the hash-split *train* 60% (``--fit``
   writes ``slmkit/monitor/flag_model.json``) and scored once on the other 40%: AUROC of
   "this answer is wrong" with a 95% bootstrap interval, against the plain mean token
   log-probability on the same answers (paired bootstrap of the gain), per kind,
   groundedness on the RAG answers, consistency where sampled, and precision / recall at
   the shipped threshold. Bar: AUROC >= 0.70 and >= 5 points above the baseline.
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
   (confidence + SQLite request log with prompt embeddings, and confidence + flag alone)
   vs ``monitor=False``, over real HTTP on 127.0.0.1, the three servers in turn each
   round. Bar: >= 0.95x.

Run (writes ``bench/results/monitor.json``)::

    nice -n 10 .venv/bin/python bench/monitor.py [--parts flag --fit] [--samples 3]
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


def module_items() -> list[dict]:
    """Which stdlib module defines a function (from the running interpreter), as chat
    questions (the 135M model is mostly, and confidently, wrong on these)."""
    import importlib

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
    return items


#: Country -> capital (and accepted spellings): closed questions the model often knows.
CAPITALS = {
    "France": ["Paris"], "Germany": ["Berlin"], "Italy": ["Rome"], "Spain": ["Madrid"],
    "Portugal": ["Lisbon"], "the United Kingdom": ["London"], "Ireland": ["Dublin"],
    "Japan": ["Tokyo"], "China": ["Beijing", "Peking"], "Russia": ["Moscow"],
    "Egypt": ["Cairo"], "Greece": ["Athens"], "Austria": ["Vienna"], "Norway": ["Oslo"],
    "Sweden": ["Stockholm"], "Finland": ["Helsinki"], "Denmark": ["Copenhagen"],
    "Poland": ["Warsaw"], "the Netherlands": ["Amsterdam"], "Belgium": ["Brussels"],
    "Switzerland": ["Bern", "Berne"], "Canada": ["Ottawa"], "Australia": ["Canberra"],
    "Brazil": ["Brasilia", "Brasília"], "Argentina": ["Buenos Aires"], "Peru": ["Lima"],
    "Chile": ["Santiago"], "Mexico": ["Mexico City"], "India": ["New Delhi", "Delhi"],
    "Pakistan": ["Islamabad"], "Turkey": ["Ankara"], "Iran": ["Tehran"],
    "Iraq": ["Baghdad"], "Saudi Arabia": ["Riyadh"], "Kenya": ["Nairobi"],
    "Nigeria": ["Abuja"], "Ethiopia": ["Addis Ababa"], "Morocco": ["Rabat"],
    "South Korea": ["Seoul"], "Thailand": ["Bangkok"], "Vietnam": ["Hanoi"],
    "Indonesia": ["Jakarta"], "the Philippines": ["Manila"], "Cuba": ["Havana"],
    "Colombia": ["Bogota", "Bogotá"], "Venezuela": ["Caracas"], "Hungary": ["Budapest"],
    "the Czech Republic": ["Prague"], "Romania": ["Bucharest"], "Bulgaria": ["Sofia"],
    "Ukraine": ["Kyiv", "Kiev"], "Iceland": ["Reykjavik", "Reykjavík"],
    "New Zealand": ["Wellington"], "Afghanistan": ["Kabul"], "Syria": ["Damascus"],
    "Lebanon": ["Beirut"], "Israel": ["Jerusalem"], "Jordan": ["Amman"],
    "Bangladesh": ["Dhaka"], "Nepal": ["Kathmandu"],
    "Sri Lanka": ["Colombo", "Sri Jayawardenepura Kotte"],
    "Malaysia": ["Kuala Lumpur"], "Singapore": ["Singapore"], "Ghana": ["Accra"],
    "Senegal": ["Dakar"], "Algeria": ["Algiers"], "Tunisia": ["Tunis"], "Libya": ["Tripoli"],
    "Sudan": ["Khartoum"], "Uganda": ["Kampala"], "Tanzania": ["Dodoma"],
    "Zimbabwe": ["Harare"], "Angola": ["Luanda"], "Mongolia": ["Ulaanbaatar", "Ulan Bator"],
    "Kazakhstan": ["Astana", "Nur-Sultan"], "Uzbekistan": ["Tashkent"],
    "Georgia": ["Tbilisi"], "Armenia": ["Yerevan"], "Azerbaijan": ["Baku"],
    "Serbia": ["Belgrade"], "Croatia": ["Zagreb"], "Slovakia": ["Bratislava"],
    "Slovenia": ["Ljubljana"], "Lithuania": ["Vilnius"], "Latvia": ["Riga"],
    "Estonia": ["Tallinn"], "Ecuador": ["Quito"], "Bolivia": ["Sucre", "La Paz"],
    "Uruguay": ["Montevideo"], "Paraguay": ["Asuncion", "Asunción"],
    "Jamaica": ["Kingston"], "Qatar": ["Doha"], "Oman": ["Muscat"], "Yemen": ["Sanaa", "Sana'a"],
}
#: Word -> opposites accepted.
OPPOSITES = {
    "hot": ["cold"], "big": ["small", "little"], "fast": ["slow"], "up": ["down"],
    "open": ["closed", "close", "shut"], "light": ["dark", "heavy"], "happy": ["sad", "unhappy"],
    "old": ["young", "new"], "early": ["late"], "full": ["empty"], "strong": ["weak"],
    "rich": ["poor"], "hard": ["soft", "easy"], "wet": ["dry"], "tall": ["short"],
    "long": ["short"], "high": ["low"], "left": ["right"], "day": ["night"],
    "true": ["false"], "win": ["lose"], "buy": ["sell"], "push": ["pull"],
    "inside": ["outside"], "begin": ["end", "finish"], "love": ["hate"],
    "friend": ["enemy", "foe"], "north": ["south"], "east": ["west"], "clean": ["dirty"],
    "cheap": ["expensive", "dear"], "thick": ["thin"], "loud": ["quiet", "soft", "silent"],
    "noisy": ["quiet", "silent"], "wide": ["narrow"], "deep": ["shallow"],
    "sharp": ["dull", "blunt"], "brave": ["cowardly", "afraid", "scared", "fearful"],
    "accept": ["reject", "refuse", "decline"], "increase": ["decrease", "reduce"],
    "maximum": ["minimum"], "ancient": ["modern"], "visible": ["invisible"],
    "arrive": ["depart", "leave"], "victory": ["defeat", "loss"], "asleep": ["awake"],
    "generous": ["stingy", "selfish", "mean"], "permanent": ["temporary"],
    "optimist": ["pessimist"], "transparent": ["opaque"], "expand": ["contract", "shrink"],
    "import": ["export"], "ascend": ["descend"], "vertical": ["horizontal"],
    "input": ["output"], "success": ["failure"], "question": ["answer"],
    "majority": ["minority"], "include": ["exclude"], "entrance": ["exit"],
}
#: Arithmetic levels: (name, digits of a, digits of b, operator), easy to hard.
ARITH_LEVELS = (("1d+1d", 1, 1, "+"), ("1d*1d", 1, 1, "*"), ("2d+1d", 2, 1, "+"),
                ("2d+2d", 2, 2, "+"), ("2d-2d", 2, 2, "-"), ("2d*1d", 2, 1, "*"),
                ("3d+3d", 3, 3, "+"), ("2d*2d", 2, 2, "*"))


def label_items(rag: int = 100, module_every: int = 5, arith_per_level: int = 30) -> list[dict]:
    """The labelled questions of the flag bench, each a chat ``messages`` list with a gold
    answer checked offline by :func:`is_right`: graded arithmetic, capitals, opposites,
    stdlib modules of functions (mostly wrong), and the built-in RAG questions asked with
    the retrieved source (``rag``; its text kept for groundedness) and without
    (``closed``). ``group``: items asked two ways share a split."""
    import hashlib
    import random

    items = []
    rng = random.Random(29)
    for name, da, db, op in ARITH_LEVELS:
        for _ in range(arith_per_level):
            a = rng.randrange(10 ** (da - 1) if da > 1 else 2, 10 ** da)
            b = rng.randrange(10 ** (db - 1) if db > 1 else 2, 10 ** db)
            items.append({"kind": "arithmetic", "level": name, "answer": str(eval(f"{a}{op}{b}")),
                          "question": f"What is {a} {op} {b}? Answer with the number only."})
    for country, caps in CAPITALS.items():
        items.append({"kind": "capital", "answer": caps[0], "accept": caps,
                      "question": f"What is the capital of {country}?"})
    for word, opp in OPPOSITES.items():
        items.append({"kind": "opposite", "answer": opp[0], "accept": opp,
                      "question": f"What is the opposite of the word \"{word}\"? "
                                  f"Answer with one word."})
    items += [it for i, it in enumerate(module_items()) if i % module_every == 0]
    for it in items:
        it["messages"] = [{"role": "user", "content": it.pop("question")}]
    if rag:
        items += rag_items(rag)
    for it in items:
        it.setdefault("group", it["messages"][-1]["content"])
        it["id"] = it["kind"] + ":" + it["messages"][-1]["content"]
        h = int(hashlib.blake2b(it["group"].encode(), digest_size=4).hexdigest(), 16)
        it["split"] = "train" if h % 10 < 6 else "val"
    return list({it["id"]: it for it in items}.values())  # random sums repeat: one each


def rag_items(n: int) -> list[dict]:
    """The built-in RAG questions (bench/routing.py's set) with the best retrieved source in
    the prompt (``slm rag ask``'s) and without it (its no-retrieval baseline)."""
    from slmkit.data.corpus import stdlib_root
    from slmkit.rag.answerer import SYSTEM, SYSTEM_NO_SOURCES, source_block
    from slmkit.rag.config import IndexConfig
    from slmkit.rag.evalset import builtin_questions, corpus_files
    from slmkit.rag.evaluate import builtin_index_dir
    from slmkit.rag.index import run_index
    from slmkit.rag.retrieve import Retriever

    root, index_dir = stdlib_root(), builtin_index_dir()
    run_index(IndexConfig(docs=corpus_files(root), out=str(index_dir)))
    questions = [q for q in builtin_questions(root, answerable=n, held_out=0) if q.answerable]
    out = []
    retriever = Retriever.open(index_dir)
    try:
        for q in questions:
            hits = retriever.search(q.question, k=3)[:1]
            base = {"answer": q.answer, "group": q.question}
            out.append({**base, "kind": "rag", "sources": [h.chunk.text for h in hits],
                        "messages": [{"role": "system", "content": SYSTEM},
                                     {"role": "user", "content": source_block(hits, q.question)}]})
            out.append({**base, "kind": "closed", "messages": [
                {"role": "system", "content": SYSTEM_NO_SOURCES},
                {"role": "user", "content": q.question}]})
    finally:
        retriever.close()
    return out


def is_right(item: dict, text: str) -> bool:
    """Whether ``text`` answers ``item`` (arithmetic: the number after the last ``=``;
    capital, opposite: an accepted word; module: the module's name; rag, closed: contains
    the gold function name, as ``slm rag eval``'s "contains")."""
    import re

    kind = item.get("kind", item.get("task"))
    if kind == "arithmetic":
        tail = text.rsplit("=", 1)[-1]  # "15 - 34 = -19": the result after the last "="
        m = re.search(r"-?\d[\d,]*", tail)
        return bool(m) and m.group(0).replace(",", "") == item["answer"]
    if kind in ("capital", "opposite"):
        return any(re.search(r"\b" + re.escape(a.lower()) + r"\b", text.lower())
                   for a in item["accept"])
    if kind in ("rag", "closed"):
        return item["answer"].lower() in text.lower()
    mods = re.findall(r"[A-Za-z_][\w.]*", text.replace("`", " "))
    return any(m.rstrip(".") == item["answer"] or m.startswith(item["answer"] + "." + item["name"])
               for m in mods)


def _chat_ids(tok, messages) -> list[int]:
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def _seed(key: str, j: int) -> int:
    import hashlib

    return int(hashlib.blake2b(f"{key}/{j}".encode(), digest_size=4).hexdigest(), 16)


def _cached(cache: Path) -> dict[str, dict]:
    done = {}
    if cache.exists():
        for line in cache.read_text().splitlines():
            r = json.loads(line)
            done[r["id"]] = r
    return done


def _answer_cached(model, tok, todo: list[dict], cache: Path, chunk: int, submit, row,
                   tag: str, total: int) -> dict[str, dict]:
    """Answer ``todo`` through one engine, ``chunk`` items at a time: ``submit(engine, item,
    ids, stops)`` returns an item's handle(s), ``row(item, handles)`` the record appended to
    ``cache`` (JSON lines). Returns the new records by id."""
    from slmkit.engine import Engine
    from slmkit.engine.generate import chat_stop_ids

    out = {}
    if not todo:
        return out
    engine = Engine(model, tok, max_batch=8, background=False, max_seq_len=1024,
                    threads=args_threads())
    stops, t0 = chat_stop_ids(tok), time.time()
    with cache.open("a") as f:
        for c0 in range(0, len(todo), chunk):
            part = todo[c0:c0 + chunk]
            handles = [submit(engine, it, _chat_ids(tok, it["messages"]), stops)
                       for it in part]
            for it, h in zip(part, handles):
                out[it["id"]] = row(it, h)
                f.write(json.dumps(out[it["id"]]) + "\n")
            f.flush()
            print(f"[{tag}] {total - len(todo) + c0 + len(part)}/{total} "
                  f"({time.time() - t0:.0f} s)", flush=True)
    engine.close()
    return out


def generate_labels(model, tok, items: list[dict], cache: Path, chunk: int = 40) -> list[dict]:
    """Each item's greedy chat answer (the server's template and stop tokens) with per-token
    ``[logprob, entropy, offset, second-best logprob]``, labelled by :func:`is_right`;
    cached in ``cache`` (JSON lines, resumed by id) so refits and new features cost no
    generation."""
    from slmkit.engine import SamplingParams

    def submit(engine, it, ids, stops):
        return engine.submit(ids, SamplingParams(
            max_tokens=48 if it["kind"] in ("rag", "closed") else 24, temperature=0,
            stop_token_ids=stops, confidence=True, top_logprobs=2))

    def row(it, h):
        g = h.result()
        top2 = [t[1][1] if t and len(t) > 1 else None for t in g.top_logprobs]
        return {**it, "text": g.text, "wrong": not is_right(it, g.text),
                "tokens": [[c[0], c[1], c[2], top2[k]]
                           for k, c in enumerate(g.confidence or [])]}

    done = _cached(cache)
    todo = [it for it in items if it["id"] not in done]
    done.update(_answer_cached(model, tok, todo, cache, chunk, submit, row, "labels",
                               len(items)))
    return [done[it["id"]] for it in items]


def sample_answers(model, tok, items: list[dict], cache: Path, k: int = 4,
                   temperature: float = 0.7, max_tokens: int = 16, chunk: int = 16
                   ) -> dict[str, list[str]]:
    """``k`` sampled answers per item (SelfCheckGPT's consistency check: a model that knows
    the answer says it again), cached by id in ``cache``; ``max_tokens`` short (the
    agreement is read from the answers' first words)."""
    from slmkit.engine import SamplingParams

    def submit(engine, it, ids, stops):
        return [engine.submit(ids, SamplingParams(
            max_tokens=max_tokens, temperature=temperature, stop_token_ids=stops,
            seed=_seed(it["id"], j))) for j in range(k)]

    def row(it, hs):
        return {"id": it["id"], "samples": [h.result().text for h in hs],
                "temperature": temperature}

    done = {i: r["samples"] for i, r in _cached(cache).items() if len(r["samples"]) >= k}
    todo = [it for it in items if it["id"] not in done]
    new = _answer_cached(model, tok, todo, cache, chunk, submit, row, "samples", len(items))
    done.update({i: r["samples"] for i, r in new.items()})
    return {it["id"]: done[it["id"]] for it in items if it["id"] in done}


def label_rows(cache: Path) -> list[dict]:
    """The cached greedy answers with :func:`slmkit.monitor.confidence.features` (the record's
    second-best logprob turned into the engine's margin), their groundedness against the
    retrieved source (``rag`` items; None elsewhere) and, where :func:`sample_answers` has
    them, their agreement with sampled answers."""
    from slmkit.monitor.confidence import consistency, features
    from slmkit.rag.answerer import groundedness

    samples = {i: r["samples"] for i, r in _cached(cache.with_name(
        cache.name.replace("labels", "samples"))).items()}
    out = []
    for r in _cached(cache).values():
        if not r["tokens"]:
            continue  # nothing generated: no confidence to score
        conf = [(lp, ent, off, None if second is None else lp - second)
                for lp, ent, off, second in r["tokens"]]
        row = {k: r[k] for k in ("id", "kind", "group", "split", "answer", "text", "wrong")}
        row.update(features(conf, r["text"], r["group"]))
        row["groundedness"] = groundedness(r["text"], r["sources"]) if r.get("sources") \
            else None
        if r["id"] in samples:
            row["consistency"] = consistency(r["text"], samples[r["id"]], r["group"])
        out.append(row)
    return out


def bootstrap(rows: list[dict], scores: dict[str, list[float]], base: str, n: int = 2000,
              seed: int = 0) -> dict:
    """AUROC of "wrong" for each score with a 95% bootstrap interval (answers resampled
    with replacement), and each score's paired gain over ``base`` with its interval."""
    import numpy as np

    y = np.array([r["wrong"] for r in rows])
    rng = np.random.default_rng(seed)
    draws = {k: [] for k in scores}
    for _ in range(n):
        idx = rng.integers(0, len(y), len(y))
        if 0 < y[idx].sum() < len(idx):
            for k, s in scores.items():
                draws[k].append(auroc(np.asarray(s)[idx], y[idx]))
    out = {}
    for k, s in scores.items():
        d = np.array(draws[k])
        gain = d - np.array(draws[base])
        out[k] = {"auroc": auroc(s, y), "ci95": [float(np.percentile(d, 2.5)),
                                                 float(np.percentile(d, 97.5))],
                  "gain_over_" + base: auroc(s, y) - auroc(scores[base], y),
                  "gain_ci95": [float(np.percentile(gain, 2.5)),
                                float(np.percentile(gain, 97.5))]}
    return out


#: Feature sets the flag may read (chosen by cross-validation on the train split).
FLAG_SETS = {
    "v1 (mean/min logprob, entropy, first, length)": ("mean_logprob", "min_logprob",
                                                     "mean_entropy", "max_entropy",
                                                     "first_logprob", "log_tokens"),
    "mean logprob + margin": ("mean_logprob", "mean_margin", "min_margin"),
    "answer tokens": ("answer_mean_logprob", "answer_min_logprob", "answer_mean_margin",
                      "answer_min_margin"),
    "answer tokens + mean logprob": ("mean_logprob", "answer_mean_logprob",
                                     "answer_min_logprob", "answer_min_margin"),
    "all token features": ("mean_logprob", "min_logprob", "mean_entropy", "max_entropy",
                           "first_logprob", "log_tokens", "mean_margin", "min_margin",
                           "answer_mean_logprob", "answer_min_logprob",
                           "answer_mean_margin", "answer_min_margin", "answer_tokens"),
}
FLAG_SETS["all token features and their squares"] = FLAG_SETS["all token features"] + tuple(
    k + "^2" for k in FLAG_SETS["all token features"])
FLAG_SETS["mean logprob alone"] = ("mean_logprob",)


def group_folds(rows: list[dict], folds: int):
    """``(train, test)`` row lists of each fold, split by question group (as train/val)."""
    import hashlib

    fold = [int(hashlib.blake2b(r["group"].encode(), digest_size=4).hexdigest(), 16) // 10
            % folds for r in rows]
    for f in range(folds):
        yield ([r for r, k in zip(rows, fold) if k != f],
               [r for r, k in zip(rows, fold) if k == f])


def cv_auroc(rows: list[dict], names, folds: int = 5) -> float:
    """Mean held-out AUROC of a flag on ``names`` over ``folds`` folds of ``rows`` (split by
    question group, as train/val are)."""
    from slmkit.monitor.confidence import FlagModel

    got = []
    for tr, te in group_folds(rows, folds):
        flag = FlagModel.fit(tr, [r["wrong"] for r in tr], names=names)
        got.append(auroc([flag.risk(r) for r in te], [r["wrong"] for r in te]))
    return sum(got) / len(got)


def hidden_means(model, tok, cache: Path, rows: list[dict], afters) -> dict[int, dict]:
    """``{after: {id: mean hidden state}}``: each cached answer re-run through the model
    after its chat prompt, the hidden states after ``after`` blocks averaged over the
    answer's tokens -- what the engine's decode-step taps average for the same answer
    (``Completion.hidden_mean``; tests/test_monitor.py checks the two agree)."""
    import torch

    records = _cached(cache)
    out: dict[int, dict] = {a: {} for a in afters}
    with torch.inference_mode():
        for r in rows:
            rec = records[r["id"]]
            prompt = _chat_ids(tok, rec["messages"])
            answer = tok(rec["text"], add_special_tokens=False)["input_ids"]
            if not answer:
                continue
            hs = model(torch.tensor([prompt + answer]), output_hidden_states=True).hidden_states
            for a in afters:
                out[a][r["id"]] = hs[a][0, len(prompt):].float().mean(0).numpy()
    return out


def cv_probe(rows: list[dict], hidden: dict, l2: float, folds: int = 5) -> float:
    """:func:`cv_auroc` for a hidden-state probe (same folds, by question group)."""
    from slmkit.monitor.confidence import HiddenProbe

    got = []
    for tr, te in group_folds([r for r in rows if r["id"] in hidden], folds):
        probe = HiddenProbe.fit([hidden[r["id"]] for r in tr], [r["wrong"] for r in tr],
                                0, "", l2=l2)
        got.append(auroc([probe.risk(hidden[r["id"]]) for r in te], [r["wrong"] for r in te]))
    return sum(got) / len(got)


#: the hidden-state probe's choices, picked by cross-validation on train
PROBE_L2 = (10.0, 30.0, 100.0, 300.0, 1000.0)


def part_flag(args) -> dict:
    from slmkit.models import load_model
    from slmkit.monitor.confidence import FlagModel, HiddenProbe, model_fingerprint

    cache = RESULTS / "monitor_labels_v2.jsonl"
    items = label_items()
    model, tok = load_model(MODEL)
    generate_labels(model, tok, items, cache)
    if args.samples:
        import random

        order = list(items)
        random.Random(1).shuffle(order)  # any prefix is a random subset
        sample_answers(model, tok, order, cache.with_name("monitor_samples_v2.jsonl"),
                       k=args.samples, max_tokens=12)
    rows = label_rows(cache)
    train = [r for r in rows if r["split"] == "train"]
    val = [r for r in rows if r["split"] == "val"]
    kinds = sorted({r["kind"] for r in rows})
    out = {"model": MODEL, "answers": len(rows), "per_kind": {
        k: {"answers": sum(r["kind"] == k for r in rows),
            "wrong": sum(r["wrong"] for r in rows if r["kind"] == k)} for k in kinds},
        "train_answers": len(train), "train_wrong": sum(r["wrong"] for r in train),
        "val_answers": len(val), "val_wrong": sum(r["wrong"] for r in val)}
    # the feature set: 5-fold cross-validation on train only; val is scored once
    out["cv_train"] = {name: cv_auroc(train, names) for name, names in FLAG_SETS.items()}
    best = max(out["cv_train"], key=out["cv_train"].get)
    print(f"[flag] cross-validated on train: {json.dumps(out['cv_train'], indent=1)}\n"
          f"[flag] chosen: {best}", flush=True)
    # the hidden-state probe: mean hidden state over the answer's tokens after half or
    # three quarters of the blocks, L2 strength by the same cross-validation on train
    n_layers = model.config.num_hidden_layers
    hidden = hidden_means(model, tok, cache, rows, (n_layers // 2, 3 * n_layers // 4))
    out["cv_probe_train"] = {f"after {a} blocks, l2 {l2:g}": cv_probe(train, hidden[a], l2)
                             for a in hidden for l2 in PROBE_L2}
    best_probe = max(out["cv_probe_train"], key=out["cv_probe_train"].get)
    after, l2 = int(best_probe.split()[1]), float(best_probe.rsplit(" ", 1)[1])
    print(f"[flag] probe cross-validated on train: {json.dumps(out['cv_probe_train'], indent=1)}"
          f"\n[flag] probe chosen: {best_probe}", flush=True)
    path = ROOT / "slmkit" / "monitor" / "flag_model.json"
    if args.fit:
        flag = FlagModel.fit(train, [r["wrong"] for r in train], names=FLAG_SETS[best],
                             source={"model": MODEL, "set": best, "kinds": kinds,
                                     "split": "train", "items": len(train),
                                     "wrong": sum(r["wrong"] for r in train),
                                     "fitted_by": "bench/monitor.py --parts flag --fit"})
        held = [r for r in train if r["id"] in hidden[after]]
        flag.probe = HiddenProbe.fit(
            [hidden[after][r["id"]] for r in held], [r["wrong"] for r in held], after,
            model_fingerprint(model), l2=l2,
            source={"model": MODEL, "choice": best_probe, "split": "train",
                    "items": len(held), "fitted_by": "bench/monitor.py --parts flag --fit"})
        flag.save(path)
        print(f"[flag] fitted on {len(train)} train answers -> {path}")
    flag = FlagModel.load(path)
    out["shipped_features"] = list(flag.features)
    probe = flag.probe_for(model)
    out["shipped_probe"] = None if probe is None else {
        "after_blocks": probe.after, "source": probe.source, "threshold": probe.threshold}
    if probe is not None and probe.after not in hidden:
        hidden.update(hidden_means(model, tok, cache, rows, (probe.after,)))
    for r in rows:
        r["risk_logprobs"] = flag.risk(r)
        # what the server reports: the probe where the answer's hidden states were tapped
        h = None if probe is None else hidden[probe.after].get(r["id"])
        r["risk"] = r["risk_logprobs"] if h is None else probe.risk(h)
        r["threshold"] = flag.threshold if h is None else probe.threshold
    signals = {"flag": lambda r: r["risk"],
               "flag from token logprobs only": lambda r: r["risk_logprobs"],
               "mean_logprob": lambda r: -r["mean_logprob"],
               "min_logprob": lambda r: -r["min_logprob"],
               "mean_entropy": lambda r: r["mean_entropy"],
               "mean_margin": lambda r: -r["mean_margin"],
               "answer_mean_logprob": lambda r: -r["answer_mean_logprob"],
               "answer_min_margin": lambda r: -r["answer_min_margin"]}
    for name, sub in (("val", val), ("train", train)):
        wrong = [r["wrong"] for r in sub]
        res = bootstrap(sub, {k: [f(r) for r in sub] for k, f in signals.items()},
                        "mean_logprob")
        flagged = [r["risk"] >= r["threshold"] for r in sub]
        tp = sum(f and w for f, w in zip(flagged, wrong))
        res["threshold"] = sorted({r["threshold"] for r in sub})
        res["flagged"] = sum(flagged)
        res["precision_at_threshold"] = tp / max(1, sum(flagged))
        res["recall_at_threshold"] = tp / max(1, sum(wrong))
        res["right_flagged_share"] = sum(f and not w for f, w in zip(flagged, wrong)) / max(
            1, len(wrong) - sum(wrong))
        res["per_kind"] = {}
        for k in kinds:
            s = [r for r in sub if r["kind"] == k]
            w = [r["wrong"] for r in s]
            if 0 < sum(w) < len(w):
                res["per_kind"][k] = {"n": len(s), "wrong": sum(w),
                                      "auroc_flag": auroc([r["risk"] for r in s], w),
                                      "auroc_mean_logprob": auroc(
                                          [-r["mean_logprob"] for r in s], w)}
        # RAG answers: the groundedness against the retrieved source, alone and with the flag
        g = [r for r in sub if r["groundedness"] is not None]
        if g and 0 < sum(r["wrong"] for r in g) < len(g):
            w = [r["wrong"] for r in g]
            res["rag_groundedness"] = {
                "n": len(g), "wrong": sum(w),
                "auroc_groundedness": auroc([-r["groundedness"] for r in g], w),
                "auroc_flag": auroc([r["risk"] for r in g], w),
                "auroc_mean_logprob": auroc([-r["mean_logprob"] for r in g], w)}
        c = [r for r in sub if "consistency" in r]
        if c and 0 < sum(r["wrong"] for r in c) < len(c):
            res["consistency"] = {"n": len(c), "wrong": sum(r["wrong"] for r in c), **bootstrap(
                c, {"consistency": [-r["consistency"] for r in c],
                    "flag": [r["risk"] for r in c],
                    "mean_logprob": [-r["mean_logprob"] for r in c]}, "mean_logprob")}
        out[name] = res
    v = out["val"]
    out["bar"] = {"auroc_ge_0.70": v["flag"]["auroc"] >= 0.70,
                  "gain_ge_5_points": v["flag"]["gain_over_mean_logprob"] >= 0.05}
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

    from slmkit.monitor.confidence import FlagModel

    probe = FlagModel.load().probe_for(model)   # what `slm serve --monitor` taps

    def engine_round(on: bool) -> float:
        engine.set_hidden_tap(probe.after if on and probe is not None else 0)
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
        "flag": LiveServer(create_app(model, tok, ServeConfig(   # confidence + flag only
            name="m", max_concurrency=4, max_seq_len=512))),
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

    for key in servers:  # warm-up (MiniLM loads here)
        server_round(key)
    speed = {key: [] for key in servers}
    for _ in range(args.cost_rounds):
        for key in servers:
            speed[key].append(server_round(key))
    for live in servers.values():
        live.stop()
    off, on = speed["off"], speed["on"]
    ratios = [b / a for a, b in zip(off, on)]
    flag_ratios = [b / a for a, b in zip(off, speed["flag"])]
    out["server"] = {"tok_s_off": off, "tok_s_on": on, "ratio_median":
                     statistics.median(ratios), "ratios": ratios,
                     "tok_s_flag_only": speed["flag"],
                     "flag_only_ratio_median": statistics.median(flag_ratios),
                     "flag_only_ratios": flag_ratios}
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
    ap.add_argument("--samples", type=int, default=0, help="flag: also draw K sampled "
                    "answers per question (cached) and score their agreement with the greedy "
                    "one (SelfCheckGPT's consistency; K+1 generations per question)")
    args = ap.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    parts = {"flag": part_flag, "drift": part_drift, "cost": part_cost}
    for name in args.parts.split(","):
        result = parts[name](args)
        results = json.loads(out_path.read_text()) if out_path.exists() else {}
        results[name] = result  # read just before writing: parts may run in parallel
        out_path.write_text(json.dumps(results, indent=1))
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
