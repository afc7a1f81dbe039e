"""The sync bridge: run the async core from synchronous code.

In a plain script there is no running event loop, so ``anyio.run`` drives the coroutine (and
Ctrl-C cancels it cleanly). Inside a running loop (a Jupyter cell) we cannot block that loop's
thread on itself, so the coroutine runs on a fresh loop in a worker thread through anyio's
blocking portal; no nest_asyncio.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

import anyio
import anyio.from_thread

T = TypeVar("T")


def run_sync(fn: Callable[[], Awaitable[T]]) -> T:
    """Run ``fn()`` to completion and return its result, from any synchronous context."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        in_loop = False
    else:
        in_loop = True
    if not in_loop:
        # Outside the except block, so the job's own errors do not chain onto that RuntimeError.
        return anyio.run(fn)
    with anyio.from_thread.start_blocking_portal() as portal:
        future = portal.start_task_soon(fn)
        try:
            return future.result()
        except BaseException:
            # KeyboardInterrupt in a notebook: cancel the job and let it unwind before we go.
            future.cancel()
            raise
