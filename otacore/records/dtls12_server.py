"""A DTLS 1.2 server handshake run by OpenSSL on memory BIOs, as a sans-IO object.

:class:`DtlsServerHandshake` starts from a ClientHello that passed the cookie exchange
(``dtls12_cookie``): datagrams in (:meth:`~DtlsServerHandshake.receive_datagram`),
datagrams out (:meth:`~DtlsServerHandshake.datagrams_to_send`), and a retransmission
deadline out (:meth:`~DtlsServerHandshake.next_timeout`, RFC 6347 4.2.4): the shell owns the
clock and calls :meth:`~DtlsServerHandshake.handle_timeout` when it passes. OpenSSL's own
timer is never used (it reads the wall clock). Our flight is resent as OpenSSL wrote it,
except a protected record (our Finished, in a resumed handshake's flight), which is re-sealed
under a new sequence number: epoch-0 records the peer already has are dropped by its replay
window (RFC 6347 4.1.2.6) and the lost ones are new to it, but a peer that has our whole
resumed flight and whose final flight was lost must see our Finished again to learn it (it
retransmits its own then, RFC 6347 4.2.4), and a Finished under a number it saw would be
dropped as a replay.

Once OpenSSL reports the handshake complete, :meth:`~DtlsServerHandshake.take_over` builds
the session's :class:`~otacore.records.dtls12.DtlsRecordLayer` (``dtls12_handover``: it keeps
our final flight to retransmit until the peer's first protected record proves it arrived)
and frees the OpenSSL object.

The context must be made with :func:`prepare_server_context` (verify callback, no MTU query,
cookie checks left to ``dtls12_cookie``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from cryptography.hazmat.primitives.serialization import Encoding
from OpenSSL import SSL, crypto

from otacore.errors import RecordHandoverError
from otacore.records.dtls12 import (
    RECORD_HEADER,
    RECORD_HEADER_SIZE,
    ContentType,
    DtlsRecordLayer,
)
from otacore.records.dtls12_handover import HandshakeRecordTracker, layer_from_connection
from otacore.records.openssl_memory import drain_output
from otacore.records.tls12_keys import derive_traffic_keys, suite_named
from otacore.records.verify_errors import verify_failure_reason

__all__ = [
    "DtlsHandover",
    "DtlsServerHandshake",
    "note_verify_failure",
    "prepare_server_context",
    "split_datagrams",
]

#: RFC 6347 4.2.4.1: an initial timer of 1 s, doubled on each retransmission, up to 60 s.
INITIAL_TIMEOUT: Final = 1.0
MAX_TIMEOUT: Final = 60.0
#: Bytes of records per datagram we send during the handshake (IPv6's minimum MTU of 1280
#: less IPv6 and UDP headers); OpenSSL fragments handshake messages to fit
#: (``set_ciphertext_mtu``).
DEFAULT_MTU: Final = 1232
_HANDSHAKE: Final = 22
_CERTIFICATE: Final = 11


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


def split_datagrams(records: bytes, mtu: int) -> list[bytes]:
    """Pack OpenSSL's concatenated records into datagrams of at most ``mtu`` bytes, whole
    records only (RFC 6347 4.1.1: a record never spans datagrams; several may share one)."""
    datagrams: list[bytes] = []
    start = offset = 0
    end = len(records)
    while end - offset >= RECORD_HEADER_SIZE:
        length = RECORD_HEADER.unpack_from(records, offset)[3]
        stop = offset + RECORD_HEADER_SIZE + length
        if stop > end:
            break
        if stop - start > mtu and offset > start:
            datagrams.append(records[start:offset])
            start = offset
        offset = stop
    if start < end:
        datagrams.append(records[start:end])
    return datagrams


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


class DtlsServerHandshake:
    """One DTLS 1.2 server handshake over memory BIOs (sans-IO; see the module docstring).

    Raises RecordHandoverError from the constructor if OpenSSL refuses the ClientHello.
    Afterwards nothing raises for what the network sends: a failed handshake sets
    :attr:`failure` (and :attr:`verify_error` when the client's certificate was rejected),
    its alert waits in :meth:`datagrams_to_send`.
    """

    __slots__ = (
        "_connection",
        "_deadline",
        "_flight",
        "_outbox",
        "_seen_fragments",
        "_sent_certificate",
        "_timeout",
        "_tracker",
        "_unprocessed",
        "complete",
        "failure",
        "max_timeout",
        "mtu",
        "retransmissions",
        "verify_error",
    )

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
        connection.set_ciphertext_mtu(mtu)
        self._connection: SSL.Connection | None = connection
        self._tracker = HandshakeRecordTracker()
        self.mtu = mtu
        self.max_timeout = max_timeout
        self._timeout = initial_timeout
        self._deadline: float | None = None
        self._flight: list[bytes] = []
        self._outbox: list[bytes] = []
        self._sent_certificate = False
        self._unprocessed = b""
        self._seen_fragments: frozenset[tuple[int, int, int]] = frozenset()
        #: True once OpenSSL has finished the handshake (then :meth:`take_over`).
        self.complete = False
        #: Why the handshake failed, or None.
        self.failure: str | None = None
        #: Why OpenSSL rejected the client's certificate chain, or None.
        self.verify_error: str | None = None
        #: Flights resent on the timer or for a repeated peer flight.
        self.retransmissions = 0
        self._seen_fragments = _handshake_fragments(client_hello)
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

    # --- the shell's interface ----------------------------------------------------------

    def receive_datagram(self, datagram: bytes, now: float) -> None:
        """A datagram from the peer. Ignored once the handshake is complete or failed."""
        connection = self._connection
        if connection is None or self.complete or self.failure is not None or not datagram:
            return
        fragments = _handshake_fragments(datagram)
        repeated = bool(fragments) and fragments <= self._seen_fragments
        self._seen_fragments |= fragments
        wrote = False
        # One record at a time, stopping where the handshake completes: a record after the
        # peer's Finished (application data in the same datagram) stays for the record
        # layer (:attr:`DtlsHandover.unprocessed`) instead of vanishing into OpenSSL.
        for start, stop in _record_bounds(datagram):
            record = datagram[start:stop]
            self._tracker.incoming(record)
            connection.bio_write(record)
            wrote |= self._step(now)
            if self.complete or self.failure is not None:
                self._unprocessed = datagram[stop:] if self.complete else b""
                break
        if not wrote and repeated:
            # The peer resent its flight: ours was lost (RFC 6347 4.2.4). Resend now, and
            # back the timer off as for a timeout, so that a spoofer replaying the peer's
            # datagrams gets ever fewer flights sent to that address.
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

    def abort(self) -> None:
        """Give up (the peer left, a deadline passed): free the OpenSSL object now."""
        self._release()
        self._outbox = []
        self._flight = []

    # --- internals ----------------------------------------------------------------------

    def _release(self) -> None:
        if self._connection is not None:
            self._connection.set_app_data(None)
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
            self._note_certificate(output)
            self._flight = split_datagrams(output, self.mtu)
            self._outbox.extend(self._flight)
            self._deadline = now + self._timeout
        if error is not None:
            self.failure = self.verify_error or f"DTLS handshake failed: {error!r}"
            self._deadline = None
            self._flight = []
        elif self.complete:
            self._deadline = None  # the record layer retransmits our final flight now
        return bool(output)

    def _note_certificate(self, output: bytes) -> None:
        offset, end = 0, len(output)
        while end - offset > RECORD_HEADER_SIZE:
            content_type, _version, epoch_seq, length = RECORD_HEADER.unpack_from(output, offset)
            if (
                content_type == _HANDSHAKE
                and epoch_seq >> 48 == 0
                and output[offset + RECORD_HEADER_SIZE] == _CERTIFICATE
            ):
                self._sent_certificate = True
            offset += RECORD_HEADER_SIZE + length

    def _retransmit(self, now: float) -> None:
        if not self._flight or self.complete or self.failure is not None:
            return
        self.retransmissions += 1
        self._flight = self._flight_resealed()
        self._outbox.extend(self._flight)
        self._timeout = min(self._timeout * 2, self.max_timeout)
        self._deadline = now + self._timeout


    def _flight_resealed(self) -> list[bytes]:
        """Our flight to send again: epoch-0 records as they were, each protected handshake
        record (the Finished of a resumed handshake, RFC 5246 7.3) re-sealed under the next
        sequence number of its epoch (see the module docstring). The new records go through
        the tracker, so the record layer taken over later continues after them and no nonce
        is used twice."""
        connection = self._connection
        tracker = self._tracker
        if connection is None or tracker.write_epoch == 0:
            return self._flight  # nothing protected sent yet (every full-handshake flight)
        master_secret = connection.master_key()
        client_random, server_random = connection.client_random(), connection.server_random()
        cipher_name = connection.get_cipher_name()
        if not (master_secret and client_random and server_random and cipher_name):
            return self._flight
        keys = derive_traffic_keys(
            suite_named(cipher_name), master_secret, client_random, server_random
        )
        # Opens what OpenSSL sealed as the server; seals it again as the server would.
        mirror = DtlsRecordLayer(keys, is_server=False, read_epoch=tracker.write_epoch)
        resealed: list[bytes] = []
        for datagram in self._flight:
            pieces: list[bytes] = []
            for start, stop in _record_bounds(datagram):
                record = datagram[start:stop]
                whole = len(record) >= RECORD_HEADER_SIZE
                epoch = RECORD_HEADER.unpack_from(record)[2] >> 48 if whole else 0
                opened = mirror.open_record(record) if epoch > 0 else None
                if opened is None or opened[0] != ContentType.HANDSHAKE or len(opened[1]) > 0xFF:
                    pieces.append(record)
                    continue
                sealer = DtlsRecordLayer(
                    keys, is_server=True, read_epoch=epoch, write_epoch=epoch,
                    write_seq=tracker.write_seq_max + 1,
                )  # fmt: skip
                sealer.keep_last_flight(b"", opened[1])
                (fresh,) = sealer.retransmit_last_flight()
                tracker.outgoing(fresh)  # our write sequence number moves past it
                pieces.append(fresh)
            resealed.append(b"".join(pieces))
        return resealed


def _record_bounds(datagram: bytes) -> list[tuple[int, int]]:
    """(start, stop) of each record in ``datagram``; a malformed tail is one last piece
    (OpenSSL discards it, RFC 6347 4.1.2.7)."""
    bounds = []
    offset, end = 0, len(datagram)
    while offset < end:
        stop = end
        if end - offset >= RECORD_HEADER_SIZE:
            length = RECORD_HEADER.unpack_from(datagram, offset)[3]
            stop = min(end, offset + RECORD_HEADER_SIZE + length)
        bounds.append((offset, stop))
        offset = stop
    return bounds


def _handshake_fragments(datagram: bytes) -> frozenset[tuple[int, int, int]]:
    """(message_seq, fragment_offset, fragment_length) of each cleartext (epoch 0) handshake
    fragment in ``datagram`` (RFC 6347 4.2.2). A retransmitted flight repeats them under new
    record numbers; a datagram made only of fragments seen before is such a repeat."""
    found = set()
    offset, end = 0, len(datagram)
    while end - offset >= RECORD_HEADER_SIZE:
        content_type, _version, epoch_seq, length = RECORD_HEADER.unpack_from(datagram, offset)
        body = offset + RECORD_HEADER_SIZE
        if content_type == _HANDSHAKE and epoch_seq >> 48 == 0 and length >= 12 <= end - body:
            header = datagram[body : body + 12]
            found.add((int.from_bytes(header[4:6], "big"), int.from_bytes(header[6:9], "big"),
                       int.from_bytes(header[9:12], "big")))  # fmt: skip
        offset = body + length
    return frozenset(found)
