"""The load generator's side of the hold benchmark (``python -m server.bench.fleet.hold``):
every device of the process connects, stays connected and pings at its keep-alive interval.

A held device is one task over the ``records`` device stack
(:func:`~server.bench.fleet.record_devices.connect_records`: OpenSSL only for the
handshake, then our record layer over one plain socket). It connects (a mutual-auth
handshake, bounded by the process's connect slots), proves the server runs its session with
a first CoAP ping answered, then pings every ``keepalive_interval`` seconds: over TCP a 7.02
Ping answered by a 7.03 Pong (RFC 8323 5.4, after the CSM of 5.3), over UDP an Empty CON
answered by an empty ACK or a RST (RFC 7252 4.3). A ping unanswered within
``keepalive_timeout`` counts as missed; ``max_missed`` in a row, a broken link or the
server's Release/Abort end the session: the device counts a drop, waits a jittered
back-off and reconnects (resuming its last session). The server's own pings are answered.

No flash, no Hello: the server runs a device session from the handshake on (it marks the
device online in its store then), so this measures what holding sessions costs, not the
OTA protocol.
"""

from __future__ import annotations

import os
import random
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import trio

from otacore.coap import (
    Code,
    Message,
    MessageType,
    TcpFrameReader,
    decode_udp,
    encode_tcp,
    encode_udp,
)
from otacore.errors import ProtocolError
from otacore.protocol.link import TcpLink
from server.bench.fleet import BenchError, error_text
from server.bench.fleet.procs import cpu_seconds, rss_kib
from server.bench.fleet.record_devices import (
    RECORD_LINK_ERRORS,
    DeviceResumption,
    RecordConnection,
    connect_records,
)


@dataclass(frozen=True)
class HoldSettings:
    """How the held devices behave (the runner sends them with ``hold_start``)."""

    #: Seconds between two keep-alive pings of a device.
    keepalive_interval: float = 60.0
    #: A ping unanswered this long counts as missed.
    keepalive_timeout: float = 20.0
    #: Missed pings in a row that end the session (the device then reconnects).
    max_missed: int = 2
    #: Devices of this process handshaking at once.
    concurrency: int = 64
    #: A connection attempt (handshake and first ping answered) must finish within this.
    connect_timeout: float = 30.0
    #: Reconnect back-off after a failed attempt or a drop: first and last, doubling,
    #: each jittered to 50-100% (devices that dropped together do not come back together).
    backoff_initial: float = 1.0
    backoff_max: float = 30.0

    def __post_init__(self) -> None:
        for name in ("keepalive_interval", "keepalive_timeout", "connect_timeout",
                     "backoff_initial", "backoff_max"):  # fmt: skip
            if not getattr(self, name) > 0:
                raise BenchError(f"hold setting {name} must be positive")
        if self.keepalive_timeout >= self.keepalive_interval:
            raise BenchError("the keep-alive timeout must be shorter than its interval")
        if self.max_missed < 1 or self.concurrency < 1:
            raise BenchError("max_missed and concurrency must be at least 1")

    @classmethod
    def from_request(cls, request: dict[str, Any]) -> HoldSettings:
        """The settings a ``hold_start`` request carries (missing ones: the defaults)."""
        names = cls.__dataclass_fields__.keys()
        return cls(**{name: request[name] for name in names if name in request})


class _SessionEnded(Exception):
    """The held session ended (the message says why)."""


