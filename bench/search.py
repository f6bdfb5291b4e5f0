"""Compression search under a hardware budget (issue 31) on the built-in SmolLM2-135M.

Rows, every model written to disk and re-measured from its files:

* **dense**: fp32, the reference perplexity;
* **uniform**: ``slm quantize --method gptq --bits 4 --group-size 64`` (the baseline);
* **searched @ uniform size**: ``slm search --max-size-mb <uniform's size on disk>``,
  timed from an empty sensitivity cache (the "whole search" figure);
* **searched @ uniform quality**: the smallest budget whose predicted KL (scaled by the
  true/predicted ratio measured on the first search) reaches the uniform model's true KL,
  materialised from the cached sensitivities, then scored;
* **Q4_K_M layout**: llama.cpp's Q4_K_M per-tensor choice applied with our quantizers
  (``attn_v`` and ``ffn_down`` of the ``use_more_bits`` layers at the next grid up, here
  int8 per channel for Q6_K; every other linear 4-bit g32 for Q4_K's 4.5 bits per weight),
  and **searched @ Q4_K_M size**;
* **searched @ uniform size and speed**: ``--min-decode-tok-s`` at 80% of uniform's
  measured decode speed: the cost model's prediction against the re-measured figure;
* **uniform, int8 table**: the same GPTQ with ``slm quantize``'s default int8 embedding
  table; **searched @ its serving memory** (``--max-memory-mb`` at its peak served with
  ``--streams`` x ``--context``, measured in a fresh process), **at its size and 80% of its
  per-stream speed at ``--streams``**, and **at its quality** (the budget bisected on true
  perplexity, the table in the search space on both sides).

Perplexity is ``bench/real_quality.py``'s ``score`` (seq_len 512, 4096 tokens of the
stdlib's held-out prose and code); "loss" is the rise over fp32. Decode speeds are measured
in interleaved rounds (A B C ... A B C ...) in one process. GPTQ (uniform and searched)
calibrates on ``--calib-samples`` windows of 512 tokens (the same for all rows).

    nice -n 10 .venv/bin/python bench/search.py        # about 40 minutes on 2 loaded cores

Results are kept per row in ``bench/results/search.json`` as they come (a rerun computes
only what is missing; ``--redo ROW``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

MODEL = "builtin:smollm2-135m"
MB = 1e6


def load_avg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's ``use_more_bits`` (src/llama-quant.cpp): the first and last eighth of the
    layers and every third layer between them."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def q4km_choice(names: list[str], n_layers: int):
    from slmkit.search.space import Option

    out = {}
    for name in names:
        i = int(name.split(".layers.")[1].split(".")[0])
        more = name.endswith(("v_proj", "down_proj")) and use_more_bits(i, n_layers)
        out[name] = Option(8, -1) if more else Option(4, 32)
    return out


def search_cfg(args, work: Path, out: str, **kw):
    from slmkit.search.config import SearchConfig

    return SearchConfig(model=MODEL, out=str(work / out), overwrite=True,
                        calib_samples=args.calib_samples, threads=args.threads,
                        kl_samples=args.kl_samples, group_sizes=args.group_sizes,
                        cache_dir=str(work / "cache"), **kw)


def scored(path: Path, args) -> dict:
    from real_quality import score

    from slmkit.models.info import dir_size
    from slmkit.models.io import load_model

    model, tok = load_model(path, dtype="fp32")
    return {"size_bytes": dir_size(path), "ppl": score(model, tok, args)}


def main(argv=None) -> int:
    global MODEL
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="builtin:smollm2-135m",
                    help="(a tiny model dir for a smoke run)")
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--kl-samples", type=int, default=2, help="KL windows of 128 tokens")
    ap.add_argument("--group-sizes", type=int, nargs="+", default=[32, 64, 128])
    ap.add_argument("--work", type=Path, default=Path("/tmp/slmkit-bench-search"))
    ap.add_argument("--redo", nargs="*", default=[])
    ap.add_argument("--iso-steps", type=int, default=4,
                    help="bisection steps on true perplexity for the iso-quality row")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "search.json")
    ap.add_argument("--streams", type=int, default=4,
                    help="concurrent streams of the memory and multi-stream speed rows")
    ap.add_argument("--context", type=int, default=2048,
                    help="tokens per stream the memory row's KV cache holds")
    ap.add_argument("--iso-lo-mb", type=float, default=90.0,
                    help="low end of the int8-table iso-quality bisection (MB)")
    args = ap.parse_args(argv)
    MODEL = args.model

    import torch

    torch.set_num_threads(args.threads)
    from slmkit.compress.quantize.api import run_quantize
    from slmkit.compress.quantize.config import QuantizeConfig
    from slmkit.models.info import dir_size
    from slmkit.models.io import load_model, save_model
    from slmkit.search.run import materialize, run_search

    args.work.mkdir(parents=True, exist_ok=True)
    rows = json.loads(args.out.read_text()).get("rows", {}) if args.out.exists() else {}
    for r in args.redo:
        rows.pop(r, None)

    def save():
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"model": MODEL, "calib_samples": args.calib_samples,
                                        "kl_samples": args.kl_samples,
                                        "group_sizes": args.group_sizes,
                                        "threads": args.threads, "rows": rows,
                                        "bars": bars(rows)}, indent=1))

    def row(name, fn, makes: str | None = None):
        """``makes``: the model dir under ``--work`` that later rows load; a row cached in
        ``--out`` whose dir is missing (another ``--work``, a cleaned /tmp) is recomputed."""
        if name in rows and (makes is None or (args.work / makes).is_dir()):
            return rows[name]
        t = time.time()
        la = load_avg()
        rows[name] = {**fn(), "seconds": round(time.time() - t, 1), "loadavg_before": la,
                      "loadavg_after": load_avg()}
        print(f"{name}: {json.dumps(rows[name])[:400]}", flush=True)
        save()
        return rows[name]

    def dense():
        from real_quality import score

        model, tok = load_model(MODEL, dtype="fp32")
        return {"ppl": score(model, tok, args)}

    row("dense", dense)

    def uniform():
        run_quantize(QuantizeConfig(model=MODEL, out=str(args.work / "uniform"), overwrite=True,
                                    method="gptq", bits=4, group_size=64,
                                    calib_samples=args.calib_samples, threads=args.threads,
                                    # like for like: the search keeps the table dense too
                                    quantize_embeddings=False))
        return scored(args.work / "uniform", args)

    uni = row("uniform", uniform, makes="uniform")

    def searched_at_size():
        shutil.rmtree(args.work / "cache", ignore_errors=True)     # time it from scratch
        t = time.time()
        res = run_search(search_cfg(args, args.work, "searched", embeddings=False,
                                    max_size_mb=uni["size_bytes"] / MB))
        took = time.time() - t
        return {**scored(args.work / "searched", args), "search_seconds": round(took, 1),
                "budget_bytes": uni["size_bytes"], "true_kl": res.figures["true_kl"],
                "predicted_kl": res.figures["predicted_kl"],
                "predicted_size": res.figures["predicted_size"],
                "options": res.data["chosen"]["options"]}

    s1 = row("searched @ uniform size", searched_at_size)

    def searched_at_size_table():
        res = run_search(search_cfg(args, args.work, "searched-table",
                                    max_size_mb=uni["size_bytes"] / MB))
        return {**scored(args.work / "searched-table", args), "budget_bytes": uni["size_bytes"],
                "true_kl": res.figures["true_kl"], "predicted_kl": res.figures["predicted_kl"],
                "options": res.data["chosen"]["options"]}

    row("searched @ uniform size, table in the space", searched_at_size_table)

    def uniform_kl():
        from slmkit.search.run import _kl_batches, _true_kl
        from slmkit.search.sensitivity import Tail

        cfg = search_cfg(args, args.work, "unused", max_size_mb=1.0)
        dense_model, tok = load_model(MODEL, dtype="fp32")
        tail = Tail(dense_model, _kl_batches(tok, cfg))
        q, _ = load_model(args.work / "uniform", dtype="fp32")
        # the tail runs the dense model's block list: put the uniform model's blocks in it
        for i, block in enumerate(q.model.layers):
            dense_model.model.layers[i] = block
        return {"true_kl": _true_kl(dense_model, tail)}

    ukl = row("uniform KL", uniform_kl)

    def iso_attempt(out: str, b: int, base: dict, **kw) -> dict:
        """The search at ``b`` bytes, scored; ``ok`` when no worse than ``base`` on both
        texts."""
        res = run_search(search_cfg(args, args.work, out, max_size_mb=b / MB, **kw))
        r = {**scored(args.work / out, args), "budget_bytes": b,
             "true_kl": res.figures["true_kl"], "predicted_kl": res.figures["predicted_kl"],
             "options": res.data["chosen"]["options"]}
        r["ok"] = all(r["ppl"][t]["ppl"] <= base["ppl"][t]["ppl"] for t in ("prose", "code"))
        print(f"  iso try ({out}) at {b / MB:.2f} MB: {r['ppl']['prose']['ppl']:.3f} / "
              f"{r['ppl']['code']['ppl']:.4f} ok={r['ok']}", flush=True)
        return r

    def searched_at_quality(table: bool = True):
        from slmkit.search.run import _solve, fixed_bytes
        from slmkit.search.sensitivity import measure_sensitivities
        from slmkit.models.io import resolve_ref

        cfg = search_cfg(args, args.work, "iso", max_size_mb=1.0, embeddings=table)
        model, tok = load_model(MODEL, dtype="fp32")
        layers, _, _ = measure_sensitivities(model, tok, cfg)
        fixed = fixed_bytes(model, resolve_ref(MODEL), set(layers))
        ratio = s1["true_kl"] / s1["predicted_kl"]
        target = ukl["true_kl"] / ratio
        lo = sum(min(i.bytes.values()) for i in layers.values())
        hi = uni["size_bytes"] - fixed
        for _ in range(30):            # the smallest layer budget predicted at the target
            mid = (lo + hi) // 2
            ch = _solve(layers, mid)
            if ch is not None and sum(layers[n].kl[o.key] for n, o in ch.items()) <= target:
                hi = mid
            else:
                lo = mid + 1
        budget = hi + fixed
        out = "iso" if not table else "iso-table"

        def attempt(b):
            return iso_attempt(out, b, uni, embeddings=table)

        first = attempt(budget)
        if table and not first["ok"]:     # the KL proxy missed: bisect on true perplexity
            return {**bisect_iso(out, budget, uni["size_bytes"], uni, [first], None,
                                 embeddings=table), "target_predicted_kl": target}
        return {**bisect_iso(out, 0, 0, uni, [first], first if first["ok"] else None, steps=0),
                "target_predicted_kl": target}

    def bisect_iso(out, lo: int, hi: int, base: dict, tries: list, best, steps=None, **kw):
        """Budgets between ``lo`` (worse than ``base``) and ``hi`` bisected on true
        perplexity; the smallest one found no worse, with every try."""
        for _ in range(args.iso_steps if steps is None else steps):
            mid = (lo + hi) // 2
            r = iso_attempt(out, mid, base, **kw)
            tries.append(r)
            if r["ok"]:
                hi, best = mid, r
            else:
                lo = mid
        final = best or tries[-1]
        return {**final, "found": best is not None,
                "tries": [{"budget_bytes": t["budget_bytes"], "ok": t["ok"],
                           "ppl": {k: v["ppl"] for k, v in t["ppl"].items()}} for t in tries]}

    row("searched @ uniform quality (linears only)", lambda: searched_at_quality(False))
    row("searched @ uniform quality", searched_at_quality)

    def q4km():
        from slmkit.search.sensitivity import layer_infos, layer_store

        cfg = search_cfg(args, args.work, "q4km", max_size_mb=1.0, embeddings=False)
        model, tok = load_model(MODEL, dtype="fp32")
        names = list(layer_infos(model, cfg))
        choice = q4km_choice(names, model.config.num_hidden_layers)
        summary = materialize(model, tok, cfg, choice, layer_store(model, cfg))
        save_model(model, tok, args.work / "q4km", step="quantize", overwrite=True,
                   params={"layout": "llama.cpp Q4_K_M with slmkit's GPTQ"}, metrics=summary)
        counts = {}
        for o in choice.values():
            counts[o.key] = counts.get(o.key, 0) + 1
        return {**scored(args.work / "q4km", args), "options": counts}

    qk = row("Q4_K_M layout", q4km, makes="q4km")

    def searched_at_q4km():
        res = run_search(search_cfg(args, args.work, "searched-q4km", embeddings=False,
                                    max_size_mb=qk["size_bytes"] / MB))
        return {**scored(args.work / "searched-q4km", args), "budget_bytes": qk["size_bytes"],
                "true_kl": res.figures["true_kl"], "options": res.data["chosen"]["options"]}

    row("searched @ Q4_K_M size", searched_at_q4km)

    def speeds():
        from slmkit.search.cost import measure_decode

        names = {"uniform": "uniform", "searched @ uniform size": "searched",
                 "searched @ uniform quality (linears only)": "iso", "Q4_K_M layout": "q4km"}
        models = {k: load_model(args.work / d, dtype="fp32") for k, d in names.items()}
        out = {k: [] for k in names}
        for _ in range(3):                     # interleaved rounds
            for k, (m, t) in models.items():
                out[k].append(measure_decode(m, t))
        return {k: {"rounds": v, "median": sorted(v)[1]} for k, v in out.items()}

    sp = row("decode speed", speeds)

    def speed_budget():
        target = 0.8 * sp["uniform"]["median"]
        res = run_search(search_cfg(args, args.work, "speed", max_size_mb=uni["size_bytes"] / MB,
                                    min_decode_tok_s=target))
        return {**scored(args.work / "speed", args), "budget_tok_s": target,
                "budget_bytes": uni["size_bytes"],
                "predicted_tok_s": res.figures["predicted_decode_tok_s"],
                "measured_tok_s": res.figures["decode_tok_s"],
                "prediction_error": res.figures["predicted_decode_tok_s"]
                / res.figures["decode_tok_s"] - 1,
                "true_kl": res.figures["true_kl"], "options": res.data["chosen"]["options"]}

    row("searched @ uniform size and 80% of its speed", speed_budget)

    def q4km_kl():
        from slmkit.search.run import _kl_batches, _true_kl
        from slmkit.search.sensitivity import Tail

        cfg = search_cfg(args, args.work, "unused", max_size_mb=1.0)
        dense_model, tok = load_model(MODEL, dtype="fp32")
        tail = Tail(dense_model, _kl_batches(tok, cfg))
        q, _ = load_model(args.work / "q4km", dtype="fp32")
        for i, block in enumerate(q.model.layers):
            dense_model.model.layers[i] = block
        return {"true_kl": _true_kl(dense_model, tail)}

    row("Q4_K_M layout KL", q4km_kl)

    # --- serving memory, concurrent streams, and the int8-table baseline -------------
    def uniform_int8_table():
        run_quantize(QuantizeConfig(model=MODEL, out=str(args.work / "uniform-int8"),
                                    overwrite=True, method="gptq", bits=4, group_size=64,
                                    calib_samples=args.calib_samples, threads=args.threads))
        return scored(args.work / "uniform-int8", args)     # slm quantize's default table

    u8 = row("uniform, int8 table (slm quantize's default)", uniform_int8_table,
             makes="uniform-int8")

    def memory_budget():
        from slmkit.search.memory import measure_serving

        base = measure_serving(args.work / "uniform-int8", args.streams, args.context,
                               threads=args.threads)
        res = run_search(search_cfg(args, args.work, "memory",
                                    max_memory_mb=base["peak_bytes"] / MB,
                                    streams=args.streams, context=args.context))
        chosen = res.data["chosen"]
        return {**scored(args.work / "memory", args),
                "budget_bytes": base["peak_bytes"], "uniform_int8_served": base,
                "predicted_memory_bytes": chosen["predicted_memory_bytes"],
                "measured_memory_bytes": chosen["measured_memory_bytes"],
                "prediction_error": chosen["predicted_memory_bytes"]
                / chosen["measured_memory_bytes"] - 1,
                "served": chosen["served"], "true_kl": res.figures["true_kl"],
                "options": chosen["options"]}

    row(f"searched @ uniform (int8 table)'s serving memory, {args.streams} streams x "
        f"{args.context}", memory_budget)

    def streams_budget():
        from slmkit.search.cost import measure_decode

        m, t = load_model(args.work / "uniform-int8", dtype="fp32")
        base = [measure_decode(m, t, streams=args.streams) for _ in range(2)]
        del m
        target = 0.8 * max(base)
        from slmkit.errors import ConfigError

        try:
            res = run_search(search_cfg(args, args.work, "streams",
                                        max_size_mb=u8["size_bytes"] / MB,
                                        min_decode_tok_s=target, streams=args.streams))
        except ConfigError as e:    # refused as unreachable: the cost model's word, kept
            return {"refused": str(e), "budget_tok_s_per_stream": target,
                    "uniform_int8_per_stream_tok_s": base}
        return {**scored(args.work / "streams", args), "budget_tok_s_per_stream": target,
                "uniform_int8_per_stream_tok_s": base, "budget_bytes": u8["size_bytes"],
                "predicted_tok_s": res.figures["predicted_decode_tok_s"],
                "measured_tok_s": res.figures["decode_tok_s"],
                "prediction_error": res.figures["predicted_decode_tok_s"]
                / res.figures["decode_tok_s"] - 1,
                "true_kl": res.figures["true_kl"], "options": res.data["chosen"]["options"]}

    row(f"searched @ uniform (int8 table)'s size and 80% of its speed at {args.streams} "
        "streams", streams_budget)

    def searched_at_int8_quality():
        """Bisect the budget on true perplexity against the int8-table uniform (table in
        the space), from the smallest model that can be written to uniform's size."""
        return bisect_iso("iso-int8", int(args.iso_lo_mb * MB), u8["size_bytes"], u8, [],
                          None)

    row("searched @ uniform (int8 table)'s quality", searched_at_int8_quality)
    save()
    print(json.dumps(bars(rows), indent=1))
    return 0


