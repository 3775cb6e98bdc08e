"""A DTLS 1.2 client handshake run by OpenSSL on memory BIOs, as a sans-IO object.

The device-side mirror of :class:`~otacore.records.dtls12_server.DtlsServerHandshake`, on the
same :class:`~otacore.records.dtls12_handshake.DtlsHandshakeDriver` (the
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
from otacore.records.dtls12 import DtlsRecordLayer
from otacore.records.dtls12_handover import layer_from_connection
from otacore.records.dtls12_handshake import (
    DEFAULT_MTU,
    INITIAL_TIMEOUT,
    MAX_TIMEOUT,
    DtlsHandshakeDriver,
    carries_certificate,
)

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


class DtlsClientHandshake(DtlsHandshakeDriver):
    """One DTLS 1.2 client handshake over memory BIOs (sans-IO; see the module docstring).

    Nothing raises for what the network sends: a failed handshake sets :attr:`failure`,
    its alert (if OpenSSL wrote one) waits in :meth:`datagrams_to_send`.
    """

    IS_SERVER = False

    __slots__ = ("_got_certificate",)

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
        if session is not None:
            connection.set_session(session)
        super().__init__(
            connection, mtu=mtu, initial_timeout=initial_timeout, max_timeout=max_timeout
        )
        self._got_certificate = False
        self._step(now)  # the ClientHello

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

    def _note_incoming(self, datagram: bytes) -> None:
        self._got_certificate |= carries_certificate(datagram)
