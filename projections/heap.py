"""Keeps Python's cyclic garbage collector off the decoded batches.

A decoded event is ~10 containers the collector tracks (JSON dicts and lists,
the DomainEvent); a ClickHouse batch of 20,000 events is ~300,000 of them,
alive until the batch is applied. Every collection that ran while one was alive
walked all of them, found nothing (they are trees, freed by reference
counting), and stopped the process meanwhile: traced in the worker over the
1M-event throughput benchmark, 42 collections stood it still for 16.6 s of its
~80 s run, the longest 957 ms (API requests and the ClickHouse pipeline waited
through them). With this module: none over 2 ms but the full ones below.

So a pipeline decodes a large batch with the automatic collector off and then
freezes it (``gc.freeze()``: the collector's tracked objects move to the
permanent generation, which it never walks; an O(1) list splice). Frozen
objects are still freed by reference counting when the batch is dropped.
What a freeze may also catch is cyclic garbage made meanwhile (asyncio and
aiohttp objects, ~50 per batch measured): frozen, the collector cannot free
it, so every ``reclaim_every`` freezes the heap is unfrozen and collected in
full once, and frozen again: one full pass (tens of ms, up to ~1 s with two
20,000-event batches alive), every ~5 minutes for the worker's ClickHouse
batches at 20,000 events/s and every ~30 s for the Redis process's 2,000-event
ones. A pipeline keeping up (batches under ``min_records``) freezes nothing
and the collector runs as usual.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["BatchHeap"]


class BatchHeap:
    """One per process (the collector is): ``with heap.decoding(n):`` around a batch's decode."""

    def __init__(self, min_records: int = 1000, reclaim_every: int = 300) -> None:
        self.min_records = min_records
        self.reclaim_every = reclaim_every
        self.freezes = 0
        self.reclaims = 0

    @contextmanager
    def decoding(self, records: int) -> Iterator[None]:
        """Collector off while a batch of `records` decodes, then the batch frozen.
        Small batches (a pipeline keeping up) are left to the collector as it is."""
        if records < self.min_records or not gc.isenabled():
            yield
            return
        gc.disable()
        try:
            yield
        finally:
            gc.freeze()
            gc.enable()
            self.freezes += 1
            if self.freezes % self.reclaim_every == 0:
                self.reclaim()

    def reclaim(self) -> int:
        """Collect the cyclic garbage that freezes caught: unfreeze, collect in full, freeze
        again (what lived then goes back to the permanent generation). Returns the
        objects collected."""
        gc.unfreeze()
        collected = gc.collect()
        gc.freeze()
        self.reclaims += 1
        return collected


# the process's one (the collector is per process; the Redis process and the worker
# each have theirs)
HEAP = BatchHeap()
