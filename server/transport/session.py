"""Device sessions shared by the TLS and DTLS shells: the session the CoAP layer sees
(:class:`DeviceSession`), the handler interface it plugs on top with, and why a session ends.

A session is bound to the device id named by its client certificate for its whole life. The
CoAP layer plugs on top through :class:`SessionHandler`; it sees only :class:`DeviceSession`.
The registry of live sessions is :mod:`server.transport.session_registry`; the code that
authorizes a handshake and runs one session's task tree is :mod:`server.transport.session_host`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Literal, Protocol

import trio

from otacore.errors import OtaError
from server.transport.limits import SessionLimits
from server.transport.timers import ProcessTimers

logger = logging.getLogger("otacloud.devices")

TransportName = Literal["tcp", "udp"]


class CloseReason:
    """Why a session ended (the values appear in logs and in :class:`TransportStats`)."""

    PEER = "closed by device"
    IDLE = "idle timeout"
    REVOKED = "device revoked"
    SHUTDOWN = "server shutdown"
    REPLACED = "replaced by a newer session of the same device"
    HANDLER_DONE = "handler finished"
    HANDLER_ERROR = "handler error"
    TRANSPORT_ERROR = "transport error"
    SEND_TIMEOUT = "send timeout"
    SERVER = "closed by server"
    STORE_UNAVAILABLE = "store unavailable"


class SessionClosed(OtaError):
    """The session has ended; ``reason`` (a :class:`CloseReason` value) says why.

    Raised by :meth:`DeviceSession.receive` and :meth:`DeviceSession.send`. A handler may
    let it propagate: the transport treats it as a normal end of the session.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(f"the device session has ended: {reason}")
        self.reason = reason


class DeviceSession:
    """One authenticated device connection, as the CoAP layer sees it.

    ``receive()`` returns one datagram (DTLS) or the next chunk of stream bytes (TLS) and
    raises :class:`SessionClosed` when the session ends. Whatever the device sends pushes
    the idle deadline ``limits.idle_timeout`` further; what the server sends does not: a
    device that vanished without a word (coverage lost, its NAT binding expired) is found
    out only by its silence, while the server may go on sending into the void (a
    transfer's probes, a CON's retransmissions, RFC 7252 4.2) for minutes.
    ``close()`` ends the session from any task; the handler's ``run`` is then cancelled.
    """

    __slots__ = (
        "_in_farewell",
        "_last_traffic",
        "_scope",
        "_timers",
        "close_reason",
        "device_id",
        "handler",
        "limits",
        "peer",
        "resumed",
        "started_at",
        "timer_at",
    )

    transport: TransportName

    def __init__(
        self, device_id: str, peer: tuple[str, int], limits: SessionLimits, resumed: bool
    ) -> None:
        #: The device id from the client certificate; fixed for the session's life.
        self.device_id = device_id
        #: The device's (address, port).
        self.peer = peer
        self.limits = limits
        #: True if the handshake resumed an earlier TLS/DTLS session (ticket).
        self.resumed = resumed
        #: trio.current_time() when the session started.
        self.started_at = trio.current_time()
        #: None while open, else a CloseReason value.
        self.close_reason: str | None = None
        #: What runs on top of the session (set by :meth:`SessionHost.run` as it starts
        #: the handler): the registry's sessions lead to their handlers, so no other map
        #: of live sessions has to be kept in step with it.
        self.handler: SessionHandler | None = None
        # True while the farewell hook runs: sends are allowed although the session closes.
        self._in_farewell = False
        # Cancelled by close(). Wraps the handler's run(); None once a detached session
        # no longer needs it (its handler runs as calls, outside any scope).
        self._scope: trio.CancelScope | None = trio.CancelScope()
        #: trio time the device was last heard (see :meth:`_touch`): the idle deadline
        #: counts from it. It lives in the process's one timer heap
        #: (``SessionHost.timers``, armed when the session runs), re-armed from here only
        #: when it falls due: a message costs an attribute write, not a deadline change.
        self._last_traffic = self.started_at
        self._timers: ProcessTimers | None = None
        #: The idle deadline armed in the timers (written by ProcessTimers).
        self.timer_at: float | None = None

    async def receive(self) -> bytes:
        """The next datagram (DTLS) or stream chunk (TLS); SessionClosed when it has ended."""
        raise NotImplementedError

    async def send(self, data: bytes) -> None:
        """Send one datagram (DTLS) or these stream bytes (TLS); SessionClosed if ended."""
        raise NotImplementedError

    async def send_window(self, messages: Sequence[bytes]) -> None:
        """Send a window of encoded CoAP messages, in order: over UDP each its own datagram,
        over TCP all of them as one piece of the stream. A session with its own record
        layer seals them in one batch (:meth:`TlsSession.send_window`); this default sends
        them through :meth:`send`. SessionClosed if the session has ended."""
        if not messages:
            return
        if self.transport == "tcp":
            await self.send(messages[0] if len(messages) == 1 else b"".join(messages))
            return
        for datagram in messages:
            await self.send(datagram)

    async def send_reply(self, messages: Sequence[bytes]) -> None:
        """Send the answers to what the session's reader just received, from the reader
        (which yields at its next receive): :meth:`send_window`, without the checkpoint
        where the transport can skip it (:meth:`TlsSession.send_reply`)."""
        await self.send_window(messages)

    @property
    def detached(self) -> bool:
        """True if the session runs with no task (see ``SessionHost.run``'s ``detach``)."""
        return False

    def send_window_nowait(self, messages: Sequence[bytes]) -> None:
        """Send a window without waiting (a caller that must not block: an evented
        handler's ``on_data``); only transports that detach sessions have it (DTLS)."""
        raise NotImplementedError(f"{type(self).__name__} cannot send without waiting")

    def close(self, reason: str = CloseReason.SERVER) -> None:
        """End the session (idempotent): cancels the handler, then the transport closes."""
        if self.close_reason is None:
            self.close_reason = reason
        if self._scope is not None:
            self._scope.cancel()
        if self._timers is not None and self.timer_at is not None:
            self._timers.disarm(self)

    @property
    def closed(self) -> bool:
        """True once the session has ended or is ending."""
        return self.close_reason is not None

    def _touch(self) -> None:
        """The device was heard: push the idle deadline (RFC 7252 section 4.3 keep-alive
        pings from the device, or any other message, keep the session open). Only what
        arrives from the device counts, never the server's own sends (see the class
        docstring): sending proves nothing about the peer."""
        self._last_traffic = trio.current_time()

    @property
    def idle_since(self) -> float:
        """trio time the device was last heard."""
        return self._last_traffic

    def start_idle_timer(self, timers: ProcessTimers) -> None:
        """Arm the idle deadline (``limits.idle_timeout`` after the last traffic) in the
        process's timers (:meth:`SessionHost.run` does, as the session starts)."""
        self._timers = timers
        timers.arm(self, self._last_traffic + self.limits.idle_timeout)

    def on_deadline(self, now: float) -> None:
        """The idle deadline came (the process's timers): close the session (IDLE) if the
        device has been silent for ``limits.idle_timeout``, else arm it again from the
        last time it was heard."""
        if self.close_reason is not None or self._timers is None:
            return
        deadline = self._last_traffic + self.limits.idle_timeout
        if now >= deadline:
            self.close(CloseReason.IDLE)
        else:
            self._timers.arm(self, deadline)

    def _check_can_send(self) -> None:
        if self.close_reason is not None and not self._in_farewell:
            raise SessionClosed(self.close_reason)

    async def _farewell(self, handler: SessionHandler) -> None:
        """Run the handler's farewell hook (graceful shutdown only); never raises."""
        if self.close_reason != CloseReason.SHUTDOWN:
            return
        self._in_farewell = True
        try:
            await handler.farewell(self)
        except SessionClosed:
            pass
        except Exception:
            logger.exception("farewell hook failed for device %s", self.device_id)
        finally:
            self._in_farewell = False

    def _ended(self, reason: str) -> SessionClosed:
        if self.close_reason is None:
            self.close_reason = reason
        return SessionClosed(self.close_reason)

    async def _farewell_then_close(self, handler: SessionHandler) -> None:
        """Transport-specific: give the handler its farewell hook, then close gracefully."""
        raise NotImplementedError

    def _close_now(self) -> None:
        """Transport-specific: release everything at once without sending anything."""
        raise NotImplementedError

    def __repr__(self) -> str:
        state = self.close_reason or "open"
        return f"<{type(self).__name__} {self.device_id} {self.transport} {self.peer} {state}>"


