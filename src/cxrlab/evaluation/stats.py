"""Small-sample statistics over seeds: mean, spread and Student-t intervals.

A sweep has a handful of seeds per variant, so intervals are Student-t (not normal, not
bootstrap: with 3 values a bootstrap has 10 distinct resamples). Differences between variants
are paired by seed, because runs with the same seed share the validation split and the
initial weights, and pairing removes that shared noise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats as _st


@dataclass
class Estimate:
    """Mean of n values with its sample std (ddof 1) and a two-sided t-interval."""

    n: int
    mean: float | None
    std: float | None
    ci_low: float | None
    ci_high: float | None
    min: float | None = None
    max: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def has_interval(self) -> bool:
        return self.ci_low is not None


def t_interval(values: Sequence[float | None], level: float = 0.95,
               bounds: tuple[float, float] | None = None) -> Estimate:
    """Mean ± t_{(1+level)/2, n-1} · s/√n over the values that are not None or NaN.

    One value has a mean but no spread and no interval; none has nothing. `bounds` clips the
    interval to the values the quantity can take (a rate cannot exceed 1), since with three
    seeds the t-interval can reach past them.
    """
    v = np.array([x for x in values if x is not None and math.isfinite(x)], dtype=float)
    n = len(v)
    if n == 0:
        return Estimate(0, None, None, None, None)
    mean = float(v.mean())
    if n == 1:
        return Estimate(1, mean, None, None, None, float(v[0]), float(v[0]))
    std = float(v.std(ddof=1))
    half = float(_st.t.ppf((1 + level) / 2, n - 1)) * std / math.sqrt(n)
    lo, hi = mean - half, mean + half
    if bounds is not None:
        lo, hi = max(lo, bounds[0]), min(hi, bounds[1])
    return Estimate(n, mean, std, lo, hi, float(v.min()), float(v.max()))


def paired_difference(treatment: dict[int, float | None], reference: dict[int, float | None],
                      level: float = 0.95, bounds: tuple[float, float] | None = None,
                      ) -> tuple[Estimate, dict[int, float]]:
    """t-interval of treatment − reference over the keys (seeds) both have a value for."""
    diffs = {k: treatment[k] - reference[k] for k in sorted(set(treatment) & set(reference))
             if treatment[k] is not None and reference[k] is not None
             and math.isfinite(treatment[k]) and math.isfinite(reference[k])}
    return t_interval(list(diffs.values()), level, bounds), diffs


def verdict(est: Estimate) -> str:
    """"better" / "worse" only when the interval excludes 0; never a claim without one."""
    if est.n == 0:
        return "no paired runs"
    if not est.has_interval:
        return "no interval possible (1 seed)"
    if est.ci_low > 0:
        return "better"
    if est.ci_high < 0:
        return "worse"
    return "within noise"
