"""Device sessions shared by the TLS and DTLS shells: the handler interface, the registry of
live sessions, and the code that authorizes a handshake and runs one session's task tree.

A session is bound to the device id named by its client certificate for its whole life. The
CoAP layer plugs on top through :class:`SessionHandler`; it sees only :class:`DeviceSession`.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import Literal, Protocol, cast

import trio

from otacore.errors import OtaError
from server import metrics
from server.authorization import DeviceDirectory, DeviceIdCache
from server.identity import CertificateRejectedError
from server.transport.admission import AdmissionClosed, HandshakeGate, NotAdmitted
from server.transport.limits import SessionLimits
from server.transport.refusals import RefusalLog
from server.transport.timers import ProcessTimers

logger = logging.getLogger("otacloud.devices")

TransportName = Literal["tcp", "udp"]
#: Seconds a revocation is remembered to catch authorizations that were in flight when it
#: happened (far longer than any handshake may take).
REVOCATION_MEMORY = 600.0


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


class RefuseReason:
    """Why a connection attempt was refused before a session started."""

    HANDSHAKE_FAILED = "handshake failed"
    HANDSHAKE_TIMEOUT = "handshake timeout"
    BAD_CERTIFICATE = "certificate names no device"
    NOT_AUTHORIZED = "device unknown or revoked"
    DIRECTORY_ERROR = "device directory failed"
    SERVER_FULL = "too many sessions"
    SERVER_BUSY = "waited too long for a handshake slot"
    ADDRESS_BUSY = "too many pending connections from one address"
    SILENT = "no ClientHello in time"
    SHUTTING_DOWN = "server shutting down"


#: A refusal's metric label: the reason's name (``server_busy``), a bounded set.
_REFUSAL_LABELS = {value: name.lower() for name, value in vars(RefuseReason).items()
                   if name.isupper()}
#: Refusals that are a failed handshake (ota_handshakes_total{result="failed"}).
_FAILED_HANDSHAKES = frozenset({RefuseReason.HANDSHAKE_FAILED, RefuseReason.HANDSHAKE_TIMEOUT})

#: Refusals about capacity or abuse: logged at WARNING (aggregated, see RefusalLog).
_WARNING_REASONS = frozenset(
    {
        RefuseReason.SERVER_FULL,
        RefuseReason.SERVER_BUSY,
        RefuseReason.ADDRESS_BUSY,
        RefuseReason.SILENT,
        RefuseReason.HANDSHAKE_TIMEOUT,
    }
)


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
    raises :class:`SessionClosed` when the session ends. Any traffic in either direction
    pushes the idle deadline ``limits.idle_timeout`` further. ``close()`` ends the session
    from any task; the handler's ``run`` is then cancelled.
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
        #: trio time of the session's last traffic: the idle deadline counts from it. It
        #: lives in the process's one timer heap (``SessionHost.timers``, armed when the
        #: session runs), re-armed from here only when it falls due: a message costs an
        #: attribute write, not a deadline change.
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
        """Traffic happened: push the idle deadline (RFC 7252 section 4.3 keep-alive pings
        from the device, or any other message, keep the session open)."""
        self._last_traffic = trio.current_time()

    @property
    def idle_since(self) -> float:
        """trio time of the session's last traffic."""
        return self._last_traffic

    def start_idle_timer(self, timers: ProcessTimers) -> None:
        """Arm the idle deadline (``limits.idle_timeout`` after the last traffic) in the
        process's timers (:meth:`SessionHost.run` does, as the session starts)."""
        self._timers = timers
        timers.arm(self, self._last_traffic + self.limits.idle_timeout)

    def on_deadline(self, now: float) -> None:
        """The idle deadline came (the process's timers): close the session (IDLE) if it
        has had no traffic for ``limits.idle_timeout``, else arm it again from the last."""
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


