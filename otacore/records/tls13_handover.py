"""A TLS 1.3 handshake run by OpenSSL, then handed over to :class:`Tls13RecordLayer`.

:class:`Tls13Handshake` wraps a pyOpenSSL ``Connection`` on memory BIOs as a sans-IO
object. It feeds OpenSSL the peer's bytes *one whole record at a time* and stops the moment
the handshake completes, so every byte after the completing record stays with us
(:attr:`Tls13Handover.unprocessed`) and OpenSSL never reads application data.

When the handshake is complete:

- the server has the client's Finished: proof that the client has the server's whole flight
  (RFC 8446 4.4.4), so nothing would ever need OpenSSL again;
- the traffic secrets came from the keylog callback (NSS key log lines, matched to this
  connection by the ``Connection`` the callback receives and checked against its
  client_random). They live in this object only, in bytearrays wiped when taken;
- OpenSSL may already have sealed records under the application write key: a server sends
  its NewSessionTickets (4.6.1) in the step that completes. Those records are counted and
  each is *opened* under the exported key with the sequence number we assign it, so the
  write sequence number we continue from is proven, not assumed (a wrong one would reuse
  AEAD nonces, 5.3).

:meth:`Tls13Handshake.take_over` then frees the OpenSSL object and returns the state.

On the client side (devices, the load generator) the server's NewSessionTickets arrive after
the handshake. With ``absorb_tickets`` the handshake keeps giving OpenSSL those records, and
only those (each is opened first to check it holds tickets only), so the OpenSSL session in
:attr:`Tls13Handover.session` can resume later; the first other record stops it and stays
for the record layer, whose read sequence number starts after the absorbed ones.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from OpenSSL import SSL

from otacore.errors import RecordHandoverError
from otacore.records.openssl_memory import drain_output
from otacore.records.tls13 import Tls13RecordLayer
from otacore.records.tls13_keys import CipherSuite, suite_named, traffic_key_and_iv
from otacore.records.tls13_protocol import (
    DEFAULT_REKEY_AFTER_RECORDS,
    MAX_CIPHERTEXT,
    ContentType,
)

__all__ = ["Tls13Handover", "Tls13Handshake", "enable_record_export", "split_records"]

#: Record content types a peer may send during a TLS 1.3 handshake (RFC 8446 5, D.4), and
#: the first byte of every legacy_record_version (0x0301 or 0x0303, 5.1).
_RECORD_TYPES = frozenset(
    (
        ContentType.CHANGE_CIPHER_SPEC,
        ContentType.ALERT,
        ContentType.HANDSHAKE,
        ContentType.APPLICATION_DATA,
    )
)
_RECORD_VERSION_MAJOR = 3

# NSS key log labels of the first application traffic secrets (RFC 8446 7.1).
_CLIENT_LABEL = b"CLIENT_TRAFFIC_SECRET_0"
_SERVER_LABEL = b"SERVER_TRAFFIC_SECRET_0"


def enable_record_export(context: SSL.Context) -> None:
    """Make ``context``'s TLS 1.3 connections hand their traffic secrets to the
    :class:`Tls13Handshake` that runs them (and to nothing else)."""
    context.set_keylog_callback(_on_keylog_line)


def _on_keylog_line(connection: SSL.Connection, line: bytes) -> None:
    handshake = connection.get_app_data()
    if isinstance(handshake, Tls13Handshake):
        handshake._note_keylog_line(connection, line)


@dataclass(frozen=True, slots=True)
class Tls13Handover:
    """Everything a session keeps of its handshake."""

    suite: CipherSuite
    is_server: bool
    read_secret: bytes
    write_secret: bytes
    #: Records OpenSSL already opened / sealed under the application secrets.
    read_seq: int
    write_seq: int
    #: Bytes that arrived after the completing record, not yet given to any layer.
    unprocessed: bytes
    #: The peer's leaf certificate (DER), None if it sent none.
    peer_certificate_der: bytes | None
    alpn_protocol: bytes | None
    #: Client only: OpenSSL's session, for resuming with ``Connection.set_session``; it
    #: holds the tickets absorbed before the takeover (see ``absorb_tickets``).
    session: SSL.Session | None = None

    def record_layer(self, *, rekey_after: int = DEFAULT_REKEY_AFTER_RECORDS) -> Tls13RecordLayer:
        """A record layer continuing the session. Feed it :attr:`unprocessed` first."""
        return Tls13RecordLayer(
            self.suite,
            is_server=self.is_server,
            read_secret=self.read_secret,
            write_secret=self.write_secret,
            read_seq=self.read_seq,
            write_seq=self.write_seq,
            rekey_after=rekey_after,
        )


class Tls13Handshake:
    """One TLS 1.3 handshake over memory BIOs, fed record by record (sans-IO).

    ``context`` must be TLS 1.3-only and prepared with :func:`enable_record_export`.
    Use :meth:`receive_data` / :meth:`data_to_send` until :attr:`complete`, send the last
    :meth:`data_to_send`, then :meth:`take_over`.
    """

    __slots__ = (
        "_client_secret",
        "_connection",
        "_inbuf",
        "_outbuf",
        "_post_handshake_records",
        "_server_secret",
        "_tickets_absorbed",
        "absorb_tickets",
        "complete",
        "is_server",
    )

    def __init__(
        self,
        context: SSL.Context,
        *,
        is_server: bool,
        server_name: bytes | None = None,
        absorb_tickets: bool = False,
        session: SSL.Session | None = None,
        certificate: x509.Certificate | None = None,
        private_key: ec.EllipticCurvePrivateKey | None = None,
    ) -> None:
        """Client only: ``session`` (:attr:`Tls13Handover.session` of an earlier handshake
        with the same ``context``) is offered for resumption (RFC 8446 2.2).
        ``certificate`` and ``private_key``: this side's identity, when the context (shared
        by many devices) has none."""
        connection = SSL.Connection(context, None)  # None: memory BIOs
        connection.set_app_data(self)
        if certificate is not None and private_key is not None:
            connection.use_certificate(certificate)
            connection.use_privatekey(private_key)
        if is_server:
            connection.set_accept_state()
        else:
            if server_name:
                connection.set_tlsext_host_name(server_name)
            if session is not None:
                connection.set_session(session)
            connection.set_connect_state()
        self._connection: SSL.Connection | None = connection
        self.is_server = is_server
        self.complete = False
        self._inbuf = b""
        self._outbuf = b""
        self._client_secret: bytearray | None = None
        self._server_secret: bytearray | None = None
        # Records OpenSSL sealed in the step that completed the handshake (see module doc).
        self._post_handshake_records: list[bytes] = []
        #: Client only: after the handshake, keep feeding OpenSSL the server's
        #: NewSessionTicket records (and nothing else) so its session can resume later.
        self.absorb_tickets = absorb_tickets and not is_server
        self._tickets_absorbed = 0
        if not is_server:
            self._step()  # the ClientHello

    def _note_keylog_line(self, connection: SSL.Connection, line: bytes) -> None:
        """Keep this connection's application traffic secrets from a key log line."""
        parts = line.split()
        if len(parts) != 3 or parts[0] not in (_CLIENT_LABEL, _SERVER_LABEL):
            return  # handshake secrets and the exporter secret are not needed
        client_random = connection.client_random()
        if client_random is None or bytes.fromhex(parts[1].decode()) != client_random:
            return  # not this connection's line (cannot happen: the callback gets it)
        secret = bytearray.fromhex(parts[2].decode())
        if parts[0] == _CLIENT_LABEL:
            self._client_secret = secret
        else:
            self._server_secret = secret

    def _connection_or_fail(self) -> SSL.Connection:
        if self._connection is None:
            raise RecordHandoverError("the handshake was already taken over, aborted or failed")
        return self._connection

    def _step(self) -> None:
        connection = self._connection_or_fail()
        try:
            connection.do_handshake()
        except SSL.WantReadError:
            self._outbuf += drain_output(connection)
            return
        except SSL.Error as error:
            self._outbuf += drain_output(connection)  # OpenSSL's alert, for the peer
            self._fail()
            raise RecordHandoverError(f"TLS handshake failed: {error}") from error
        # Complete. Everything OpenSSL wrote in this step follows the peer's Finished (the
        # server's tickets, 4.6.1) or is the client's own final flight (4.4.4).
        final = drain_output(connection)
        self._outbuf += final
        self._post_handshake_records = split_records(final)
        self.complete = True

    def _fail(self) -> None:
        if self._connection is not None:
            self._connection.set_app_data(None)
        self._connection = None
        _wipe(self._client_secret)
        _wipe(self._server_secret)

    def abort(self) -> None:
        """Give up on the handshake (the peer left, a deadline passed): free the OpenSSL
        object now rather than at the next garbage collection, and wipe any secret."""
        self._inbuf = b""
        self._outbuf = b""
        self._post_handshake_records = []
        self._fail()

    def receive_data(self, data: bytes) -> None:
        """Feed the peer's bytes; OpenSSL gets whole records until the handshake completes.
        RecordHandoverError if the handshake fails (send :meth:`data_to_send`: its alert)."""
        connection = self._connection_or_fail()
        self._inbuf += data
        while (not self.complete or self.absorb_tickets) and len(self._inbuf) >= 5:
            length = int.from_bytes(self._inbuf[3:5], "big")
            if length > MAX_CIPHERTEXT:  # RFC 8446 5.1/5.2
                self._fail()
                raise RecordHandoverError(
                    f"handshake record of {length} bytes exceeds 2^14+256 (RFC 8446 5.2)"
                )
            if not self.complete and (
                self._inbuf[0] not in _RECORD_TYPES or self._inbuf[1] != _RECORD_VERSION_MAJOR
            ):
                self._reject_non_record()
            if len(self._inbuf) < 5 + length:
                return
            record = self._inbuf[: 5 + length]
            if self.complete and not self._absorb_ticket(connection, record):
                self.absorb_tickets = False  # the rest is for the record layer
                return
            self._inbuf = self._inbuf[5 + length :]
            if not self.complete:
                connection.bio_write(record)
                self._step()

    def _reject_non_record(self) -> None:
        """The peer's bytes do not start a TLS record (5.1): hand them to OpenSSL at once
        rather than wait for a "body" of up to 16 KiB that may never come (an HTTP client
        or a port scanner would hold the connection until its deadline). OpenSSL rejects
        them with its own error and alert; always raises RecordHandoverError."""
        connection = self._connection_or_fail()
        header = self._inbuf[:5]
        connection.bio_write(self._inbuf)
        self._inbuf = b""
        self._step()  # raises with OpenSSL's verdict
        self._fail()
        raise RecordHandoverError(
            f"not a TLS record (content type {header[0]}, version byte {header[1]}; RFC 8446 5.1)"
        )

    def _absorb_ticket(self, connection: SSL.Connection, record: bytes) -> bool:
        """Give OpenSSL ``record`` if it holds NewSessionTickets only (RFC 8446 4.6.1), so
        its session learns them; False (untouched) for anything else."""
        if self._server_secret is None:
            return False
        suite = suite_named(connection.get_cipher_name() or "")
        key, iv = traffic_key_and_iv(suite, bytes(self._server_secret))
        nonce = (int.from_bytes(iv, "big") ^ self._tickets_absorbed).to_bytes(12, "big")
        try:
            inner = suite.aead(key).decrypt(nonce, record[5:], record[:5])  # 5.2, 5.3
        except InvalidTag:
            return False  # the record layer will report it
        inner = inner.rstrip(b"\x00")
        if not inner or inner[-1] != ContentType.HANDSHAKE or not _only_tickets(inner[:-1]):
            return False
        connection.bio_write(record)
        try:
            received = connection.recv(1)
        except SSL.WantReadError:
            received = b""
        except SSL.Error as error:
            self._fail()
            raise RecordHandoverError(f"OpenSSL refused a session ticket: {error}") from error
        if received:  # cannot happen: the record held handshake messages only
            self._fail()
            raise RecordHandoverError("OpenSSL returned application data from a ticket record")
        self._tickets_absorbed += 1
        self._outbuf += drain_output(connection)
        return True

    def send_application_data(self, data: bytes) -> None:
        """Client only, once :attr:`complete` and before :meth:`take_over`: seal ``data``
        with OpenSSL (collect it with :meth:`data_to_send`). For a device whose server sends
        its NewSessionTickets with its first reply: the handshake stays, absorbing them
        (``absorb_tickets``), until that reply comes; :meth:`take_over` then continues the
        write sequence numbers after these records (each is opened to prove it)."""
        connection = self._connection_or_fail()
        if self.is_server or not self.complete:
            raise RecordHandoverError(
                "application data before the take-over is for a client whose handshake is complete"
            )
        view = memoryview(data)
        while view:
            sent = connection.send(view)
            view = view[sent:]
        out = drain_output(connection)
        self._post_handshake_records += split_records(out)
        self._outbuf += out

    def data_to_send(self) -> bytes:
        """OpenSSL's output so far (handshake flights, tickets, alerts)."""
        out = self._outbuf
        self._outbuf = b""
        return out

    def take_over(self, *, rekey_after: int = DEFAULT_REKEY_AFTER_RECORDS) -> Tls13Handover:
        """Free OpenSSL and return the session's keys, counters and unread bytes.

        Requires :attr:`complete` and :meth:`data_to_send` collected (OpenSSL's output must
        go out before the first record we seal)."""
        connection = self._connection_or_fail()
        if not self.complete:
            raise RecordHandoverError("the handshake is not complete yet")
        if self._outbuf:
            raise RecordHandoverError("send data_to_send() before taking the session over")
        if connection.pending():
            raise RecordHandoverError("OpenSSL holds unread application data")
        if self._client_secret is None or self._server_secret is None:
            self._fail()
            raise RecordHandoverError(
                "no traffic secrets were logged: prepare the context with enable_record_export()"
            )
        suite = suite_named(connection.get_cipher_name() or "")
        if connection.get_protocol_version_name() != "TLSv1.3":
            self._fail()
            raise RecordHandoverError("the session is not TLS 1.3")
        client_secret, server_secret = bytes(self._client_secret), bytes(self._server_secret)
        read_secret, write_secret = (
            (client_secret, server_secret) if self.is_server else (server_secret, client_secret)
        )
        write_seq = _count_sealed(suite, write_secret, self._post_handshake_records)
        peer = connection.get_peer_certificate(as_cryptography=True)
        handover = Tls13Handover(
            suite=suite,
            is_server=self.is_server,
            read_secret=read_secret,
            write_secret=write_secret,
            # After the completing record OpenSSL got only the ticket records we counted.
            read_seq=self._tickets_absorbed,
            write_seq=write_seq,
            unprocessed=self._inbuf,
            peer_certificate_der=None if peer is None else _der(peer),
            alpn_protocol=connection.get_alpn_proto_negotiated() or None,
            session=None if self.is_server else connection.get_session(),
        )
        self._inbuf = b""
        self._post_handshake_records = []
        # Freeing an SSL that was never shut down marks its session not resumable and
        # drops it from the context's cache (OpenSSL's ssl_clear_bad_session); this one
        # ends well, so say so without sending anything: the record layer owns the wire.
        connection.set_shutdown(SSL.SENT_SHUTDOWN | SSL.RECEIVED_SHUTDOWN)
        self._fail()  # frees OpenSSL, wipes the captured secrets
        return handover


