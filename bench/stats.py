"""Summaries of timing samples: latency percentiles and throughput."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["MB", "Latency", "Throughput", "percentile"]

#: Throughput unit: decimal megabytes (10**6 bytes), as in "MB/s".
MB = 1_000_000


def percentile(samples: Sequence[float], q: float) -> float:
    """
    The ``q``-th percentile (0..100) of ``samples``, interpolated linearly between the two
    nearest ranks (numpy's default), so that p50 of an even count is the usual median.

    :raises ValueError: no samples, or ``q`` outside 0..100.
    """
    if not samples:
        raise ValueError("percentile of no samples")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} is outside 0..100")
    ordered = sorted(samples)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass(frozen=True)
class Latency:
    """Round-trip times of ``count`` sequential operations, in seconds."""

    count: int
    median: float
    p99: float
    mean: float
    minimum: float
    maximum: float

    @classmethod
    def of(cls, samples: Sequence[float]) -> Latency:
        return cls(
            count=len(samples),
            median=percentile(samples, 50),
            p99=percentile(samples, 99),
            mean=sum(samples) / len(samples),
            minimum=min(samples),
            maximum=max(samples),
        )


@dataclass(frozen=True)
class Throughput:
    """``size`` bytes moved in ``seconds``."""

    size: int
    seconds: float

    @property
    def mb_per_s(self) -> float:
        return self.size / MB / self.seconds if self.seconds > 0 else math.inf
