"""Mean over seeds and a 95% interval for every score of the evaluation tables.

A method is scored on some items (held-out cells, retrieval queries, generated images) under one or
more seeds (the cell split of tasks 7-8, the clustering of tasks 4-5). Each seed gives a point score
on all its items; its bootstrap draws resample those items with replacement (the same resampled
rows for every method of a task, so methods stay paired). A table cell shows the mean of the
per-seed scores and the 2.5 / 97.5 percentiles of the draws pooled over seeds, so the interval
covers both the sampling of cells and the seed. A winner is named only when intervals separate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np

N_BOOTSTRAP = 200  # draws per seed: percentile intervals of a mean settle to ~0.005 by ~200
LEVEL = 0.95
DEFAULT_SEEDS = (0, 1, 2)

ScoreFn = Callable[[np.ndarray], Mapping[str, float]]


def draws_per_seed(n_seeds: int) -> int:
    """Bootstrap draws per seed so that about :data:`N_BOOTSTRAP` are pooled over ``n_seeds`` seeds."""
    return max(1, -(-N_BOOTSTRAP // max(1, int(n_seeds))))


def resamples(n_items: int, seed: int, n_boot: int = N_BOOTSTRAP) -> np.ndarray:
    """``(n_boot, n_items)`` row indices drawn with replacement (seeded, shared by all methods)."""
    if n_items < 2:
        raise ValueError(f"n_items={n_items}: a bootstrap needs at least 2 scored items")
    return np.random.default_rng([seed, 2027]).integers(0, n_items, size=(n_boot, n_items))


@dataclass
class SeededScores:
    """Per method and metric: the point score of each seed and the bootstrap draws of all seeds.

    Use ``add(method, seed, score_fn, draws)`` once per method and seed, where ``score_fn(rows)``
    scores the method on the item rows ``rows`` (``np.arange(n)`` gives the point score) and
    ``draws`` comes from :func:`resamples`; then read ``means()``, ``intervals()``, ``per_seed()``.
    """

    level: float = LEVEL
    _points: dict = field(default_factory=dict)
    _draws: dict = field(default_factory=dict)

    def add(self, method: str, seed: int, score_fn: ScoreFn, draws: np.ndarray, batched: bool = False
            ) -> dict[str, float]:
        """Score ``method`` under ``seed`` on all items and on each draw. ``batched``: ``score_fn``
        takes a 2-D array of rows (one draw per row) and returns one array of values per metric."""
        n = int(draws.shape[1])
        whole = np.arange(n)
        if batched:
            point = {k: float(np.asarray(v)[0]) for k, v in score_fn(whole[None]).items()}
            values = {k: np.asarray(v, np.float64) for k, v in score_fn(draws).items()}
        else:
            point = {k: float(v) for k, v in score_fn(whole).items()}
            per_draw = [score_fn(rows) for rows in draws]
            values = {k: np.array([d[k] for d in per_draw], np.float64) for k in point}
        for metric, value in point.items():
            self._points.setdefault(method, {}).setdefault(metric, {})[seed] = value
            self._draws.setdefault(method, {}).setdefault(metric, []).extend(values[metric].tolist())
        return point

    def add_point(self, method: str, seed: int, scores: Mapping[str, float]) -> None:
        """A score with no items to resample (e.g. a reference); its interval is its seeds' range."""
        for metric, value in scores.items():
            self._points.setdefault(method, {}).setdefault(metric, {})[seed] = float(value)

    def means(self) -> dict[str, dict[str, float]]:
        return {m: {k: _nanmean(list(v.values())) for k, v in by.items()} for m, by in self._points.items()}

    def per_seed(self) -> dict[str, dict[str, dict[str, float]]]:
        return {m: {k: {str(s): x for s, x in v.items()} for k, v in by.items()} for m, by in self._points.items()}

    def intervals(self) -> dict[str, dict[str, list[float]]]:
        q = (100 * (1 - self.level) / 2, 100 * (1 + self.level) / 2)
        out = {}
        for m, by in self._points.items():
            out[m] = {}
            for k, v in by.items():
                draws = np.asarray(self._draws.get(m, {}).get(k, list(v.values())), np.float64)
                draws = draws[np.isfinite(draws)]
                out[m][k] = [float(x) for x in np.percentile(draws, q)] if draws.size else [math.nan, math.nan]
        return out


def _nanmean(values: Sequence[float]) -> float:
    a = np.asarray(values, np.float64)
    a = a[np.isfinite(a)]
    return float(a.mean()) if a.size else math.nan


def separated(a: Sequence[float] | None, b: Sequence[float] | None) -> bool:
    """True when the intervals ``[lo, hi]`` ``a`` and ``b`` do not overlap (NaN or missing: False)."""
    if a is None or b is None or any(v is None or math.isnan(v) for v in (*a, *b)):
        return False
    return a[1] < b[0] or b[1] < a[0]


__all__ = ["N_BOOTSTRAP", "LEVEL", "DEFAULT_SEEDS", "draws_per_seed", "resamples", "SeededScores", "separated"]
