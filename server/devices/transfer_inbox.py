"""A session updater's inbox of transfer messages: bounded, and free while no transfer runs.

A transfer's messages from the device (``otacore.transfer``) advance its sender in the
reader's own call (:mod:`server.devices.transfer_run`); they wait here, put by the
session's reader (which must never block on them), only while the updater's task drives
the sender itself (catching up after a send that had to wait, or a kick's check), and
before a transfer starts. A memory channel cost about 1 KiB per session, transfer or not;
this holds a deque only while messages wait and a trio.Event only while someone waits.
"""

from __future__ import annotations

from collections import deque

import trio

from otacore.transfer import TransferMessage

#: Messages kept beyond it are dropped: the transfer protocol recovers lost messages.
INBOX_SIZE = 256


class TransferInbox:
    """Transfer messages in arrival order, at most ``size`` of them."""

    __slots__ = ("_arrived", "_messages", "size")

    def __init__(self, size: int = INBOX_SIZE) -> None:
        self.size = size
        self._messages: deque[TransferMessage] | None = None
        self._arrived: trio.Event | None = None

    def __len__(self) -> int:
        return len(self._messages) if self._messages is not None else 0

    def put(self, message: TransferMessage) -> bool:
        """Add ``message`` (never blocks); False (dropped) when the inbox is full."""
        messages = self._messages
        if messages is None:
            messages = self._messages = deque()
        elif len(messages) >= self.size:
            return False
        messages.append(message)
        arrived = self._arrived
        if arrived is not None:
            self._arrived = None
            arrived.set()
        return True

    def clear(self) -> None:
        """Drop every message (what an earlier transfer left)."""
        self._messages = None

    def take(self) -> TransferMessage | None:
        """The oldest message, or None when there is none (never waits)."""
        messages = self._messages
        if not messages:
            return None
        return messages.popleft()

    async def receive(self) -> TransferMessage:
        """The oldest message, waiting for one; a cancellation loses none."""
        while not self._messages:
            if self._arrived is None:
                self._arrived = trio.Event()
            await self._arrived.wait()
        await trio.lowlevel.checkpoint()  # as a channel's receive: a checkpoint each time
        messages = self._messages
        if not messages:  # taken meanwhile (cleared): wait again
            return await self.receive()
        return messages.popleft()
