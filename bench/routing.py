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
on one mix moves on the other. (The mined stdlib code tasks were tried first: both models
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


def rag_tasks(n: int) -> dict[str, list[dict]]:
    """The built-in RAG questions as chat prompts, with and without the retrieved source."""
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
            rag.append({**item, "id": f"rag/{i}", "prompt": chat(SYSTEM, source_block(
                hits[:1], q.question))})
            closed.append({**item, "id": f"closed/{i}",
                           "prompt": chat(SYSTEM_NO_SOURCES, q.question)})
    finally:
        retriever.close()
    return {"rag": rag, "closed-book": closed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=60, help="questions (each asked twice)")
    parser.add_argument("--layers", type=int, nargs="+", default=[0, 2],
                        help="router feature depths to compare (decoder layers)")
    parser.add_argument("--work", default=str(ROOT / "runs" / "route-bench"))
    parser.add_argument("--threads", type=int, default=2)
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
                     layers=args.layers, threads=args.threads, out=str(work))
    result = run_eval(cfg, rag_tasks(args.limit))
    result.show()
    data = {**result.data, "seconds": time.perf_counter() - t}
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
        *[(f"{k} decision p95", f"{v['p95']:.2f} ms (bar < 5 ms), APGR "
                                f"{strategies[k]['apgr']:.3f}")
          for k, v in data["overhead"]["router_decision_ms"].items()],
        ("seconds", f"{data['seconds']:.0f}"),
        ("written", str(out))])


if __name__ == "__main__":
    main()
