"""Trio shell of one emulated device: connect over TLS or DTLS, run the machine, reconnect.

The protocol lives in :class:`otacore.device.emulated.EmulatedDevice`; this shell only moves
bytes and time. One device costs one task (two while connected: the session loop and its
reader), one socket and no thread; it sleeps until the machine's next deadline, a received
message or an application call (:meth:`DeviceRunner.wake`), never polls.

Reconnects back off exponentially with jitter (0.5 s doubling to 30 s by default, reset after
a session whose Hello was answered), so a fleet that lost its server does not return as a
thundering herd. A device given several endpoints (``LinkSettings.fallbacks``: the other
nodes of the installation, like the further answers of a DNS name) fails over: when its
endpoint refuses, does not finish the handshake in ``connect_timeout``, or ends the session
(a lost link, the server's close, a Hello left unanswered), the next attempt, after the same
back-off, goes to the next endpoint of its order, wrapping around. A reset keeps the endpoint
(Device OS keeps its session, server included, across a reset).

A :class:`Reboot` closes the link (after the Goodbye is sent), waits ``reboot_delay`` and
boots the machine again; a kill is simply cancelling :meth:`run`: the flash keeps what must
survive, and the device's sockets are closed at once with no goodbye, as the kernel closes a
killed process's (:meth:`_Connection.cut`). A TLS stream is in a reference cycle (trio's
``SSLStream`` holds bound methods of itself), so a socket left to the garbage collector
would close whenever a full collection happens to run: the server would see the end of the
connection after a delay set by the heap's size, not by the device.
"""

from __future__ import annotations

import math
import random
import socket
import ssl
import time
from contextlib import AbstractAsyncContextManager, nullcontext, suppress
from dataclasses import dataclass
from typing import Protocol

import trio
from OpenSSL import SSL

from otacore.device.emulated import DeviceAction, Disconnect, EmulatedDevice, Reboot
from otacore.protocol.link import Transport
from server.transport.client import (
    DeviceCredentials,
    connect_dtls,
    connect_tls,
    dtls_session,
    receive_datagram,
)
from server.transport.dtls import send_close_notify

#: Exceptions that mean "this connection is gone" (not a bug in the device).
LINK_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, SSL.Error, OSError)
_READ_SIZE = 65536
#: A session that went online and lasted this long (seconds) resets the reconnect back-off.
SESSION_OK_AFTER = 5.0


@dataclass(frozen=True)
class LinkSettings:
    """Where and how one device connects (times in seconds)."""

    #: The endpoint the device tries first.
    server: tuple[str, int]
    transport: Transport
    credentials: DeviceCredentials
    connect_timeout: float = 10.0
    backoff_initial: float = 0.5
    backoff_max: float = 30.0
    #: Time a reset takes (the device is offline meanwhile).
    reboot_delay: float = 0.1
    #: Resume TLS and DTLS sessions on reconnect (RFC 8446 section 2.2; RFC 5246 section
    #: 7.3 for DTLS 1.2), saving a full handshake. Device OS keeps its DTLS session across
    #: resets for this.
    resume_tls: bool = True
    #: Further endpoints, in the order the device fails over to them after ``server``.
    fallbacks: tuple[tuple[str, int], ...] = ()

    @property
    def endpoints(self) -> tuple[tuple[str, int], ...]:
        """Every endpoint, in the order the device tries them."""
        return (self.server, *self.fallbacks)


class _Connection(Protocol):
    async def receive(self) -> bytes: ...
    async def send(self, pieces: list[bytes]) -> None: ...
    async def aclose(self) -> None: ...

    def cut(self) -> None:
        """Power cut: close the socket now, sending nothing (no close_notify); idempotent.
        Over TCP the kernel still ends the connection (FIN), as it does for a killed
        process; over UDP nothing reaches the server, which waits for its idle timeout."""
        ...


class _TlsConnection:
    def __init__(self, stream: trio.SSLStream[trio.SocketStream]) -> None:
        self.stream = stream

    async def receive(self) -> bytes:
        data = await self.stream.receive_some(_READ_SIZE)
        if not data:
            raise trio.BrokenResourceError("the server closed the connection")
        return bytes(data)

    async def send(self, pieces: list[bytes]) -> None:
        await self.stream.send_all(b"".join(pieces))  # one write for the whole batch

    async def aclose(self) -> None:
        with trio.move_on_after(1.0):
            try:
                await self.stream.aclose()  # close_notify, then the socket
                return
            except LINK_ERRORS:
                pass
        await trio.aclose_forcefully(self.stream)

    def cut(self) -> None:
        self.stream.transport_stream.socket.close()


