"""One device's CoAP session over an authenticated TLS or DTLS transport.

The Trio shell around the sans-IO :class:`otacore.protocol.link.CoapLink`: a reader feeds
received bytes to the link and dispatches what it yields, a writer drains the link's outbox
into the transport, and a timer task runs the link's retransmissions (UDP). All three live
in one nursery per session; the session's device id comes from its certificate and can
never change (a Hello naming another device is refused and closes the session).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

from otacore.chunk_framing import MAX_WINDOW_CHUNKS
from otacore.coap import Code, Message, MessageType
from otacore.errors import OtaError, PayloadSchemaError, ProtocolError
from otacore.messages import (
    Describe,
    Direction,
    Event,
    Goodbye,
    Hello,
    ServerEvent,
    UnknownMessageError,
    from_message,
    to_message,
)
from otacore.platforms import platform_name
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
from otacore.protocol.ota_wire import (
    UPDATE_RESULT_EVENT,
    hello_answer_payload,
    is_key_request,
    key_page_for,
    key_page_payload,
    parse_key_request,
    statement_budget,
)
from otacore.transfer import Chunk, PreparedFile
from otacore.transfer.framing import frame_chunks
from server.events import Event as BusEvent
from server.events import EventSource, device_may_publish
from server.fleet.errors import WrongPlatformError
from server.transport.session import CloseReason, DeviceSession, SessionClosed

if TYPE_CHECKING:
    from server.devices.plane import DevicePlane
    from server.devices.updater import SessionUpdater
    from server.fleet import DeviceTarget

log = logging.getLogger("ota.devices")

#: RFC 6690 link-format, the Content-Format of /.well-known/core (RFC 7252 12.3: 40).
LINK_FORMAT = 40
WELL_KNOWN_CORE = (
    b'</h>;rt="ota.hello",</d>;rt="ota.describe",</e>;rt="ota.event",'
    b'</g>;rt="ota.goodbye",</k>;rt="ota.keys",</fw>;rt="ota.firmware";ct=42'
)
#: Protocol violations a session may commit before it is closed.
MAX_VIOLATIONS = 5
#: Requests from the device waiting for the session's request handler (beyond it the
#: reader waits: a device flooding requests slows only its own session).
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
    """Runs one device's session: hello, describe, events, pings, and server requests."""

    def __init__(self, plane: DevicePlane, session: DeviceSession) -> None:
        self.plane = plane
        self.session = session
        self.device_id = session.device_id
        self.link = make_link(session.transport, plane.config.max_frame_size)
        self.hello: Hello | None = None
        self.product_id: int | None = None
        self.violations = 0
        self._waiters: dict[bytes, _Waiter] = {}
        self._wake_writer = trio.Event()
        self._rearm_timer = trio.Event()
        self._requests_in, self._requests = trio.open_memory_channel[Message](MAX_QUEUED_REQUESTS)
        #: Called with each request the generic dispatcher does not own (OTA paths).
        self.extra_routes: list[Callable[[Message], Any]] = []
        #: Called after the Hello (with None, None) and after the Describe (with the
        #: device's target as the Describe's own transaction left it, so no need to read it
        #: again, and when that transaction was asked for, trio clock).
        self.on_hello: list[Callable[[DeviceTarget | None, float | None], Any]] = []
        #: Set once this session's Describe is recorded: until then the stored modules are
        #: those of an earlier session (the device may have reset into new ones since).
        self.described = trio.Event()
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

    # -- the session's task tree -------------------------------------------------------------

    async def run(self, session: DeviceSession) -> None:
        """Serve the session until the device leaves, misbehaves or the server stops."""
        # The transport registered the session (and closed the one it replaces) before
        # this handler was made: that session's end sees a successor in ``plane.live`` and
        # leaves the device's online state alone.
        presence = self.presence
        try:
            await self.plane.fleet.device_online(self.device_id, ip=_ip_of(session.peer),
                                                 session=presence)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._writer)
                nursery.start_soon(self._timer)
                nursery.start_soon(self._handle_requests)
                self.plane.on_session_start(self, nursery)
                await self._reader()
                nursery.cancel_scope.cancel()
        except* SessionClosed:
            # A task was sending when the session closed (revoked, replaced, cut): a normal
            # end. The nursery wraps it in a group, which the transport would log as a bug.
            pass
        finally:
            self.plane.on_session_end(self)  # no longer its device's live session
            if self.plane.live.get(self.device_id) is None:  # not replaced
                with trio.CancelScope(shield=True):
                    try:
                        # Only if no newer session took the device over meanwhile (the
                        # device may have reconnected to another server process).
                        await self.plane.fleet.device_offline(self.device_id,
                                                              session=presence)
                    except OtaError:
                        log.warning("could not mark %s offline", self.device_id)

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
        # The link answers pings, acknowledgements and responses as soon as bytes arrive;
        # requests (which may wait on the store) go to _handle_requests, so a slow Hello
        # never leaves a keep-alive ping unanswered (the device would drop the session).
        while True:
            try:
                data = await self.session.receive()
            except SessionClosed:
                return
            for event in self.link.receive(data, trio.current_time()):
                await self._on_link_event(event)
                if self.session.closed:
                    return
            self.wake()

    async def _handle_requests(self) -> None:
        """Serve the device's requests one at a time, in the order they arrived."""
        async for message in self._requests:
            await self._on_request(message)
            if self.session.closed:
                return
            self.wake()

    async def _writer(self) -> None:
        while True:
            await self._wake_writer.wait()
            self._wake_writer = trio.Event()
            await self._send_outgoing()

    async def _send_outgoing(self) -> None:
        out = self.link.take_outgoing()
        if out:
            await self.session.send_window(out)

    async def _timer(self) -> None:
        while True:
            deadline = self.link.next_deadline()
            self._rearm_timer = trio.Event()
            with trio.move_on_at(math.inf if deadline is None else deadline):
                await self._rearm_timer.wait()
                continue
            for event in self.link.poll(trio.current_time()):
                await self._on_link_event(event)
            self.wake()

    def wake(self) -> None:
        """Something was queued on the link: let the writer send it and re-arm timers."""
        self._wake_writer.set()
        self._rearm_timer.set()

    async def flush(self) -> None:
        """Hand everything queued so far to the transport (sends are serialised FIFO)."""
        await self._send_outgoing()

    async def send_chunks(self, prepared: PreparedFile, chunks: Sequence[Chunk]) -> None:
        """Send a run of one transfer's chunks (of ``prepared``) after everything queued on
        the link so far: framed by the chunk framing kernel in one call per window
        (:func:`otacore.transfer.framing.frame_chunks`; over UDP NONs with ids from the
        link's message layer), then handed to the session as one window with the link's
        queued messages in front (:meth:`DeviceSession.send_window`: one batch seal and
        one write over TLS)."""
        link = self.link
        for start in range(0, len(chunks), MAX_WINDOW_CHUNKS):
            window = chunks[start : start + MAX_WINDOW_CHUNKS]
            if isinstance(link, UdpLink):
                ids = link.reserve_message_ids(len(window))
                frames = frame_chunks(prepared, window, transport="udp", message_ids=ids)
            else:
                frames = frame_chunks(prepared, window, transport="tcp")
            queued = link.take_outgoing()
            await self.session.send_window(queued + frames if queued else frames)

    # -- requests to the device --------------------------------------------------------------

    async def request(self, message: Message, timeout: float) -> Message:
        """Send a request and wait for its response; DeviceUnreachableError otherwise."""
        token = self.link.request(message, trio.current_time())
        waiter = self._waiters[token] = _Waiter()
        self.wake()
        try:
            with trio.fail_after(timeout):
                await waiter.done.wait()
        except trio.TooSlowError as exc:
            raise DeviceUnreachableError(f"no answer within {timeout:g} s") from exc
        finally:
            self._waiters.pop(token, None)
        if waiter.response is None:
            raise DeviceUnreachableError(waiter.failure or "no answer")
        return waiter.response

    def notify(self, message: Message) -> None:
        """Queue a request that expects no answer (NON over UDP)."""
        self.link.notify(message, trio.current_time())
        self.wake()

    async def send_event(self, name: str, data: str, ttl: int = 60) -> None:
        """Publish an event to the device (server -> device ``POST e/<name>``)."""
        message = to_message(ServerEvent(name, data, ttl), Direction.TO_DEVICE)
        try:
            await self.request(message, timeout=self.plane.config.request_timeout)
        except DeviceUnreachableError as exc:
            log.info("event %s to %s not acknowledged: %s", name, self.device_id, exc)

    # -- what the device sends -------------------------------------------------------------

    async def _on_link_event(self, event: LinkEvent) -> None:
        if isinstance(event, RequestReceived):
            await self._requests_in.send(event.message)
        elif isinstance(event, ResponseReceived | RequestFailed):
            waiter = self._waiters.get(event.token)
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

    def _violation(self, what: str, *, fatal: bool = False) -> None:
        self.violations += 1
        log.info("device %s: %s", self.device_id, what)
        if fatal or self.violations >= MAX_VIOLATIONS:
            self.session.close("protocol violation")

    def _respond(self, request: Message, code: int, payload: bytes = b"",
                 content_format: int | None = None) -> None:
        response = Message(MessageType.ACK, code, payload=payload)
        if content_format is not None:
            response.set_content_format(content_format)
        self.link.respond(request, response, trio.current_time())
        self.wake()

    async def _on_request(self, message: Message) -> None:
        path = message.uri_path
        if path == [".well-known", "core"] and message.code == Code.GET:
            self._respond(message, Code.CONTENT, WELL_KNOWN_CORE, LINK_FORMAT)
            return
        if is_key_request(message):
            self._on_key_request(message)
            return
        for route in self.extra_routes:
            if await route(message):
                return
        try:
            payload = from_message(message, Direction.TO_CLOUD)
        except UnknownMessageError as exc:
            self._respond(message, Code.NOT_FOUND, str(exc).encode()[:200])
            return
        except (PayloadSchemaError, ProtocolError) as exc:
            self._respond(message, Code.BAD_REQUEST, str(exc).encode()[:200])
            self._violation(str(exc))
            return
        try:
            if isinstance(payload, Hello):
                await self._on_hello(message, payload)
            elif isinstance(payload, Describe):
                await self._on_describe(message, payload)
            elif isinstance(payload, Event):
                await self._on_event(message, payload)
            elif isinstance(payload, Goodbye):
                self._respond(message, Code.CHANGED)
                await self.flush()
                self.session.close(CloseReason.PEER)
        except OtaError as exc:
            # The device was removed from its product (or the store refused): tell it, end.
            self._respond(message, Code.FORBIDDEN, str(exc).encode()[:200])
            await self.flush()
            self.session.close("refused by the fleet")

    async def _on_hello(self, message: Message, hello: Hello) -> None:
        if hello.device_id != self.device_id:
            # The session is bound to the certificate's device id for its whole life.
            self._respond(message, Code.FORBIDDEN, b"device id differs from the certificate")
            await self.flush()
            self.session.close("impersonation attempt")
            return
        # One store write: the platform is bound to the device's product, not taken from
        # the Hello (a device naming another platform would be offered, and could GET fw/,
        # that platform's Device OS modules); checked in the Hello's own transaction before
        # anything of it is recorded, with what it says of updates and a held reset.
        try:
            view = await self.plane.fleet.record_device_hello(
                self.device_id, platform_id=hello.platform_id,
                product_version=hello.product_version or None,
                system_version=hello.system_version or None, ip=_ip_of(self.session.peer),
                session=self.presence, updates_enabled=hello.updates_enabled,
                reset_pending=hello.reset_pending, bound_platform=True,
            )
        except WrongPlatformError as exc:
            platform = exc.product_platform
            refusal = (f"this device belongs to a {platform_name(platform)} product (platform "
                       f"{platform}); its Hello names platform {hello.platform_id}")
            log.warning("device %s refused: %s", self.device_id, refusal)
            self._respond(message, Code.FORBIDDEN, refusal.encode()[:200])
            await self.flush()
            self.session.close("wrong platform")
            return
        self.product_id = view.product.id
        self.hello = hello
        # Key rotation statements ride on the Hello answer (the ones the device lacks, as
        # many as fit; it asks for the rest with GET k), so they are applied before any offer
        # signed with a new key can arrive (ota_wire, point 5).
        statements = self.plane.key_statements(view.product.id)
        after = hello.key_sequence or 0
        page = key_page_for(statements, after, self.statement_budget())
        if hello.key_sequence is None:  # a device that predates paging: the legacy array
            payload = hello_answer_payload(page.statements)
        else:
            payload = key_page_payload(page)
        self.key_sequence = after + len(page.statements)
        self._respond(message, Code.CHANGED, payload)
        for hook in self.on_hello:
            hook(None, None)

    def statement_budget(self) -> int:
        """Payload bytes one message to this device may carry (its Hello's message size,
        and over DTLS one unfragmented datagram)."""
        hello = self.hello
        max_message_size = hello.max_message_size if hello is not None else 1024
        return statement_budget(self.session.transport, max_message_size)

    def _on_key_request(self, message: Message) -> None:
        """``GET k?after=N``: the next key rotation statements after N (ota_wire point 5)."""
        if self.product_id is None or self.hello is None:
            self._respond(message, Code.FORBIDDEN, b"send Hello before asking for keys")
            return
        try:
            after = parse_key_request(message)
        except PayloadSchemaError as exc:
            self._respond(message, Code.BAD_REQUEST, str(exc).encode()[:200])
            self._violation(str(exc))
            return
        statements = self.plane.key_statements(self.product_id)
        page = key_page_for(statements, after, self.statement_budget())
        self.key_sequence = after + len(page.statements)  # the device says it is at after
        self._respond(message, Code.CONTENT, key_page_payload(page))

    async def _on_describe(self, message: Message, describe: Describe) -> None:
        modules = [
            {"function": m.function, "index": m.index, "version": m.version, "store": m.store,
             "size": m.size, "sha256": m.sha256.hex(),
             "dependencies": [{"function": d.function, "index": d.index, "version": d.version}
                              for d in m.dependencies]}
            for m in describe.modules
        ]
        # The fleet emits "spark/device/describe" when the modules changed.
        read_at = trio.current_time()
        view = await self.plane.fleet.record_describe(self.device_id, modules)
        self.product_id = view.product.id
        self.described_at = trio.current_time()
        self.described.set()
        self._respond(message, Code.CHANGED)
        for hook in self.on_hello:
            hook(view, read_at)

    async def _on_event(self, message: Message, event: Event) -> None:
        refusal = device_may_publish(event.name)
        if refusal is not None:
            # Reserved names are the cloud's (Particle: "particle", "spark"; ours: "ota/"):
            # refused, not published, and the session goes on (an application's mistake is
            # no protocol violation).
            self._respond(message, Code.FORBIDDEN, refusal.encode()[:200])
            return
        if event.name != UPDATE_RESULT_EVENT:
            self._respond(message, Code.CHANGED)
            self.publish(event.name, event.data, event.ttl)
            await self.plane.on_device_event(self, event)
            return
        # An update result is acknowledged only once recorded: the device keeps it (in its
        # boot record) until acknowledged, and reports it again in its next session.
        self.publish(event.name, event.data, event.ttl)
        if await self.plane.on_device_event(self, event):
            self._respond(message, Code.CHANGED)
        else:
            self._respond(message, Code.SERVICE_UNAVAILABLE, b"not recorded yet: report it again")

    def publish(self, name: str, data: str | None, ttl: int = 60) -> None:
        """Put an event from this device on the REST event stream, marked as the device's
        (the server's listeners never act on it, whatever its name)."""
        if self.product_id is None:
            return  # no hello or describe yet: the product is not known to the session
        self.plane.bus.publish(BusEvent(
            name, data, product_id=self.product_id, device_id=self.device_id,
            coreid=self.device_id, ttl=ttl, source=EventSource.DEVICE,
        ))


def _ip_of(peer: Any) -> str | None:
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return None
