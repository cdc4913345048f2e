"""A fixed-bucket latency histogram, cheap to observe and to pickle with every step's stats, and
rendered as a Prometheus histogram on /metrics."""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

# upper bounds in seconds: fine around a decode step (a few ms), coarse towards stalls
LATENCY_BUCKETS = (0.001, 0.002, 0.004, 0.006, 0.008, 0.010, 0.012, 0.015, 0.020, 0.025, 0.030, 0.040, 0.050,
                   0.060, 0.080, 0.100, 0.150, 0.200, 0.300, 0.500, 1.0, 2.0, 5.0)


@dataclass(slots=True)
class Histogram:
    bounds: tuple[float, ...] = LATENCY_BUCKETS
    counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))  # the last: +Inf
    total: float = 0.0
    count: int = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value
        self.count += 1

    def copy(self) -> Histogram:
        return Histogram(self.bounds, list(self.counts), self.total, self.count)

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, observations at or below it), ending with (inf, count): Prometheus' `le`."""
        out, running = [], 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts):
            running += n
            out.append((bound, running))
        return out
