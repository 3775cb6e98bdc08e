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

import functools
import math
import socket
from contextlib import nullcontext, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import trio
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
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
)
from otacore.records.tls13 import Tls13RecordLayer
from otacore.records.tls13_handover import Tls13Handshake, enable_record_export
from otacore.records.tls13_protocol import ApplicationData as TlsApplicationData
from otacore.records.tls13_protocol import CloseNotifyReceived
from server.emulator.device import LINK_ERRORS, DeviceRunner
from server.transport.client import DeviceCredentials
from server.transport.dtls import DTLS1_2_VERSION, DTLS_CIPHERS
from server.transport.tls_handshake import COAP_ALPN

DeviceStack = Literal["records", "openssl"]
DEVICE_STACKS: tuple[DeviceStack, ...] = ("records", "openssl")
#: Errors that end one record-layer connection (a lost link, not a bug).
RECORD_LINK_ERRORS = (*LINK_ERRORS, RecordError, RecordHandoverError)
_READ_SIZE = 65536


def tls_client_context(ca_path: Path) -> SSL.Context:
    """The devices' shared TLS 1.3 context for :class:`Tls13Handshake`: verifies the server
    against the installation CA, ALPN ``coap``, traffic secrets exported to the handshake.
    Each handshake brings its device's certificate and key."""
    context = SSL.Context(SSL.TLS_METHOD)
    context.set_min_proto_version(SSL.TLS1_3_VERSION)
    context.load_verify_locations(str(ca_path))
    context.set_alpn_protos([COAP_ALPN.encode()])
    enable_record_export(context)
    return context


def dtls_client_context(ca_path: Path) -> SSL.Context:
    """The devices' shared DTLS 1.2 context for :class:`DtlsClientHandshake` (suites and
    versions as the emulator's, :func:`server.transport.dtls.make_dtls_client_context`)."""
    context = SSL.Context(SSL.DTLS_METHOD)
    context.set_min_proto_version(DTLS1_2_VERSION)
    context.set_max_proto_version(DTLS1_2_VERSION)
    context.set_cipher_list(DTLS_CIPHERS)
    context.load_verify_locations(str(ca_path))
    prepare_client_context(context)
    return context


class DeviceContexts:
    """One OpenSSL context per transport for all of a process's devices (an SSL_CTX with
    its CA store costs ~26-29 KiB: one per device would dominate an idle device's cost).
    A device's identity is set on each handshake's connection, and its sessions resume with
    the shared context (pyOpenSSL resumes a session only with the context that made it)."""

    def __init__(self, ca_path: Path) -> None:
        self.tls = tls_client_context(ca_path)
        self.dtls = dtls_client_context(ca_path)
        #: ids of the TLS handshakes in progress that verified a server certificate: only
        #: a full handshake does (a resumed one has no Certificate, RFC 8446 2.2).
        self._verified: set[int] = set()
        for context in (self.tls, self.dtls):
            context.set_verify(SSL.VERIFY_PEER, self._verify)

    def _verify(
        self, connection: SSL.Connection, _certificate: object, _errnum: int, _depth: int,
        ok: int,
    ) -> bool:
        self._verified.add(id(connection.get_app_data()))
        return bool(ok)  # OpenSSL's verdict stands

    def take_verified(self, handshake: object) -> bool:
        """True if ``handshake`` verified a certificate (and forget it)."""
        key = id(handshake)
        verified = key in self._verified
        self._verified.discard(key)
        return verified


@functools.cache
def device_contexts(ca_path: Path) -> DeviceContexts:
    """This process's shared contexts for devices of the installation whose CA is ``ca_path``."""
    return DeviceContexts(ca_path)