class SessionHandler(Protocol):
    """What runs on top of a session (the CoAP layer)."""

    async def run(self, session: DeviceSession) -> None:
        """Serve the device until it leaves; may raise SessionClosed. Cancelled by close()."""
        ...

    async def farewell(self, session: DeviceSession) -> None:
        """On graceful server shutdown: send a last message (e.g. CoAP over TCP Release,
        RFC 8323 section 5.5, with Hold-Off) telling the device when to come back. Called
        after ``run`` was cancelled, within ``limits.farewell_timeout``; may do nothing."""
        ...


class EventedHandler(SessionHandler, Protocol):
    """A handler that can run as calls instead of a task (issue 14 item 5: an idle DTLS
    session then has no task). The transport calls ``start`` (in the session's starting
    task), then ``on_data`` for each message it receives (synchronously, from its reader:
    it must never block; work that waits runs in tasks the handler starts on demand), then
    ``finish`` once the session closed, before the farewell."""

    async def start(self, session: DeviceSession) -> None:
        """Begin the session (e.g. record the device online)."""
        ...

    def on_data(self, data: bytes) -> None:
        """One received message (a datagram's plaintext); never blocks."""
        ...

    async def finish(self, session: DeviceSession) -> None:
        """The session closed: end the handler's tasks and record what must be."""
        ...

    @property
    def streaming(self) -> bool:
        """True while a transfer runs: the transport then keeps the record layer's cipher
        objects between datagrams instead of dropping them at each quiet moment."""
        ...


def is_evented(handler: object) -> bool:
    """True if ``handler`` has the :class:`EventedHandler` methods."""
    methods = ("start", "on_data", "finish")
    return all(callable(getattr(handler, name, None)) for name in methods) and hasattr(
        type(handler), "streaming")


#: Makes the handler for a new session (it may return one shared handler object).
HandlerFactory = Callable[[DeviceSession], SessionHandler]
