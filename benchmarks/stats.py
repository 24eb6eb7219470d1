"""Medians, their confidence intervals, and per-round ratios.

Each round measures every variant once, back to back, so a ratio taken within a
round cancels the machine's slow drift; the median over rounds ignores the odd
disturbed round. The interval is the distribution-free one for a median, from
order statistics (about 95 %).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass


def _binom_cdf(k: int, n: int) -> float:
    return sum(math.comb(n, i) for i in range(k + 1)) / 2**n


def median_ci(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """Order-statistic interval for the median; the full range when there are few values."""
    xs = sorted(values)
    n = len(xs)
    if n == 0:
        return (math.nan, math.nan)
    alpha = (1 - confidence) / 2
    k = 0  # largest k with P(Binom(n, 1/2) <= k - 1) <= alpha
    while k + 1 <= n // 2 and _binom_cdf(k, n) <= alpha:
        k += 1
    lo = max(k - 1, 0)
    return (xs[lo], xs[n - 1 - lo])


@dataclass(frozen=True)
class Summary:
    median: float
    lo: float
    hi: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Summary:
        # A round a variant could not be measured in is NaN: it keeps the rounds paired.
        values = [v for v in values if not math.isnan(v)] or [math.nan]
        lo, hi = median_ci(values)
        return cls(statistics.median(values), lo, hi, len(values))

    @property
    def spread(self) -> float:
        """Half the width of the interval, relative to the median."""
        if not self.median:
            return math.nan
        return (self.hi - self.lo) / 2 / self.median

    def fmt_ratio(self) -> str:
        return f"{self.median:.2f} [{self.lo:.2f}-{self.hi:.2f}]"

    def fmt_rate(self) -> str:
        return f"{self.median:,.0f} ±{self.spread * 100:.0f}%"


def ratios(num: Sequence[float], den: Sequence[float]) -> Summary:
    """Per-round ratios ``num[r] / den[r]``, summarised."""
    return Summary.of([x / y for x, y in zip(num, den, strict=True) if y > 0 and not math.isnan(x)])


@dataclass(frozen=True)
class Target:
    """``numerator / denominator >= threshold`` on one measured cell."""

    name: str
    cell: str
    num: str
    den: str
    threshold: float
    ratio: Summary | None
    note: str = ""

    @property
    def verdict(self) -> str:
        if self.ratio is None:
            return "n/a"
        return "PASS" if self.ratio.median >= self.threshold else "MISS"

    @property
    def resolved(self) -> str:
        """Whether the interval lies wholly on one side of the threshold."""
        if self.ratio is None:
            return ""
        if self.ratio.lo >= self.threshold or self.ratio.hi < self.threshold:
            return "clear"
        return "within noise"
