"""One device's CoAP session over an authenticated TLS or DTLS transport.

The Trio shell around the sans-IO :class:`otacore.protocol.link.CoapLink`, as a record with
no task of its own (issue 14 item 5): the session's reader feeds received bytes to the link,
dispatches what it yields and sends the link's answers itself; whoever else queues on the
link flushes it; the link's retransmission deadlines (UDP) live in the plane's one
:class:`~server.transport.timers.ProcessTimers`; the device's requests and the OTA updater run
in tasks started on demand in the plane's nursery, which end when they have nothing left to
do. The session's device id comes from its certificate and can never change (a Hello
naming another device is refused and closes the session). What the session does with each
request of its device (Hello, Describe, Event, ``GET k``) is
:mod:`server.devices.device_requests`.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

from otacore.chunk_framing import MAX_WINDOW_CHUNKS
from otacore.coap import Message, MessageType, OptionNumber
from otacore.coap_reliability import ReliableLayer
from otacore.errors import OtaError
from otacore.messages import Direction, Hello, ServerEvent, to_message
from otacore.protocol.link import (
    FrameRejected,
    LinkEvent,
    PeerReleased,
    RequestFailed,
    RequestReceived,
    ResponseReceived,
    UdpLink,
    make_link,
)
from otacore.protocol.ota_wire import statement_budget
from otacore.transfer import Chunk, PreparedFile
from otacore.transfer.framing import frame_chunks
from server.devices.device_requests import ip_of, serve_request
from server.devices.flag import Flag
from server.devices.session_tasks import SessionTasks
from server.devices.suspended import SuspendedSession, SuspendedStateError
from server.events import Event as BusEvent
from server.events import EventSource
from server.transport.session import CloseReason, DeviceSession, SessionClosed
from server.transport.tls_session import TlsSession

if TYPE_CHECKING:
    from server.devices.plane import DevicePlane
    from server.devices.updater import SessionUpdater
    from server.fleet import DeviceTarget

log = logging.getLogger("ota.devices")

#: Protocol violations a session may commit before it is closed.
MAX_VIOLATIONS = 5
#: Requests from the device waiting for the session's request worker (beyond it the TLS
#: reader waits: a device flooding requests slows only its own session; a DTLS session with
#: no task drops them, and the device sends its CON again, RFC 7252 4.2).
MAX_QUEUED_REQUESTS = 16
SHUTDOWN_EVENT = "ota/server/going-away"


class DeviceUnreachableError(OtaError):
    """A request to the device got no answer (reset, retransmissions exhausted, timeout)."""


@dataclass(eq=False)
class _Waiter:
    done: trio.Event = field(default_factory=trio.Event)
    response: Message | None = None
    failure: str = ""


class DeviceSessionHandler:
    """Runs one device's session: hello, describe, events, pings, and server requests.

    It owns no task of its own (issue 14 item 5). Over TLS the session's one task is the
    reader (:meth:`run`); over DTLS the UDP endpoint's reader calls :meth:`on_data` (the
    session has no task at all). Either feeds the link and answers pings,
    acknowledgements and responses at once. Whoever else queues on the link flushes it
    (:meth:`flush`; the session serialises the sends, FIFO). The link's deadlines (UDP
    retransmissions) are armed in the plane's one :class:`ProcessTimers`. The device's
    requests wait in a bounded queue served by a worker task started on demand in the
    plane's nursery, which ends when the queue is empty; the OTA engine's updater starts its
    task the same way. An idle session therefore has no task but its reader, if any.
    """

    # One per live session: slots save its dict (~0.3 KiB per session); "__dict__" keeps
    # room for attributes added later (made only if one is set).
    __slots__ = ("__dict__", "_flush_started", "_request_room", "_requests",
                 "_serving_requests", "_waiters", "described", "described_at", "device_id",
                 "extra_routes", "hello", "instant_routes", "key_sequence", "link",
                 "on_hello", "plane", "presence", "product_id", "requests_dropped", "session",
                 "tasks", "timer_at", "updater", "violations")  # fmt: skip

    def __init__(self, plane: DevicePlane, session: DeviceSession) -> None:
        self.plane = plane
        self.session = session
        self.device_id = session.device_id
        self.link = make_link(session.transport, plane.config.max_frame_size)
        self.hello: Hello | None = None
        self.product_id: int | None = None
        self.violations = 0
        #: Our requests to the device awaiting their answer (None while there are none).
        self._waiters: dict[bytes, _Waiter] | None = None
        #: The link's deadline armed in the plane's timers (written by ProcessTimers).
        self.timer_at: float | None = None
        #: The device's requests not yet served (created with the first; bounded by
        #: MAX_QUEUED_REQUESTS: beyond it the reader waits, see _queue_request).
        self._requests: deque[Message] | None = None
        #: Set while the request worker task runs (at most one per session).
        self._serving_requests = False
        #: The reader waits on it while the request queue is full.
        self._request_room: trio.Event | None = None
        #: A flush task was started by a caller that cannot wait (the timers).
        self._flush_started = False
        #: This session's on-demand tasks (in the plane's nursery; none while idle).
        self.tasks = SessionTasks(plane, session)
        #: Requests dropped because the queue was full (sessions with no task only).
        self.requests_dropped = 0
        #: Called with each request the generic dispatcher does not own (OTA paths). The
        #: three hook lists are tuples, extended by copy (set once per session): an empty
        #: tuple is shared, a list costs 56 bytes, 88 with one hook (issue 14 item 4).
        self.extra_routes: tuple[Callable[[Message], Any], ...] = ()
        #: Routes that never block (a transfer's acknowledgements): the reader calls them
        #: itself when no request is queued before (the order stays the device's), so the
        #: OTA sender is fed without a task switch; True when a route took the request.
        self.instant_routes: tuple[Callable[[Message], bool], ...] = ()
        #: Called after the Hello (with None, None) and after the Describe (with the
        #: device's target as the Describe's own transaction left it, so no need to read it
        #: again, and when that transaction was asked for, trio clock).
        self.on_hello: tuple[Callable[[DeviceTarget | None, float | None], Any], ...] = ()
        #: Set once this session's Describe is recorded: until then the stored modules are
        #: those of an earlier session (the device may have reset into new ones since).
        self.described = Flag()
        #: This session's name in the store's presence column (see PresenceService).
        self.presence = plane.presence_token()
        #: When (trio clock) this session's Describe was recorded; None before.
        self.described_at: float | None = None
        #: The key rotation sequence this session's device has reached, as far as the
        #: server knows: its Hello's ``key_sequence`` plus the statements it was sent since
        #: (the Hello's answer, ``GET k`` pages, key pushes it acknowledged; see
        #: server.devices.key_sync).
        self.key_sequence = 0
        #: The OTA engine's updater of this session (set when the session starts; None
        #: without an engine). It lives and ends with the session.
        self.updater: SessionUpdater | None = None

    # -- the session's one task ---------------------------------------------------------------

    async def run(self, session: DeviceSession) -> None:
        """Serve the session until the device leaves, misbehaves or the server stops (the
        session's one task: TLS)."""
        try:
            await self.start(session)
            await self._reader()
        finally:
            await self.finish(session)

    async def start(self, session: DeviceSession) -> None:
        """Begin the session: the device is online, the OTA engine attached. A DTLS
        session then runs with no task (``on_data`` for each datagram)."""
        # The transport registered the session (and closed the one it replaces) before
        # this handler was made: that session's end sees a successor in ``plane.live`` and
        # leaves the device's online state alone.
        saved = getattr(session, "restored_state", None)
        if saved is not None:
            self._restore(session, saved)
            # Restored after a graceful restart: all at once, so written in batches
            # (server.devices.restored_start), with the same outcome.
            await self.plane.restored_starts.online(self.device_id, ip_of(session.peer),
                                                    self.presence)
        else:
            await self.plane.fleet.device_online(self.device_id, ip=ip_of(session.peer),
                                                 session=self.presence)
        self.plane.on_session_start(self)
        log.info("device %s online over %s from %s%s", self.device_id, session.transport,
                 ip_of(session.peer), " (restored session)" if saved is not None else "",
                 extra={"event": "session_opened", "device_id": self.device_id,
                        "transport": session.transport, "address": ip_of(session.peer),
                        "restored": saved is not None})
        if saved is not None:
            # As after a Hello (and a Describe, if it was recorded): the updater checks the
            # device's target, read for many restored sessions at once; a transfer cut by
            # the restart is offered again and resumed.
            self.plane.restored_starts.check_target(self)

    def suspend(self, session: DeviceSession) -> bytes:
        """Graceful shutdown: the state the next server process restores this DTLS session
        with, so the device goes on without a handshake or a new Hello
        (:class:`~server.devices.suspended.SuspendedSession`)."""
        link = self.link
        next_id = link.reserve_message_ids(1)[0] if isinstance(link, UdpLink) else 0
        return SuspendedSession(self.hello, self.product_id, self.key_sequence,
                                self.described.is_set(), next_id).to_bytes()

    def _restore(self, session: DeviceSession, saved: bytes) -> None:
        """Take back what the previous process's :meth:`suspend` saved; a state it cannot
        read closes the session (the device then handshakes and says Hello again)."""
        try:
            state = SuspendedSession.from_bytes(saved)
        except SuspendedStateError as exc:
            log.warning("restored session of %s closed: %s", self.device_id, exc)
            session.close("saved state unreadable")
            raise SessionClosed("saved state unreadable") from None
        if state.hello is not None and state.hello.device_id != self.device_id:
            # Bound to the certificate's device id, as a Hello is (see _on_hello).
            log.warning("restored session of %s closed: its saved Hello names %s",
                        self.device_id, state.hello.device_id)
            session.close("saved state names another device")
            raise SessionClosed("saved state names another device")
        # RFC 7252 4.4: go on from the previous process's message ids.
        self.link = UdpLink(ReliableLayer(answer_pings_with_ack=True,
                                          first_message_id=state.next_message_id))
        self.hello = state.hello
        self.product_id = state.product_id
        self.key_sequence = state.key_sequence
        if state.described:
            self.described_at = trio.current_time()
            self.described.set()

    async def finish(self, session: DeviceSession) -> None:
        """The session ended: its on-demand tasks end, it leaves the registry, and the
        device is offline unless a newer session holds it, or the session was saved for
        the next server process (graceful restart: the device stays online, with no
        offline/online pair of ``spark/status`` events; if the save fails after all, the
        endpoint calls :meth:`not_saved`)."""
        await self.tasks.end()
        self.plane.timers.disarm(self)
        self.plane.on_session_end(self)  # no longer its device's live session
        reason = str(session.close_reason or CloseReason.SERVER)
        saved = bool(getattr(session, "saved", False))
        log.info("device %s session over %s closed: %s%s", self.device_id, session.transport,
                 reason, " (saved for the next server process)" if saved else "",
                 extra={"event": "session_closed", "device_id": self.device_id,
                        "product_id": self.product_id, "transport": session.transport,
                        "reason": reason, "saved": saved})
        if getattr(session, "saved", False):
            self.plane.fleet.memory_hand_off.drop(self.presence)
            return
        if self.plane.live.get(self.device_id) is None:  # not replaced
            await self._mark_offline()

    async def not_saved(self, session: DeviceSession) -> None:
        """The session was suspended at a graceful shutdown, but the saved sessions could
        not be written: it is over after all, so the device is offline (unless a newer
        session holds it)."""
        await self._mark_offline()

    async def _mark_offline(self) -> None:
        with trio.CancelScope(shield=True):
            try:
                # Only if no newer session took the device over meanwhile (the device may
                # have reconnected to another server process).
                await self.plane.fleet.device_offline(self.device_id, session=self.presence)
            except OtaError:
                log.warning("could not mark %s offline", self.device_id)

    def on_data(self, data: bytes) -> None:
        """One datagram's plaintext of a session with no task (DTLS, called by the
        endpoint's reader): pings, acknowledgements and responses are answered at once;
        requests go to the request worker; a request beyond a full queue is dropped
        (CoAP over UDP: the device sends a CON again, RFC 7252 4.2)."""
        session = self.session
        for event in self.link.receive(data, trio.current_time()):
            if type(event) is RequestReceived:
                message = event.message
                if self._serving_requests or not self._route_now(message):
                    self._queue_request_nowait(message)
            else:
                self._on_link_event(event)
            if session.closed:
                return
        self.flush_now()

    async def farewell(self, session: DeviceSession) -> None:
        """Graceful shutdown: tell the device when to come back, then let it go."""
        hold_off = self.plane.config.shutdown_hold_off
        if session.transport == "tcp":
            self.link.release(hold_off)  # RFC 8323 5.5: Release with Hold-Off
        else:
            notice = ServerEvent(SHUTDOWN_EVENT, json.dumps({"hold_off": hold_off}), 60)
            message = to_message(notice, Direction.TO_DEVICE, MessageType.NON)
            self.link.notify(message, trio.current_time())
        await self._send_outgoing()

    async def _reader(self) -> None:
        # The link answers pings, acknowledgements and responses as soon as bytes arrive,
        # and this task sends the answers itself; requests (which may wait on the store)
        # go to the request worker, so a slow Hello never leaves a keep-alive ping
        # unanswered (the device would drop the session).
        session, link = self.session, self.link
        while True:
            try:
                data = await session.receive()
            except SessionClosed:
                return
            for event in link.receive(data, trio.current_time()):
                if type(event) is RequestReceived:
                    message = event.message
                    if self._serving_requests or not self._route_now(message):
                        await self._queue_request(message)
                else:
                    self._on_link_event(event)
                if session.closed:
                    return
            self.rearm()
            out = link.take_outgoing()
            if out:  # the answers (pings, acknowledgements): no extra trip to the scheduler
                await session.send_reply(out)

    # -- on-demand tasks ---------------------------------------------------------------------

    def spawn(self, work: Callable[[], Awaitable[object]]) -> bool:
        """Run ``work()`` in a task of the plane's nursery that ends with this session
        (cancelled, and awaited, as it ends). An error in it ends this session only, as
        one in the reader would. False (nothing started) once the session is ending."""
        return self.tasks.start(work)

    @property
    def streaming(self) -> bool:
        """A transfer is in flight: its acks arrive every few milliseconds, so the transport
        keeps the session's AEAD objects instead of rebuilding them per datagram."""
        updater = self.updater
        return updater is not None and updater.transfer is not None

    @property
    def task_count(self) -> int:
        """On-demand tasks of this session running now (0 for an idle session)."""
        return len(self.tasks)

    # -- the device's requests ---------------------------------------------------------------

    def _route_now(self, message: Message) -> bool:
        """Serve ``message`` at once if a route that never blocks takes it."""
        return any(route(message) for route in self.instant_routes)

    async def _queue_request(self, message: Message) -> None:
        """Queue a request for the worker (started if not running); waits while the queue
        is full, so a device flooding requests slows only its own session."""
        queue = self._requests
        if queue is None:
            queue = self._requests = deque()
        while len(queue) >= MAX_QUEUED_REQUESTS:
            if self._request_room is None:
                self._request_room = trio.Event()
            await self._request_room.wait()
        queue.append(message)
        if not self._serving_requests and self.spawn(self._serve_requests):
            self._serving_requests = True

    def _queue_request_nowait(self, message: Message) -> None:
        """Queue a request for the worker without waiting; dropped when the queue is full."""
        queue = self._requests
        if queue is None:
            queue = self._requests = deque()
        if len(queue) >= MAX_QUEUED_REQUESTS:
            self.requests_dropped += 1
            log.debug("device %s: request dropped, %d queued", self.device_id, len(queue))
            return
        queue.append(message)
        if not self._serving_requests and self.spawn(self._serve_requests):
            self._serving_requests = True

    async def _serve_requests(self) -> None:
        """Serve the device's requests one at a time, in the order they arrived, until
        none is left."""
        try:
            queue = self._requests
            while queue:
                message = queue.popleft()
                room = self._request_room
                if room is not None:
                    self._request_room = None
                    room.set()
                await serve_request(self, message)
                if self.session.closed:
                    return
                await self.flush()
            self._requests = None  # an idle session keeps no empty queue
        finally:
            self._serving_requests = False

    # -- sending -----------------------------------------------------------------------------

    async def _send_outgoing(self) -> None:
        out = self.link.take_outgoing()
        if out:
            await self.session.send_window(out)

    def rearm(self) -> None:
        """The link changed: arm its next deadline (UDP retransmissions) in the plane's
        timers."""
        self.plane.timers.arm(self, self.link.next_deadline())

    def wake(self) -> None:
        """Something was queued on the link by code that will not :meth:`flush`: re-arm
        the link's deadline and send it, at once over a session with no task, else from
        a task of its own (started on demand)."""
        if self.session.detached:
            self.flush_now()
            return
        self.rearm()
        if not self._flush_started and self.spawn(self._flush_task):
            self._flush_started = True

    def flush_now(self) -> None:
        """Send what the link queued without waiting (a session with no task: what the
        socket does not take is sent in order by a task of the endpoint)."""
        self.rearm()
        out = self.link.take_outgoing()
        if out:
            with contextlib.suppress(SessionClosed):  # closed meanwhile: nothing to send
                self.session.send_window_nowait(out)

    async def _flush_task(self) -> None:
        self._flush_started = False
        await self.flush()

    async def flush(self) -> None:
        """Hand everything queued so far to the transport (sends are serialised FIFO by
        the session) and re-arm the link's deadline."""
        self.rearm()
        await self._send_outgoing()

    async def send_chunks(self, prepared: PreparedFile, chunks: Sequence[Chunk]) -> None:
        """Send a run of one transfer's chunks (of ``prepared``) after everything queued on
        the link so far: framed by the chunk framing kernel in one call per window
        (:meth:`frame_chunks`), then handed to the session as one window with the link's
        queued messages in front (:meth:`DeviceSession.send_window`: one batch seal and
        one write over TLS)."""
        for frames in self.frame_chunks(prepared, chunks):
            queued = self.link.take_outgoing()
            await self.session.send_window(queued + frames if queued else frames)

    def frame_chunks(self, prepared: PreparedFile,
                     chunks: Sequence[Chunk]) -> Iterator[list[bytes]]:
        """The wire messages of a run of chunks of ``prepared``, one list per window of at
        most MAX_WINDOW_CHUNKS: framed by the chunk framing kernel in one call each
        (:func:`otacore.transfer.framing.frame_chunks`; over UDP NONs with ids from the
        link's message layer, reserved as each window is framed)."""
        link = self.link
        for start in range(0, len(chunks), MAX_WINDOW_CHUNKS):
            window = chunks[start : start + MAX_WINDOW_CHUNKS]
            if isinstance(link, UdpLink):
                ids = link.reserve_message_ids(len(window))
                yield frame_chunks(prepared, window, transport="udp", message_ids=ids)
            else:
                yield frame_chunks(prepared, window, transport="tcp")

    def send_window_now(self, messages: Sequence[bytes]) -> bool:
        """Send a window of wire messages without waiting (the OTA sender run inside the
        event that fed it, issue 14 item 5): True once the session took them, in order
        after everything sent so far; False, sending nothing, when that would mean waiting
        (a TLS send under way, or bytes of an earlier write still held: see
        :meth:`send_held`), and the caller must send them from a task.

        Over DTLS (a session with no task) what the socket's buffer does not take waits in
        the endpoint's backlog, bounded by the transfer's window; over TLS a write the
        socket takes only in part keeps the rest (:meth:`holds_unsent`) for
        :meth:`send_held`."""
        session = self.session
        if session.detached:
            session.send_window_nowait(messages)
            return True
        if isinstance(session, TlsSession):
            return session.try_send_window(messages)
        return False

    def holds_unsent(self) -> bool:
        """True while bytes sealed by :meth:`send_window_now` wait for room in the TLS
        socket's buffer (:meth:`send_held` sends them)."""
        session = self.session
        return isinstance(session, TlsSession) and session.holds_unsent

    async def send_held(self) -> None:
        """Send what :meth:`send_window_now` sealed but the socket did not take (TLS),
        waiting for room (bounded by the session's send timeout)."""
        session = self.session
        if isinstance(session, TlsSession):
            await session.send_unsent()

    def on_deadline(self, now: float) -> None:
        """The link's deadline came (called by the plane's timers): retransmit or give up,
        and send from a task started on demand."""
        for event in self.link.poll(now):
            self._on_link_event(event)
        self.wake()

    # -- requests to the device --------------------------------------------------------------

    async def request(self, message: Message, timeout: float) -> Message:
        """Send a request and wait for its response; DeviceUnreachableError otherwise."""
        token = self.link.request(message, trio.current_time())
        if self._waiters is None:
            self._waiters = {}
        waiter = self._waiters[token] = _Waiter()
        try:
            with trio.fail_after(timeout):
                await self.flush()
                await waiter.done.wait()
        except trio.TooSlowError as exc:
            raise DeviceUnreachableError(f"no answer within {timeout:g} s") from exc
        finally:
            if self._waiters is not None:
                self._waiters.pop(token, None)
                if not self._waiters:
                    self._waiters = None
        if waiter.response is None:
            raise DeviceUnreachableError(waiter.failure or "no answer")
        return waiter.response

    def notify(self, message: Message) -> None:
        """Queue a request that expects no answer (NON over UDP); it goes out with the
        next :meth:`flush`, or call :meth:`wake` to send it from a task of its own."""
        self.link.notify(message, trio.current_time())
        self.rearm()

    async def send_event(self, name: str, data: str, ttl: int = 60) -> None:
        """Publish an event to the device (server -> device ``POST e/<name>``)."""
        message = to_message(ServerEvent(name, data, ttl), Direction.TO_DEVICE)
        try:
            await self.request(message, timeout=self.plane.config.request_timeout)
        except DeviceUnreachableError as exc:
            log.info("event %s to %s not acknowledged: %s", name, self.device_id, exc)

    # -- what the device sends -------------------------------------------------------------

    def _on_link_event(self, event: LinkEvent) -> None:
        """What the link reports, other than a request (see _queue_request); never
        blocks (the timers call it too)."""
        if isinstance(event, ResponseReceived | RequestFailed):
            waiter = self._waiters.get(event.token) if self._waiters is not None else None
            if waiter is not None:
                if isinstance(event, ResponseReceived):
                    waiter.response = event.message
                else:
                    waiter.failure = event.reason
                waiter.done.set()
        elif isinstance(event, PeerReleased):
            self.session.close(CloseReason.PEER)
        elif isinstance(event, FrameRejected):
            self._violation(f"malformed CoAP frame: {event.error}", fatal=event.fatal)
        elif isinstance(event, RequestReceived):  # pragma: no cover - never from poll()
            log.debug("device %s: request from a timer dropped", self.device_id)

    def _violation(self, what: str, *, fatal: bool = False) -> None:
        self.violations += 1
        log.info("device %s: %s", self.device_id, what)
        if fatal or self.violations >= MAX_VIOLATIONS:
            self.session.close("protocol violation")

    def _respond(self, request: Message, code: int, payload: bytes = b"",
                 content_format: int | None = None, max_age: int | None = None) -> None:
        response = Message(MessageType.ACK, code, payload=payload)
        if content_format is not None:
            response.set_content_format(content_format)
        if max_age is not None:
            response.set_uint_option(OptionNumber.MAX_AGE, max_age)
        self.link.respond(request, response, trio.current_time())
        self.rearm()  # the request worker flushes once the request is served

    def statement_budget(self) -> int:
        """Payload bytes one message to this device may carry (its Hello's message size,
        and over DTLS one unfragmented datagram)."""
        hello = self.hello
        max_message_size = hello.max_message_size if hello is not None else 1024
        return statement_budget(self.session.transport, max_message_size)

    def publish(self, name: str, data: str | None, ttl: int = 60) -> None:
        """Put an event from this device on the REST event stream, marked as the device's
        (the server's listeners never act on it, whatever its name)."""
        if self.product_id is None:
            return  # no hello or describe yet: the product is not known to the session
        self.plane.bus.publish(BusEvent(
            name, data, product_id=self.product_id, device_id=self.device_id,
            coreid=self.device_id, ttl=ttl, source=EventSource.DEVICE,
        ))
