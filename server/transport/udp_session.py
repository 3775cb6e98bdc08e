"""An established DTLS 1.2 session on the server: our record layer, not an OpenSSL object.

:class:`DtlsLink` is what the UDP endpoint (``udp_endpoint``) keeps per established peer:
the :class:`~otacore.records.dtls12.DtlsRecordLayer` and a bounded queue of plaintexts not
yet read. The endpoint's reader task opens each datagram as it arrives
(:meth:`DtlsLink.on_datagram`) and answers what the record layer asks at once (our
close_notify answering the peer's, our last flight when the peer repeats its Finished, the
no_renegotiation alert). :class:`DtlsSession` is the :class:`DeviceSession` the CoAP layer
sees over it: ``receive()`` returns the next application-data plaintext, ``send()`` seals
one record per datagram. A session whose handler runs as calls is *detached*
(:meth:`DtlsSession.detach`): no task reads it; each plaintext goes to the handler from the
endpoint's reader, and it has no task at all while idle (issue 14 item 5).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import trio

from otacore.errors import RecordError
from otacore.records.dtls12 import (
    ApplicationData,
    DtlsRecordLayer,
    NewHandshakeRequested,
    PeerAlert,
    PeerRepeatedFlight,
    RecordDiscarded,
    RenegotiationRefused,
    SessionClosed,
)
from otacore.records.dtls12_events import AlertDescription
from server.authorization import ClientCertificate
from server.transport.limits import SessionLimits, TokenBucket
from server.transport.session import (
    CloseReason,
    DeviceSession,
    EventedHandler,
    SessionHandler,
    logger,
)
from server.transport.session import SessionClosed as DeviceSessionClosed
from server.transport.session_host import SessionHost

__all__ = ["Address", "DatagramSender", "DtlsLink", "DtlsSession", "SuspendableHandler"]

#: A socket address as recvfrom reports it: (host, port) or IPv6's 4-tuple.
Address = tuple[Any, ...]


class DatagramSender(Protocol):
    """What a link needs of its endpoint."""

    def send_now(self, datagram: bytes, address: Address) -> bool:
        """Send without waiting; False if the socket's buffer is full (nothing sent)."""
        ...

    async def send(self, datagram: bytes, address: Address) -> None:
        """Send, waiting for room in the socket's buffer if need be."""
        ...

    def note_discarded(self, event: RecordDiscarded) -> None:
        """Count a record the layer discarded."""
        ...

    def forget(self, link: DtlsLink) -> None:
        """The session is over: datagrams from its address are strangers' again."""
        ...

    def end_session(self, session: DtlsSession, handler: EventedHandler) -> None:
        """A detached session closed: run its end (``SessionHost.end_detached``) in a
        task of the endpoint's nursery."""
        ...

    def spawn_sender(self, session: DtlsSession) -> None:
        """Start a task that sends ``session``'s backlog (the socket buffer was full)."""
        ...

    def keep(self, session: DtlsSession, handler: SessionHandler) -> bool:
        """On graceful shutdown: save ``session`` to be restored by the next process
        instead of closing it; False if sessions are not being saved (close it)."""
        ...


class SuspendableHandler(Protocol):
    """A session handler that can carry its state across a graceful restart (optional:
    the endpoint looks for ``suspend`` on the handler). The next process's handler finds
    the bytes in ``DtlsSession.restored_state`` (e.g. the CoAP layer's next message id, so
    the device does not take new messages for duplicates, RFC 7252 4.5)."""

    def suspend(self, session: DtlsSession) -> bytes:
        """The handler's state to restore with ``session`` (small; sealed at rest).
        Called as the shutdown closes the session, before the handler's ``finish``, which
        finds ``session.saved`` True: the session is not over for its device.

        A handler may also have ``async def not_saved(session)``: called if the saved
        sessions could not be written after all (the session is over; e.g. mark the
        device offline)."""
        ...


