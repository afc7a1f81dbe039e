"""The sync bridge: every public sync function is generated from its async one, here.

In a plain script there is no running event loop, so ``anyio.run`` drives the coroutine (and
Ctrl-C cancels it cleanly). Inside a running loop (a Jupyter cell) we cannot block that loop's
thread on itself, so the coroutine runs on a fresh loop in a worker thread through anyio's
blocking portal; no nest_asyncio.

A job interrupted by Ctrl-C leaves what it had (``keep_partial``), and the bridge raises
``JobInterrupted`` carrying it: no submitted row's handle is lost to a KeyboardInterrupt.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable, Coroutine
from contextvars import ContextVar
from typing import Any, ParamSpec, TypeVar

import anyio
import anyio.from_thread

from ._errors import JobInterrupted

T = TypeVar("T")
P = ParamSpec("P")

# What an interrupted job had, for the bridge to hand over: one list per run_sync call.
_PARTIAL: ContextVar[list[Any] | None] = ContextVar("runflow_frames_partial", default=None)


def keep_partial(result: Any) -> None:
    """Called by a job that is being interrupted: ``result`` goes with the KeyboardInterrupt."""
    box = _PARTIAL.get()
    if box is not None:
        box.append(result)


def run_sync(fn: Callable[[], Awaitable[T]]) -> T:
    """Run ``fn()`` to completion and return its result, from any synchronous context."""
    box: list[Any] = []

    async def job() -> T:
        _PARTIAL.set(box)  # in the task's own context, whichever thread runs it
        return await fn()

    try:
        return _drive(job)
    except KeyboardInterrupt as exc:
        if box:
            raise JobInterrupted(
                "interrupted; .result holds the rows that have a handle. With a checkpoint, "
                "re-running the same call resumes; without one, re-running sends every row "
                "again: send only the rows without a handle",
                result=box[-1],
            ) from exc
        raise


def _drive(fn: Callable[[], Awaitable[T]]) -> T:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        in_loop = False
    else:
        in_loop = True
    if not in_loop:
        # Outside the except block, so the job's own errors do not chain onto that RuntimeError.
        # The result leaves in a list, not as the main task's result: when asyncio's Runner
        # restores the SIGINT handler, Python 3.11's signal.getsignal formats the repr of its
        # handler, a partial holding the main task, and with it the task's result: two
        # DataFrame reprs, 10 ms at the end of every call (measured).
        out: list[T] = []

        async def main() -> None:
            out.append(await fn())

        anyio.run(main)
        return out[0]
    with anyio.from_thread.start_blocking_portal() as portal:
        future = portal.start_task_soon(fn)
        try:
            return future.result()
        except BaseException:
            # KeyboardInterrupt in a notebook: cancel the job and let it unwind before we go.
            future.cancel()
            raise


def sync_twin(afn: Callable[P, Coroutine[Any, Any, T]]) -> Callable[P, T]:
    """The synchronous form of ``afn`` (named without its leading ``a``), with its signature
    and docstring: it works the same in a script and in a notebook cell."""

    @functools.wraps(afn)
    def twin(*args: P.args, **kwargs: P.kwargs) -> T:
        return run_sync(lambda: afn(*args, **kwargs))

    twin.__name__ = afn.__name__.removeprefix("a")
    twin.__qualname__ = afn.__qualname__.removeprefix("a")
    return twin
