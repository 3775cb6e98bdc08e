"""A DTLS 1.2 client handshake run by OpenSSL on memory BIOs, as a sans-IO object.

The device-side mirror of :class:`~otacore.records.dtls12_server.DtlsServerHandshake` (the
load generator's devices use it, issue 14 item 8): datagrams in
(:meth:`~DtlsClientHandshake.receive_datagram`), datagrams out
(:meth:`~DtlsClientHandshake.datagrams_to_send`), a retransmission deadline out
(:meth:`~DtlsClientHandshake.next_timeout`, RFC 6347 4.2.4) that the shell's clock drives
through :meth:`~DtlsClientHandshake.handle_timeout`. OpenSSL's own timer is never used.

OpenSSL answers the server's HelloVerifyRequest itself (RFC 6347 4.2.1: the ClientHello
again, with the cookie); to us that is one more flight, with a fresh timer.

Once OpenSSL reports the handshake complete, :meth:`~DtlsClientHandshake.take_over` builds
the session's :class:`~otacore.records.dtls12.DtlsRecordLayer` (``dtls12_handover``; in a
resumed handshake the client sends the final flight, RFC 5246 7.3, so the layer keeps it to
retransmit until the server's first protected record proves it arrived), keeps OpenSSL's
``SSL.Session`` to resume with next time, and frees the OpenSSL object.

The context must be made with :func:`prepare_client_context` (no MTU query). pyOpenSSL
resumes a session only with the context that made it: keep both.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from OpenSSL import SSL

from otacore.errors import RecordHandoverError
from otacore.records.dtls12 import (
    RECORD_HEADER,
    RECORD_HEADER_SIZE,
    ContentType,
    DtlsRecordLayer,
)
from otacore.records.dtls12_handover import HandshakeRecordTracker, layer_from_connection
from otacore.records.dtls12_server import (
    DEFAULT_MTU,
    INITIAL_TIMEOUT,
    MAX_TIMEOUT,
    _handshake_fragments,
    _record_bounds,
    split_datagrams,
)
from otacore.records.openssl_memory import drain_output

__all__ = [
    "DtlsClientHandover",
    "DtlsClientHandshake",
    "prepare_client_context",
]


def prepare_client_context(context: SSL.Context) -> None:
    """Make ``context`` fit for :class:`DtlsClientHandshake` (call before its first use:
    pyOpenSSL freezes a context then)."""
    # Memory BIOs have no MTU to query: the handshake sets one (set_ciphertext_mtu).
    context.set_options(SSL.OP_NO_QUERY_MTU)


@dataclass(frozen=True, slots=True)
class DtlsClientHandover:
    """What a device keeps of its handshake."""

    layer: DtlsRecordLayer
    #: The server's leaf certificate (DER).
    peer_certificate_der: bytes | None
    #: True if the handshake resumed ``session`` (RFC 5077 ticket or session id).
    resumed: bool
    #: OpenSSL's session, to resume with next time (with the same context).
    session: SSL.Session | None
    #: Records that came after the server's Finished in its last datagram: give them to
    #: ``layer.open_datagram`` first.
    unprocessed: bytes = b""


class DtlsClientHandshake:
    """One DTLS 1.2 client handshake over memory BIOs (sans-IO; see the module docstring).

    Nothing raises for what the network sends: a failed handshake sets :attr:`failure`,
    its alert (if OpenSSL wrote one) waits in :meth:`datagrams_to_send`.
    """

    __slots__ = (
        "_connection",
        "_deadline",
        "_flight",
        "_got_certificate",
        "_outbox",
        "_seen_fragments",
        "_timeout",
        "_tracker",
        "_unprocessed",
        "complete",
        "failure",
        "max_timeout",
        "mtu",
        "retransmissions",
    )

    def __init__(
        self,
        context: SSL.Context,
        *,
        now: float,
        session: SSL.Session | None = None,
        certificate: x509.Certificate | None = None,
        private_key: ec.EllipticCurvePrivateKey | None = None,
        mtu: int = DEFAULT_MTU,
        initial_timeout: float = INITIAL_TIMEOUT,
        max_timeout: float = MAX_TIMEOUT,
    ) -> None:
        """``session``: an earlier session of ``context`` to resume (OpenSSL falls back to
        a full handshake if the server declines it). ValueError if ``session`` came from
        another context (pyOpenSSL's rule). ``certificate`` and ``private_key``: this
        device's identity, when the context (shared by many devices) has none."""
        connection = SSL.Connection(context, None)  # None: memory BIOs
        if certificate is not None and private_key is not None:
            connection.use_certificate(certificate)
            connection.use_privatekey(private_key)
        connection.set_connect_state()
        connection.set_ciphertext_mtu(mtu)
        if session is not None:
            connection.set_session(session)
        self._connection: SSL.Connection | None = connection
        self._tracker = HandshakeRecordTracker()
        self.mtu = mtu
        self.max_timeout = max_timeout
        self._timeout = initial_timeout
        self._deadline: float | None = None
        self._flight: list[bytes] = []
        self._outbox: list[bytes] = []
        self._unprocessed = b""
        self._got_certificate = False
        self._seen_fragments: frozenset[tuple[int, int, int]] = frozenset()
        #: True once OpenSSL has finished the handshake (then :meth:`take_over`).
        self.complete = False
        #: Why the handshake failed, or None.
        self.failure: str | None = None
        #: Flights resent on the timer or for a repeated server flight.
        self.retransmissions = 0
        self._step(now)  # the ClientHello

    # --- the shell's interface ----------------------------------------------------------

    def receive_datagram(self, datagram: bytes, now: float) -> None:
        """A datagram from the server. Ignored once the handshake is complete or failed."""
        connection = self._connection
        if connection is None or self.complete or self.failure is not None or not datagram:
            return
        fragments = _handshake_fragments(datagram)
        self._got_certificate |= _carries_certificate(datagram)
        repeated = bool(fragments) and fragments <= self._seen_fragments
        self._seen_fragments |= fragments
        wrote = False
        # One record at a time, stopping where the handshake completes: what follows the
        # server's Finished stays for the record layer (DtlsClientHandover.unprocessed).
        for start, stop in _record_bounds(datagram):
            record = datagram[start:stop]
            self._tracker.incoming(record)
            connection.bio_write(record)
            wrote |= self._step(now)
            if self.complete or self.failure is not None:
                self._unprocessed = datagram[stop:] if self.complete else b""
                break
        if not wrote and repeated:
            # The server resent its flight: ours was lost (RFC 6347 4.2.4). Resend now and
            # back the timer off as for a timeout.
            self._retransmit(now)

    def datagrams_to_send(self) -> list[bytes]:
        """Datagrams to send now, in order (and forget them)."""
        out, self._outbox = self._outbox, []
        return out

    def next_timeout(self) -> float | None:
        """When :meth:`handle_timeout` is due (the shell's clock), or None."""
        return self._deadline

    def handle_timeout(self, now: float) -> None:
        """Resend our last flight if its timer expired (RFC 6347 4.2.4)."""
        if self._deadline is not None and now >= self._deadline:
            self._retransmit(now)

    def take_over(self) -> DtlsClientHandover:
        """The established session: its record layer, the server's certificate, whether it
        resumed, and the session to resume next time. Frees the OpenSSL object. Send
        :meth:`datagrams_to_send` first (in a resumed handshake: our final flight).
        RecordHandoverError if the handshake is not complete."""
        connection = self._connection
        if connection is None or not self.complete:
            raise RecordHandoverError("the DTLS handshake is not complete; nothing to take over")
        try:
            layer = layer_from_connection(connection, self._tracker, is_server=False)
            certificate = connection.get_peer_certificate(as_cryptography=True)
            der = None if certificate is None else certificate.public_bytes(Encoding.DER)
            session = connection.get_session()
            # Freeing an SSL that was never shut down marks its session not resumable
            # (OpenSSL's ssl_clear_bad_session); this one ended well and the record layer
            # owns the wire now, so say so without sending anything.
            connection.set_shutdown(SSL.SENT_SHUTDOWN | SSL.RECEIVED_SHUTDOWN)
        finally:
            self._release()
        unprocessed, self._unprocessed = self._unprocessed, b""
        # A full handshake has the server's Certificate; a resumed one not (RFC 5246 7.3).
        return DtlsClientHandover(layer, der, not self._got_certificate, session, unprocessed)

    def abort(self) -> None:
        """Give up (no answer, a deadline passed): free the OpenSSL object now."""
        self._release()
        self._outbox = []
        self._flight = []

    # --- internals ----------------------------------------------------------------------

    def _release(self) -> None:
        self._connection = None
        self._deadline = None
        self._tracker = HandshakeRecordTracker()  # drops the kept records

    def _step(self, now: float) -> bool:
        """Run OpenSSL on what it has; True if it wrote anything."""
        connection = self._connection
        assert connection is not None
        error: SSL.Error | None = None
        try:
            connection.do_handshake()
            self.complete = True
        except SSL.WantReadError:
            pass
        except SSL.Error as exc:
            error = exc
        output = drain_output(connection)
        if output:
            self._tracker.outgoing(output)
            datagrams = split_datagrams(output, self.mtu)
            self._outbox.extend(datagrams)
            if not self.complete:
                # A new flight (the first ClientHello, the one answering a
                # HelloVerifyRequest, or our certificate flight) restarts the timer.
                self._flight = datagrams
                self._deadline = now + self._timeout
        if error is not None:
            self.failure = f"DTLS handshake failed: {error!r}"
            self._deadline = None
            self._flight = []
        elif self.complete:
            # A resumed handshake's final flight is ours: the record layer retransmits it
            # when the server repeats its own (dtls12_handover). A full one ends with the
            # server's Finished: nothing of ours is outstanding.
            self._deadline = None
            self._flight = []
        return bool(output)

    def _retransmit(self, now: float) -> None:
        if not self._flight or self.complete or self.failure is not None:
            return
        self.retransmissions += 1
        self._outbox.extend(self._flight)
        self._timeout = min(self._timeout * 2, self.max_timeout)
        self._deadline = now + self._timeout


_CERTIFICATE = 11  # HandshakeType.certificate (RFC 5246 7.4)


def _carries_certificate(datagram: bytes) -> bool:
    """True if ``datagram`` holds a cleartext (epoch 0) Certificate message fragment."""
    offset, end = 0, len(datagram)
    while end - offset > RECORD_HEADER_SIZE:
        content_type, _version, epoch_seq, length = RECORD_HEADER.unpack_from(datagram, offset)
        body = offset + RECORD_HEADER_SIZE
        if (
            content_type == ContentType.HANDSHAKE
            and epoch_seq >> 48 == 0
            and datagram[body] == _CERTIFICATE
        ):
            return True
        offset = body + length
    return False
