"""What the DTLS 1.2 server and client handshakes share (``dtls12_server``, ``dtls12_client``).

:class:`DtlsHandshakeDriver` runs OpenSSL on memory BIOs as a sans-IO object: datagrams in
(:meth:`~DtlsHandshakeDriver.receive_datagram`), datagrams out
(:meth:`~DtlsHandshakeDriver.datagrams_to_send`), and a retransmission deadline out
(:meth:`~DtlsHandshakeDriver.next_timeout`, RFC 6347 4.2.4) that the shell's clock drives
through :meth:`~DtlsHandshakeDriver.handle_timeout`. OpenSSL's own timer is never used (it
reads the wall clock).

Our flight is resent as OpenSSL wrote it, except a protected record (a Finished sent before
the handshake completed: the server's in a resumed handshake, the client's in a full one),
which is re-sealed under a new sequence number. Epoch-0 records the peer already has are
dropped by its replay window (RFC 6347 4.1.2.6) and the lost ones are new to it; but a peer
that has our whole flight and whose own final flight was lost must see our Finished again to
learn it (it then retransmits its own, RFC 6347 4.2.4), and a Finished under a number it saw
would be dropped as a replay. Every record we send goes through the
:class:`~otacore.records.dtls12_handover.HandshakeRecordTracker`, so the record layer taken
over afterwards continues after the highest sequence number used and no nonce repeats.
"""

from __future__ import annotations

from typing import ClassVar, Final

from OpenSSL import SSL

from otacore.records.dtls12 import (
    RECORD_HEADER,
    RECORD_HEADER_SIZE,
    ContentType,
    DtlsRecordLayer,
)
from otacore.records.dtls12_handover import HandshakeRecordTracker
from otacore.records.openssl_memory import drain_output
from otacore.records.tls12_keys import derive_traffic_keys, suite_named

