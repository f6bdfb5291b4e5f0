"""SLM <-> LLM routing on real models: cascade vs router vs random (issue 28's bars).

The big model is the built-in SmolLM2-135M-Instruct (fp32); the small one is the same
model compressed for a device: 4-bit RTN, groups of 64, with the embedding table (and so
the tied head) in int4 too (``slm quantize builtin:smollm2-135m --method rtn --bits 4
--group-size 64 --quantize-embeddings --embedding-bits 4``; +75% prose / +49% code
perplexity in the README's real-model table).

The task set is the RAG issue's built-in questions ("Which function in module M does
this: <docstring sentence>", answerable ones), asked two ways -- two traffic mixes:

* ``rag``: with the best retrieved source in the prompt (what ``slm rag ask`` sends: the
  built-in index, hybrid search, one source);
* ``closed-book``: the question alone (``slm rag``'s no-retrieval baseline prompt).

An answer is right when it contains the gold function name (``slm rag eval``'s
"contains"). Both models answer greedily through the engine; ``slm route eval``
(:mod:`slmkit.route.evaluate`) then traces quality against the share forwarded for the
cascade signals, the cross-validated routers and random routing, with RouteLLM's APGR and
CPT(95%), the routers' decision time, the cascade's overheads, and how far a threshold set
on one mix moves on the other. The routers are 5-fold cross-validated on the measured
items, each fold's fit joined by the generator's other 102 questions (both mixes, both
models' answers; never scored: ``--no-train-split`` leaves them out), and their APGR is also
given over 10 fold assignments. Reference rankings that read the gold (the mix; whether the
source shown is the gold one; the small answer's correctness) show how far prompt-level
knowledge could go. (The mined stdlib code tasks were tried first: both models
answer those raw-completion prompts almost never right -- 1 of 120 -- so they measure
nothing here.)

Run (at low priority; the first run builds the built-in RAG index)::

    nice -n 10 .venv/bin/python bench/routing.py

Writes ``bench/results/routing.json`` (and ``runs/route-bench/scores.jsonl``, the input of
``slm route calibrate``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def small_model(path: Path) -> str:
    """The compressed student, made once (RTN needs no calibration: seconds)."""
    if not (path / "config.json").exists():
        from slmkit.compress.quantize.api import run_quantize
        from slmkit.compress.quantize.config import QuantizeConfig

        run_quantize(QuantizeConfig(model="builtin:smollm2-135m", method="rtn", bits=4,
                                    group_size=64, quantize_embeddings=True,
                                    embedding_bits=4, out=str(path), overwrite=True))
    return str(path)


def rag_tasks(n: int, split: str = "eval") -> dict[str, list[dict]]:
    """The built-in RAG questions as chat prompts, with and without the retrieved source.

    ``split="eval"``: ``n`` questions spread over the generator's set (the measured items);
    ``"train"``: every other question of the same generator (no question text shared with
    the evaluated ones): router training data, never scored."""
    from slmkit.data.corpus import stdlib_root
    from slmkit.models import load_tokenizer
    from slmkit.rag.answerer import SYSTEM, SYSTEM_NO_SOURCES, source_block
    from slmkit.rag.config import IndexConfig
    from slmkit.rag.evalset import builtin_questions, corpus_files
    from slmkit.rag.evaluate import builtin_index_dir
    from slmkit.rag.index import run_index
    from slmkit.rag.retrieve import Retriever

    root = stdlib_root()
    index_dir = builtin_index_dir()
    run_index(IndexConfig(docs=corpus_files(root), out=str(index_dir)))
    questions = [q for q in builtin_questions(root, answerable=n, held_out=0) if q.answerable]
    if split == "train":
        seen = {q.question for q in questions}
        questions = [q for q in builtin_questions(root, answerable=10 ** 6, held_out=0)
                     if q.answerable and q.question not in seen]
    tag = "" if split == "eval" else f"-{split}"
    tok = load_tokenizer("builtin:smollm2-135m")

    def chat(system: str, user: str) -> str:
        return tok.apply_chat_template([{"role": "system", "content": system},
                                        {"role": "user", "content": user}],
                                       add_generation_prompt=True, tokenize=False)

    retriever = Retriever.open(index_dir)
    try:
        rag, closed = [], []
        for i, q in enumerate(questions):
            hits = retriever.search(q.question, k=3)
            item = {"type": "generation", "answer": q.answer, "stop": ["\n\n"],
                    "max_new_tokens": 48, "metric": "contains"}
            # whether the source shown is the gold one (for the reference rankings only;
            # no router or cascade reads it)
            gold = bool(hits) and any(g.matches(hits[0].path, hits[0].display,
                                                hits[0].chunk.start_line,
                                                hits[0].chunk.end_line) for g in q.sources)
            rag.append({**item, "id": f"rag{tag}/{i}", "gold_source": gold,
                        "prompt": chat(SYSTEM, source_block(hits[:1], q.question))})
            closed.append({**item, "id": f"closed{tag}/{i}", "gold_source": False,
                           "prompt": chat(SYSTEM_NO_SOURCES, q.question)})
    finally:
        retriever.close()
    return {"rag": rag, "closed-book": closed}


def references(items: list[dict], rows: list[dict], seed: int = 0) -> dict[str, dict]:
    """Rankings that read what no router can (the gold source, the graded answers): how
    far knowing the traffic mix, the retrieval's correctness and the small answer's
    correctness would go. APGR averaged over 200 random orders within ties."""
    import numpy as np

    from slmkit.route.evaluate import pgr_figures

    small = np.array([r["small_quality"] for r in rows])
    big = np.array([r["big_quality"] for r in rows])
    rag = np.array([it["task"] == "rag" for it in items], dtype=float)
    gold = np.array([it["gold_source"] for it in items], dtype=float)
    rng = np.random.default_rng(seed)
    keys = {"retrieval present first (the mix)": -rag,
            "gold source first, then other retrieval, then closed-book": -(2 * gold + rag),
            "... and the small answer's correctness known": -(2 * gold + rag) + 3 * small}
    out = {}
    for name, key in keys.items():
        apgrs = [pgr_figures(key + rng.random(len(key)) * 1e-6, small, big)["apgr"]
                 for _ in range(200)]
        out[name] = {"apgr": float(np.mean(apgrs))}
    out["items with the gold source shown"] = {"rag": int(gold.sum()), "of": int(rag.sum()),
                                               "big_right": int(big[gold == 1].sum())}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=60, help="questions (each asked twice)")
    parser.add_argument("--layers", type=int, nargs="+", default=[0, 2],
                        help="router feature depths to compare (decoder layers)")
    parser.add_argument("--work", default=str(ROOT / "runs" / "route-bench"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-train-split", action="store_true",
                        help="fit the routers on the evaluated items' other folds only "
                        "(default: also on the generator's other questions, never scored)")
    parser.add_argument("--decisions", type=int, default=1000,
                        help="router decisions timed (5 ms apart)")
    args = parser.parse_args()

    from slmkit.console import print_table
    from slmkit.route.config import EvalConfig
    from slmkit.route.evaluate import run_eval

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    small = small_model(work / "small-rtn4-emb4")
    t = time.perf_counter()
    cfg = EvalConfig(small=small, big="builtin:smollm2-135m",
                     tasks=["rag", "closed-book"], limit=args.limit,
                     signals=["mean", "min", "q05", "q10", "q25", "entropy", "max_entropy"],
                     layers=args.layers, threads=args.threads, decisions=args.decisions,
                     out=str(work))
    tasks = rag_tasks(args.limit)
    result = run_eval(cfg, tasks, None if args.no_train_split else
                      rag_tasks(args.limit, "train"))
    result.show()
    rows = [json.loads(line) for line in (work / "scores.jsonl").open(encoding="utf-8")]
    items = [dict(it, task=name) for name, its in tasks.items() for it in its]
    refs = references(items, rows)
    print_table("reference rankings (read the gold; not routers)",
                [(k, f"APGR {v['apgr']:.3f}" if "apgr" in v else
                  f"{v['rag']} of {v['of']} (the big model right on {v['big_right']})")
                 for k, v in refs.items()])
    data = {**result.data, "references": refs, "seconds": time.perf_counter() - t}
    out = ROOT / "bench" / "results" / "routing.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"small_model": "builtin:smollm2-135m, 4-bit RTN g64, int4 "
                               "embedding", "big_model": "builtin:smollm2-135m (fp32)",
                               **data}, indent=1) + "\n")
    strategies = data["strategies"]
    best = max((k for k in strategies if k != "oracle"), key=lambda k: strategies[k]["apgr"])
    print_table("bench/routing.py", [
        ("best mode", f"{best}: APGR {strategies[best]['apgr']:.3f} (bar >= 0.75; random 0.5)"),
        ("CPT(95%) of the best", f"{strategies[best]['cpt95']:.1%} (random 95%)"),
        *[(f"{k} decision p50 / p95", f"{v['p50']:.2f} / {v['p95']:.2f} ms (bar < 5 ms; "
                                      f"back to back {v['back_to_back_p95']:.2f}; load "
                                      f"{v['load_avg_1m']:.1f}), APGR "
                                      f"{strategies[k]['apgr']:.3f} (10 fold seeds: "
                                      f"{strategies[k]['apgr_over_10_fold_seeds']['mean']:.3f})")
          for k, v in data["overhead"]["router_decision_ms"].items()],
        ("seconds", f"{data['seconds']:.0f}"),
        ("written", str(out))])


if __name__ == "__main__":
    main()
