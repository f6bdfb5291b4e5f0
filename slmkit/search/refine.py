"""Evolutionary refinement of an assignment on the true end-to-end KL (EvoPress-style).

Sieberling, Kuznedelev, Kurtic & Alistarh, 2025, "EvoPress: Accurate Dynamic Model
Compression via Evolutionary Search": the sum of per-layer errors is not the model's error,
so candidates are scored end to end, and a level-switch mutation keeps every candidate on
the budget. Here the additive solve's answer is the first parent; each offspring moves one
layer to its next bigger option and one or more others to their next smaller ones until the
bytes fit again, and is scored by the KL of the whole model (the stored variants swapped
into the dense model's linears) on the KL windows; the best of each generation replaces
the parent when it is better.
"""

from __future__ import annotations

import random
import time

import torch

from slmkit.compress.match import set_weight_matrix, weight_matrix
from slmkit.nn.packing import dequantize_codes
from slmkit.nn.surgery import linear_shape
from slmkit.search.space import Option


class Variants:
    """Swaps stored layer variants into a dense model's linears (and back)."""

    def __init__(self, model, layers, store):
        from slmkit.search.sensitivity import embedding_table

        table = embedding_table(model)
        layers = {n: i for n, i in layers.items() if not table or n != table[0]}
        self.model, self.layers, self.store = model, layers, store
        self.dense = {n: weight_matrix(model.get_submodule(n)).detach().clone()
                      for n in layers}
        self.current: dict[str, Option] = {n: Option(0) for n in layers}

    def weight(self, name: str, opt: Option) -> torch.Tensor:
        if opt.dense:
            return self.dense[name]
        module = self.model.get_submodule(name)
        r = self.store.load(name, opt, linear_shape(module)[1])
        if r is None:
            raise KeyError(f"{name} {opt.key} is not stored")
        return dequantize_codes(r.codes, r.scale, r.zero, opt.group_size)

    def apply(self, choice: dict[str, Option]) -> None:
        for n, o in choice.items():
            if n in self.current and self.current[n] != o:
                set_weight_matrix(self.model.get_submodule(n), self.weight(n, o))
                self.current[n] = o

    def restore(self) -> None:
        self.apply({n: Option(0) for n in self.layers})


def _bytes(layers, choice) -> int:
    return sum(layers[n].bytes[o.key] for n, o in choice.items())


def mutate(layers, parent: dict[str, Option], budget: int, rng: random.Random,
           tries: int = 50, frozen: frozenset = frozenset()) -> dict[str, Option] | None:
    """One layer a level up (next option by bytes), others a level down until it fits."""
    names = [n for n in parent if n not in frozen]
    ladders = {n: sorted(layers[n].options, key=lambda o: layers[n].bytes[o.key])
               for n in names}
    for _ in range(tries):
        child = dict(parent)
        up = rng.choice(names)
        lad = ladders[up]
        i = lad.index(child[up])
        if i + 1 >= len(lad):
            continue
        child[up] = lad[i + 1]
        moved = {up}
        ok = True
        while _bytes(layers, child) > budget:
            down = [n for n in names if n not in moved and ladders[n].index(child[n]) > 0]
            if not down:
                ok = False
                break
            d = rng.choice(down)
            child[d] = ladders[d][ladders[d].index(child[d]) - 1]
            moved.add(d)
        if ok and child != parent:
            return child
    return None


def refine(model, tail, layers, store, choice: dict[str, Option], budget: int,
           generations: int, offspring: int = 4, seed: int = 0,
           deadline: float | None = None) -> tuple[dict[str, Option], dict]:
    """Refine ``choice`` (within ``budget`` bytes of the searched layers) for
    ``generations`` generations of ``offspring`` candidates each.

    Returns:
        ``(best choice, {"start_kl", "best_kl", "evaluations", "accepted"})``, KLs measured
        end to end (dequantized weights, fp32).
    """
    from slmkit.console import progress

    from slmkit.search.sensitivity import embedding_table, quantize_table

    rng = random.Random(seed)
    swap = Variants(model, layers, store)
    table = embedding_table(model)
    frozen = frozenset([table[0]]) if table and table[0] in choice else frozenset()
    restore_table = quantize_table(model) if frozen and not choice[table[0]].dense \
        else (lambda: None)
    try:
        swap.apply(choice)
        best, best_kl = dict(choice), tail.kl_model(model)
        info = {"start_kl": best_kl, "evaluations": 1, "accepted": 0}
        with progress("evolutionary refinement", total=generations) as update:
            for _ in range(generations):
                if deadline is not None and time.monotonic() > deadline:
                    break
                gen_best, gen_kl = None, best_kl
                for _ in range(offspring):
                    child = mutate(layers, best, budget, rng, frozen=frozen)
                    if child is None:
                        continue
                    swap.apply(child)
                    kl = tail.kl_model(model)
                    info["evaluations"] += 1
                    if kl < gen_kl:
                        gen_best, gen_kl = child, kl
                if gen_best is not None:
                    best, best_kl = gen_best, gen_kl
                    info["accepted"] += 1
                update(1, info=f"best KL {best_kl:.4g}")
        info["best_kl"] = best_kl
        return best, info
    finally:
        swap.restore()
        restore_table()
