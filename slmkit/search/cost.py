"""The decode cost model: decode time per token of one stream, per layer option, measured
here, at batch 1 or at ``--streams N`` concurrent streams of the continuous-batching engine.

Hardware in the loop (HAQ, AMC): nothing is counted in FLOPs. slmkit's engine decodes a
Llama-layout model either with the native step (one C call per token; fp32, int8 and int4
layers) or with its torch loop (any layer, e.g. 3-bit ones). A model takes the native step
only when *every* linear has a native kernel, so the cost model has one table per path:

* per distinct ``(shape, option, path)``, the time of one ``[N, in]`` product through that
  path's kernel (the native ``slm_linear`` call, or the layer's torch forward), timed on
  this machine (median of repeats) and cached with the sensitivities;
* per path, ``T = base + alpha * sum(t_layer)`` fitted on two reference models decoded
  end to end through the engine (the dense model and one with every layer at the
  smallest option the path runs): ``base`` is everything that is no searched linear
  (attention, norms, the head, the step's overhead), ``alpha`` how the isolated kernel
  times add up inside a real step.

:meth:`CostModel.predict` gives decode tokens/s for an assignment; the search reports its
error against the chosen model re-measured with :func:`measure_decode`.
"""

from __future__ import annotations

import ctypes
import json
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from slmkit.search.space import Option

PATHS = ("native", "torch")


def native_capable(option: Option) -> bool:
    """Whether the native step has a kernel for a layer of this option (int8, int4, fp32)."""
    return option.dense or option.bits in (8, 4)


def measure_decode(model, tok, tokens: int = 48, repeats: int = 3, streams: int = 1) -> float:
    """Decode tokens/s of one stream through the engine: batch 1 with
    :func:`slmkit.eval.speed.measure_speed`, or each of ``streams`` concurrent streams of
    the continuous-batching engine (:func:`measure_streams`, best of ``repeats``)."""
    if streams > 1:
        return max(measure_streams(model, tok, streams, tokens)["per_stream_tok_s"]
                   for _ in range(max(1, repeats - 1)))
    from slmkit.eval.speed import measure_speed

    return float(measure_speed(model, tok, prompt_lengths=(), decode_tokens=tokens,
                               repeats=repeats)["decode_tok_s"])


def measure_streams(model, tok, streams: int, tokens: int = 32,
                    max_seq_len: int | None = None, threads: int | None = None) -> dict:
    """``streams`` concurrent greedy requests (a 32-token prompt each, ``tokens`` new tokens)
    through the continuous-batching :class:`~slmkit.engine.engine.Engine`, after one
    warm-up round. The clock runs from the moment every stream has its first token (all
    prefills done, the batch decoding together) to the last token.

    Returns ``{"per_stream_tok_s", "aggregate_tok_s", "kv_bytes", "path", "streams"}``."""
    import time as _time

    from slmkit.engine.engine import Engine
    from slmkit.engine.events import TokenEvent
    from slmkit.engine.sampling import SamplingParams
    from slmkit.eval.speed import prompt_ids

    ids = prompt_ids(tok, 32)
    engine = Engine(model, tok, max_batch=streams, background=False, threads=threads,
                    max_seq_len=max_seq_len or 32 + tokens + 8)
    try:
        rate = 0.0
        for _ in range(2):               # a warm-up round, then the timed one
            stamps: list[list[float]] = [[] for _ in range(streams)]
            for s in range(streams):
                engine.submit(ids, SamplingParams(max_tokens=tokens, temperature=0,
                                                  ignore_eos=True),
                              on_event=lambda ev, s=s: stamps[s].append(_time.perf_counter())
                              if isinstance(ev, TokenEvent) else None)
            while engine.step():
                pass
            start = max(t[0] for t in stamps)
            end = max(t[-1] for t in stamps)
            after = sum(1 for t in stamps for x in t if x > start)
            rate = after / max(end - start, 1e-9)
        return {"per_stream_tok_s": rate / streams, "aggregate_tok_s": rate,
                "kv_bytes": getattr(getattr(engine.runner, "cache", None), "nbytes", None),
                "path": engine.path, "streams": streams}
    finally:
        engine.close()


