"""Did a code change really help, or was it noise? The statistics of an A/B test.

An A/B test trains the parent's code (A) and the node's code (B) under the node's config over
K paired seeds: seed s runs both arms, so each pair differs only by the code. The verdict
needs two things: the 95% interval of the mean paired difference must exclude zero, and the
mean difference must exceed the run's noise floor (the spread of repeated runs of one
config: the standard deviation of R² over seeds, measured once per run and kept)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

Verdict = Literal["helped", "no effect", "hurt"]

# Student's t, two-sided 95% (the 0.975 quantile), by degrees of freedom; between two listed
# values the smaller df is used (a wider interval: the cautious side).
_T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
          9: 2.262, 10: 2.228, 11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131,
          16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093, 20: 2.086, 25: 2.060, 30: 2.042,
          40: 2.021, 60: 2.000, 120: 1.980}
_Z_975 = 1.960


def t_975(df: int) -> float:
    """The 0.975 quantile of Student's t with `df` degrees of freedom."""
    if df < 1:
        raise ValueError("a t interval needs at least one degree of freedom")
    listed = max(d for d in _T_975 if d <= df)
    return _Z_975 if df > max(_T_975) else _T_975[listed]


def noise_floor(r2s: Sequence[float]) -> float:
    """The spread of repeated runs of one config: the sample standard deviation of their R²."""
    if len(r2s) < 2:
        raise ValueError("the noise floor needs at least two runs of the same config")
    return statistics.stdev(r2s)


@dataclass(frozen=True)
class Comparison:
    """The outcome of K paired seeds: mean ΔR² (B − A), its 95% interval and the verdict."""

    seeds: tuple[int, ...]
    parent_r2: tuple[float, ...]
    node_r2: tuple[float, ...]
    mean_delta: float
    low: float
    high: float
    noise: float
    verdict: Verdict

    @property
    def beyond_noise(self) -> bool:
        return abs(self.mean_delta) > self.noise

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Comparison:
        values = dict(data)
        for name in ("seeds", "parent_r2", "node_r2"):
            values[name] = tuple(values[name])
        return cls(**values)

    def summary(self) -> str:
        """`ΔR² +0.0210 [+0.0110, +0.0310] over 3 seeds, noise 0.0040: helped`"""
        return (f"ΔR² {self.mean_delta:+.4f} [{self.low:+.4f}, {self.high:+.4f}] over "
                f"{len(self.seeds)} seeds, noise {self.noise:.4f}: {self.verdict}")


def compare(seeds: Sequence[int], parent_r2: Sequence[float], node_r2: Sequence[float],
            noise: float) -> Comparison:
    """The paired comparison of the node's code (B) with its parent's (A), seed by seed."""
    if not (len(seeds) == len(parent_r2) == len(node_r2)) or len(seeds) < 2:
        raise ValueError("an A/B test needs two or more seeds, each with both arms")
    deltas = [b - a for a, b in zip(parent_r2, node_r2, strict=True)]
    mean = statistics.fmean(deltas)
    half = t_975(len(deltas) - 1) * statistics.stdev(deltas) / math.sqrt(len(deltas))
    low, high = mean - half, mean + half
    verdict: Verdict = "no effect"
    if abs(mean) > noise and (low > 0 or high < 0):
        verdict = "helped" if mean > 0 else "hurt"
    return Comparison(tuple(seeds), tuple(parent_r2), tuple(node_r2), mean, low, high, noise,
                      verdict)
