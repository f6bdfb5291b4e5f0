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

import functools
import json
import math
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
    gone = tuple(p + "." for p in dropped_blocks(model, choice).values())
    for name, t in model.state_dict().items():
        owner, _, leaf = name.rpartition(".")
        if owner in choice or owner == skip or (gone and name.startswith(gone)):
            continue
        key = (t.data_ptr(), t.numel())
        if key not in seen:
            seen.add(key)
            state[name] = t
    for name, o in choice.items():
        if o.dropped:
            continue
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


def block_of(name: str) -> int | None:
    """The decoder block index of a searched unit's name (None for the embedding table)."""
    m = re.search(r"\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def dropped_blocks(model, choice: dict[str, Option]) -> dict[int, str]:
    """``{block index: module prefix}`` of the blocks ``choice`` drops."""
    from slmkit.compress.calibrate import find_blocks

    idx = {block_of(n) for n, o in choice.items() if o.dropped}
    if not idx:
        return {}
    path, _ = find_blocks(model)
    return {i: f"{path}.{i}" for i in sorted(idx)}


def add_drops(model, tok, layers, cfg, mem) -> list[tuple[int, float]]:
    """``--drop-layers``: each block's drop KL (measured once, cached), spread over its
    linears as their ``drop`` entry (0 bytes, the block's KV cache off the memory), not an
    option the solve picks per layer. Returns ``[(block, KL)]``, cheapest first."""
    if not cfg.drop_layers:
        return []
    from slmkit.search.sensitivity import drop_sensitivities

    kls = drop_sensitivities(model, tok, cfg)
    per_block: dict[int, list[str]] = {}
    for n in layers:
        if block_of(n) is not None:
            per_block.setdefault(block_of(n), []).append(n)
    kv_layer = mem.kv["quantized"] // model.config.num_hidden_layers if mem else 0
    for b, names in per_block.items():
        for n in names:
            layers[n].kl["drop"] = kls[b] / len(names)
            layers[n].bytes["drop"] = 0
            if mem is not None:
                layers[n].mem["drop"] = -kv_layer // len(names)
    return sorted(((b, kls[b]) for b in per_block), key=lambda x: x[1])[:cfg.drop_layers]


def _pick(layers, budget: int, cost, cfg, mem_limit, drops, kv_layer: int):
    """The best assignment over k = 0..len(drops) dropped blocks (the k cheapest), each
    rest solved under the budgets (a dropped block frees its KV cache too)."""
    from slmkit.search.space import DROP

    best, best_kl = None, float("inf")
    for k in range(len(drops) + 1):
        gone = {b for b, _ in drops[:k]}
        sub = {n: i for n, i in layers.items() if block_of(n) not in gone}
        solve = _solve if mem_limit is None else \
            functools.partial(_solve, memory=mem_limit + k * kv_layer)
        choice = _choose(sub, budget, cost, cfg, solve)
        if choice is None:
            continue
        choice.update({n: DROP for n in layers if n not in sub})
        kl = sum(layers[n].kl[o.key] for n, o in choice.items())
        if kl < best_kl:
            best, best_kl = choice, kl
    return best


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


def _solve(layers, budget: int, times=None, max_time=None, base_time=0.0, memory=None):
    """One option per unit: least summed KL within ``budget`` bytes, and, when given,
    ``base_time + sum(times) <= max_time`` and ``sum(unit.mem) <= memory`` (resident bytes
    the units may hold when served)."""
    from slmkit.search.solve import solve_with_limits

    infos = list(layers.values())
    costs = [[info.kl[o.key] for o in info.options] for info in infos]
    weights = [[info.bytes[o.key] for o in info.options] for info in infos]
    limits = []
    if times is not None:
        limits.append((times, max_time, base_time))
    if memory is not None:
        limits.append(([[info.mem[o.key] for o in info.options] for info in infos], memory,
                       0.0))
    picks = solve_with_limits(costs, weights, budget, limits)
    if picks is None:
        return None
    return {info.name: info.options[j] for info, j in zip(infos, picks)}


def summarize(layers, choice: dict[str, Option], fixed: int, mem=None) -> dict:
    size = fixed + sum(layers[n].bytes[o.key] for n, o in choice.items())
    kl = sum(layers[n].kl[o.key] for n, o in choice.items())
    counts = Counter(o.key for o in choice.values() if not o.dropped)
    out = {"size_bytes": size, "predicted_kl": kl, "options": dict(counts.most_common())}
    blocks = {block_of(n) for n, o in choice.items() if o.dropped}
    if blocks:
        out["options"]["dropped blocks"] = len(blocks)
        out["dropped_blocks"] = sorted(blocks)
    if mem is not None:
        out["predicted_memory_bytes"] = mem.predict(choice)
    return out


def _memory_model(model, src, layers, cfg):
    """The serving-memory model under ``--max-memory-mb`` (None without one); refuses a
    budget that even the smallest choice cannot meet before any search."""
    if cfg.max_memory_mb is None:
        return None
    from slmkit.console import console
    from slmkit.search.memory import memory_model

    if _runner_kind(model) == "GenericRunner":
        raise ConfigError(f"--max-memory-mb needs the engine's static KV cache, which "
                          f"'{cfg.model}' does not run on (a Llama-family layout does); "
                          "drop it.")
    console.print("[dim]memory model: serving the dense model in a fresh process[/dim]")
    mm = memory_model(model, src, layers, cfg)
    for n, info in layers.items():
        info.mem = mm.units[n]
    least = mm.predict({n: min(i.options, key=lambda o: i.mem[o.key])
                        for n, i in layers.items()})
    if least > cfg.max_memory_mb * MB:
        raise ConfigError(
            f"--max-memory-mb {cfg.max_memory_mb:g} cannot be met: serving the leanest model "
            f"this search can write takes {least / MB:.1f} MB here (runtime "
            f"{mm.base / MB:.0f} MB, KV cache {mm.kv['quantized'] / MB:.1f} MB for "
            f"{mm.streams} stream(s) x {mm.context} tokens); raise it, or lower --streams "
            "or --context.")
    return mm


def _runner_kind(model) -> str:
    from slmkit.engine.runner import make_runner

    return type(make_runner(model, n_slots=1, max_seq_len=8)).__name__


def materialize(model, tok, cfg: SearchConfig, choice: dict[str, Option],
                store=None, rtn_missing: bool = False) -> dict:
    """Quantize ``model`` in place to ``choice``: from the sensitivity pass's stored codes
    (exactly the weights that were scored) through the quantize step's
    :func:`~slmkit.compress.quantize.api.install_codes`, or, for anything not stored,
    by running :func:`~slmkit.compress.quantize.api.quantize_model` with per-layer grids;
    then the dropped decoder blocks are removed (their layers' grids renamed)."""
    gone = dropped_blocks(model, choice)
    choice = {n: o for n, o in choice.items() if not o.dropped}
    summary = _materialize(model, tok, cfg, choice, store, rtn_missing)
    if gone:
        from slmkit.search.sensitivity import drop_blocks

        renames = drop_blocks(model, sorted(gone))
        section = getattr(model.config, "slmkit", None) or {}
        for where in (section, getattr(model.config, "quantization_config", None) or {}):
            if isinstance(where, dict) and "layer_grids" in where:
                where["layer_grids"] = {_rename(n, renames): g
                                        for n, g in where["layer_grids"].items()}
        summary["dropped_blocks"] = sorted(gone)
    return summary


def _rename(name: str, renames: dict[str, str]) -> str:
    for old, new in renames.items():
        if name.startswith(old + "."):
            return new + name[len(old):]
    return name


def _materialize(model, tok, cfg: SearchConfig, choice: dict[str, Option], store,
                 rtn_missing: bool = False) -> dict:
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
        results, missing = {}, []
        for n, o in quant.items():
            r = store.load(n, o, linear_shape(model.get_submodule(n))[1])
            if r is None:
                missing.append(n)
            else:
                results[n] = r
        if not missing or rtn_missing:
            # a stopped search: the layers it did not reach get RTN (no calibration pass,
            # so --time-limit bounds the write too)
            from slmkit.compress.match import weight_matrix
            from slmkit.compress.quantize.modifiers import QuantizedLayer
            from slmkit.nn.packing import quantize_rtn

            for n in missing:
                o = quant[n]
                results[n] = QuantizedLayer(*quantize_rtn(
                    weight_matrix(model.get_submodule(n)).detach().float(), o.bits,
                    o.group_size, cfg.sym))
            opts = QuantizeOptions(method=cfg.method, bits=common[0], group_size=common[1],
                                   sym=cfg.sym, quantize_embeddings=int8_table,
                                   **({"embedding_bits": 8} if int8_table else {}))
            linears = {n: model.get_submodule(n) for n in quant}
            weights = "stored (the scored variants)" + (
                f"; {len(missing)} layers the stopped search did not reach: RTN"
                if missing else "")
            return {**install_codes(model, linears, results, opts, grids), "weights": weights}
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


def pareto(layers, fixed: int, points: int, mem=None) -> list[dict]:
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
        row = summarize(layers, choice, fixed, mem)
        if out and row["size_bytes"] == out[-1]["size_bytes"]:
            continue
        row["max_size_mb"] = math.ceil(row["size_bytes"] / 1e3) / 1e3   # fits, rounded up
        row["assignment"] = {n: o.key for n, o in choice.items()}
        out.append(row)
    return out


def point_command(cfg: SearchConfig, size_mb: float) -> str:
    """The ``slm search`` command that writes the front's point of ``size_mb``: this run's
    own flags (so the cached sensitivities are reused) with that size budget, less the
    ones the front does not solve for (the other budgets, drops, refinement)."""
    import shlex

    from slmkit.cli_options import flag_name

    fields = type(cfg).model_fields
    parts = ["slm", "search", cfg.model]
    for name in sorted(cfg.model_fields_set - {
            "model", "out", "max_size_mb", "overwrite", "max_memory_mb", "min_decode_tok_s",
            "streams", "context", "drop_layers", "refine", "refine_offspring",
            "pareto_points", "time_limit"}):
        value = getattr(cfg, name)
        extra = fields[name].json_schema_extra
        flag = (extra.get("cli", {}) if isinstance(extra, dict) else {}).get("flag") \
            or flag_name(name)
        if isinstance(value, bool):
            on, _, off = flag.partition("/")
            parts.append(on if value else (off or "--no-" + on[2:]))
        elif isinstance(value, list):
            for v in value:
                parts += [flag, str(v)]
        elif value is not None:
            parts += [flag, str(value)]
    return shlex.join(parts + ["--max-size-mb", f"{size_mb:g}", "--out", "OUT"])


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
    from slmkit.compress.calibrate import find_blocks
    from slmkit.search.space import DROP

    n_blocks = len(find_blocks(model)[1])
    if cfg.drop_layers >= n_blocks:
        raise ConfigError(f"--drop-layers {cfg.drop_layers} would leave no decoder block "
                          f"of the {n_blocks}; use at most {n_blocks - 1}.")
    lightest = exact_bytes(model, shapes, {n: DROP if (block_of(n) is not None and
                                                       block_of(n) < cfg.drop_layers)
                                           else min(i.options, key=lambda o: i.bytes[o.key])
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
    mem = _memory_model(model, src, layers, cfg)
    drops = add_drops(model, tok, layers, cfg, mem)
    kv_layer = mem.kv["quantized"] // model.config.num_hidden_layers if mem else 0
    solve = _solve
    written = None
    margin = mem_margin = 0
    front = pareto(layers, fixed, cfg.pareto_points, mem)
    for row in front:
        row["command"] = point_command(cfg, row["max_size_mb"])
    for _attempt in range(3):
        for _ in range(8):       # the solve's per-tensor header estimate, checked exactly
            mem_limit = None     # the units' share of the memory budget (KV fp16 first)
            if mem is not None:
                mem_limit = mem.layer_budget(int(cfg.max_memory_mb * MB) - mem_margin)
                solve = functools.partial(_solve, memory=mem_limit)
            choice = _pick(layers, budget_bytes - fixed - margin, cost, cfg, mem_limit,
                           drops, kv_layer)
            if choice is None:
                raise ConfigError(_unmet(cfg, cost, layers, budget_bytes - fixed - margin,
                                         solve, mem))
            if mem is not None and mem.predict(choice) > cfg.max_memory_mb * MB - mem_margin:
                # an all-dense answer keeps an fp32 KV cache: take the excess off
                mem_margin += mem.predict(choice) - int(cfg.max_memory_mb * MB - mem_margin) + 1
                continue
            exact = exact_bytes(model if _attempt == 0 else work, layers, choice, cfg.sym,
                                src)
            if cfg.max_size_mb is None or exact <= budget_bytes:
                break
            margin += exact - budget_bytes + 256
        chosen = summarize(layers, choice, fixed, mem)
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
            small = mem is None or \
                mem.predict(refined) <= cfg.max_memory_mb * MB - mem_margin
            info["kept"] = fits and fast and small
            if fits and fast and small:
                choice, exact = refined, size
                chosen = {**summarize(layers, choice, fixed, mem), "size_bytes": exact}
                if cost is not None:
                    chosen["predicted_decode_tok_s"] = cost.predict(choice)
            chosen["refinement"] = info
        summary = materialize(work, tok, cfg, choice, layer_store(work, cfg),
                              rtn_missing=not complete)
        chosen["true_kl"] = _true_kl(work, tail)
        report = {"config": cfg.lineage(), "chosen": chosen,
                  "assignment": {n: o.key for n, o in choice.items()},
                  "pareto": front, "fixed_bytes": fixed, "sensitivity_cache": str(cache),
                  "sensitivity_complete": complete,
                  "layers": {n: i.to_json() for n, i in layers.items()}}
        if cost is not None:
            report["cost_model"] = cost.to_json()
        if mem is not None:
            report["memory_model"] = mem.to_json()
        saved = save_model(work, tok, final, step="search", params=cfg.lineage(),
                           metrics={**summary, "predicted_kl": chosen["predicted_kl"],
                                    "true_kl": chosen["true_kl"]},
                           overwrite=cfg.overwrite or _attempt > 0,
                           extra_files={"search/search.json": json.dumps(report, indent=1),
                                        "search/pareto.png": plot_front(front, chosen, None)})
        written = dir_size(saved)
        chosen["written_bytes"] = written
        mem_ok = True
        if mem is not None:      # served in a fresh process: the real peak
            from slmkit.search.memory import measure_serving

            served = measure_serving(saved, mem.streams, mem.context, threads=cfg.threads)
            chosen["measured_memory_bytes"] = served["peak_bytes"]
            chosen["served"] = served
            over = served["peak_bytes"] - int(cfg.max_memory_mb * MB)
            mem_ok = over <= 0
            if not mem_ok:
                mem_margin += over + 1_000_000
        size_ok = cfg.max_size_mb is None or written <= int(cfg.max_size_mb * MB)
        if size_ok and mem_ok:
            break
        if not size_ok:
            margin += written - int(cfg.max_size_mb * MB) + 4096   # re-solve without excess
    report["chosen"] = chosen
    (Path(saved) / "search" / "search.json").write_text(json.dumps(report, indent=1))
    (Path(saved) / "search" / "pareto.png").write_bytes(plot_front(front, chosen, None))
    measured_speed = None
    if cost is not None:
        from slmkit.search.cost import measure_decode

        measured_speed = measure_decode(work, tok, streams=cfg.streams)
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
        per = "" if cfg.streams == 1 else f" per stream at {cfg.streams} streams"
        rows.append(("decode tok/s" + per, f"{measured_speed:.1f} measured, "
                                           f"{chosen['predicted_decode_tok_s']:.1f} predicted"))
    if mem is not None:
        m, p = chosen["measured_memory_bytes"], chosen["predicted_memory_bytes"]
        rows.append(("serving memory", f"{human_bytes(m)} measured peak, {human_bytes(p)} "
                                       f"predicted ({(p - m) / m:+.1%}); {mem.streams} "
                                       f"stream(s) x {mem.context} tokens"))
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
    table = Table("Pareto front (predicted; write a point with this run's command and its "
                  "--max-size-mb, listed in search/search.json)",
                  [(f"{r['max_size_mb']:g}", f"{r['predicted_kl']:.4g}",
                    ", ".join(f"{k} x{v}" for k, v in r["options"].items()))
                   for r in front], header=("--max-size-mb", "predicted KL", "layers"))
    figures = {"size_on_disk": written, "predicted_size": chosen["size_bytes"],
               "predicted_kl": chosen["predicted_kl"], "true_kl": chosen["true_kl"],
               "search_seconds": elapsed}
    if cost is not None:
        figures.update(predicted_decode_tok_s=chosen["predicted_decode_tok_s"],
                       decode_tok_s=measured_speed)
    if mem is not None:
        figures.update(predicted_memory_bytes=chosen["predicted_memory_bytes"],
                       memory_bytes=chosen["measured_memory_bytes"])
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


def _choose(layers, budget: int, cost, cfg, solve=_solve):
    if cost is None:
        return solve(layers, budget)
    return cost.solve(layers, budget, cfg.min_decode_tok_s, solve)


def _budget_text(cfg) -> str:
    parts = []
    if cfg.max_size_mb:
        parts.append(f"<= {cfg.max_size_mb:g} MB")
    if cfg.max_memory_mb:
        parts.append(f"<= {cfg.max_memory_mb:g} MB serving memory")
    if cfg.streams > 1:
        parts.append(f"at {cfg.streams} streams")
    if cfg.min_decode_tok_s:
        parts.append(f">= {cfg.min_decode_tok_s:g} decode tok/s")
    return ", ".join(parts)


def _unmet(cfg, cost, layers, budget: int, solve=_solve, mem=None) -> str:
    if cost is not None:
        best = cost.fastest(layers, budget, solve)
        fastest = f"{best:.1f} tok/s" if best else "none"
        return (f"--min-decode-tok-s {cfg.min_decode_tok_s:g} cannot be met within the size "
                f"budget: the fastest model this search predicts there is {fastest}; "
                "lower it or raise --max-size-mb.")
    if mem is not None:
        return (f"--max-memory-mb {cfg.max_memory_mb:g} and --max-size-mb "
                f"{cfg.max_size_mb or 0:g} cannot be met together; raise one of them.")
    return f"--max-size-mb {cfg.max_size_mb:g} cannot be met; raise it."