def _layer(out_f: int, in_f: int, option: Option) -> nn.Module:
    from slmkit.nn.packing import num_groups
    from slmkit.nn.quant_linear import QuantLinear

    torch.manual_seed(0)
    if option.dense:
        return nn.Linear(in_f, out_f, bias=False)
    g = num_groups(in_f, option.group_size)
    codes = torch.randint(0, 2 ** option.bits, (out_f, in_f), dtype=torch.uint8)
    scale = torch.rand(out_f, g) * 0.01 + 1e-3
    zero = torch.full((out_f, g), float(2 ** (option.bits - 1)))
    return QuantLinear.from_codes(codes, scale, zero, option.bits, option.group_size, True)


def _time(fn, min_seconds: float = 0.05, rounds: int = 5) -> float:
    fn()
    n = 1
    while True:
        t = time.perf_counter()
        for _ in range(n):
            fn()
        if time.perf_counter() - t > min_seconds / rounds or n > 4096:
            break
        n *= 2
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        times.append((time.perf_counter() - t) / n)
    return min(times)          # preemption only ever adds time


@torch.no_grad()
def time_layer(out_f: int, in_f: int, option: Option, path: str, rows: int = 1) -> float:
    """Seconds of one batch-1 product of a layer of this shape and option on ``path``, on
    one thread: on a busy machine a two-thread call waits at an OpenMP barrier for a
    descheduled thread (every kernel then timed about one scheduler slice, 6 ms here, the
    shape lost); the per-path fit's ``alpha`` maps one-thread times to the engine's."""
    from slmkit.compress.hessian import one_thread

    with one_thread():
        return _time_layer(out_f, in_f, option, path, rows)


def _time_layer(out_f: int, in_f: int, option: Option, path: str, rows: int = 1) -> float:
    layer = _layer(out_f, in_f, option)
    x = torch.randn(rows, in_f)
    if path == "torch":
        return _time(lambda: layer(x))
    from slmkit.engine import native

    lib = native.load_library()
    keep: list = []
    lin = native._lin(layer, keep, bool(lib.slm_has_vnni()))
    if isinstance(lin, str):
        raise RuntimeError(lin)
    threads = torch.get_num_threads()
    y = torch.empty(rows, lin.n)
    work = torch.empty(int(lib.slm_linear_work_floats(ctypes.byref(lin), rows, threads)))
    ref = ctypes.byref(lin)
    return _time(lambda: lib.slm_linear(ref, rows, x.data_ptr(), y.data_ptr(),
                                        work.data_ptr(), threads))