__all__ = [
    "DEFAULT_MTU",
    "INITIAL_TIMEOUT",
    "MAX_TIMEOUT",
    "DtlsHandshakeDriver",
    "carries_certificate",
    "handshake_fragments",
    "record_bounds",
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
_CERTIFICATE: Final = 11  # HandshakeType.certificate (RFC 5246 7.4)
#: A Finished message with its DTLS handshake header is 24 bytes (RFC 5246 7.4.9).
_MAX_RESEALED: Final = 0xFF


class DtlsHandshakeDriver:
    """OpenSSL's DTLS 1.2 handshake on memory BIOs, driven as a sans-IO object (see the
    module docstring). Subclasses set :attr:`IS_SERVER` and may note what passes through
    (:meth:`_note_incoming`, :meth:`_note_outgoing`) or name a failure
    (:meth:`_failure_reason`).

    Nothing raises for what the network sends: a failed handshake sets :attr:`failure`, its
    alert (if OpenSSL wrote one) waits in :meth:`datagrams_to_send`.
    """

    IS_SERVER: ClassVar[bool]

    __slots__ = (
        "_connection",
        "_deadline",
        "_flight",
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
        self, connection: SSL.Connection, *, mtu: int, initial_timeout: float,
        max_timeout: float,
    ) -> None:  # fmt: skip
        connection.set_ciphertext_mtu(mtu)
        self._connection: SSL.Connection | None = connection
        self._tracker = HandshakeRecordTracker()
        self.mtu = mtu
        self.max_timeout = max_timeout
        self._timeout = initial_timeout
        self._deadline: float | None = None
        self._flight: list[bytes] = []
        self._outbox: list[bytes] = []
        self._unprocessed = b""
        self._seen_fragments: frozenset[tuple[int, int, int]] = frozenset()
        #: True once OpenSSL has finished the handshake (then ``take_over``).
        self.complete = False
        #: Why the handshake failed, or None.
        self.failure: str | None = None
        #: Flights resent on the timer or for a repeated peer flight.
        self.retransmissions = 0

    # --- the shell's interface ----------------------------------------------------------

    def receive_datagram(self, datagram: bytes, now: float) -> None:
        """A datagram from the peer. Ignored once the handshake is complete or failed."""
        connection = self._connection
        if connection is None or self.complete or self.failure is not None or not datagram:
            return
        fragments = handshake_fragments(datagram)
        self._note_incoming(datagram)
        repeated = bool(fragments) and fragments <= self._seen_fragments
        self._seen_fragments |= fragments
        wrote = False
        # One record at a time, stopping where the handshake completes: a record after the
        # peer's Finished (application data in the same datagram) stays for the record
        # layer (the handover's ``unprocessed``) instead of vanishing into OpenSSL.
        for start, stop in record_bounds(datagram):
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

    def abort(self) -> None:
        """Give up (the peer left, a deadline passed): free the OpenSSL object now."""
        self._release()
        self._outbox = []
        self._flight = []

    # --- what subclasses may refine -----------------------------------------------------

    def _note_incoming(self, datagram: bytes) -> None:
        """A datagram from the peer is about to reach OpenSSL."""

    def _note_outgoing(self, output: bytes) -> None:
        """OpenSSL wrote ``output`` (records, concatenated)."""

    def _failure_reason(self, error: SSL.Error) -> str:
        """What :attr:`failure` says when OpenSSL fails the handshake with ``error``."""
        return f"DTLS handshake failed: {error!r}"

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
            self._note_outgoing(output)
            datagrams = split_datagrams(output, self.mtu)
            self._outbox.extend(datagrams)
            if not self.complete:
                # A new flight (the first ClientHello, the one answering a
                # HelloVerifyRequest, the server's flights, the client's certificate flight)
                # restarts the timer.
                self._flight = datagrams
                self._deadline = now + self._timeout
        if error is not None:
            self.failure = self._failure_reason(error)
            self._deadline = None
            self._flight = []
        elif self.complete:
            # Whoever sent the final flight keeps it in the record layer, which retransmits
            # it when the peer repeats its own (dtls12_handover).
            self._deadline = None
            self._flight = []
        return bool(output)

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
        record (a Finished) re-sealed under the next sequence number of its epoch (see the
        module docstring)."""
        connection = self._connection
        tracker = self._tracker
        if connection is None or tracker.write_epoch == 0:
            return self._flight  # nothing protected sent yet
        master_secret = connection.master_key()
        client_random, server_random = connection.client_random(), connection.server_random()
        cipher_name = connection.get_cipher_name()
        if not (master_secret and client_random and server_random and cipher_name):
            return self._flight
        keys = derive_traffic_keys(
            suite_named(cipher_name), master_secret, client_random, server_random
        )
        # Opens what OpenSSL sealed in our role; seals it again as OpenSSL would.
        mirror = DtlsRecordLayer(keys, is_server=not self.IS_SERVER, read_epoch=tracker.write_epoch)
        resealed: list[bytes] = []
        for datagram in self._flight:
            pieces: list[bytes] = []
            for start, stop in record_bounds(datagram):
                record = datagram[start:stop]
                whole = len(record) >= RECORD_HEADER_SIZE
                epoch = RECORD_HEADER.unpack_from(record)[2] >> 48 if whole else 0
                opened = mirror.open_record(record) if epoch > 0 else None
                if (
                    opened is None
                    or opened[0] != ContentType.HANDSHAKE
                    or len(opened[1]) > _MAX_RESEALED
                ):
                    pieces.append(record)
                    continue
                sealer = DtlsRecordLayer(
                    keys, is_server=self.IS_SERVER, read_epoch=epoch, write_epoch=epoch,
                    write_seq=tracker.write_seq_max + 1,
                )  # fmt: skip
                sealer.keep_last_flight(b"", opened[1])
                (fresh,) = sealer.retransmit_last_flight()
                tracker.outgoing(fresh)  # our write sequence number moves past it
                pieces.append(fresh)
            resealed.append(b"".join(pieces))
        return resealed


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


def record_bounds(datagram: bytes) -> list[tuple[int, int]]:
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


def handshake_fragments(datagram: bytes) -> frozenset[tuple[int, int, int]]:
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


def carries_certificate(datagram: bytes) -> bool:
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
