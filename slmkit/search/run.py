"""``slm search``: the best per-layer compression that fits a size (and speed) budget.

1. per-layer sensitivities (:mod:`slmkit.search.sensitivity`), cached;
2. the exact byte accounting of the output dir: the tensors that stay as they are, the
   other files, and each layer's option (:mod:`slmkit.search.space`);
3. the additive solve (:mod:`slmkit.search.solve`) at the budget, and at ``pareto_points``
   budgets for the front;
4. optionally the per-layer decode cost model (:mod:`slmkit.search.cost`);
5. the chosen assignment written through the quantize step's own code
   (:func:`~slmkit.compress.quantize.api.quantize_model` with per-layer grids), its size
   re-measured from the written dir (a model over budget is re-solved with the excess
   taken off) and its true end-to-end KL measured against the prediction.
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from pathlib import Path

import torch

from slmkit.errors import ConfigError
from slmkit.search.config import SearchConfig
from slmkit.search.space import HEADER_BYTES_PER_TENSOR, Option
from slmkit.step import StepResult, Table

MB = 1e6
#: What a search adds to config.json (the quant section) and slmkit.json (its lineage
#: record) beyond the per-layer grids, bounded.
FILE_MARGIN = 512


def other_files(model_dir: Path, layer_names) -> int:
    """Bytes of the non-weight files of the output: the input's, plus the layer grids
    (written twice in config.json, indented) and :data:`FILE_MARGIN`."""
    others = sum(f.stat().st_size for f in model_dir.iterdir()
                 if f.is_file() and not f.name.endswith(".safetensors")
                 and f.name != "model.safetensors.index.json")
    grids = len(json.dumps({n: [4, 128] for n in layer_names}, indent=4))
    return others + 2 * grids + FILE_MARGIN


def fixed_bytes(model, model_dir: Path, layer_names: set[str]) -> int:
    """Bytes of the output dir that no option changes: every tensor outside the searched
    linears (tied tensors once) with its header entry, and the non-weight files."""
    seen = set()
    total = 0
    skip = _tied_head(model, layer_names)
    for name, t in model.state_dict(keep_vars=True).items():
        if name.rpartition(".")[0] in layer_names or name.rpartition(".")[0] == skip:
            continue
        key = (t.data_ptr(), t.numel())
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size() + HEADER_BYTES_PER_TENSOR
    return total + other_files(model_dir, layer_names) + 8


def skip_table(model) -> str | None:
    """The name of the input embedding table, when it is a plain one."""
    from slmkit.search.sensitivity import embedding_table

    found = embedding_table(model)
    return found[0] if found else None


def _tied_head(model, units) -> str | None:
    """The tied LM head's name when the embedding table is one of ``units`` (its tensor is
    the table's: counted with the table's option, not as a fixed tensor)."""
    from slmkit.search.sensitivity import embedding_table

    found = embedding_table(model)
    if found and found[0] in units and found[2]:
        return found[2]
    return None


def exact_bytes(model, layers, choice: dict[str, Option], sym: bool, model_dir: Path) -> int:
    """The output dir's size for ``choice``, its weight file serialized for real (tensors of
    the right shapes and dtypes, as ``QuantLinear`` stores them; tied tensors once, as
    ``save_pretrained`` writes them) plus :func:`other_files`."""
    from safetensors.torch import save

    from slmkit.nn.packing import num_groups, packed_cols

    state, seen = {}, set()
    skip = _tied_head(model, choice)
    for name, t in model.state_dict().items():
        owner, _, leaf = name.rpartition(".")
        if owner in choice or owner == skip:
            continue
        key = (t.data_ptr(), t.numel())
        if key not in seen:
            seen.add(key)
            state[name] = t
    for name, o in choice.items():
        info = layers[name]
        out_f, in_f = info.out_features, info.in_features
        if name == skip_table(model) and not o.dense:       # int8 table (+ tied head)
            for owner in [name] + ([skip] if skip else []):
                state[f"{owner}.qweight"] = torch.empty(out_f, in_f, dtype=torch.uint8)
                state[f"{owner}.scales"] = torch.empty(out_f, 1, dtype=torch.float16)
            continue
        if o.dense:
            state[f"{name}.weight"] = torch.empty(out_f, in_f)
        else:
            g = num_groups(in_f, o.group_size)
            state[f"{name}.qweight"] = torch.empty(out_f, packed_cols(o.bits, in_f),
                                                   dtype=torch.uint8)
            state[f"{name}.scales"] = torch.empty(out_f, g, dtype=torch.float16)
            if not sym:
                state[f"{name}.zeros"] = torch.empty(out_f, g, dtype=torch.uint8)
        if info.bias:
            state[f"{name}.bias"] = torch.empty(out_f)
    state = {k: v.contiguous() for k, v in state.items()}
    return len(save(state, metadata={"format": "pt"})) + other_files(model_dir, choice)


def _layer_kls(layers: dict) -> None:
    """Layers a stopped sensitivity pass did not reach get the mean KL of measured layers
    of the same kind (``q_proj``, ...) and option, so the best-so-far search can still run."""
    by_kind: dict[tuple[str, str], list[float]] = {}
    for name, info in layers.items():
        kind = name.rsplit(".", 1)[-1]
        for k, v in info.kl.items():
            by_kind.setdefault((kind, k), []).append(v)
    for name, info in layers.items():
        kind = name.rsplit(".", 1)[-1]
        for o in info.options:
            if o.key not in info.kl:
                vals = by_kind.get((kind, o.key)) or [0.0 if o.dense else 1.0]
                info.kl[o.key] = sum(vals) / len(vals)


def _solve(layers, budget: int, times=None, max_time=None, base_time=0.0):
    from slmkit.search.solve import solve_knapsack, solve_with_time

    infos = list(layers.values())
    costs = [[info.kl[o.key] for o in info.options] for info in infos]
    weights = [[info.bytes[o.key] for o in info.options] for info in infos]
    if times is None:
        picks = solve_knapsack(costs, weights, budget)
    else:
        picks = solve_with_time(costs, weights, times, budget, max_time, base_time)
    if picks is None:
        return None
    return {info.name: info.options[j] for info, j in zip(infos, picks)}


def summarize(layers, choice: dict[str, Option], fixed: int) -> dict:
    size = fixed + sum(layers[n].bytes[o.key] for n, o in choice.items())
    kl = sum(layers[n].kl[o.key] for n, o in choice.items())
    counts = Counter(o.key for o in choice.values())
    return {"size_bytes": size, "predicted_kl": kl, "options": dict(counts.most_common())}


def materialize(model, tok, cfg: SearchConfig, choice: dict[str, Option],
                store=None) -> dict:
    """Quantize ``model`` in place to ``choice``: from the sensitivity pass's stored codes
    (exactly the weights that were scored) through the quantize step's
    :func:`~slmkit.compress.quantize.api.install_codes`, or, for anything not stored,
    by running :func:`~slmkit.compress.quantize.api.quantize_model` with per-layer grids."""
    from slmkit.compress.match import DEFAULT_IGNORE
    from slmkit.compress.quantize.api import install_codes, quantize_model
    from slmkit.compress.quantize.config import QuantizeOptions
    from slmkit.nn.surgery import linear_shape

    table = skip_table(model)
    int8_table = table in choice and not choice[table].dense
    choice = {n: o for n, o in choice.items() if n != table}
    quant = {n: o for n, o in choice.items() if not o.dense}
    if not quant:
        if int8_table:
            from slmkit.search.sensitivity import quantize_table

            quantize_table(model)
        return {"layers": 0, "weights": "dense", "embeddings": "int8" if int8_table else "dense"}
    common = Counter((o.bits, o.group_size) for o in quant.values()).most_common(1)[0][0]
    grids = {n: (o.bits, o.group_size) for n, o in quant.items()}
    if store is not None:
        results = {}
        for n, o in quant.items():
            r = store.load(n, o, linear_shape(model.get_submodule(n))[1])
            if r is None:
                break
            results[n] = r
        else:
            # the embedding table is not one of the search's choices: it stays as it is
            opts = QuantizeOptions(method=cfg.method, bits=common[0], group_size=common[1],
                                   sym=cfg.sym, quantize_embeddings=int8_table,
                                   **({"embedding_bits": 8} if int8_table else {}))
            linears = {n: model.get_submodule(n) for n in quant}
            return {**install_codes(model, linears, results, opts, grids),
                    "weights": "stored (the scored variants)"}
    dense = [re.escape(n) + "$" for n, o in choice.items() if o.dense]
    fields = dict(method=cfg.method, bits=common[0], group_size=common[1], sym=cfg.sym,
                  quantize_embeddings=int8_table,
                  **({"embedding_bits": 8} if int8_table else {}),
                  targets=["|".join(re.escape(n) + "$" for n in quant)],
                  ignore=list(DEFAULT_IGNORE) + dense)
    if cfg.method == "gptq":
        fields.update(calib_data=cfg.calib_data, calib_samples=cfg.calib_samples,
                      calib_seq_len=cfg.calib_seq_len, seed=cfg.seed,
                      calib_precision=cfg.calib_precision)
    opts = QuantizeOptions(**fields)
    return {**quantize_model(model, tok, opts, grids=grids), "weights": "quantized again"}


def pareto(layers, fixed: int, points: int) -> list[dict]:
    """The predicted front: the best assignment at ``points`` sizes from the smallest
    model to the one with every layer at its most expensive option."""
    lo = sum(min(i.bytes.values()) for i in layers.values())
    hi = sum(max(i.bytes.values()) for i in layers.values())
    out = []
    for k in range(points):
        budget = int(lo + (hi - lo) * (k / (points - 1)) ** 2)   # denser at the small end
        choice = _solve(layers, budget)
        if choice is None:
            continue
        row = summarize(layers, choice, fixed)
        if out and row["size_bytes"] == out[-1]["size_bytes"]:
            continue
        out.append(row)
    return out


def plot_front(front: list[dict], chosen: dict, path_png: Path | None) -> bytes:
    """PNG of predicted KL against size (log y), the chosen point marked."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=130)
    xs = [r["size_bytes"] / MB for r in front]
    ys = [max(r["predicted_kl"], 1e-9) for r in front]
    ax.plot(xs, ys, "o--", color="#1f6feb", label="Pareto front (predicted)")
    ax.scatter([chosen["size_bytes"] / MB], [max(chosen["predicted_kl"], 1e-9)], s=160,
               marker="*", color="#d73a49", zorder=3, label="chosen")
    if chosen.get("true_kl") is not None and chosen.get("written_bytes"):
        ax.scatter([chosen["written_bytes"] / MB], [max(chosen["true_kl"], 1e-9)], s=60,
                   marker="x", color="#24292f", zorder=3, label="chosen, measured")
    ax.set_yscale("log")
    ax.set_xlabel("size of the model dir (MB)")
    ax.set_ylabel("KL to the dense model (nats/token)")
    ax.set_title("slm search: quality against size", loc="left")
    ax.grid(True, color="#e1e4e8")
    ax.legend(frameon=False)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def run_search(cfg: SearchConfig) -> StepResult:
    """``slm search``: measure, solve, write the chosen model with the front beside it."""
    from slmkit.console import console, human_bytes
    from slmkit.models.info import dir_size
    from slmkit.models.io import load_model, resolve_ref, save_model
    from slmkit.search.sensitivity import (Tail, layer_infos, layer_store,
                                           measure_sensitivities)

    t0 = time.monotonic()
    deadline = t0 + cfg.time_limit if cfg.time_limit else None
    final = cfg.check_output()
    cfg.apply_threads()
    model, tok = load_model(cfg.model, dtype="fp32")
    from slmkit.compress.quantize.api import is_quantized

    if is_quantized(model):
        raise ConfigError(f"'{cfg.model}' is already quantized; search from the original "
                          "dense model.")
    src = resolve_ref(cfg.model)
    shapes = layer_infos(model, cfg)         # sizes need no measurement: check them first
    budget_bytes = int(cfg.max_size_mb * MB) if cfg.max_size_mb else None
    lightest = exact_bytes(model, shapes, {n: min(i.options, key=lambda o: i.bytes[o.key])
                                           for n, i in shapes.items()}, cfg.sym, src)
    if budget_bytes is not None and budget_bytes < lightest:
        raise ConfigError(f"--max-size-mb {cfg.max_size_mb:g} cannot be met: the smallest "
                          f"model this search can write is {lightest / MB:.3f} MB (every "
                          "layer at its fewest bits); raise the budget"
                          + (" or add --bits 3." if 3 not in cfg.bits else "."))
    def show(done: int, total: int, measured: dict) -> None:
        """One line per block: time, and the best assignment the search would pick now
        (layers not yet measured borrow their kind's mean, as a stopped search does)."""
        line = f"sensitivities: block {done}/{total}, {time.monotonic() - t0:.0f} s"
        if budget_bytes is not None:
            import copy

            trial = copy.deepcopy(measured)
            _layer_kls(trial)
            best = _solve(trial, budget_bytes - fixed_bytes(model, src, set(trial)))
            if best is not None:
                r = summarize(trial, best, 0)
                line += (f"; current best: predicted KL {r['predicted_kl']:.4g} ("
                         + ", ".join(f"{k} x{v}" for k, v in r["options"].items()) + ")")
        console.print(f"[dim]{line}[/dim]", highlight=False)

    layers, cache, complete = measure_sensitivities(model, tok, cfg, deadline=deadline,
                                                    log=show)
    if not complete:
        _layer_kls(layers)
    fixed = fixed_bytes(model, src, set(layers))
    if budget_bytes is None:
        budget_bytes = fixed + sum(max(i.bytes.values()) for i in layers.values())
    cost = None
    if cfg.min_decode_tok_s:
        from slmkit.search.cost import decode_cost_model

        cost = decode_cost_model(model, tok, layers, cfg)
    written = None
    margin = 0
    front = pareto(layers, fixed, cfg.pareto_points)
    for _attempt in range(3):
        for _ in range(8):       # the solve's per-tensor header estimate, checked exactly
            choice = _choose(layers, budget_bytes - fixed - margin, cost, cfg)
            if choice is None:
                raise ConfigError(_unmet(cfg, cost, layers, budget_bytes - fixed - margin))
            exact = exact_bytes(model if _attempt == 0 else work, layers, choice, cfg.sym,
                                src)
            if cfg.max_size_mb is None or exact <= budget_bytes:
                break
            margin += exact - budget_bytes + 256
        chosen = summarize(layers, choice, fixed)
        chosen["size_bytes"] = exact
        if cost is not None:
            chosen["predicted_decode_tok_s"] = cost.predict(choice)
        console.print(f"[dim]search: predicted KL {chosen['predicted_kl']:.4g} at "
                      f"{chosen['size_bytes'] / MB:.2f} MB; writing it[/dim]")
        work = load_model(cfg.model, dtype="fp32")[0] if _attempt else model
        tail = Tail(work, _kl_batches(tok, cfg))       # dense references, before quantizing
        if cfg.refine and _attempt == 0 and complete:
            from slmkit.search.refine import refine

            refined, info = refine(work, tail, layers, layer_store(work, cfg), choice,
                                   budget_bytes - fixed - margin, cfg.refine,
                                   cfg.refine_offspring, cfg.seed, deadline)
            size = exact_bytes(work, layers, refined, cfg.sym, src)
            fits = cfg.max_size_mb is None or size <= budget_bytes
            fast = cost is None or cost.predict(refined) >= cfg.min_decode_tok_s
            info["kept"] = fits and fast
            if fits and fast:
                choice, exact = refined, size
                chosen = {**summarize(layers, choice, fixed), "size_bytes": exact}
                if cost is not None:
                    chosen["predicted_decode_tok_s"] = cost.predict(choice)
            chosen["refinement"] = info
        summary = materialize(work, tok, cfg, choice, layer_store(work, cfg))
        chosen["true_kl"] = _true_kl(work, tail)
        report = {"config": cfg.lineage(), "chosen": chosen,
                  "assignment": {n: o.key for n, o in choice.items()},
                  "pareto": front, "fixed_bytes": fixed, "sensitivity_cache": str(cache),
                  "sensitivity_complete": complete,
                  "layers": {n: i.to_json() for n, i in layers.items()}}
        if cost is not None:
            report["cost_model"] = cost.to_json()
        saved = save_model(work, tok, final, step="search", params=cfg.lineage(),
                           metrics={**summary, "predicted_kl": chosen["predicted_kl"],
                                    "true_kl": chosen["true_kl"]},
                           overwrite=cfg.overwrite or _attempt > 0,
                           extra_files={"search/search.json": json.dumps(report, indent=1),
                                        "search/pareto.png": plot_front(front, chosen, None)})
        written = dir_size(saved)
        chosen["written_bytes"] = written
        if cfg.max_size_mb is None or written <= int(cfg.max_size_mb * MB):
            break
        margin += written - int(cfg.max_size_mb * MB) + 4096   # re-solve without the excess
    report["chosen"] = chosen
    (Path(saved) / "search" / "search.json").write_text(json.dumps(report, indent=1))
    (Path(saved) / "search" / "pareto.png").write_bytes(plot_front(front, chosen, None))
    measured_speed = None
    if cost is not None:
        from slmkit.search.cost import measure_decode

        measured_speed = measure_decode(work, tok)
        chosen["measured_decode_tok_s"] = measured_speed
        (Path(saved) / "search" / "search.json").write_text(json.dumps(report, indent=1))
    elapsed = time.monotonic() - t0
    rows = [("budget", _budget_text(cfg)),
            ("chosen", ", ".join(f"{k} x{v}" for k, v in chosen["options"].items())),
            ("size on disk", f"{human_bytes(written)} (predicted "
                             f"{human_bytes(chosen['size_bytes'])})"),
            ("KL to dense", f"{chosen['true_kl']:.4g} measured, {chosen['predicted_kl']:.4g} "
                            "predicted (sum of per-layer KLs)")]
    if cost is not None:
        rows.append(("decode tok/s", f"{measured_speed:.1f} measured, "
                                     f"{chosen['predicted_decode_tok_s']:.1f} predicted"))
    rows.append(("decode path", decode_path(work)))
    if "refinement" in chosen:
        r = chosen["refinement"]
        rows.append(("refinement", f"end-to-end KL {r['start_kl']:.4g} -> {r['best_kl']:.4g} "
                                   f"({r['evaluations']} evaluations, {r['accepted']} "
                                   f"generations improved"
                                   + ("" if r["kept"] else "; over a budget, not kept") + ")"))
    rows += [("sensitivities", f"{cache} ({'complete' if complete else 'stopped early'})"),
             ("search time", f"{elapsed:.0f} s"),
             ("written to", f"{saved} (front: search/search.json, search/pareto.png)")]
    table = Table("Pareto front (predicted; materialise one with --max-size-mb)",
                  [(f"{r['size_bytes'] / MB:.2f}", f"{r['predicted_kl']:.4g}",
                    ", ".join(f"{k} x{v}" for k, v in r["options"].items()))
                   for r in front], header=("MB", "predicted KL", "layers"))
    figures = {"size_on_disk": written, "predicted_size": chosen["size_bytes"],
               "predicted_kl": chosen["predicted_kl"], "true_kl": chosen["true_kl"],
               "search_seconds": elapsed}
    if cost is not None:
        figures.update(predicted_decode_tok_s=chosen["predicted_decode_tok_s"],
                       decode_tok_s=measured_speed)
    return StepResult("search", str(saved), figures, rows, [table],
                      data={**figures, "out": str(saved), "chosen": chosen, "pareto": front})


