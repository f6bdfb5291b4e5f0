"""Choosing one option per layer: the additive objective under byte and time budgets.

The objective is the sum of the per-layer sensitivities (predicted KL). Under a byte budget
that is a multiple-choice knapsack, solved exactly by dynamic programming over the bytes,
counted in quanta of ``q`` bytes with every option's bytes rounded *up* (so a solution
never exceeds the real budget; ``q = 1`` when the budget is small enough, which makes the
solve exact). A second budget (decode time) is folded in with a Lagrange multiplier on the
time, bisected until the prediction meets it. :func:`brute_force` is the slow reference
the tests compare against.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np

#: The DP's byte axis has at most this many cells (the quantum grows for bigger budgets).
MAX_CELLS = 200_000


def solve_knapsack(costs: Sequence[Sequence[float]], weights: Sequence[Sequence[int]],
                   budget: int) -> list[int] | None:
    """Indices, one per layer, minimising ``sum(costs)`` with ``sum(weights) <= budget``.

    Args:
        costs: per layer, the cost of each option.
        weights: per layer, the bytes of each option (integers).
        budget: bytes available to these layers.

    Returns:
        The chosen option index per layer, or None when even the lightest choice does not
        fit.
    """
    n = len(costs)
    if n == 0:
        return []
    lightest = sum(min(w) for w in weights)
    if lightest > budget:
        return None
    q = max(1, math.ceil(budget / MAX_CELLS))
    cells = budget // q
    inf = np.inf
    dp = np.zeros(cells + 1)                       # dp[c]: best cost within c quanta
    choice = np.zeros((n, cells + 1), dtype=np.int16)
    for i in range(n):
        new = np.full(cells + 1, inf)
        arg = np.zeros(cells + 1, dtype=np.int16)
        for j, (c, w) in enumerate(zip(costs[i], weights[i])):
            k = -(-int(w) // q)                       # rounded up: never over budget
            if k > cells:
                continue
            cand = np.full(cells + 1, inf)
            cand[k:] = dp[:cells + 1 - k] + c
            better = cand < new
            new[better] = cand[better]
            arg[better] = j
        dp = new
        choice[i] = arg
    if not np.isfinite(dp[cells]):
        # the rounding up lost the only fits: fall back to the lightest option everywhere
        return [int(np.argmin(w)) for w in weights]
    picks = [0] * n
    c = cells
    for i in range(n - 1, -1, -1):
        j = int(choice[i][c])
        picks[i] = j
        c -= -(-int(weights[i][j]) // q)
    return picks


def brute_force(costs, weights, budget) -> list[int] | None:
    """Every combination (a reference for tests; exponential)."""
    best, best_cost = None, math.inf
    for combo in itertools.product(*[range(len(c)) for c in costs]):
        w = sum(weights[i][j] for i, j in enumerate(combo))
        if w > budget:
            continue
        c = sum(costs[i][j] for i, j in enumerate(combo))
        if c < best_cost - 1e-15:
            best, best_cost = list(combo), c
    return best


def solve_with_time(costs, weights, times, budget: int, max_time: float | None,
                    base_time: float = 0.0, iters: int = 40) -> list[int] | None:
    """:func:`solve_knapsack` plus ``base_time + sum(times) <= max_time``.

    Minimises ``sum(costs) + mu * sum(times)`` under the byte budget, with ``mu`` bisected
    to the smallest value whose solution meets the time budget (a Lagrangian relaxation: the
    answer is feasible, and optimal among the solutions on the convex hull).
    """
    def at(mu):
        mixed = [[c + mu * t for c, t in zip(cs, ts)] for cs, ts in zip(costs, times)]
        return solve_knapsack(mixed, weights, budget)

    def total_time(p):
        return base_time + sum(times[i][j] for i, j in enumerate(p))

    picks = at(0.0)
    if picks is None or max_time is None or total_time(picks) <= max_time:
        return picks
    scale = max(max(c) for c in costs) or 1.0
    tmin = max(min(t) for t in times) or 1e-9
    return _smallest_multiplier(at, lambda p: total_time(p) <= max_time, scale / tmin, iters)


def _smallest_multiplier(at, ok, hi: float, iters: int, grow: int = 60):
    """``at(mu)``'s answer at about the smallest ``mu >= 0`` whose answer is ``ok``: ``hi``
    grown (x4) until it is, then bisected ``iters`` times; None when no ``mu`` found one."""
    for _ in range(grow):
        p = at(hi)
        if p is not None and ok(p):
            break
        hi *= 4
    else:
        return None
    lo, best = 0.0, p
    for _ in range(iters):
        mid = (lo + hi) / 2
        p = at(mid)
        if p is not None and ok(p):
            hi, best = mid, p
        else:
            lo = mid
    return best


def solve_with_limits(costs, weights, budget: int, limits: Sequence[tuple]) -> list[int] | None:
    """:func:`solve_knapsack` under ``budget`` plus up to two more additive limits, each
    ``(values, limit, base)`` meaning ``base + sum(values) <= limit`` (decode time, serving
    memory). One limit: :func:`solve_with_time`. Two: the second one's Lagrange multiplier
    is bisected around :func:`solve_with_time` of the first (each inner solve meets the
    first limit; the answer meets both, or None when no multiplier found one that does)."""
    limits = [lim for lim in limits if lim is not None and lim[1] is not None]
    if not limits:
        return solve_knapsack(costs, weights, budget)
    if len(limits) == 1:
        values, limit, base = limits[0]
        return solve_with_time(costs, weights, values, budget, limit, base)
    if len(limits) > 2:
        raise ValueError("at most two limits besides the byte budget")
    (va, la, ba), (vb, lb, bb) = limits

    def total(p):
        return bb + sum(vb[i][j] for i, j in enumerate(p))

    def at(mu):
        mixed = [[c + mu * v for c, v in zip(cs, vs)] for cs, vs in zip(costs, vb)]
        return solve_with_time(mixed, weights, va, budget, la, ba, iters=20)

    p = at(0.0)
    if p is None or total(p) <= lb:
        return p
    scale = max(max(c) for c in costs) or 1.0
    vmin = max(min(v) for v in vb) or 1e-9
    return _smallest_multiplier(at, lambda p: total(p) <= lb, scale / vmin, 16, grow=40)