@dataclass
class CostModel:
    """Per-path fits and per-(shape, option) kernel times (seconds)."""

    layer_times: dict[str, dict[str, float]]         # "out x in|option|path" -> seconds
    fits: dict[str, dict[str, float]] = field(default_factory=dict)   # path -> base, alpha
    references: dict[str, float] = field(default_factory=dict)        # measured tok/s

    @staticmethod
    def key(out_f: int, in_f: int, option: Option, path: str) -> str:
        return f"{out_f}x{in_f}|{option.key}|{path}"

    def path_of(self, choice: dict[str, Option]) -> str:
        if "native" in self.fits and all(native_capable(o) for o in choice.values()):
            return "native"
        return "torch"

    def raw(self, layers, choice: dict[str, Option], path: str) -> float:
        return sum(self.layer_times[self.key(layers[n].out_features, layers[n].in_features, o,
                                             path)] for n, o in choice.items())

    def seconds(self, layers, choice, path: str | None = None) -> float:
        path = path or self.path_of(choice)
        fit = self.fits[path]
        return fit["base"] + fit["alpha"] * self.raw(layers, choice, path)

    def predict(self, choice: dict[str, Option], layers=None) -> float:
        layers = layers if layers is not None else self._layers
        return 1.0 / self.seconds(layers, choice)

    def fastest(self, layers, budget: int, solve) -> float | None:
        """The highest predicted decode tokens/s of any assignment within ``budget`` bytes
        (None when nothing fits)."""
        best = None
        for path, fit in self.fits.items():
            units = _units(layers, path)
            for names, u in units:    # cost = time: the same solve, minimising time
                u.kl = {o.key: sum(self.layer_times[self.key(layers[n].out_features,
                                                              layers[n].in_features, o, path)]
                                   for n in names) for o in u.options}
            picked = solve({u.name: u for _, u in units}, budget)
            if picked is None:
                continue
            choice = {n: picked[u.name] for names, u in units for n in names}
            if self.path_of(choice) == path:
                speed = 1.0 / self.seconds(layers, choice, path)
                best = speed if best is None else max(best, speed)
        return best

    def solve(self, layers, budget: int, min_tok_s: float, solve):
        """The best assignment under the byte budget whose predicted speed meets
        ``min_tok_s``, over both paths. On the native path every layer has an int8, int4 or
        dense kernel and the projections that share an input (q/k/v, gate/up) share one
        option (the native step runs them as one group of one kernel kind)."""
        best, best_kl = None, float("inf")
        for path, fit in self.fits.items():
            units = _units(layers, path)
            times = [[fit["alpha"] * sum(self.layer_times[self.key(
                layers[n].out_features, layers[n].in_features, o, path)] for n in names)
                for o in u.options] for names, u in units]
            picked = solve({u.name: u for _, u in units}, budget, times, 1.0 / min_tok_s,
                           fit["base"])
            if picked is None:
                continue
            choice = {n: picked[u.name] for names, u in units for n in names}
            if self.path_of(choice) != path \
                    or self.predict(choice, layers) < min_tok_s * (1 - 1e-9):
                continue
            kl = sum(layers[n].kl[o.key] for n, o in choice.items())
            if kl < best_kl:
                best, best_kl = choice, kl
        return best

    def to_json(self) -> dict:
        return {"layer_times": self.layer_times, "fits": self.fits,
                "references": self.references}


#: Projections the native step runs as one group (one kernel kind for all of them).
SHARED = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "gate_up",
          "up_proj": "gate_up"}


def _units(layers, path: str) -> list[tuple[list[str], object]]:
    """The solve's units on ``path``: single layers (torch), or on the native path the
    shared-input groups as one unit whose options are the members' common native-capable
    options (KL and bytes summed)."""
    from slmkit.search.sensitivity import LayerInfo

    groups: dict[str, list[str]] = {}
    for name in layers:
        parent, _, leaf = name.rpartition(".")
        key = f"{parent}.{SHARED[leaf]}" if path == "native" and leaf in SHARED else name
        groups.setdefault(key, []).append(name)
    units = []
    for key, names in groups.items():
        infos = [layers[n] for n in names]
        common = [o for o in infos[0].options
                  if (path == "torch" or native_capable(o))
                  and all(o in i.options for i in infos)]
        unit = LayerInfo(key, infos[0].out_features, infos[0].in_features, infos[0].bias,
                         common, {o.key: sum(i.bytes[o.key] for i in infos) for o in common},
                         {o.key: sum(i.kl[o.key] for i in infos) for o in common})
        if all(i.mem for i in infos):
            unit.mem = {o.key: sum(i.mem[o.key] for i in infos) for o in common}
        units.append((names, unit))
    return units


