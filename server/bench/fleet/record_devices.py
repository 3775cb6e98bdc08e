"""Load-generator devices over the project's own record layers (issue 14 item 8).

The ``records`` device stack: OpenSSL runs only the handshake (pyOpenSSL on memory BIOs:
:class:`~otacore.records.dtls12_client.DtlsClientHandshake`, and
:class:`~otacore.records.tls13_handover.Tls13Handshake` with ``absorb_tickets``), then a
session is a :class:`~otacore.records.dtls12.DtlsRecordLayer` over one plain UDP socket, or a
:class:`~otacore.records.tls13.Tls13RecordLayer` over one TCP socket: no OpenSSL object, no
trio DTLS endpoint, no SSLStream per device. The CoAP side is unchanged: the same
:class:`~otacore.device.emulated.EmulatedDevice` runs in the same
:class:`~server.emulator.device.DeviceRunner` loop; only the connection underneath differs.

The ``openssl`` stack (trio's DTLSEndpoint and stdlib ``ssl``, what ``ota device emulate``
and the tests use) stays available as the interop proof.
"""

from __future__ import annotations

import math
import socket
from collections import deque
from contextlib import suppress
from typing import Literal

import trio
from OpenSSL import SSL

from otacore.errors import RecordError, RecordHandoverError
from otacore.records.dtls12 import (
    ApplicationData,
    DtlsRecordLayer,
    PeerRepeatedFlight,
    RenegotiationRefused,
    SessionClosed,
)
from otacore.records.dtls12_client import (
    DtlsClientHandshake,
    prepare_client_context,
    repeated_server_flight_reply,
)
from otacore.records.tls13 import Tls13RecordLayer
from otacore.records.tls13_handover import Tls13Handshake, enable_record_export
from otacore.records.tls13_protocol import ApplicationData as TlsApplicationData
from otacore.records.tls13_protocol import CloseNotifyReceived
from server.emulator.device import LINK_ERRORS, DeviceRunner
from server.transport.client import DeviceCredentials
from server.transport.tls_handshake import COAP_ALPN

DeviceStack = Literal["records", "openssl"]
DEVICE_STACKS: tuple[DeviceStack, ...] = ("records", "openssl")
#: Errors that end one record-layer connection (a lost link, not a bug).
RECORD_LINK_ERRORS = (*LINK_ERRORS, RecordError, RecordHandoverError)
_READ_SIZE = 65536


def tls_client_context(credentials: DeviceCredentials) -> SSL.Context:
    """A device's TLS 1.3 context for :class:`Tls13Handshake` (mutual auth, ALPN ``coap``,
    traffic secrets exported to the handshake). Keep it to resume its sessions."""
    context = SSL.Context(SSL.TLS_METHOD)
    context.set_min_proto_version(SSL.TLS1_3_VERSION)
    context.use_certificate_chain_file(str(credentials.cert_path))
    context.use_privatekey_file(str(credentials.key_path))
    context.check_privatekey()
    context.load_verify_locations(str(credentials.ca_path))
    context.set_verify(SSL.VERIFY_PEER)
    context.set_alpn_protos([COAP_ALPN.encode()])
    enable_record_export(context)
    return context


def dtls_client_context(credentials: DeviceCredentials) -> SSL.Context:
    """A device's DTLS 1.2 context for :class:`DtlsClientHandshake`. Keep it to resume."""
    context = credentials.dtls_context()
    prepare_client_context(context)
    return context


class ResumableContext:
    """A device's OpenSSL context and its last session (pyOpenSSL resumes a session only
    with the context that made it). Counts the context's certificate verifications: a
    handshake that verified none resumed (RFC 8446 2.2: no Certificate message)."""

    __slots__ = ("context", "session", "verifications")

    def __init__(self, context: SSL.Context) -> None:
        self.context = context
        self.session: SSL.Session | None = None
        self.verifications = 0
        context.set_verify(SSL.VERIFY_PEER, self._verify)

    def _verify(
        self, _connection: SSL.Connection, _certificate: object, _errnum: int, _depth: int,
        ok: int,
    ) -> bool:
        self.verifications += 1
        return bool(ok)  # OpenSSL's verdict stands

    @classmethod
    def for_tls(cls, credentials: DeviceCredentials) -> ResumableContext:
        """A device's TLS 1.3 context, see :func:`tls_client_context`."""
        return cls(tls_client_context(credentials))

    @classmethod
    def for_dtls(cls, credentials: DeviceCredentials) -> ResumableContext:
        """A device's DTLS 1.2 context, see :func:`dtls_client_context`."""
        return cls(dtls_client_context(credentials))


