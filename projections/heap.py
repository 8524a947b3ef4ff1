"""Keeps Python's cyclic garbage collector off the decoded batches.

A decoded event is ~10 containers the collector tracks (JSON dicts and lists,
the DomainEvent); a ClickHouse batch of 20,000 events is ~300,000 of them,
alive until the batch is applied. Every collection that ran while one was alive
walked all of them, found nothing (they are trees, freed by reference
counting), and stopped the process meanwhile: traced in the worker over the
1M-event throughput benchmark, 42 collections stood it still for 16.6 s of its
~80 s run, the longest 957 ms (API requests and the ClickHouse pipeline waited
through them).

So a pipeline decodes a large batch with the automatic collector off and then
freezes (``gc.freeze()``: every object the collector tracks moves to the
permanent generation, which it never walks; an O(1) list splice). Frozen
objects are still freed by reference counting when the batch is dropped.

A freeze takes every tracked object of the process, not only the batch: also
garbage cycles not collected yet, and live cycles that die later (an
exception kept past its except block holds its frames' locals). Frozen, the
collector cannot free them, so the frozen heap is collected in full (unfreeze,
collect, freeze again) at the start of a decode window:

- after ``reclaim_every`` freezes (300: every 2.5-5 minutes for the worker's
  ClickHouse batches, which close every 0.5 s or at 20,000 events);
- at a small batch after freezes, at most once a minute (``settle_s``): the
  pipeline has caught up, so nothing frozen stays frozen long once the load
  drops, and a load that hovers around ``min_records`` does not make a full
  collection of every other batch.

A full collection walks what is alive: measured with the worker's start-up
heap, 78 ms with no batch alive and ~600 ms with two 20,000-event batches.
At the start of a window only the batch being applied is alive.
``min_records`` is 5,000: below it two batches alive (~150,000 objects) stay
under the worker's collection threshold of 300,000 young objects, so the
collector never walked them anyway; so a pipeline keeping up is left to the
collector as it was (the Redis process's batches, up to 10,000 records, freeze
only while it catches up), as is a collector someone else turned off.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["HEAP", "BatchHeap"]


class BatchHeap:
    """One per process (the collector is): ``with heap.decoding(n):`` around a batch's decode."""

    def __init__(
        self, min_records: int = 5000, reclaim_every: int = 300, settle_s: float = 60.0
    ) -> None:
        self.min_records = min_records
        self.reclaim_every = reclaim_every
        self.settle_s = settle_s
        self.freezes = 0
        self.reclaims = 0
        self._pending = 0  # freezes since the last reclaim
        self._last_reclaim = time.monotonic()
        self._depth = 0  # open windows that turned the collector off (overlapping pipelines)

    @contextmanager
    def decoding(self, records: int) -> Iterator[None]:
        """Collector off while a batch of `records` decodes, then the heap frozen."""
        if self._depth == 0:
            if not gc.isenabled():  # turned off by someone else: theirs to run
                yield
                return
            if self._pending and (
                self._pending >= self.reclaim_every
                or (
                    records < self.min_records
                    and time.monotonic() - self._last_reclaim >= self.settle_s
                )
            ):
                self.reclaim()
            if records < self.min_records:
                yield
                return
            gc.disable()
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
            if self._depth == 0:
                gc.freeze()
                gc.enable()
                self.freezes += 1
                self._pending += 1

    def reclaim(self) -> int:
        """Collect the garbage that freezes caught: unfreeze, collect in full, freeze again
        (what lives goes back to the permanent generation). Returns the objects collected."""
        gc.unfreeze()
        try:
            collected = gc.collect()
        finally:
            gc.freeze()
        self._pending = 0
        self._last_reclaim = time.monotonic()
        self.reclaims += 1
        return collected


# the process's one (the collector is per process; the Redis process and the worker
# each have theirs)
HEAP = BatchHeap()
