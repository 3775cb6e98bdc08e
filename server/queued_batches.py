"""Storing a batch taken off an in-memory queue without ever losing it: the event relay's
outgoing log and the event history's writer both buffer events in a deque and write them in
batches from a worker thread."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import TypeVar

import trio

T = TypeVar("T")


async def store_batch(waiting: deque[T], limit: int, write: Callable[[list[T]], object]) -> int:
    """Take up to ``limit`` items off the front of ``waiting``, ``write`` them (blocking: in a
    worker thread) and return how many were written (0 when ``waiting`` was empty).

    When ``write`` raises, or the call is cancelled before the thread ran
    (``trio.to_thread.run_sync`` checkpoints first), the batch goes back to the front of
    ``waiting`` in order and the exception propagates: the caller's next write, or its last
    one on the way out, still has it. A cancellation that arrives once the thread runs waits
    for it (the thread is not abandoned), so a written batch is never put back."""
    batch = [waiting.popleft() for _ in range(min(limit, len(waiting)))]
    if not batch:
        return 0
    written = False

    def run() -> None:
        nonlocal written
        write(batch)
        written = True

    try:
        await trio.to_thread.run_sync(run)
    except BaseException:
        if not written:
            waiting.extendleft(reversed(batch))
        raise
    return len(batch)