class SessionRegistry:
    """Live sessions by device id, one per device: a new session replaces the older one.

    The control plane calls :meth:`close_device` when a device is revoked.
    """

    __slots__ = ("_by_device", "_revoked_at")

    def __init__(self) -> None:
        self._by_device: dict[str, DeviceSession] = {}
        # device id -> trio time of its last revocation, oldest first (see revoked_since).
        self._revoked_at: dict[str, float] = {}

    def register(self, session: DeviceSession) -> None:
        """Record ``session``; an older session of the same device is closed (REPLACED)."""
        older = self._by_device.get(session.device_id)
        if older is session:
            return
        if older is not None:
            older.close(CloseReason.REPLACED)
            metrics.session_ended(older.transport)
        self._by_device[session.device_id] = session
        metrics.session_started(session.transport)

    def unregister(self, session: DeviceSession) -> None:
        """Forget ``session`` (no-op if a newer session of its device replaced it)."""
        if self._by_device.get(session.device_id) is session:
            del self._by_device[session.device_id]
            metrics.session_ended(session.transport)

    def get(self, device_id: str) -> DeviceSession | None:
        """The live session of ``device_id``, if any."""
        return self._by_device.get(device_id)

    def handler(self, device_id: str) -> SessionHandler | None:
        """The handler of ``device_id``'s live session, if it has one yet."""
        session = self._by_device.get(device_id)
        return session.handler if session is not None else None

    def close_device(self, device_id: str, reason: str = CloseReason.REVOKED) -> bool:
        """Close the live session of ``device_id``; True if there was one. A revocation
        (the default reason) is also remembered for :meth:`revoked_since`."""
        if reason == CloseReason.REVOKED:
            self._note_revoked(device_id)
        session = self._by_device.get(device_id)
        if session is None:
            return False
        session.close(reason)
        return True

    def _note_revoked(self, device_id: str) -> None:
        now = trio.current_time()
        self._revoked_at.pop(device_id, None)
        self._revoked_at[device_id] = now  # newest last
        while self._revoked_at:  # forget what no authorization in flight can predate
            oldest, at = next(iter(self._revoked_at.items()))
            if now - at <= REVOCATION_MEMORY:
                break
            del self._revoked_at[oldest]

    def revoked_since(self, device_id: str, since: float) -> bool:
        """True if ``device_id`` was revoked (:meth:`close_device`) at or after trio time
        ``since``: an authorization asked before then may be stale."""
        at = self._revoked_at.get(device_id)
        return at is not None and at >= since

    def close_all(self, reason: str) -> int:
        """Close every live session; return how many."""
        sessions = list(self._by_device.values())
        for session in sessions:
            session.close(reason)
        return len(sessions)

    def __len__(self) -> int:
        return len(self._by_device)

    def __iter__(self) -> Iterator[DeviceSession]:
        return iter(list(self._by_device.values()))

    def __contains__(self, device_id: object) -> bool:
        return device_id in self._by_device


class TransportStats:
    """Counters for monitoring and tests: keys are ``(transport, reason)``."""

    __slots__ = ("closed", "full_handshakes", "refused", "resumed_handshakes")

    def __init__(self) -> None:
        self.full_handshakes: Counter[str] = Counter()
        self.resumed_handshakes: Counter[str] = Counter()
        self.refused: Counter[tuple[str, str]] = Counter()
        self.closed: Counter[tuple[str, str]] = Counter()