def decode_cost_model(model, tok, layers, cfg) -> CostModel:
    """Measure (or load from the cache) the kernel times, then fit each path on two
    reference models decoded through the engine."""
    from slmkit.engine import native
    from slmkit.search.sensitivity import cache_root, model_fingerprint

    streams = getattr(cfg, "streams", 1)
    suffix = "" if streams == 1 else f"-s{streams}"     # kernels timed on [streams, in]
    path = cache_root(cfg) / f"cost-v2-{model_fingerprint(model)}{suffix}.json"
    times: dict[str, float] = {}
    if path.exists():
        times = json.loads(path.read_text()).get("layer_times", {})
    paths = ["torch"]
    if native.unavailable_reason() is None:
        paths.insert(0, "native")
    shapes = {(i.out_features, i.in_features): i.options for i in layers.values()}
    for (o_f, i_f), options in shapes.items():
        for p in paths:
            for opt in options:
                k = CostModel.key(o_f, i_f, opt, p)
                if k in times or (p == "native" and not native_capable(opt)):
                    continue
                times[k] = time_layer(o_f, i_f, opt, p, rows=streams)
    cost = CostModel(times)
    cost._layers = layers
    fits = {}
    for p in paths:
        smallest = {n: min((o for o in i.options if p == "torch" or native_capable(o)),
                           key=lambda o: i.bytes[o.key]) for n, i in layers.items()}
        dense = {n: Option(0) for n in layers}
        meas = {}
        for label, choice in (("dense", dense), ("smallest", smallest)):
            meas[label] = _decode_with(model, tok, choice, native_on=(p == "native"),
                                       streams=streams)
            cost.references[f"{p}:{label}"] = meas[label]
        r_d, r_s = (sum(times[CostModel.key(layers[n].out_features, layers[n].in_features,
                                            o, p)] for n, o in c.items())
                    for c in (dense, smallest))
        t_d, t_s = 1 / meas["dense"], 1 / meas["smallest"]
        alpha = (t_d - t_s) / (r_d - r_s) if r_d != r_s else 1.0
        base = t_d - alpha * r_d
        if not 0.25 <= alpha <= 4 or base < 0:
            # the two references do not pin the scale (the linears are a small part of a
            # step, or timing noise): the kernels' own times, and the rest as the base
            alpha = 1.0
            base = max(((t_d - r_d) + (t_s - r_s)) / 2, 0.0)
        fits[p] = {"base": base, "alpha": alpha}
    cost.fits = fits
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"layer_times": times}))
    return cost


@torch.no_grad()
def _decode_with(model, tok, choice: dict[str, Option], native_on: bool,
                 streams: int = 1) -> float:
    """Decode tokens/s per stream of ``model`` at ``streams`` concurrent streams with its
    searched linears swapped for RTN layers of ``choice`` (speed does not depend on the
    quantizer), then restored."""
    from slmkit.compress.match import weight_matrix
    from slmkit.engine import native
    from slmkit.nn.packing import quantize_rtn
    from slmkit.nn.quant_linear import QuantLinear
    from slmkit.nn.surgery import set_module

    from slmkit.search.sensitivity import embedding_table, quantize_table

    table = embedding_table(model)
    restore_table = lambda: None  # noqa: E731
    if table and table[0] in choice:
        if not choice[table[0]].dense:
            restore_table = quantize_table(model)
        choice = {n: o for n, o in choice.items() if n != table[0]}
    originals = {}
    for name, opt in choice.items():
        if opt.dense:
            continue
        old = model.get_submodule(name)
        originals[name] = old
        codes, scale, zero = quantize_rtn(weight_matrix(old).float(), opt.bits,
                                          opt.group_size, True)
        set_module(model, name, QuantLinear.from_codes(
            codes, scale, zero, opt.bits, opt.group_size, True,
            bias=getattr(old, "bias", None)))
    was = native._ENABLED["on"]
    native.set_enabled(native_on)
    try:
        return measure_decode(model, tok, streams=streams)
    finally:
        native.set_enabled(was)
        for name, old in originals.items():
            set_module(model, name, old)
        restore_table()