def decode_path(model) -> str:
    """Which engine path decodes ``model``: the native step, or the torch loop and why
    (3-bit layers, or projections sharing an input on different kernels, have no native
    step: the speed budget accounts for it)."""
    from slmkit.engine.runner import make_runner

    runner = make_runner(model, n_slots=1, max_seq_len=8)
    if getattr(runner, "native", None) is not None:
        return "native step"
    return f"torch loop ({getattr(runner, 'native_reason', None) or type(runner).__name__})"


def _kl_batches(tok, cfg):
    from slmkit.compress.calibrate import calibration_batches

    return calibration_batches(tok, cfg.calib_data, "train", cfg.kl_samples, cfg.kl_seq_len,
                               batch_size=4, seed=cfg.seed + 1)


@torch.no_grad()
def _true_kl(model, tail) -> float:
    """End-to-end KL of the (compressed) model to the dense reference on the KL windows,
    through the dequantized weights (the int kernels' bf16 activations would add their own
    rounding to what the search predicts)."""
    from slmkit.nn.quant_linear import _MODE, set_kernel_mode

    mode = _MODE["kernel"]
    set_kernel_mode("dequant")
    try:
        return tail.kl_model(model)
    finally:
        set_kernel_mode(mode)
        for m in model.modules():           # drop the dense copies the fallback cached
            if hasattr(m, "_cache") and hasattr(m, "qweight"):
                m._cache = {}


def _choose(layers, budget: int, cost, cfg):
    if cost is None:
        return _solve(layers, budget)
    return cost.solve(layers, budget, cfg.min_decode_tok_s, _solve)


def _budget_text(cfg) -> str:
    parts = []
    if cfg.max_size_mb:
        parts.append(f"<= {cfg.max_size_mb:g} MB")
    if cfg.min_decode_tok_s:
        parts.append(f">= {cfg.min_decode_tok_s:g} decode tok/s")
    return ", ".join(parts)


def _unmet(cfg, cost, layers, budget: int) -> str:
    if cost is not None:
        best = cost.fastest(layers, budget, _solve)
        fastest = f"{best:.1f} tok/s" if best else "none"
        return (f"--min-decode-tok-s {cfg.min_decode_tok_s:g} cannot be met within the size "
                f"budget: the fastest model this search predicts there is {fastest}; "
                "lower it or raise --max-size-mb.")
    return f"--max-size-mb {cfg.max_size_mb:g} cannot be met; raise it."