def _loss(r, d, text):
    return r["ppl"][text]["ppl"] - d["ppl"][text]["ppl"]


def bars(rows: dict) -> dict:
    out = {}
    d, u = rows.get("dense"), rows.get("uniform")
    s1 = rows.get("searched @ uniform size")
    if d and u and s1:
        out["loss ratio searched/uniform at uniform size"] = {
            t: _loss(s1, d, t) / _loss(u, d, t) for t in ("prose", "code")}
        out["bar: loss >= 20% smaller (both texts)"] = all(
            v <= 0.8 for v in out["loss ratio searched/uniform at uniform size"].values())
        out["size within budget"] = s1["size_bytes"] <= s1["budget_bytes"]
        out["whole search seconds"] = s1["search_seconds"]
        out["bar: search under 30 minutes"] = s1["search_seconds"] < 1800
    lin = rows.get("searched @ uniform quality (linears only)")
    if d and u and lin:
        out["size ratio at uniform quality, linears only"] = lin["size_bytes"] / u["size_bytes"]
        out["ppl no worse than uniform, linears only"] = all(
            lin["ppl"][t]["ppl"] <= u["ppl"][t]["ppl"] for t in ("prose", "code"))
    iso = rows.get("searched @ uniform quality")
    if d and u and iso:
        out["size ratio at uniform quality"] = iso["size_bytes"] / u["size_bytes"]
        out["ppl no worse than uniform (both texts)"] = all(
            iso["ppl"][t]["ppl"] <= u["ppl"][t]["ppl"] for t in ("prose", "code"))
        out["bar: >= 15% smaller at uniform's perplexity"] = \
            out["size ratio at uniform quality"] <= 0.85 and \
            out["ppl no worse than uniform (both texts)"]
    qk, sq = rows.get("Q4_K_M layout"), rows.get("searched @ Q4_K_M size")
    if d and qk and sq:
        out["loss ratio searched/Q4_K_M at Q4_K_M size"] = {
            t: _loss(sq, d, t) / _loss(qk, d, t) for t in ("prose", "code")}
        out["Q4_K_M-size search within budget"] = sq["size_bytes"] <= sq["budget_bytes"]
    pts = []      # (true KL, mean log perplexity ratio over both texts) per compressed model
    for name, kl_row in (("uniform", "uniform KL"), ("Q4_K_M layout", "Q4_K_M layout KL"),
                         ("searched @ uniform size", None), ("searched @ uniform quality", None),
                         ("searched @ uniform quality (linears only)", None),
                         ("searched @ uniform size, table in the space", None),
                         ("searched @ Q4_K_M size", None),
                         ("searched @ uniform size and 80% of its speed", None)):
        r = rows.get(name)
        kl = (rows.get(kl_row) or {}).get("true_kl") if kl_row else (r or {}).get("true_kl")
        if d and r and kl is not None:
            import math

            pts.append((kl, sum(math.log(r["ppl"][t]["ppl"] / d["ppl"][t]["ppl"])
                                for t in ("prose", "code")) / 2))
    if len(pts) >= 3:
        from scipy.stats import spearmanr

        out["KL vs perplexity rank correlation (Spearman)"] = {
            "models": len(pts), "rho": float(spearmanr(*zip(*pts)).statistic)}
    sb = rows.get("searched @ uniform size and 80% of its speed")
    if sb:
        out["speed budget met when re-measured"] = sb["measured_tok_s"] >= sb["budget_tok_s"]
        out["speed prediction error"] = sb["prediction_error"]
        out["speed-budget model within size"] = sb["size_bytes"] <= sb["budget_bytes"]
    for name, r in rows.items():
        if name.startswith("searched @ uniform (int8 table)'s serving memory"):
            out["memory budget met when re-measured"] = \
                r["measured_memory_bytes"] <= r["budget_bytes"]
            out["memory prediction error"] = r["prediction_error"]
        elif name.startswith("searched @ uniform (int8 table)'s size and 80%") \
                and "refused" not in r:
            out["multi-stream speed budget met when re-measured"] = \
                r["measured_tok_s"] >= r["budget_tok_s_per_stream"]
            out["multi-stream speed prediction error"] = r["prediction_error"]
    u8 = rows.get("uniform, int8 table (slm quantize's default)")
    iso8 = rows.get("searched @ uniform (int8 table)'s quality")
    if u8 and iso8:
        out["size ratio at the int8-table uniform's perplexity"] = \
            iso8["size_bytes"] / u8["size_bytes"] if iso8["found"] else None
        out["bar: >= 15% smaller at uniform's perplexity (int8-table baseline)"] = \
            bool(iso8["found"] and iso8["size_bytes"] <= 0.85 * u8["size_bytes"])
    return out


if __name__ == "__main__":
    raise SystemExit(main())
