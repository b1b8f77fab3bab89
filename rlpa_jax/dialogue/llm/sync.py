"""Running the LLM clients' coroutines from synchronous code (scripts, the trainer's host loop,
notebooks whose own event loop is already running)."""

from __future__ import annotations

import asyncio
import concurrent.futures
from typing import Awaitable, TypeVar

T = TypeVar("T")


def run_sync(coro: Awaitable[T]) -> T:
    """Run `coro` to completion from synchronous code and return its result.

    Use it where no event loop is running in this thread (scripts, the trainer's
    host loop): it is asyncio.run. Called from inside a running loop (e.g. a
    notebook), it runs the coroutine on a fresh loop in a worker thread and blocks
    until done, since a running loop cannot be re-entered. Inside async code,
    prefer plain `await`.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(_as_coroutine(coro))
    with concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="run_sync") as pool:
        return pool.submit(asyncio.run, _as_coroutine(coro)).result()


async def _as_coroutine(awaitable: Awaitable[T]) -> T:
    return await awaitable
