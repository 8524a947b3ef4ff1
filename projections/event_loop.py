"""The worker's event loop: uvloop by default (PROJECTIONS_EVENT_LOOP=asyncio for asyncio's own).

The query API runs on the worker's event loop, and at 500 requests/s a
good part of a read's CPU was the loop and its transports (asyncio's
selector loop, in Python). uvloop (libuv, in C) is the loop Faust documents
for production. Measured on the development machine, interleaved, uvloop
with the reads' own connections (projections/redis_reads.py) cut the
worker's CPU for GET /users/{id} by about 17 %, and uvloop alone 15-25 % in
an earlier pair; the Redis process, on the same loop, applied as fast or
faster (21.0k and 21.2k events/s against 18.6k and 20.7k on asyncio).

The choice is made with an event loop policy, which mode's Worker and
asyncio.run both follow. Policies are deprecated from Python 3.14 (removed
in 3.16): there, this becomes a loop factory.
"""

from __future__ import annotations

import asyncio

EVENT_LOOPS = ("uvloop", "asyncio")


def use_event_loop(name: str) -> None:
    """Make the loops asyncio creates from now on (asyncio.run, mode's Worker) of this kind."""
    if name == "uvloop":
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    elif name == "asyncio":
        asyncio.set_event_loop_policy(None)
    else:
        raise ValueError(f"unknown event loop {name!r}; expected one of {', '.join(EVENT_LOOPS)}")
