"""The tasks one device session starts on demand (issue 14 item 5).

A session has no task of its own while idle: the work that must wait (a request that reads
the store, an update, a send the socket's buffer cannot take yet) runs in a task started
when it is needed, in a nursery that outlives every session (the device plane's), and ends
when the work is done. :class:`SessionTasks` keeps those tasks of one session: each in a
cancel scope of its own, all cancelled and awaited as the session ends (as a per-session
nursery would, without the nursery and its task while idle), and an error in one ends that
session only.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Protocol

import trio

from server.transport.session import CloseReason, DeviceSession, SessionClosed

log = logging.getLogger("ota.devices")

class Spawner(Protocol):
    """What starts the tasks: the device plane, whose nursery outlives the sessions."""

    def spawn(self, fn: Callable[..., Awaitable[object]], *args: object) -> None:
        """Start ``fn(*args)`` in that nursery."""
        ...


class SessionTasks:
    """The on-demand tasks of one session (none while it is idle)."""

    __slots__ = ("_done", "_ending", "_scopes", "_spawner", "session")

    def __init__(self, spawner: Spawner, session: DeviceSession) -> None:
        self._spawner = spawner
        #: Whose tasks these are: closed (HANDLER_ERROR) when one of them fails.
        self.session = session
        self._scopes: set[trio.CancelScope] | None = None
        self._done: trio.Event | None = None
        self._ending = False

    def __len__(self) -> int:
        """Tasks running (or started and not yet running) now."""
        return len(self._scopes) if self._scopes is not None else 0

    def start(self, work: Callable[[], Awaitable[object]]) -> bool:
        """Run ``work()`` in a task that ends with the session; False (nothing started)
        once the session is ending."""
        if self._ending:
            return False
        scope = trio.CancelScope()
        if self._scopes is None:
            self._scopes = set()
        self._scopes.add(scope)
        self._spawner.spawn(self._run, scope, work)
        return True

    async def _run(self, scope: trio.CancelScope, work: Callable[[], Awaitable[object]]) -> None:
        try:
            with scope:
                await work()
        except SessionClosed:
            pass  # the session closed under a send: a normal end
        except Exception:
            log.exception("session handler of device %s failed", self.session.device_id)
            self.session.close(CloseReason.HANDLER_ERROR)
        finally:
            scopes = self._scopes
            if scopes is not None:
                scopes.discard(scope)
                if not scopes:
                    self._scopes = None
                    if self._done is not None:
                        self._done.set()

    async def end(self) -> None:
        """The session ends: no task starts from now on; cancel the running ones and wait
        until they are gone (their shielded, bounded store writes complete first)."""
        self._ending = True
        scopes = self._scopes
        if scopes is None:
            return
        for scope in scopes:
            scope.cancel()
        self._done = trio.Event()
        with trio.CancelScope(shield=True):
            await self._done.wait()