class TlsRecordConnection:
    """A TLS 1.3 session as our record layer over a plain TCP stream.

    Our server sends its NewSessionTickets with its first reply (RFC 8446 4.6.1 lets it
    choose when), so the handshake object stays until that reply: the device's first
    messages are sealed by OpenSSL (:meth:`Tls13Handshake.send_application_data`), the
    tickets go to OpenSSL's session (``absorb_tickets``), and the first other record hands
    the session over to the record layer, which opens it.
    """

    def __init__(self, stream: trio.SocketStream, handshake: Tls13Handshake) -> None:
        self.stream = stream
        self._handshake: Tls13Handshake | None = handshake
        self.layer: Tls13RecordLayer | None = None
        #: OpenSSL's session with the tickets absorbed (set at the hand-over).
        self.session: SSL.Session | None = None

    def _take_over(self, handshake: Tls13Handshake) -> bytes:
        """Free OpenSSL; the bytes the record layer must open first."""
        handover = handshake.take_over()
        self._handshake = None
        self.layer = handover.record_layer()
        self.session = handover.session
        return handover.unprocessed

    async def receive(self) -> bytes:
        """The next application bytes (a TCP stream: any framing)."""
        while True:
            data = bytes(await self.stream.receive_some(_READ_SIZE))
            if not data:
                raise trio.BrokenResourceError("the server closed the connection")
            try:
                handshake = self._handshake
                if handshake is not None:
                    handshake.receive_data(data)  # tickets go to OpenSSL's session
                    if handshake.absorb_tickets:
                        continue  # nothing but tickets so far
                    data = self._take_over(handshake)
                layer = self.layer
                assert layer is not None
                events = layer.receive_data(data)
            except (RecordError, RecordHandoverError) as error:
                with suppress(*RECORD_LINK_ERRORS):
                    await self._flush()
                raise trio.BrokenResourceError(f"TLS record error: {error}") from None
            await self._flush()  # a KeyUpdate answer, our close_notify
            received = b"".join(e.data for e in events if isinstance(e, TlsApplicationData))
            if any(isinstance(e, CloseNotifyReceived) for e in events):
                raise trio.BrokenResourceError("the server closed the session (close_notify)")
            if received:
                return received

    async def _flush(self) -> None:
        out = self.layer.data_to_send() if self.layer is not None else b""
        if out:
            await self.stream.send_all(out)

    async def send(self, pieces: list[bytes]) -> None:
        """Seal and send a batch in one write."""
        try:
            if self._handshake is not None:
                self._handshake.send_application_data(b"".join(pieces))
                wire = self._handshake.data_to_send()
            else:
                assert self.layer is not None
                wire = self.layer.seal_many(pieces)
        except (RecordError, RecordHandoverError) as error:
            raise trio.BrokenResourceError(f"TLS record error: {error}") from None
        await self.stream.send_all(wire)

    async def aclose(self) -> None:
        """close_notify (RFC 8446 6.1), then the socket."""
        handshake = self._handshake
        if handshake is not None:
            with suppress(RecordError, RecordHandoverError):
                self._take_over(handshake)  # (the server never replied: no ticket)
            handshake.abort()
        if self.layer is not None:
            with trio.move_on_after(1.0), suppress(*RECORD_LINK_ERRORS):
                await self.stream.send_all(self.layer.close())
        await trio.aclose_forcefully(self.stream)