class DtlsLink:
    """One established peer as the endpoint's reader sees it (see the module docstring)."""

    __slots__ = (
        "_bucket",
        "_waiter",
        "address",
        "certificate",
        "dropped",
        "ended",
        "endpoint",
        "inbox",
        "layer",
        "limits",
        "overflowed",
        "queue_size",
        "session",
    )

    def __init__(
        self,
        address: Address,
        layer: DtlsRecordLayer,
        endpoint: DatagramSender,
        queue_size: int,
        limits: SessionLimits,
    ) -> None:
        #: The peer's socket address, as recvfrom reports it.
        self.address = address
        #: The device certificate the session was authorized with (set once authorized;
        #: saved with the session on graceful shutdown and authorized again on restore).
        self.certificate: ClientCertificate | None = None
        self.layer = layer
        self.endpoint = endpoint
        self.limits = limits
        #: Plaintexts received and not yet read (at most ``queue_size``, so a list's
        #: pop(0) is cheap; a deque costs 600 bytes), None while there are none: a
        #: detached session never has any (each goes straight to its handler), and an
        #: empty list would cost 56 bytes per idle session.
        self.inbox: list[bytes] | None = None
        self.queue_size = queue_size
        #: None while open; a CloseReason value once the peer closed or broke the session.
        self.ended: str | None = None
        #: Datagrams dropped for size or rate (``limits``), and for a full queue.
        self.dropped = 0
        self.overflowed = 0
        self._bucket: TokenBucket | None = None
        self._waiter: trio.lowlevel.Task | None = None
        #: The session, once detached (it has no task: each plaintext goes straight to
        #: its handler, see DtlsSession.detach); None while a task reads the inbox.
        self.session: DtlsSession | None = None

    def on_datagram(self, datagram: bytes) -> bool:
        """Open a datagram from the peer and act on it; True if it starts a new handshake
        (RFC 6347 4.2.8: the endpoint decides, after a cookie exchange)."""
        for event in self.layer.open_datagram(datagram):
            if isinstance(event, ApplicationData):
                self._deliver(event.data)
            elif isinstance(event, RecordDiscarded):
                self.endpoint.note_discarded(event)
            elif isinstance(event, SessionClosed):
                if event.reply:
                    self.endpoint.send_now(event.reply, self.address)
                closed_by_peer = event.by_peer and event.alert == AlertDescription.CLOSE_NOTIFY
                self.ended = CloseReason.PEER if closed_by_peer else CloseReason.TRANSPORT_ERROR
                logger.debug("DTLS peer %s ended the session (alert %d, by peer %s)",
                             self.address, event.alert, event.by_peer)  # fmt: skip
                self.wake()
            elif isinstance(event, PeerRepeatedFlight):
                for reply in event.replies:
                    self.endpoint.send_now(reply, self.address)
            elif isinstance(event, RenegotiationRefused):
                self.endpoint.send_now(event.reply, self.address)
            elif isinstance(event, PeerAlert):
                logger.debug("DTLS peer %s sent warning alert %d", self.address, event.description)
            elif isinstance(event, NewHandshakeRequested):
                return True
        return False

    def _deliver(self, data: bytes) -> None:
        limits = self.limits
        now = trio.current_time()
        if self._bucket is None:
            self._bucket = TokenBucket(limits.messages_per_second, limits.message_burst, now)
        # Over the size or rate limit: dropped, as CoAP over UDP allows (RFC 7252 4.2).
        if len(data) > limits.max_message_size or not self._bucket.try_take(1.0, now):
            self.dropped += 1
            return
        session = self.session
        if session is not None:
            session.on_data(data, now)
            return
        inbox = self.inbox
        if inbox is None:
            inbox = self.inbox = []
        if len(inbox) >= self.queue_size:
            self.overflowed += 1  # the handler is behind: drop the newest, as UDP may
            return
        inbox.append(data)
        self.wake()

    def wake(self) -> None:
        """Resume the task waiting in :meth:`wait`, if any; a detached session whose
        link has ended is closed."""
        session = self.session
        if session is not None:
            if self.ended is not None:
                session.close(self.ended)
            return
        task = self._waiter
        if task is not None:
            self._waiter = None
            trio.lowlevel.reschedule(task)

    def start_waiting(self) -> None:
        """The current task will wait for :meth:`wake` (one task at a time): then call
        ``trio.lowlevel.wait_task_rescheduled(link.abort_wait)`` (inline, so that an idle
        session costs one coroutine frame less: its waiting task is its only state)."""
        if self._waiter is not None:
            raise trio.BusyResourceError("another task is already receiving on this session")
        self._waiter = trio.lowlevel.current_task()

    def abort_wait(self, _raise_cancel: object) -> trio.lowlevel.Abort:
        """The waiting task was cancelled."""
        self._waiter = None
        return trio.lowlevel.Abort.SUCCEEDED