class _DtlsConnection:
    def __init__(self, endpoint: trio.DTLSEndpoint, channel: trio.DTLSChannel) -> None:
        self.endpoint = endpoint
        self.channel = channel

    async def receive(self) -> bytes:
        return await receive_datagram(self.channel)  # skips datagrams without data

    async def send(self, pieces: list[bytes]) -> None:
        for datagram in pieces:
            try:
                await self.channel.send(datagram)
            except SSL.WantReadError:
                # OpenSSL wants a handshake record (e.g. the server's retransmitted last
                # flight) read before it writes: treat it as a lost datagram, which CoAP
                # and the transfer protocol recover, rather than as a dead session.
                continue

    async def aclose(self) -> None:
        # trio never sends close_notify itself; without it the server waits for its idle timeout.
        with trio.move_on_after(1.0):
            await send_close_notify(self.channel)
        self.cut()

    def cut(self) -> None:
        self.channel.close()
        self.endpoint.close()


async def _open_dtls_endpoint(server: tuple[str, int]) -> trio.DTLSEndpoint:
    """A UDP socket of the server's address family on an ephemeral port (one per device:
    trio keys DTLS channels by peer address, and each device is its own peer to the server)."""
    infos = await trio.socket.getaddrinfo(server[0], server[1], type=socket.SOCK_DGRAM)
    family = infos[0][0]
    sock = trio.socket.socket(family, socket.SOCK_DGRAM)
    try:
        await sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", 0))
    except BaseException:  # an error, or a power cut meanwhile: no socket left open
        sock.close()
        raise
    return trio.DTLSEndpoint(sock)