class KeepAliveProbe:
    """CoAP pings of one session and the matching of their answers (sans-IO)."""

    __slots__ = ("_awaiting_id", "_next_id", "_reader", "transport")

    def __init__(self, transport: str, first_message_id: int) -> None:
        self.transport = transport
        self._reader = TcpFrameReader() if transport == "tcp" else None
        self._next_id = first_message_id & 0xFFFF
        self._awaiting_id: int | None = None

    def first(self) -> list[bytes]:
        """What the device sends first: over TCP its CSM (RFC 8323 5.3) and a Ping."""
        if self.transport == "tcp":
            csm = TcpLink().take_outgoing()
            return [*csm, self.ping()[0]]
        return self.ping()

    def ping(self) -> list[bytes]:
        """One ping: TCP 7.02 Ping (RFC 8323 5.4), UDP Empty CON (RFC 7252 4.3)."""
        message_id = self._next_id
        self._next_id = (message_id + 1) & 0xFFFF
        if self.transport == "tcp":
            return [encode_tcp(Message(MessageType.CON, Code.PING, token=message_id.to_bytes(2)))]
        self._awaiting_id = message_id
        return [encode_udp(Message(MessageType.CON, Code.EMPTY, message_id))]

    def feed(self, data: bytes) -> tuple[bool, list[bytes]]:
        """Bytes the session delivered: (a ping was answered, what to send back). Raises
        _SessionEnded on the server's Release or Abort (RFC 8323 5.5, 5.6) or a malformed
        TCP frame (the stream cannot be resynchronised)."""
        answered = False
        replies: list[bytes] = []
        if self._reader is not None:
            try:
                messages = self._reader.feed(data)
            except ProtocolError as exc:
                raise _SessionEnded(f"malformed frame from the server: {exc}") from None
            for message in messages:
                if message.code == Code.PONG:
                    answered = True
                elif message.code == Code.PING:  # RFC 8323 5.4: Pong echoes the token
                    replies.append(encode_tcp(Message(MessageType.CON, Code.PONG,
                                                      token=message.token)))  # fmt: skip
                elif message.code in (Code.RELEASE, Code.ABORT):
                    raise _SessionEnded("the server released the connection")
            return answered, replies
        try:
            message = decode_udp(data)
        except ProtocolError:
            return False, []  # RFC 7252 4.2: silently ignore a malformed message
        if message.type in (MessageType.ACK, MessageType.RST):
            if message.message_id == self._awaiting_id:
                self._awaiting_id = None
                answered = True
        elif message.type is MessageType.CON:
            # Its ping, or a request this device does not serve: both get an empty RST
            # (RFC 7252 4.2, 4.3).
            replies.append(encode_udp(Message(MessageType.RST, Code.EMPTY, message.message_id)))
        return answered, replies