class DtlsRecordConnection:
    """A DTLS 1.2 session as our record layer over one connected UDP socket."""

    def __init__(self, sock: trio.socket.SocketType, layer: DtlsRecordLayer,
                 session: SSL.Session | None) -> None:  # fmt: skip
        self.sock = sock
        self.layer = layer
        self.session = session
        self._messages: deque[bytes] = deque()

    def take_datagram(self, datagram: bytes) -> list[bytes]:
        """Open one datagram: queue its messages, return the datagrams to answer with.
        trio.BrokenResourceError once the session is closed (after the answers are sent
        by the caller)."""
        layer = self.layer
        replies = list(repeated_server_flight_reply(layer, datagram))
        closed: SessionClosed | None = None
        for event in layer.open_datagram(datagram):
            if isinstance(event, ApplicationData):
                if event.data:  # an empty record carries no CoAP message
                    self._messages.append(event.data)
            elif isinstance(event, PeerRepeatedFlight):
                replies += event.replies
            elif isinstance(event, RenegotiationRefused):
                replies.append(event.reply)
            elif isinstance(event, SessionClosed):
                closed = event
                if event.reply:
                    replies.append(event.reply)
        if closed is not None:
            self._closed = closed
        return replies

    _closed: SessionClosed | None = None

    async def receive(self) -> bytes:
        """The next CoAP message (one per record, RFC 7252 over DTLS)."""
        while not self._messages:
            if self._closed is not None:
                raise trio.BrokenResourceError(
                    f"the DTLS session closed (alert {self._closed.alert}, "
                    f"{'by the server' if self._closed.by_peer else 'by us'})"
                )
            datagram = await self.sock.recv(_READ_SIZE)
            for reply in self.take_datagram(datagram):
                await self.sock.send(reply)
        return self._messages.popleft()

    async def send(self, pieces: list[bytes]) -> None:
        """One record, one datagram per CoAP message."""
        if self.layer.closed:
            raise trio.ClosedResourceError("the DTLS session is closed")
        try:
            datagrams = self.layer.seal_many(pieces)
        except RecordError as error:
            raise trio.BrokenResourceError(f"DTLS record error: {error}") from None
        for datagram in datagrams:
            await self.sock.send(datagram)

    async def aclose(self) -> None:
        """close_notify (RFC 6347 4.2.7 / RFC 5246 7.2.1), then the socket."""
        if not self.layer.closed:
            with suppress(*RECORD_LINK_ERRORS):
                await self.sock.send(self.layer.close())
        self.sock.close()


async def _udp_socket(server: tuple[str, int], source: str | None) -> trio.socket.SocketType:
    infos = await trio.socket.getaddrinfo(server[0], server[1], type=socket.SOCK_DGRAM)
    family = infos[0][0]
    sock = trio.socket.socket(family, socket.SOCK_DGRAM)
    try:
        any_address = "::" if family == socket.AF_INET6 else "0.0.0.0"
        await sock.bind((source or any_address, 0))
        # Connected: the kernel delivers only the server's datagrams to this socket.
        await sock.connect(server)
    except OSError:
        sock.close()
        raise
    return sock


async def connect_dtls_records(
    server: tuple[str, int], resumable: ResumableContext, *, source: str | None = None
) -> tuple[DtlsRecordConnection, bool]:
    """A DTLS 1.2 handshake as the device (resuming ``resumable.session`` if set), then our
    record layer: the connection and whether it resumed. Raises a RECORD_LINK_ERRORS error
    if it fails; the caller bounds the time."""
    sock = await _udp_socket(server, source)
    handshake: DtlsClientHandshake | None = None
    try:
        handshake = DtlsClientHandshake(
            resumable.context, now=trio.current_time(), session=resumable.session
        )
        while not handshake.complete:
            for datagram in handshake.datagrams_to_send():
                await sock.send(datagram)
            if handshake.failure is not None:
                raise trio.BrokenResourceError(handshake.failure)
            due = handshake.next_timeout()
            with trio.move_on_at(math.inf if due is None else due):
                datagram = await sock.recv(_READ_SIZE)
                handshake.receive_datagram(datagram, trio.current_time())
                continue
            handshake.handle_timeout(trio.current_time())
        for datagram in handshake.datagrams_to_send():  # a resumed handshake's final flight
            await sock.send(datagram)
        handover = handshake.take_over()
    except BaseException:
        if handshake is not None:
            handshake.abort()
        sock.close()
        raise
    connection = DtlsRecordConnection(sock, handover.layer, handover.session)
    if handover.unprocessed:
        for reply in connection.take_datagram(handover.unprocessed):
            await sock.send(reply)
    return connection, handover.resumed


