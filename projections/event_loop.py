"""The worker's event loop: uvloop by default (PROJECTIONS_EVENT_LOOP=asyncio for asyncio's own).

The query API runs on the worker's event loop, and at 500 requests/s a
third of a read's CPU was the loop and its transports (asyncio's selector
loop in Python). uvloop (libuv, in C) is the loop Faust documents for
production; measured on the development machine, interleaved, a
GET /users/{id} cost the worker 15-25 % less CPU with it. The Redis
process takes the same loop.
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
