"""A DTLS 1.2 server handshake run by OpenSSL on memory BIOs, as a sans-IO object.

:class:`DtlsServerHandshake` starts from a ClientHello that passed the cookie exchange
(``dtls12_cookie``). Datagrams in, datagrams out and our retransmission timer are the
shared :class:`~otacore.records.dtls12_handshake.DtlsHandshakeDriver`'s (read it for how a
flight is resent: a resumed handshake's Finished is re-sealed under a new sequence number).

Once OpenSSL reports the handshake complete, :meth:`~DtlsServerHandshake.take_over` builds
the session's :class:`~otacore.records.dtls12.DtlsRecordLayer` (``dtls12_handover``: it keeps
our final flight to retransmit until the peer's first protected record proves it arrived)
and frees the OpenSSL object.

The context must be made with :func:`prepare_server_context` (verify callback, no MTU query,
cookie checks left to ``dtls12_cookie``).
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography.hazmat.primitives.serialization import Encoding
from OpenSSL import SSL, crypto

from otacore.errors import RecordHandoverError
from otacore.records.dtls12 import DtlsRecordLayer
from otacore.records.dtls12_handover import layer_from_connection
from otacore.records.dtls12_handshake import (
    DEFAULT_MTU,
    INITIAL_TIMEOUT,
    MAX_TIMEOUT,
    DtlsHandshakeDriver,
    carries_certificate,
    handshake_fragments,
)
from otacore.records.verify_errors import verify_failure_reason

__all__ = [
    "DtlsHandover",
    "DtlsServerHandshake",
    "note_verify_failure",
    "prepare_server_context",
]


def note_verify_failure(
    connection: SSL.Connection, certificate: crypto.X509, errnum: int, depth: int, ok: int
) -> bool:
    """OpenSSL's verify callback: keep its verdict, and tell the handshake why it failed."""
    if not ok:
        handshake = connection.get_app_data()
        if isinstance(handshake, DtlsServerHandshake) and handshake.verify_error is None:
            handshake.verify_error = verify_failure_reason(errnum, depth)
    return bool(ok)


def prepare_server_context(context: SSL.Context, *, verify_mode: int) -> None:
    """Make ``context`` fit for :class:`DtlsServerHandshake` (call before its first use:
    pyOpenSSL freezes a context then)."""
    context.set_verify(verify_mode, note_verify_failure)
    # Memory BIOs have no MTU to query (the handshake sets one). Renegotiation needs no
    # option: OpenSSL is gone once the handshake is over, and the record layer refuses it.
    context.set_options(SSL.OP_NO_QUERY_MTU)
    # dtls12_cookie checked the cookie before any OpenSSL object existed.
    context.set_cookie_verify_callback(lambda _connection, _cookie: True)


@dataclass(frozen=True, slots=True)
class DtlsHandover:
    """What a session keeps of its handshake."""

    layer: DtlsRecordLayer
    #: The client's leaf certificate (DER), None if it sent none.
    peer_certificate_der: bytes | None
    #: True if the handshake resumed an earlier session (a ticket, RFC 5077).
    resumed: bool
    #: Records that came after the peer's Finished in its last datagram: give them to
    #: ``layer.open_datagram`` first.
    unprocessed: bytes = b""


class DtlsServerHandshake(DtlsHandshakeDriver):
    """One DTLS 1.2 server handshake over memory BIOs (sans-IO; see the module docstring).

    Raises RecordHandoverError from the constructor if OpenSSL refuses the ClientHello.
    Afterwards nothing raises for what the network sends: a failed handshake sets
    :attr:`failure` (and :attr:`verify_error` when the client's certificate was rejected),
    its alert waits in :meth:`datagrams_to_send`.
    """

    IS_SERVER = True

    __slots__ = ("_sent_certificate", "verify_error")

    def __init__(
        self,
        context: SSL.Context,
        client_hello: bytes,
        *,
        now: float,
        mtu: int = DEFAULT_MTU,
        initial_timeout: float = INITIAL_TIMEOUT,
        max_timeout: float = MAX_TIMEOUT,
    ) -> None:
        """``client_hello``: the datagram whose ClientHello carries a valid cookie."""
        connection = SSL.Connection(context, None)  # None: memory BIOs
        connection.set_app_data(self)
        connection.set_accept_state()
        super().__init__(
            connection, mtu=mtu, initial_timeout=initial_timeout, max_timeout=max_timeout
        )
        self._sent_certificate = False
        #: Why OpenSSL rejected the client's certificate chain, or None.
        self.verify_error: str | None = None
        self._seen_fragments = handshake_fragments(client_hello)
        self._tracker.incoming(client_hello)
        connection.bio_write(client_hello)
        try:
            # Takes the ClientHello as one that passed a cookie exchange: OpenSSL then
            # numbers its messages and records after the HelloVerifyRequest (RFC 6347 4.2.2).
            connection.DTLSv1_listen()
        except SSL.Error as error:
            self._release()
            raise RecordHandoverError(f"OpenSSL refused the ClientHello: {error!r}") from None
        self._step(now)

    def take_over(self) -> DtlsHandover:
        """The established session: its record layer, the peer's certificate and whether it
        resumed. Frees the OpenSSL object. Send :meth:`datagrams_to_send` first (our final
        flight). RecordHandoverError if the handshake is not complete."""
        connection = self._connection
        if connection is None or not self.complete:
            raise RecordHandoverError("the DTLS handshake is not complete; nothing to take over")
        try:
            layer = layer_from_connection(connection, self._tracker, is_server=True)
            certificate = connection.get_peer_certificate()
            der = (
                None if certificate is None
                else certificate.to_cryptography().public_bytes(Encoding.DER)
            )  # fmt: skip
        finally:
            self._release()
        # A full handshake sends our Certificate; a resumed one does not (RFC 5246 7.3).
        unprocessed, self._unprocessed = self._unprocessed, b""
        return DtlsHandover(layer, der, not self._sent_certificate, unprocessed)

    def _note_outgoing(self, output: bytes) -> None:
        if carries_certificate(output):
            self._sent_certificate = True

    def _failure_reason(self, error: SSL.Error) -> str:
        return self.verify_error or super()._failure_reason(error)