class SessionHost:
    """What both listeners share: authorization, the registry, limits, stats, and the
    code that runs one session from authorization to close."""

    def __init__(
        self,
        *,
        directory: DeviceDirectory,
        handler_factory: HandlerFactory,
        registry: SessionRegistry,
        limits: SessionLimits,
        timers: ProcessTimers | None = None,
    ) -> None:
        self.directory = directory
        #: The process's one timer heap (link retransmissions, idle deadlines of sessions
        #: with no task); served by its owner's task: the caller's when given, else
        #: :attr:`owns_timers` asks the listeners to serve it.
        self.timers = timers if timers is not None else ProcessTimers()
        self.owns_timers = timers is None
        self.handler_factory = handler_factory
        self.registry = registry
        self.limits = limits
        self.stats = TransportStats()
        self.id_cache = DeviceIdCache()
        #: False once shutdown began: new handshakes are refused.
        self.accepting = True
        #: Connections being served (handshaking or in session), per transport.
        self.live: Counter[str] = Counter()
        #: Pending connections per source address, and the handshake slots.
        self.gate = HandshakeGate(limits)
        #: Refusals worth an operator's attention, aggregated (see :meth:`report_refusals`).
        self.refusals = RefusalLog(limits.refusal_log_interval)
        self._refusals_due = trio.Event()
        self._hello_waits: set[trio.CancelScope] = set()
        self._idle_event: trio.Event | None = None

    def refuse(self, transport: str, reason: str, peer: object, detail: str = "") -> None:
        """Count and log a refused connection: capacity and abuse refusals at WARNING
        (the first of a burst at once, then one summary per ``refusal_log_interval``),
        authorization refusals at INFO, the rest at DEBUG."""
        self.stats.refused[(transport, reason)] += 1
        metrics.refused(transport, _REFUSAL_LABELS.get(reason, "other"))
        if reason in _FAILED_HANDSHAKES:
            metrics.handshake_failed(transport)
        if reason in _WARNING_REASONS:
            host = str(peer[0]) if isinstance(peer, tuple) and peer else str(peer)
            line = self.refusals.note(trio.current_time(), transport, reason, host, detail)
            if line is not None:
                logger.warning("%s", line, extra={"event": "session_refused",
                                                  "transport": transport, "reason": str(reason),
                                                  "address": host, "detail": detail})
                self._refusals_due.set()
            return
        level = logging.INFO if reason == RefuseReason.NOT_AUTHORIZED else logging.DEBUG
        logger.log(
            level, "refused %s device connection from %s: %s %s", transport, peer, reason, detail,
            extra={"event": "session_refused", "transport": transport, "reason": str(reason),
                   "address": str(peer[0]) if isinstance(peer, tuple) and peer else str(peer),
                   "detail": detail},
        )

    async def report_refusals(self) -> None:
        """Log the refusal summaries as they fall due; runs as long as the listeners."""
        while True:
            await self._refusals_due.wait()
            self._refusals_due = trio.Event()
            while (deadline := self.refusals.deadline) is not None:
                await trio.sleep_until(deadline)
                line = self.refusals.flush(trio.current_time())
                if line is not None:
                    logger.warning("%s", line, extra={"event": "session_refusals_summary"})

    def has_room(self, transport: str) -> bool:
        """True if a new connection on ``transport`` stays within ``limits.max_sessions``."""
        return self.live[transport] < self.limits.max_sessions

    def enter_pending(self, transport: str, peer: tuple[str, int]) -> tuple[str, ...] | None:
        """Count a new connection as pending for its source and return the source's keys
        (see :class:`HandshakeGate`), or refuse it (None) when its address or IPv6 network
        has too many pending connections already. After keys, call :meth:`leave_pending`
        once the connection is refused or its session starts."""
        keys = self.gate.keys(peer[0])
        full = self.gate.enter(keys)
        if full is None:
            return keys
        self.refuse(transport, RefuseReason.ADDRESS_BUSY, peer, full)
        return None

    def leave_pending(self, keys: tuple[str, ...]) -> None:
        """The pending connection counted by :meth:`enter_pending` was refused or started."""
        self.gate.leave(keys)

    async def wait_for_hello(self, transport: str, sock: trio.socket.SocketType,
                             peer: tuple[str, int]) -> bool:
        """Wait until ``sock`` has bytes to read (the ClientHello) without holding any
        handshake slot; False (refused) if none came within ``limits.hello_timeout`` or
        the server began shutting down meanwhile."""
        with trio.CancelScope(deadline=trio.current_time() + self.limits.hello_timeout) as scope:
            self._hello_waits.add(scope)
            try:
                await trio.lowlevel.wait_readable(sock)
            finally:
                self._hello_waits.discard(scope)
        if not scope.cancelled_caught:
            return True
        if not self.accepting:
            self.refuse(transport, RefuseReason.SHUTTING_DOWN, peer)
        else:
            self.refuse(
                transport,
                RefuseReason.SILENT,
                peer,
                f"nothing received within {self.limits.hello_timeout:g} s of connecting "
                "(ota server --device-limit hello_timeout=SECONDS)",
            )
        return False

    def stop_accepting(self) -> None:
        """Shutdown began: refuse new handshakes, and stop waiting for ClientHellos."""
        self.accepting = False
        self.gate.accepting = False
        for scope in list(self._hello_waits):
            scope.cancel()

    def refuse_unadmitted(self, transport: str, peer: object, error: NotAdmitted) -> None:
        """Count and log a connection that got no handshake slot (``error`` says why)."""
        if isinstance(error, AdmissionClosed):
            self.refuse(transport, RefuseReason.SHUTTING_DOWN, peer)
        else:
            self.refuse(transport, RefuseReason.SERVER_BUSY, peer, str(error))

    @property
    def handshakes_in_progress(self) -> int:
        """Handshake slots held right now (TLS handshakes computing or authorizing, DTLS
        handshakes in progress)."""
        return self.gate.tls.borrowed + self.gate.dtls.borrowed

    @property
    def handshakes_waiting(self) -> int:
        """Takes of handshake slots waiting now (their source's share or the process's)."""
        return self.gate.waiting()

    @property
    def pending_connections(self) -> int:
        """Connections accepted whose session has not started (nor been refused) yet."""
        return self.gate.total_pending()

    def connection_started(self, transport: str) -> None:
        """Count a connection from accept (or cookie exchange) on."""
        self.live[transport] += 1

    def connection_ended(self, transport: str) -> None:
        """Count a connection's end; wakes :meth:`wait_all_closed`."""
        self.live[transport] -= 1
        if self._idle_event is not None and sum(self.live.values()) == 0:
            self._idle_event.set()

    async def wait_all_closed(self) -> None:
        """Return once no connection is being served."""
        while sum(self.live.values()) > 0:
            self._idle_event = trio.Event()
            await self._idle_event.wait()
        await trio.lowlevel.checkpoint()

    async def authorize(self, transport: str, der: bytes | None, peer: object) -> str | None:
        """The device id for a client certificate if the device may connect, else None
        (the refusal is counted and logged)."""
        if der is None:
            self.refuse(transport, RefuseReason.BAD_CERTIFICATE, peer, "(no client certificate)")
            return None
        try:
            certificate = self.id_cache.certificate(der)
        except CertificateRejectedError as exc:
            self.refuse(transport, RefuseReason.BAD_CERTIFICATE, peer, str(exc))
            return None
        device_id = certificate.device_id
        if not self.accepting:
            self.refuse(transport, RefuseReason.SHUTTING_DOWN, peer, device_id)
            return None
        asked_at = trio.current_time()
        try:
            allowed = await self.directory.authorize(certificate)
        except Exception:
            logger.exception("the device directory failed to authorize %s", device_id)
            self.refuse(transport, RefuseReason.DIRECTORY_ERROR, peer, device_id)
            return None
        # A revocation that committed after the directory's answer, and whose event came
        # while it travelled back, found no session to close: the answer is stale.
        if allowed and self.registry.revoked_since(device_id, asked_at):
            allowed = False
        if allowed and not self.accepting:
            # Shutdown began while the directory answered: it has closed every session
            # already, so one starting now would outlive it.
            self.refuse(transport, RefuseReason.SHUTTING_DOWN, peer, device_id)
            return None
        if not allowed:
            self.refuse(
                transport, RefuseReason.NOT_AUTHORIZED, peer,
                f"{device_id} (certificate {certificate.sha256[:16]}...)",
            )
            return None
        return device_id

    async def run(
        self, session: DeviceSession, *,
        detach: Callable[[EventedHandler], bool] | None = None,
    ) -> bool:
        """Run ``session``'s handler, then close the session (gracefully when possible).

        A handler error ends only its own session. An outside cancellation (the server is
        being torn down) closes the connection at once without waiting on the device.

        ``detach`` (a transport that can deliver data by calls: DTLS): a handler with the
        :class:`EventedHandler` methods is started (``start``), then ``detach(handler)``
        hands the session over to the transport, which delivers each datagram to
        ``handler.on_data`` and, once the session closes, runs :meth:`end_detached` in a
        task of its own. Returns True then: the session lives on with no task. False when
        the session ended here.
        """
        transport = session.transport
        counter = self.stats.resumed_handshakes if session.resumed else self.stats.full_handshakes
        counter[transport] += 1
        # A DTLS session restored after a restart had no handshake in this process.
        kind = ("restored" if getattr(session, "restored", False)
                else "resumed" if session.resumed else "full")
        metrics.handshake_ok(transport, kind)
        self.registry.register(session)
        session.start_idle_timer(self.timers)
        handler: SessionHandler | None = None
        evented: EventedHandler | None = None
        detached = False
        scope = session._scope
        assert scope is not None, "a session runs once"
        try:
            with scope:
                try:
                    handler = self.handler_factory(session)
                    session.handler = handler
                    if detach is not None and is_evented(handler):
                        evented = cast("EventedHandler", handler)
                        await evented.start(session)
                        detached = not session.closed and detach(evented)
                        if detached:
                            return True
                    else:
                        await handler.run(session)
                    session._ended(CloseReason.HANDLER_DONE)
                except SessionClosed:
                    pass
                except Exception:
                    logger.exception("session handler of device %s failed", session.device_id)
                    session._ended(CloseReason.HANDLER_ERROR)
            if session.close_reason is None:  # a handler that returned closes it above
                session.close_reason = CloseReason.IDLE
            if evented is not None:  # started, never detached: end it as run() would
                await self._finish(session, evented)
            self.registry.unregister(session)
            await session._farewell_then_close(handler if handler is not None else _NO_HANDLER)
        except BaseException:
            session._ended(CloseReason.SERVER)
            session._close_now()
            raise
        finally:
            if not detached:
                self.timers.disarm(session)
                self.registry.unregister(session)
                self.stats.closed[(transport, session.close_reason or CloseReason.SERVER)] += 1
        return False

    async def end_detached(self, session: DeviceSession, handler: EventedHandler) -> None:
        """End a session :meth:`run` detached, once it closed (the transport calls it in a
        task started then): the handler's ``finish``, then the farewell or close as
        :meth:`run` does."""
        transport = session.transport
        try:
            await self._finish(session, handler)
            self.registry.unregister(session)
            await session._farewell_then_close(handler)
        except BaseException:
            session._ended(CloseReason.SERVER)
            session._close_now()
            raise
        finally:
            self.registry.unregister(session)
            self.stats.closed[(transport, session.close_reason or CloseReason.SERVER)] += 1

    @staticmethod
    async def _finish(session: DeviceSession, handler: EventedHandler) -> None:
        """The handler's ``finish`` (shielded: the session's own scope may be cancelled);
        an error in it is logged, the close goes on."""
        with trio.CancelScope(shield=True):
            try:
                await handler.finish(session)
            except Exception:
                logger.exception("session handler of device %s failed to finish",
                                 session.device_id)


class _NoHandler:
    async def run(self, session: DeviceSession) -> None:
        await trio.lowlevel.checkpoint()

    async def farewell(self, session: DeviceSession) -> None:
        await trio.lowlevel.checkpoint()


_NO_HANDLER = _NoHandler()
