"""Bootstrap 95 % confidence intervals for every score, and paired comparisons of two runs.

A score can be undefined (a ratio whose denominator is 0): it is NaN in memory and null in JSON. `finite`, `fmt`
and `fmt_ci` are the one place that turns such a value into a number or "n/a" for tables and charts.

A statistic is `(columns, fn)`: `fn` maps the sums of the named per-sample columns to a value, so both plain means
(BLEU: sum / n) and ratios of sums (micro F1) are resampled correctly. Resampling draws one seeded matrix of
multinomial sample weights and reuses it for every statistic, and for both runs of a paired comparison (the same
resampled cases for both, which is what makes the difference's CI tight).
"""

from __future__ import annotations

import math

import numpy as np

from radscribe.errors import RadscribeError

N_COLUMN = "n"
"""A column of ones added to every table, so `n` can be used as a denominator."""


def mean_statistics(names) -> dict:
    """Statistics that are plain means of per-sample columns (BLEU-4, ROUGE, already in percent)."""
    return {name: ((name, N_COLUMN), lambda s: s[0] / s[1]) for name in names}


def _matrix(cols: dict[str, np.ndarray], statistics: dict) -> tuple[np.ndarray, dict[str, int], int]:
    n = len(next(iter(cols.values()))) if cols else 0
    if n == 0:
        raise RadscribeError("no samples to compute statistics on")
    cols = {**cols, N_COLUMN: np.ones(n)}
    names = sorted({c for columns, _ in statistics.values() for c in columns})
    missing = [c for c in names if c not in cols]
    if missing:
        raise RadscribeError(f"per-sample column(s) {', '.join(missing)} are missing")
    return np.stack([np.asarray(cols[c], dtype=np.float64) for c in names], axis=1), \
        {c: i for i, c in enumerate(names)}, n


def _apply(statistics: dict, sums: np.ndarray, index: dict[str, int]) -> dict[str, np.ndarray]:
    # sums: (..., k) -> each statistic evaluated on the last axis
    return {name: np.asarray(fn(tuple(sums[..., index[c]] for c in columns)), dtype=np.float64)
            for name, (columns, fn) in statistics.items()}


def _weights(n: int, n_boot: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot).astype(np.float64)


def _interval(samples: np.ndarray, level: float) -> tuple[float, float]:
    finite = samples[np.isfinite(samples)]
    if finite.size == 0:
        return math.nan, math.nan
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(finite, [tail, 100 - tail])
    return float(low), float(high)


def bootstrap(cols: dict[str, np.ndarray], statistics: dict, n_boot: int = 1000, seed: int = 0,
              level: float = 0.95) -> dict[str, dict]:
    """name -> {"value", "low", "high"}: the point estimate and a percentile bootstrap interval."""
    matrix, index, n = _matrix(cols, statistics)
    point = _apply(statistics, matrix.sum(axis=0), index)
    resampled = _apply(statistics, _weights(n, n_boot, seed) @ matrix, index)
    out = {}
    for name in statistics:
        low, high = _interval(resampled[name], level)
        out[name] = {"value": float(point[name]), "low": low, "high": high}
    return out


def paired(cols_a: dict[str, np.ndarray], cols_b: dict[str, np.ndarray], statistics: dict, n_boot: int = 1000,
           seed: int = 0, level: float = 0.95) -> dict[str, dict]:
    """name -> {"a", "b", "diff" (b - a), "low", "high"} over the same samples in the same order for both runs."""
    matrix_a, index, n = _matrix(cols_a, statistics)
    matrix_b, _, n_b = _matrix(cols_b, statistics)
    if n != n_b:
        raise RadscribeError(f"paired comparison needs the same samples: {n} vs {n_b}")
    weights = _weights(n, n_boot, seed)
    a, b = _apply(statistics, matrix_a.sum(axis=0), index), _apply(statistics, matrix_b.sum(axis=0), index)
    boot_a, boot_b = _apply(statistics, weights @ matrix_a, index), _apply(statistics, weights @ matrix_b, index)
    out = {}
    for name in statistics:
        low, high = _interval(boot_b[name] - boot_a[name], level)
        out[name] = {"a": float(a[name]), "b": float(b[name]), "diff": float(b[name] - a[name]),
                     "low": low, "high": high}
    return out


def finite(value, default: float = math.nan) -> float:
    """`value` as a float, or `default` when it is undefined: None (NaN read back from JSON), NaN or infinite."""
    if value is None:
        return default
    value = float(value)
    return value if math.isfinite(value) else default


def fmt(value, spec: str = ".2f") -> str:
    """A score for a table, `n/a` when undefined."""
    value = finite(value)
    return "n/a" if math.isnan(value) else format(value, spec)


def fmt_ci(score: dict | None, spec: str = ".2f") -> str:
    """`value [low, high]` of a {"value", "low", "high"} score; `n/a` when the value is undefined."""
    if not score or math.isnan(finite(score.get("value"))):
        return "n/a"
    return f"{fmt(score['value'], spec)} [{fmt(score.get('low'), spec)}, {fmt(score.get('high'), spec)}]"