@dataclass(frozen=True, slots=True)
class DeviceIdentity:
    """A device's certificate and key, read from its credential files at each handshake
    (held only while it runs)."""

    certificate: x509.Certificate
    private_key: ec.EllipticCurvePrivateKey

    @classmethod
    def load(cls, credentials: DeviceCredentials) -> DeviceIdentity:
        """Read the device's files; RecordHandoverError if the key is not an EC key."""
        certificate = x509.load_pem_x509_certificate(credentials.cert_path.read_bytes())
        key = serialization.load_pem_private_key(credentials.key_path.read_bytes(), None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise RecordHandoverError(
                f"{credentials.key_path}: a device key is an EC key (as provisioned)"
            )
        return cls(certificate, key)


class DeviceResumption:
    """What a device keeps between sessions: its credentials and its last session."""

    __slots__ = ("credentials", "session")

    def __init__(self, credentials: DeviceCredentials) -> None:
        self.credentials = credentials
        self.session: SSL.Session | None = None


class TlsRecordConnection:
    """A TLS 1.3 session as our record layer over a plain TCP stream.

    Our server sends its NewSessionTickets with its first reply (RFC 8446 4.6.1 lets it
    choose when), so the handshake object stays until that reply: the device's first
    messages are sealed by OpenSSL (:meth:`Tls13Handshake.send_application_data`), the
    tickets go to OpenSSL's session (``absorb_tickets``), and the first other record hands
    the session over to the record layer, which opens it.
    """

    __slots__ = ("_handshake", "_sending", "layer", "session", "stream")

    def __init__(self, stream: trio.SocketStream, handshake: Tls13Handshake) -> None:
        self.stream = stream
        # The reader answers (a KeyUpdate, the server's close_notify) while the device's
        # loop may be sending: one writer at a time on the stream (as SSLStream does).
        self._sending = trio.Lock()
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
        async with self._sending:
            out = self.layer.data_to_send() if self.layer is not None else b""
            if out:
                await self.stream.send_all(out)

    async def send(self, pieces: list[bytes]) -> None:
        """Seal and send a batch in one write."""
        async with self._sending:
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
                async with self._sending:
                    await self.stream.send_all(self.layer.close())
        await trio.aclose_forcefully(self.stream)

    def cut(self) -> None:
        """Power cut: OpenSSL's handshake object freed, the socket closed now, nothing
        sent (the kernel still ends the TCP connection, as for a killed process)."""
        handshake, self._handshake = self._handshake, None
        if handshake is not None:
            handshake.abort()
        self.stream.socket.close()


class DtlsRecordConnection:
    """A DTLS 1.2 session as our record layer over one connected UDP socket."""

    __slots__ = ("_closed", "_messages", "layer", "session", "sock")

    def __init__(self, sock: trio.socket.SocketType, layer: DtlsRecordLayer,
                 session: SSL.Session | None) -> None:  # fmt: skip
        self.sock = sock
        self.layer = layer
        #: OpenSSL's session, to resume the next time.
        self.session = session
        # Messages opened but not yet read (a plain list: an idle device holds it empty).
        self._messages: list[bytes] = []
        self._closed: SessionClosed | None = None

    def take_datagram(self, datagram: bytes) -> list[bytes]:
        """Open one datagram: queue its messages, return the datagrams to answer with (our
        final flight again, a refusal to renegotiate, our close_notify). After a closing
        alert, :meth:`receive` raises once the queued messages are read."""
        layer = self.layer
        replies: list[bytes] = []
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
        return self._messages.pop(0)

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

    def cut(self) -> None:
        """Power cut: the socket closed now, nothing sent (the server's session lasts
        until its idle timeout)."""
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
    except BaseException:  # an error, or a power cut meanwhile: no socket left open
        sock.close()
        raise
    return sock


async def connect_dtls_records(
    server: tuple[str, int], device: DeviceResumption, *, source: str | None = None
) -> tuple[DtlsRecordConnection, bool]:
    """A DTLS 1.2 handshake as the device (resuming ``device.session`` if set), then our
    record layer: the connection and whether it resumed. Raises a RECORD_LINK_ERRORS error
    if it fails; the caller bounds the time."""
    identity = DeviceIdentity.load(device.credentials)
    contexts = device_contexts(device.credentials.ca_path)
    sock = await _udp_socket(server, source)
    handshake: DtlsClientHandshake | None = None
    try:
        handshake = DtlsClientHandshake(
            contexts.dtls, now=trio.current_time(), session=device.session,
            certificate=identity.certificate, private_key=identity.private_key,
        )  # fmt: skip
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
        try:
            for reply in connection.take_datagram(handover.unprocessed):
                await sock.send(reply)
        except BaseException:
            connection.cut()
            raise
    return connection, handover.resumed


async def connect_tls_records(
    server: tuple[str, int], device: DeviceResumption, *, source: str | None = None
) -> tuple[TlsRecordConnection, bool]:
    """A TLS 1.3 handshake as the device (resuming ``device.session`` if set): the
    connection (it hands over to our record layer at the server's first reply, see
    :class:`TlsRecordConnection`) and whether it resumed."""
    identity = DeviceIdentity.load(device.credentials)
    contexts = device_contexts(device.credentials.ca_path)
    stream = await trio.open_tcp_stream(*server, local_address=source)
    handshake: Tls13Handshake | None = None
    try:
        handshake = Tls13Handshake(
            contexts.tls, is_server=False, absorb_tickets=True, session=device.session,
            certificate=identity.certificate, private_key=identity.private_key,
        )  # fmt: skip
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
            contexts.take_verified(handshake)
            handshake.abort()
        await trio.aclose_forcefully(stream)
        raise
    connection = TlsRecordConnection(stream, handshake)
    # Only a full handshake verifies the server's certificate (a resumed one has none).
    return connection, not contexts.take_verified(handshake)


RecordConnection = TlsRecordConnection | DtlsRecordConnection


async def connect_records(
    transport: str,
    server: tuple[str, int],
    device: DeviceResumption,
    *,
    resume: bool = True,
    source: str | None = None,
) -> tuple[RecordConnection, bool]:
    """A device session over our record layers (``transport`` tcp: TLS 1.3, udp: DTLS 1.2):
    the connection and whether it resumed. ``resume``: offer the device's last session."""
    saved = device.session
    if not resume:
        device.session = None
    try:
        if transport == "tcp":
            return await connect_tls_records(server, device, source=source)
        return await connect_dtls_records(server, device, source=source)
    finally:
        device.session = saved


class RecordDeviceRunner(DeviceRunner):
    """A :class:`DeviceRunner` whose sessions are our record layers (the ``records`` stack).

    Everything else (boot, back-off, the session loop, actions) is the parent's: only the
    connection differs, so devices speak exactly the same CoAP/OTA as with OpenSSL.
    """

    _resumption: DeviceResumption | None = None

    async def _connect(self) -> RecordConnection | None:
        link = self.link
        slots = self._connect_slots
        async with slots if slots is not None else nullcontext():
            if self._resumption is None:
                self._resumption = DeviceResumption(link.credentials)
            try:
                with trio.fail_after(link.connect_timeout):
                    connection, _resumed = await connect_records(
                        link.transport, self.server, self._resumption, resume=link.resume_tls
                    )
                    return connection
            except (trio.TooSlowError, *RECORD_LINK_ERRORS) as exc:
                self.last_connect_error = f"{type(exc).__name__}: {exc}"
                return None

    async def _run_session(self, connection: RecordConnection) -> bool:  # type: ignore[override]
        went_online = await super()._run_session(connection)
        # As the parent does: resume next time only a session the server accepted.
        if went_online and self._resumption is not None and connection.session is not None:
            self._resumption.session = connection.session
        return went_online
