"""A latency histogram with log-spaced buckets: constant memory, ~2 % precision.

Long runs (``--duration 0``) cannot keep every sample; percentiles read from
buckets 1/32 of an octave wide are within about 2 % of the exact value.
"""

from __future__ import annotations

import math

__all__ = ["LatencyHistogram"]

_PER_OCTAVE = 32
_BUCKETS = 40 * _PER_OCTAVE  # 1 microsecond .. 2**40 microseconds (12 days)


class LatencyHistogram:
    __slots__ = ("count", "counts", "max", "total")

    def __init__(self) -> None:
        self.counts = [0] * (_BUCKETS + 1)
        self.count = 0
        self.total = 0.0
        self.max = 0.0

    def record(self, seconds: float) -> None:
        micros = seconds * 1e6
        index = int(math.log2(micros) * _PER_OCTAVE) + 1 if micros >= 1 else 0
        self.counts[min(index, _BUCKETS)] += 1
        self.count += 1
        self.total += seconds
        if seconds > self.max:
            self.max = seconds

    def merge(self, other: LatencyHistogram) -> None:
        self.counts = [a + b for a, b in zip(self.counts, other.counts, strict=True)]
        self.count += other.count
        self.total += other.total
        self.max = max(self.max, other.max)

    def percentile(self, p: float) -> float:
        """The latency (seconds) below which ``p`` percent of the samples fall; 0 if empty."""
        if not self.count:
            return 0.0
        rank = max(1, math.ceil(self.count * p / 100))
        seen = 0
        for index, n in enumerate(self.counts):
            seen += n
            if seen >= rank:
                if index == 0:
                    return 1e-6
                # the bucket's geometric middle, but never above the true maximum
                middle = 2 ** ((index - 0.5) / _PER_OCTAVE) / 1e6
                return min(middle, self.max)
        return self.max

    def mean(self) -> float:
        return self.total / self.count if self.count else 0.0