class HeldDevices:
    """Every device of this load generator, held connected (see the module docstring)."""

    def __init__(self, devices: list[tuple[str, str]], credentials: Any, sources: list[str],
                 seed: int) -> None:  # fmt: skip
        #: (device id, transport) of each device.
        self.devices = devices
        #: ``device id -> DeviceCredentials`` (LoadGenSpec.credentials).
        self._credentials = credentials
        self._sources = sources
        self._rng = random.Random(seed)
        self.settings = HoldSettings()
        self.scope: trio.CancelScope | None = None
        #: Set once every device's task has ended (after :meth:`stop`).
        self.finished = trio.Event()
        self.connected = 0
        self.connected_by_transport: Counter[str] = Counter()
        self.sessions = 0  # sessions that came up (first ping answered), reconnects included
        self.drops: Counter[str] = Counter()  # why sessions ended, by transport and reason
        self.connect_failures: Counter[str] = Counter()
        #: Device id -> the last error of a device not connected now (why it is not).
        self.waiting_errors: dict[str, str] = {}
        self.pings_sent = 0
        self.pings_answered = 0
        self.pings_missed = 0
        #: Pings sent and not yet answered or missed (a window's answers may be for these).
        self.pings_awaited = 0
        self.first_up: float | None = None
        self.last_up: float | None = None  # the last time a device came up

    async def run(self, settings: HoldSettings, addresses: dict[str, tuple[str, int]],
                  *, task_status: trio.TaskStatus[float]) -> None:  # fmt: skip
        """Connect every device and hold it until cancelled (:meth:`stop`)."""
        self.settings = settings
        slots = trio.Semaphore(settings.concurrency)
        try:
            with trio.CancelScope() as scope:
                self.scope = scope
                async with trio.open_nursery() as nursery:
                    for position, (device_id, transport) in enumerate(self.devices):
                        nursery.start_soon(self._device, position, device_id, transport,
                                           addresses[transport], slots)  # fmt: skip
                    task_status.started(time.monotonic())
        finally:
            self.finished.set()

    def stop(self) -> None:
        """End every session (close_notify each, bounded), and every device's task."""
        if self.scope is not None:
            self.scope.cancel()

    async def _device(self, position: int, device_id: str, transport: str,
                      address: tuple[str, int], slots: trio.Semaphore) -> None:  # fmt: skip
        settings = self.settings
        resumption = DeviceResumption(self._credentials(device_id))
        source = self._sources[position % len(self._sources)]
        backoff = settings.backoff_initial
        while True:
            probe = KeepAliveProbe(transport, self._rng.getrandbits(16))
            connection: RecordConnection | None = None
            try:
                async with slots:
                    with trio.fail_after(settings.connect_timeout):
                        connection, _resumed = await connect_records(
                            transport, address, resumption, resume=True, source=source
                        )
                        await connection.send(probe.first())
                        while True:  # the first answer proves the server runs the session
                            answered, replies = probe.feed(await connection.receive())
                            if replies:
                                await connection.send(replies)
                            if answered:
                                break
            except (trio.TooSlowError, _SessionEnded, *RECORD_LINK_ERRORS) as exc:
                error = f"{transport}: {error_text(exc)[:100]}"
                self.connect_failures[error] += 1
                self.waiting_errors[device_id] = error
                if connection is not None:
                    await _close(connection)
                await trio.sleep(backoff * (0.5 + self._rng.random() / 2))
                backoff = min(backoff * 2, settings.backoff_max)
                continue
            except BaseException:
                if connection is not None:
                    await _close(connection)
                raise
            if connection.session is not None:  # resume it next time
                resumption.session = connection.session
            backoff = settings.backoff_initial
            self.waiting_errors.pop(device_id, None)
            reason = await self._held(connection, transport, probe)
            self.drops[f"{transport}: {reason[:100]}"] += 1
            self.waiting_errors[device_id] = f"{transport}: dropped: {reason[:100]}"
            await trio.sleep(backoff * (0.5 + self._rng.random() / 2))

    async def _held(self, connection: RecordConnection, transport: str,
                    probe: KeepAliveProbe) -> str:  # fmt: skip
        """Keep one session up with pings; returns why it ended."""
        settings = self.settings
        now = trio.current_time()
        self._came_up(transport, +1)
        next_ping = now + settings.keepalive_interval
        answer_due: float | None = None
        missed = 0
        try:
            while True:
                with trio.move_on_at(next_ping if answer_due is None else answer_due):
                    answered, replies = probe.feed(await connection.receive())
                    if replies:
                        await connection.send(replies)
                    if answered and answer_due is not None:
                        self.pings_answered += 1
                        self.pings_awaited -= 1
                        answer_due, missed = None, 0
                    continue
                now = trio.current_time()
                if answer_due is not None:  # unanswered in time
                    self.pings_missed += 1
                    self.pings_awaited -= 1
                    missed += 1
                    answer_due = None
                    if missed >= settings.max_missed:
                        return f"{missed} keep-alive pings unanswered"
                    continue  # the next ping goes at its time
                await connection.send(probe.ping())
                self.pings_sent += 1
                self.pings_awaited += 1
                answer_due = now + settings.keepalive_timeout
                next_ping = now + settings.keepalive_interval
        except _SessionEnded as exc:
            return str(exc)
        except RECORD_LINK_ERRORS as exc:
            return error_text(exc)
        finally:
            if answer_due is not None:  # ended with a ping out: neither answered nor missed
                self.pings_awaited -= 1
            self._came_up(transport, -1)
            await _close(connection)

    def _came_up(self, transport: str, change: int) -> None:
        self.connected += change
        self.connected_by_transport[transport] += change
        if change > 0:
            self.sessions += 1
            self.last_up = time.monotonic()
            if self.first_up is None:
                self.first_up = self.last_up

    def stats(self) -> dict[str, Any]:
        """Counters so far, with this process's RSS and CPU time."""
        pid = os.getpid()
        return {
            "devices": len(self.devices),
            "connected": self.connected,
            "connected_by_transport": dict(self.connected_by_transport),
            "sessions": self.sessions,
            "drops": sum(self.drops.values()),
            "drop_reasons": dict(self.drops.most_common(5)),
            "connect_failures": sum(self.connect_failures.values()),
            "connect_failure_reasons": dict(self.connect_failures.most_common(5)),
            # Why the devices not connected now are not (their last error, counted).
            "waiting_reasons": dict(Counter(self.waiting_errors.values()).most_common(5)),
            "pings_sent": self.pings_sent,
            "pings_answered": self.pings_answered,
            "pings_missed": self.pings_missed,
            "pings_awaited": self.pings_awaited,
            "first_up": self.first_up,
            "last_up": self.last_up,
            "rss_kib": rss_kib(pid),
            "cpu_s": cpu_seconds(pid),
        }


async def _close(connection: RecordConnection) -> None:
    """close_notify, then the socket; bounded (the server may be gone), also when cancelled."""
    with trio.CancelScope(shield=True), trio.move_on_after(2.0):
        await connection.aclose()
