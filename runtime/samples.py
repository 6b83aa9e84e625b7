"""Samples of one quantity in bounded memory, for a run of any length: `Series` (count, mean, min, max exact;
percentiles exact up to EXACT_SAMPLES samples, within 0.5 % beyond) and `RecentSamples` (the newest N, for plots)."""
from __future__ import annotations

import math

import numpy as np

from edgeact.runtime.errors import ConfigError

EXACT_SAMPLES = 10_000       # per quantity: exact percentiles up to this many samples, a histogram's beyond


# -- samples in bounded memory ------------------------------------------------------------------

# Histogram bins for |value| from 1 ns to ~3 h (seconds; counts such as decode steps fit too), each 1 % wider than
# the last: its geometric middle is within 0.5 % of any sample in it. Under 1 ns counts as 0, over the top in the top
# bin (the max is kept exactly). Index order is value order: negatives, zero, positives.
_HIST_LOW, _HIST_HIGH, _HIST_STEP = 1e-9, 1e4, math.log(1.01)
_HIST_BINS = math.ceil(math.log(_HIST_HIGH / _HIST_LOW) / _HIST_STEP)
_HIST_MIDDLES = _HIST_LOW * np.exp((np.arange(_HIST_BINS) + 0.5) * _HIST_STEP)
_HIST_VALUES = np.concatenate([-_HIST_MIDDLES[::-1], [0.0], _HIST_MIDDLES])


def _histogram(values: np.ndarray) -> np.ndarray:
    magnitude = np.abs(values)
    bins = np.floor(np.log(np.maximum(magnitude, _HIST_LOW) / _HIST_LOW) / _HIST_STEP).astype(np.intp)
    np.minimum(bins, _HIST_BINS - 1, out=bins)
    index = np.where(magnitude < _HIST_LOW, _HIST_BINS,
                     np.where(values > 0, _HIST_BINS + 1 + bins, _HIST_BINS - 1 - bins))
    return np.bincount(index, minlength=_HIST_VALUES.size)


class Series:
    """One quantity's finite samples over a whole run in bounded memory (~130 kB): n, mean, min and max exact;
    percentiles exact while it has at most EXACT_SAMPLES samples, beyond that from a histogram of them all.

    The samples go into a block of EXACT_SAMPLES; a full block is added to the histogram when the next one comes, so
    a short run keeps every sample and a long one allocates nothing more.
    """

    def __init__(self):
        self._block: np.ndarray | None = None
        self._filled = 0
        self._counts: np.ndarray | None = None      # the histogram of the blocks binned so far
        self._binned, self._sum, self._min, self._max = 0, 0.0, math.inf, -math.inf

    @property
    def n(self) -> int:
        return self._binned + self._filled

    def __len__(self) -> int:
        return self.n

    def append(self, value: float) -> None:
        if not math.isfinite(value):
            return
        if self._block is None:
            self._block = np.empty(EXACT_SAMPLES)
        elif self._filled == EXACT_SAMPLES:
            block, self._filled = self._block, 0
            if self._counts is None:
                self._counts = np.zeros(_HIST_VALUES.size, dtype=np.int64)
            self._counts += _histogram(block)
            self._binned += block.size
            self._sum += float(block.sum())
            self._min, self._max = min(self._min, float(block.min())), max(self._max, float(block.max()))
        self._block[self._filled] = value
        self._filled += 1

    def _pending(self) -> np.ndarray:
        return self._block[:self._filled] if self._block is not None else np.empty(0)

    def min(self) -> float:
        pending = self._pending()
        return min(self._min, float(pending.min())) if pending.size else self._min

    def max(self) -> float:
        pending = self._pending()
        return max(self._max, float(pending.max())) if pending.size else self._max

    def mean(self) -> float:
        return (self._sum + float(self._pending().sum())) / self.n if self.n else math.nan

    def percentiles(self, qs: list[float]) -> list[float]:
        """numpy's default (linear) percentiles: exact, or each order statistic from its bin's middle (within 0.5 %)."""
        if self._counts is None:
            return [float(v) for v in np.percentile(self._pending(), qs)]
        counts = self._counts + _histogram(self._pending()) if self._filled else self._counts
        cumulative, low, high = np.cumsum(counts), self.min(), self.max()
        out = []
        for q in qs:
            rank = q / 100 * (self.n - 1)
            below, above = _HIST_VALUES[np.searchsorted(cumulative, [math.floor(rank), math.ceil(rank)], "right")]
            out.append(min(max(float(below + (above - below) * (rank - math.floor(rank))), low), high))
        return out


class RecentSamples:
    """The newest `size` samples, NaN kept, as an array oldest first (`np.asarray`): what the plots draw."""

    def __init__(self, size: int):
        if size < 1:
            raise ConfigError(f"plot_ticks is {size}; give at least 1 (the period plot's newest ticks)")
        self._values = np.empty(size)
        self._count = 0

    def __len__(self) -> int:
        return min(self._count, self._values.size)

    def append(self, value: float) -> None:
        self._values[self._count % self._values.size] = value
        self._count += 1

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        start = self._count % self._values.size
        values = (self._values[:self._count] if self._count <= self._values.size
                  else np.concatenate([self._values[start:], self._values[:start]]))
        return values.astype(dtype or np.float64, copy=True)
