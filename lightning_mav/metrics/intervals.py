"""95% intervals for the report: Wilson score intervals for rates, t intervals for means, and one way to print them.

Every rate of the evaluation is a mean over independent units (videos, real clips, prompts) of a per-unit value in
[0, 1] (a per-video fraction of frames, or a 0/1 outcome). Frames of one video are not independent (one object,
one noise draw), so the interval counts units, not frames. For a value in [0, 1] with mean p the variance is at most
p (1 - p), so the Wilson interval with n = units is exact for 0/1 outcomes and conservative (at least as wide) for
per-video fractions, and it stays inside [0, 1] and away from zero width at 0 and 1, unlike the normal interval.

Means of unbounded values (PSNR, pixels, speeds) get Student's t interval from the per-unit sum and sum of squares:
summed states, so a torchmetrics ``Metric`` under DDP gives the same interval as one process.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from scipy import stats
from torch import Tensor
from torchmetrics import Metric

__all__ = ["UnitMeans", "format_interval", "t_interval", "wilson_interval"]

Z95 = 1.959963984540054  # two-sided 95% normal quantile


def wilson_interval(successes: float, n: float, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a rate ``successes / n`` (``successes`` may be a sum of per-unit fractions).

    ``wilson_interval(0, 24) == (0.0, 0.138)``, ``wilson_interval(12, 24) == (0.313, 0.687)`` (3 decimals).
    ``n == 0`` gives ``(nan, nan)``.
    """
    if n <= 0:
        return math.nan, math.nan
    if not 0 <= successes <= n:
        raise ValueError(f"successes must be within [0, n={n}], got {successes}")
    p = successes / n
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def t_interval(total: float, total_sq: float, n: float, level: float = 0.95) -> tuple[float, float]:
    """Student's t interval of a mean from the sum and the sum of squares of ``n`` values; ``(nan, nan)`` for
    fewer than two values (no spread to estimate)."""
    if n < 2:
        return math.nan, math.nan
    mean = total / n
    variance = max(total_sq - n * mean * mean, 0.0) / (n - 1)  # the sample variance, rounding kept >= 0
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * math.sqrt(variance / n)
    return mean - half, mean + half


def format_interval(value: Any, interval: Any = None, digits: int = 4) -> str:
    """``0.4400 [0.3000, 0.5800]``: a value and its interval as the report prints them; a string value (why a score
    was not computed) as it is, a value without a (finite) interval alone."""
    if not isinstance(value, (int, float)):
        return str(value)
    shown = f"{value:.{digits}f}"
    if interval is None or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in interval):
        return shown
    lo, hi = interval
    return f"{shown} [{lo:.{digits}f}, {hi:.{digits}f}]"


class UnitMeans(Metric):
    """Means of per-unit values (one value per video / clip / prompt) with 95% intervals, for several named
    quantities at once: ``update({name: values [N]})``; ``compute() -> {name: {"mean", "low", "high", "n"}}``
    (float64 scalars). Names in ``rates`` hold values in [0, 1] and get Wilson's interval over the units, the others
    Student's t. NaN values are dropped (a unit where the quantity is undefined). Summed states: exact under DDP."""

    is_differentiable = False
    full_state_update = False

    def __init__(self, names: Sequence[str], *, rates: Sequence[str] = (), **kwargs: Any) -> None:
        super().__init__(**kwargs)
        unknown = set(rates) - set(names)
        if unknown:
            raise ValueError(f"rates {sorted(unknown)} are not among the names {list(names)}")
        self.names, self.rates = tuple(names), frozenset(rates)
        for name in self.names:
            for suffix in ("total", "total_sq", "n"):
                self.add_state(f"{name}_{suffix}", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, values: dict[str, Tensor | Sequence[float] | float]) -> None:
        """Add per-unit values ``{name: [N]}`` (any subset of the names)."""
        for name, given in values.items():
            if name not in self.names:
                raise ValueError(f"unknown quantity {name!r}; expected one of {self.names}")
            v = torch.as_tensor(given, dtype=torch.float64).flatten().to(self.device)
            v = v[~v.isnan()]
            if name in self.rates and v.numel() and not bool(((v >= 0) & (v <= 1)).all()):
                raise ValueError(f"{name}: a rate's values must lie in [0, 1], got {float(v.min()):.4g}..{float(v.max()):.4g}")
            setattr(self, f"{name}_total", getattr(self, f"{name}_total") + v.sum())
            setattr(self, f"{name}_total_sq", getattr(self, f"{name}_total_sq") + v.square().sum())
            setattr(self, f"{name}_n", getattr(self, f"{name}_n") + v.numel())

    def compute(self) -> dict[str, dict[str, Tensor]]:
        """Each quantity's mean and 95% interval; NaN without values."""
        out = {}
        for name in self.names:
            total, total_sq, n = (float(getattr(self, f"{name}_{s}")) for s in ("total", "total_sq", "n"))
            mean = total / n if n else math.nan
            low, high = (wilson_interval(min(max(total, 0.0), n), n) if name in self.rates
                         else t_interval(total, total_sq, n))
            out[name] = {k: torch.tensor(v, dtype=torch.float64)
                         for k, v in {"mean": mean, "low": low, "high": high, "n": n}.items()}
        return out
