"""JSON lines over trio byte streams: the pipe protocol between the runner and its load
generators (one JSON object per line; requests carry ``id``, replies ``reply``, unsolicited
reports ``event``)."""

from __future__ import annotations

import json
from typing import Any

import trio

from server.bench.fleet import BenchError

#: Longest line accepted (a reply lists a time per device: ~40 bytes each).
MAX_LINE = 64 * 1024 * 1024


class JsonLines:
    """Reads and writes newline-delimited JSON objects; writes are serialised by a lock."""

    def __init__(
        self, receive: trio.abc.ReceiveStream | None, send: trio.abc.SendStream | None
    ) -> None:
        self._receive = receive
        self._send = send
        self._buffer = bytearray()
        self._lock = trio.Lock()

    async def read(self) -> dict[str, Any] | None:
        """The next object, or None at the end of the stream."""
        if self._receive is None:
            raise BenchError("this JSON-lines channel cannot read")
        while True:
            end = self._buffer.find(b"\n")
            if end >= 0:
                line = bytes(self._buffer[:end])
                del self._buffer[: end + 1]
                if not line.strip():
                    continue
                try:
                    value = json.loads(line)
                except ValueError as exc:
                    raise BenchError(f"not a JSON line: {line[:200]!r}") from exc
                if not isinstance(value, dict):
                    raise BenchError(f"expected a JSON object per line, got {line[:200]!r}")
                return value
            if len(self._buffer) > MAX_LINE:
                raise BenchError(f"a line is longer than {MAX_LINE} bytes")
            chunk = await self._receive.receive_some(1 << 16)
            if not chunk:
                return None
            self._buffer += chunk

    async def write(self, value: dict[str, Any]) -> None:
        """Send one object as a line."""
        if self._send is None:
            raise BenchError("this JSON-lines channel cannot write")
        data = json.dumps(value, separators=(",", ":")).encode() + b"\n"
        async with self._lock:  # trio streams refuse concurrent send_all calls
            await self._send.send_all(data)