async def connect_tls_records(
    server: tuple[str, int], resumable: ResumableContext, *, source: str | None = None
) -> tuple[TlsRecordConnection, bool]:
    """A TLS 1.3 handshake as the device (resuming ``resumable.session`` if set), then our
    record layer: the connection and whether it resumed. The server's tickets that follow
    the handshake go to OpenSSL's session (``absorb_tickets``) for the next resumption."""
    stream = await trio.open_tcp_stream(*server, local_address=source)
    verified_before = resumable.verifications
    handshake: Tls13Handshake | None = None
    try:
        handshake = Tls13Handshake(
            resumable.context, is_server=False, absorb_tickets=True, session=resumable.session
        )
        await stream.send_all(handshake.data_to_send())  # ClientHello
        while not handshake.complete:
            data = await stream.receive_some(_READ_SIZE)
            if not data:
                raise trio.BrokenResourceError("the server closed the connection in the handshake")
            handshake.receive_data(bytes(data))
            out = handshake.data_to_send()
            if out:
                await stream.send_all(out)
    except BaseException:
        if handshake is not None:
            handshake.abort()
        await trio.aclose_forcefully(stream)
        raise
    connection = TlsRecordConnection(stream, handshake)
    # Only a full handshake verifies the server's certificate (a resumed one has none).
    return connection, resumable.verifications == verified_before


RecordConnection = TlsRecordConnection | DtlsRecordConnection


async def connect_records(
    transport: str,
    server: tuple[str, int],
    resumable: ResumableContext,
    *,
    resume: bool = True,
    source: str | None = None,
) -> tuple[RecordConnection, bool]:
    """A device session over our record layers (``transport`` tcp: TLS 1.3, udp: DTLS 1.2):
    the connection and whether it resumed. ``resume``: offer the context's last session."""
    saved = resumable.session
    if not resume:
        resumable.session = None
    try:
        if transport == "tcp":
            return await connect_tls_records(server, resumable, source=source)
        return await connect_dtls_records(server, resumable, source=source)
    finally:
        resumable.session = saved


class RecordDeviceRunner(DeviceRunner):
    """A :class:`DeviceRunner` whose sessions are our record layers (the ``records`` stack).

    Everything else (boot, back-off, the session loop, actions) is the parent's: only the
    connection differs, so devices speak exactly the same CoAP/OTA as with OpenSSL.
    """

    _resumable: ResumableContext | None = None

    async def _connect(self) -> RecordConnection | None:
        link = self.link
        slots = self._connect_slots
        async with slots if slots is not None else _NO_SLOTS:
            resumable = self._resumable
            try:
                if resumable is None:
                    resumable = self._resumable = (
                        ResumableContext.for_tls(link.credentials)
                        if link.transport == "tcp"
                        else ResumableContext.for_dtls(link.credentials)
                    )
                with trio.fail_after(link.connect_timeout):
                    connection, _resumed = await connect_records(
                        link.transport, link.server, resumable, resume=link.resume_tls
                    )
                    return connection
            except (trio.TooSlowError, *RECORD_LINK_ERRORS) as exc:
                self.last_connect_error = f"{type(exc).__name__}: {exc}"
                return None

    async def _run_session(self, connection: RecordConnection) -> bool:  # type: ignore[override]
        went_online = await super()._run_session(connection)
        # As the parent does: resume next time only a session the server accepted.
        if went_online and self._resumable is not None and connection.session is not None:
            self._resumable.session = connection.session
        return went_online


class _NoSlots:
    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, *_exc: object) -> None:
        return None


_NO_SLOTS = _NoSlots()