class DtlsSession(DeviceSession):
    """A device session over DTLS; ``receive()`` returns one datagram's plaintext."""

    __slots__ = ("_backlog", "_ending", "_evented", "_saved", "link", "restored_state")

    transport = "udp"

    def __init__(
        self,
        link: DtlsLink,
        device_id: str,
        peer: tuple[str, int],
        host: SessionHost,
        resumed: bool,
        restored_state: bytes | None = None,
        idle_for: float = 0.0,
    ) -> None:
        super().__init__(device_id, peer, host.limits, resumed)
        self.link = link
        # Restored: the idle deadline counts from the traffic before the restart.
        self._last_traffic -= max(0.0, idle_for)
        #: The handler once detached (see detach); None while a task runs the session.
        self._evented: EventedHandler | None = None
        #: True once a detached session's end was started.
        self._ending = False
        #: True once saved for the next process (see :meth:`close`).
        self._saved = False
        #: Records the socket did not take yet (its buffer was full), oldest first: a
        #: task of the endpoint sends them; None when there are none.
        self._backlog: list[bytes] | None = None
        #: None for a session that began with a handshake; for one restored after a
        #: graceful restart, what its handler saved (``SuspendableHandler``; b"" if none).
        #: ``idle_for``: seconds the restored session had been idle (before and during
        #: the restart), so it expires when it would have without the restart.
        self.restored_state = restored_state

    @property
    def restored(self) -> bool:
        """True if this session was saved by the previous server process and restored."""
        return self.restored_state is not None

    @property
    def detached(self) -> bool:
        """True once the session runs with no task (see :meth:`detach`)."""
        return self._evented is not None

    # --- a session with no task (issue 14 item 5) ---------------------------------------

    def detach(self, handler: EventedHandler) -> bool:
        """Hand the session to the endpoint's reader: from now on each plaintext goes to
        ``handler.on_data`` as it is opened, the idle deadline lives in the process's
        timers, and closing the session starts its end in a task of the endpoint. What
        arrived while the handler started is delivered now."""
        link = self.link
        self._evented = handler
        link.session = self
        inbox, link.inbox = link.inbox, None
        now = trio.current_time()
        for data in inbox or ():
            self.on_data(data, now)
        if link.ended is not None:
            self.close(link.ended)
        # The scope SessionHost.run wraps the start in ends as detach returns: nothing can
        # cancel into it after, so an idle session does not keep it (~110 bytes).
        self._scope = None
        return True

    def on_data(self, data: bytes, now: float) -> None:
        """A plaintext for a detached session's handler (from the endpoint's reader)."""
        handler = self._evented
        if handler is None or self.close_reason is not None:
            return
        self._last_traffic = now
        try:
            handler.on_data(data)
        except DeviceSessionClosed:
            pass
        except Exception:
            logger.exception("session handler of device %s failed", self.device_id)
            self.close(CloseReason.HANDLER_ERROR)
        if self._backlog is None and not handler.streaming:
            # Quiet again: the AEAD objects hold ~2.3 KB of OpenSSL state each; the next
            # record rebuilds them (~0.7 us each). Not during a transfer: its acks arrive
            # every few milliseconds, and rebuilding per datagram cost ~3.4 ms/MB.
            self.link.layer.release_aeads()

    @property
    def saved(self) -> bool:
        """True if the session was saved for the next server process (graceful restart,
        issue 14 item 6): it is not over for its device, which the next process serves
        on it without a handshake, so its end must not mark the device offline."""
        return self._saved

    def close(self, reason: str = CloseReason.SERVER) -> None:
        """End the session (idempotent); a detached one starts its end in a task.

        Closed for a graceful shutdown while the endpoint saves sessions, it is saved at
        once, before its handler's ``finish`` runs (which then knows the device is not
        going offline) and whatever the shutdown's grace."""
        if reason == CloseReason.SHUTDOWN and self.close_reason is None:
            self._save()
        super().close(reason)
        handler = self._evented
        if handler is not None and not self._ending:
            self._ending = True
            self.link.endpoint.end_session(self, handler)

    def _seal_window(self, messages: Sequence[bytes]) -> list[bytes]:
        """Seal ``messages`` in one batch, one record each; SessionClosed if the session
        has ended or its layer refuses (closed, oversized, or 2^48 records sealed)."""
        self._check_can_send()
        link = self.link
        if link.ended is not None:
            raise self._ended(link.ended)
        try:
            records = link.layer.seal_many(messages)
        except RecordError as error:
            logger.debug("cannot seal for %s: %s", self.peer, error)
            raise self._ended(link.ended or CloseReason.TRANSPORT_ERROR) from None
        self._release_if_detached()
        return records

    def _release_if_detached(self) -> None:
        """A detached session sealed outside ``on_data`` (from a task: a Hello's answer, a
        request to the device, a window of chunks): drop the AEAD objects now, as on_data
        does once quiet, or the session would keep ~2.3 KB of OpenSSL state until the
        device's next datagram (issue 14 item 4)."""
        handler = self._evented
        if handler is not None and not handler.streaming:
            self.link.layer.release_aeads()

    def send_window_nowait(self, messages: Sequence[bytes]) -> None:
        """Seal a window (one record per datagram, in one batch) and send it without
        waiting: what the socket's buffer does not take waits in a backlog that a task of
        the endpoint sends, in order."""
        if not messages:
            return
        records = self._seal_window(messages)
        link = self.link
        backlog = self._backlog
        if backlog is not None:
            backlog.extend(records)
            return
        endpoint, address = link.endpoint, link.address
        for index, record in enumerate(records):
            if not endpoint.send_now(record, address):
                self._backlog = list(records[index:])
                endpoint.spawn_sender(self)
                return

    async def send_backlog(self) -> None:
        """Send the backlog (waiting for room in the socket's buffer), then drop it."""
        link = self.link
        while self._backlog:
            record = self._backlog.pop(0)
            # A saved session's backlog was sealed before its state was saved: it goes out.
            if link.ended is None or self._in_farewell or self._saved:
                await link.endpoint.send(record, link.address)
        self._backlog = None

    @property
    def dropped(self) -> int:
        """Datagrams dropped for size or rate (RFC 7252 4.2: CoAP over UDP retransmits)."""
        return self.link.dropped

    async def receive(self) -> bytes:
        """The next datagram's plaintext within size and rate limits (others are dropped);
        SessionClosed when the session has ended."""
        link = self.link
        yielded = False  # a trio receive always yields once, before taking the data
        while True:
            if self.close_reason is not None:
                raise DeviceSessionClosed(self.close_reason)
            inbox = link.inbox
            if inbox:
                if yielded:
                    data = inbox.pop(0)
                    if not inbox:
                        link.inbox = None
                    self._touch()
                    return data
                await trio.lowlevel.checkpoint()  # before taking it: a cancel loses nothing
                yielded = True
                continue
            if link.ended is not None:
                raise self._ended(link.ended)
            # Nothing to read: the session may stay idle for minutes. Its AEAD objects hold
            # ~2.3 KB of OpenSSL state each; the next record rebuilds them (~0.7 us each).
            link.layer.release_aeads()
            await trio.lowlevel.checkpoint_if_cancelled()
            link.start_waiting()
            await trio.lowlevel.wait_task_rescheduled(link.abort_wait)
            yielded = True

    async def send(self, data: bytes) -> None:
        """Send ``data`` as one DTLS record in one datagram."""
        self._check_can_send()
        link = self.link
        if link.ended is not None:
            raise self._ended(link.ended)
        try:
            record = link.layer.seal(data)
        except RecordError as error:  # closed, or 2^48 records sealed (RFC 6347 4.1)
            logger.debug("cannot seal for %s: %s", self.peer, error)
            raise self._ended(link.ended or CloseReason.TRANSPORT_ERROR) from None
        self._release_if_detached()
        await link.endpoint.send(record, link.address)

    async def send_window(self, messages: Sequence[bytes]) -> None:
        """Send a window of CoAP messages, each one record in its own datagram (RFC 6347
        4.1), all sealed in one batch (``DtlsRecordLayer.seal_many``: the chunk framing
        kernel, sequence numbers reserved as N seals would)."""
        if not messages:
            return
        records = self._seal_window(messages)
        link = self.link
        for record in records:
            await link.endpoint.send(record, link.address)

    def _save(self) -> bool:
        """Hand the session to the endpoint to be saved for the next process, if it is
        saving (graceful shutdown) and the session can go on there; True if saved."""
        link = self.link
        handler = self.handler
        if handler is None or link.ended is not None or link.layer.closed:
            return False
        if not link.endpoint.keep(self, handler):
            return False
        # Saved (issue 14 item 6): no farewell telling the device to leave, no
        # close_notify; the layer must never seal again in this process (the next one
        # goes on from its sequence numbers: RFC 5116 3, a nonce never repeats), nor open
        # (the next one's replay window is the one saved).
        self._saved = True
        link.ended = CloseReason.SHUTDOWN
        link.endpoint.forget(link)
        return True

    async def _farewell_then_close(self, handler: SessionHandler) -> None:
        link = self.link
        if self._backlog:  # what a detached session's handler sent last goes out first
            with trio.move_on_after(self.limits.farewell_timeout):
                await self.send_backlog()
        if self._saved:  # at close (see close): no farewell, no close_notify
            return
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + self.limits.farewell_timeout
            await self._farewell(handler)
            if self.close_reason != CloseReason.PEER and not link.layer.closed:
                # close_notify (RFC 5246 7.2.1): the device handshakes again at once
                # instead of finding out by timeouts.
                await link.endpoint.send(link.layer.close(), link.address)
        link.endpoint.forget(link)

    def _close_now(self) -> None:
        self.link.endpoint.forget(self.link)