class DeviceRunner:
    """Runs one :class:`EmulatedDevice` over a real TLS or DTLS connection until cancelled."""

    def __init__(
        self,
        device: EmulatedDevice,
        link: LinkSettings,
        *,
        connect_slots: trio.Semaphore | None = None,
        rng: random.Random | None = None,
        wall_clock: bool = True,
    ) -> None:
        """``connect_slots`` bounds how many devices handshake at once (shared by a fleet);
        ``wall_clock``: the device has a real-time clock (set from this host's at start)."""
        self.device = device
        self.link = link
        self._wall_clock = wall_clock
        self._connect_slots = connect_slots
        self._rng = rng or random.Random()
        self._wake = trio.Event()
        self._tls_context: ssl.SSLContext | None = None
        self._tls_session: ssl.SSLSession | None = None
        self._dtls_session: SSL.Session | None = None
        self._hold_off = 0.0  # seconds the server asked us to stay away
        #: Failed connection attempts since the last session that went online.
        self.connect_failures = 0
        self.last_connect_error = ""
        #: Position in ``link.endpoints`` of the endpoint the device uses now.
        self.endpoint_index = 0
        #: Times the device moved on to its next endpoint.
        self.failovers = 0

    @property
    def server(self) -> tuple[str, int]:
        """The endpoint the device connects to now (or is connected to)."""
        return self.link.endpoints[self.endpoint_index]

    def _fail_over(self) -> None:
        """Move on to the next endpoint of the device's order (no-op with one endpoint)."""
        count = len(self.link.endpoints)
        if count > 1:
            self.endpoint_index = (self.endpoint_index + 1) % count
            self.failovers += 1

    # --- the application's API: change the machine, then wake the loop -------------------

    def wake(self) -> None:
        """Make the loop look at the machine now (after an application call)."""
        self._wake.set()

    def disable_updates(self) -> None:
        """``System.disableUpdates()``."""
        self.device.disable_updates()
        self.wake()

    def enable_updates(self) -> None:
        """``System.enableUpdates()``."""
        self.device.enable_updates()
        self.wake()

    def disable_reset(self) -> None:
        """``System.disableReset()``."""
        self.device.disable_reset()
        self.wake()

    def enable_reset(self) -> None:
        """``System.enableReset()``: a held reset happens now."""
        self.device.enable_reset()
        self.wake()

    def reset(self) -> None:
        """``System.reset()``."""
        self.device.reset()
        self.wake()

    def publish(self, name: str, data: str) -> None:
        """``Particle.publish(name, data)``."""
        self.device.publish(name, data)
        self.wake()

    # --- the loop ---------------------------------------------------------------------------

    async def run(self) -> None:
        """Boot and run the device until cancelled (a cancel is a power cut)."""
        device = self.device
        if self._wall_clock:
            device.set_wall_clock(time.time(), trio.current_time())
        device.boot(trio.current_time())
        while True:
            if not device.wants_link:
                await self._run_offline()
                continue
            boots = device.boots
            started = trio.current_time()
            connection = await self._connect()
            went_online = False
            if connection is not None:
                try:
                    went_online = await self._run_session(connection)
                except BaseException:  # a power cut (cancelled): the socket goes now
                    connection.cut()
                    raise
            if device.boots != boots:
                continue  # it reset: a booting device connects at once (same endpoint)
            # Refused, timed out, or the session ended without a reset: the next attempt
            # goes to the next endpoint, as a client tries a name's next DNS answer.
            self._fail_over()
            if self._hold_off and len(self.link.endpoints) > 1:
                # The hold-off asked this device to stay away from that endpoint only;
                # it goes to the next one after the ordinary back-off.
                self._hold_off = 0.0
            if self._hold_off:
                # The server said when to come back; spread the fleet over 1-1.5x of it.
                delay, self._hold_off = self._hold_off * (1 + 0.5 * self._rng.random()), 0.0
                await self._sleep_or_wake(delay)
                continue
            # A session that went online and lasted resets the back-off; one that was
            # refused, never answered Hello or ended at once counts as a failure, so a
            # server that drops devices right away is not hammered by reconnects.
            lasted = trio.current_time() - started >= SESSION_OK_AFTER
            self.connect_failures = 0 if went_online and lasted else self.connect_failures + 1
            await self._sleep_or_wake(self._backoff())

    def _backoff(self) -> float:
        """Exponential back-off with jitter: 0.5-1x of initial * 2**(failures - 1), capped."""
        exponent = min(max(self.connect_failures - 1, -1), 20)
        delay = min(self.link.backoff_max, self.link.backoff_initial * 2**exponent)
        return delay * (0.5 + 0.5 * self._rng.random())  # jitter spreads a fleet's retries

    async def _sleep_or_wake(self, seconds: float) -> None:
        with trio.move_on_after(seconds):
            await self._wait()

    async def _wait(self) -> None:
        await self._wake.wait()
        self._wake = trio.Event()

    async def _run_offline(self) -> None:
        """No link wanted (a trial image failing its self-test): just the machine's timers."""
        device = self.device
        deadline = device.next_deadline()
        with trio.move_on_at(math.inf if deadline is None else deadline):
            await self._wait()
        device.poll(trio.current_time())
        await self._obey(None, device.take_actions(), None)

    async def _connect(self) -> _Connection | None:
        link = self.link
        slots: AbstractAsyncContextManager[object] = (
            self._connect_slots if self._connect_slots is not None else nullcontext()
        )
        endpoint: trio.DTLSEndpoint | None = None
        async with slots:
            try:
                with trio.fail_after(link.connect_timeout):
                    if link.transport == "tcp":
                        if self._tls_context is None:
                            self._tls_context = link.credentials.tls_context()
                        stream = await connect_tls(
                            self.server,
                            link.credentials,
                            context=self._tls_context,
                            session=self._tls_session if link.resume_tls else None,
                        )
                        return _TlsConnection(stream)
                    endpoint = await _open_dtls_endpoint(self.server)
                    channel = await connect_dtls(
                        endpoint, self.server, link.credentials,
                        session=self._dtls_session if link.resume_tls else None,
                    )
                    return _DtlsConnection(endpoint, channel)
            except (trio.TooSlowError, *LINK_ERRORS) as exc:
                self.last_connect_error = f"{type(exc).__name__}: {exc}"
                if endpoint is not None:
                    endpoint.close()
                return None
            except BaseException:  # a power cut during the handshake (connect_tls and
                if endpoint is not None:  # connect_dtls close their own stream, channel)
                    endpoint.close()
                raise

    async def _run_session(self, connection: _Connection) -> bool:
        """One session: returns True when the server answered Hello."""
        device = self.device
        device.connected(self.link.transport, trio.current_time())
        lost: list[str] = []
        actions: list[DeviceAction] = []
        went_online = False
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._read, connection, lost)
            try:
                while True:
                    await self._send(connection)
                    went_online |= device.online
                    actions = device.take_actions()
                    if actions or lost:
                        break
                    # Sleep until the machine's next timer or news (a message, an app call);
                    # a deadline already due cancels at once, which is also a checkpoint.
                    deadline = device.next_deadline()
                    with trio.move_on_at(math.inf if deadline is None else deadline):
                        await self._wait()
                    device.poll(trio.current_time())
            except LINK_ERRORS as exc:
                lost.append(f"sending failed: {exc}")
            nursery.cancel_scope.cancel()
        if isinstance(connection, _TlsConnection) and went_online:
            self._tls_session = connection.stream.session
        elif isinstance(connection, _DtlsConnection) and went_online:
            self._dtls_session = dtls_session(connection.channel)
        await self._obey(connection, actions, lost[0] if lost else None)
        return went_online

    async def _read(self, connection: _Connection, lost: list[str]) -> None:
        try:
            while True:
                data = await connection.receive()
                self.device.receive(data, trio.current_time())
                self._wake.set()
        except LINK_ERRORS as exc:
            lost.append(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
            self._wake.set()

    async def _send(self, connection: _Connection) -> None:
        out = self.device.take_outgoing()
        if out:
            await connection.send(out)

    async def _obey(
        self, connection: _Connection | None, actions: list[DeviceAction], lost: str | None
    ) -> None:
        """Act on the machine's actions (and a lost link) after its last words are sent."""
        device = self.device
        actions = actions + device.take_actions()
        if connection is not None:
            with trio.move_on_after(1.0), suppress(*LINK_ERRORS):
                await self._send(connection)  # e.g. the Goodbye before a reset
            await connection.aclose()
        reboot = next((a for a in actions if isinstance(a, Reboot)), None)
        if reboot is not None:
            await trio.sleep(self.link.reboot_delay)
            device.boot(trio.current_time())
        elif connection is not None:
            disconnect = next((a for a in actions if isinstance(a, Disconnect)), None)
            if disconnect is not None:
                self._hold_off = disconnect.hold_off
            reason = lost or (disconnect.reason if disconnect else "the link closed")
            device.disconnected(trio.current_time(), reason)
