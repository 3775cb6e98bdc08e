"""What the TLS and DTLS listeners share: the :class:`SessionHost` that authorizes a
handshake, counts and logs refused connections (:class:`RefuseReason`), and runs one
session's task tree from authorization to close, with its counters (:class:`TransportStats`).

Separate from :mod:`server.transport.session` (the session and handler interfaces the CoAP
layer sees) and :mod:`server.transport.session_registry` (the live sessions): the host is the
listeners' side, admission and authorization included.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from typing import cast

import trio

from server import metrics
from server.authorization import DeviceDirectory, DeviceIdCache
from server.identity import CertificateRejectedError
from server.store.errors import StoreUnavailableError
from server.transport.admission import AdmissionClosed, HandshakeGate, NotAdmitted
from server.transport.limits import SessionLimits
from server.transport.refusals import RefusalLog
from server.transport.session import (
    CloseReason,
    DeviceSession,
    EventedHandler,
    HandlerFactory,
    SessionClosed,
    SessionHandler,
    is_evented,
    logger,
)
from server.transport.session_registry import SessionRegistry
from server.transport.timers import ProcessTimers


class RefuseReason:
    """Why a connection attempt was refused before a session started."""

    HANDSHAKE_FAILED = "handshake failed"
    HANDSHAKE_TIMEOUT = "handshake timeout"
    BAD_CERTIFICATE = "certificate names no device"
    NOT_AUTHORIZED = "device unknown or revoked"
    DIRECTORY_ERROR = "device directory failed"
    STORE_UNAVAILABLE = "store unavailable"
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
        # A database restart or cut refuses every device that connects meanwhile: one
        # aggregated line per burst, not a traceback per device.
        RefuseReason.STORE_UNAVAILABLE,
    }
)


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
        except StoreUnavailableError as exc:  # for now: the device's back-off tries again
            self.refuse(transport, RefuseReason.STORE_UNAVAILABLE, peer, f"{device_id}: {exc}")
            return None
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
                except StoreUnavailableError as exc:
                    # The session's first write (its presence) found the database away (a
                    # restart, a cut): counted and logged as a refusal (one line per burst,
                    # not a traceback per device); the device's back-off tries again.
                    self.refuse(transport, RefuseReason.STORE_UNAVAILABLE, session.peer,
                                f"{session.device_id}: {exc}")
                    session._ended(CloseReason.STORE_UNAVAILABLE)
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