def _der(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(Encoding.DER)


def _wipe(secret: bytearray | None) -> None:
    if secret is not None:
        secret[:] = bytes(len(secret))


def _only_tickets(content: bytes) -> bool:
    """True if ``content`` is whole NewSessionTicket messages and nothing else (4.6.1)."""
    pos = 0
    while pos < len(content):
        if len(content) - pos < 4 or content[pos] != 4:
            return False
        pos += 4 + int.from_bytes(content[pos + 1 : pos + 4], "big")
    return pos == len(content)


def split_records(data: bytes) -> list[bytes]:
    """The TLS records ``data`` (OpenSSL's output) holds, split by their RFC 8446 5.1
    headers; RecordHandoverError if it ends inside a record."""
    records = []
    pos = 0
    while len(data) - pos >= 5:
        end = pos + 5 + int.from_bytes(data[pos + 3 : pos + 5], "big")
        records.append(data[pos:end])
        pos = end
    if pos != len(data):
        raise RecordHandoverError("OpenSSL wrote a partial record")
    return records


def _count_sealed(suite: CipherSuite, write_secret: bytes, records: list[bytes]) -> int:
    """How many of ``records`` (OpenSSL's output in the completing step) are sealed under
    ``write_secret``: a contiguous tail, each opened with its sequence number to prove it."""
    key, iv_bytes = traffic_key_and_iv(suite, write_secret)
    aead = suite.aead(key)
    iv = int.from_bytes(iv_bytes, "big")
    count = 0
    for record in records:
        header, body = record[:5], record[5:]
        try:
            if header[0] != ContentType.APPLICATION_DATA:
                raise InvalidTag
            aead.decrypt((iv ^ count).to_bytes(12, "big"), body, header)  # RFC 8446 5.3
        except InvalidTag:
            if count:  # an application-epoch record followed by one that is not
                raise RecordHandoverError(
                    "OpenSSL's post-handshake records are not one run under the "
                    "application key; refusing to guess the write sequence number"
                ) from None
            continue
        count += 1
    return count
