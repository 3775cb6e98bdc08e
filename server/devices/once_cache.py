"""A bounded cache whose values are computed once per key, however many tasks ask at once.

Delta patches and compressed frames are expensive (a worker thread each) and shared by every
device getting the same file: the first task to ask computes, concurrent askers wait for it,
and a cancelled computation lets the next asker try again.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

import trio

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class OnceCache(Generic[K, V]):
    """Least recently used values, at most ``entries`` of them, each computed once."""

    def __init__(self, entries: int) -> None:
        self.entries = entries
        self._values: OrderedDict[K, V] = OrderedDict()
        self._pending: dict[K, trio.Event] = {}

    async def get(self, key: K, compute: Callable[[], Awaitable[V]]) -> V:
        """The value for ``key``: cached, or awaited from the task computing it, or
        computed now by ``compute()``."""
        while True:
            if key in self._values:
                self._values.move_to_end(key)
                return self._values[key]
            pending = self._pending.get(key)
            if pending is None:
                break
            await pending.wait()  # it may have been cancelled: then look again
        done = trio.Event()
        self._pending[key] = done
        try:
            value = await compute()
            self._values[key] = value
            while len(self._values) > self.entries:
                self._values.popitem(last=False)
            return value
        finally:
            del self._pending[key]
            done.set()
