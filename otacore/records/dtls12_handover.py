"""Taking an established DTLS 1.2 session out of OpenSSL (issue 14 item 2).

OpenSSL runs the handshake over memory BIOs; the shell passes every datagram OpenSSL emits
to :meth:`HandshakeRecordTracker.outgoing` and every datagram it feeds OpenSSL to
:meth:`HandshakeRecordTracker.incoming`. Record headers are cleartext (RFC 6347 4.1), so the
tracker learns, without help from OpenSSL:

- the highest (epoch, sequence number) OpenSSL sealed, so that our first record continues
  after it and no AEAD nonce is used twice (OpenSSL's Finished is seq 0 of epoch 1, and a
  timer retransmission of the final flight takes seq 1, 2, ...; NewSessionTicket comes
  before ChangeCipherSpec, in epoch 0, RFC 5077 section 3.3 / RFC 6347 4.2.4);
- the peer's protected records OpenSSL was given, so the replay window starts where
  OpenSSL's was (we authenticate them ourselves at hand-over, only genuine ones count);
- our final flight (epoch-0 records verbatim, our Finished), to retransmit when the peer
  repeats its own (RFC 6347 4.2.4).

:func:`layer_from_connection` then derives the keys (``tls12_keys``) and builds the
:class:`~otacore.records.dtls12.DtlsRecordLayer`; the OpenSSL object can be freed.
"""

from __future__ import annotations

import struct
from typing import Final

from OpenSSL import SSL

from otacore.errors import RecordHandoverError
from otacore.records.dtls12 import (
    DTLS12_VERSION,
    MAX_SEQUENCE,
    RECORD_HEADER,
    RECORD_HEADER_SIZE,
    ContentType,
    DtlsRecordLayer,
    HandshakeType,
)
from otacore.records.tls12_keys import derive_traffic_keys, suite_named

#: How many of the peer's protected handshake-time records are kept to seed the replay
#: window (normally one: its Finished; a few more if it retransmitted).
MAX_KEPT_INCOMING: Final = 8
_MESSAGE_SEQ: Final = struct.Struct(">H")


def _records(datagram: bytes) -> list[tuple[int, int, int, bytes]]:
    """(content type, epoch, seq, whole record bytes) of each well-formed DTLS 1.2 record."""
    found = []
    offset, end = 0, len(datagram)
    while end - offset >= RECORD_HEADER_SIZE:
        content_type, version, epoch_seq, length = RECORD_HEADER.unpack_from(datagram, offset)
        stop = offset + RECORD_HEADER_SIZE + length
        if stop > end or version != DTLS12_VERSION:
            break
        found.append((content_type, epoch_seq >> 48, epoch_seq & MAX_SEQUENCE,
                      datagram[offset:stop]))  # fmt: skip
        offset = stop
    return found


class HandshakeRecordTracker:
    """Watches one handshake's datagrams in both directions (see the module docstring)."""

    __slots__ = (
        "_flight",
        "_flight_has_ccs",
        "_flight_max_message_seq",
        "_flight_open",
        "_records_seen",
        "incoming_protected",
        "last_outgoing_finished",
        "write_epoch",
        "write_seq_max",
    )

    def __init__(self) -> None:
        #: The highest epoch of any record OpenSSL sealed, and the highest seq in it.
        self.write_epoch = 0
        self.write_seq_max = -1
        #: The peer's latest records in an epoch > 0 (at most MAX_KEPT_INCOMING), each with
        #: its place in the order of all records seen. Unauthenticated until hand-over.
        self.incoming_protected: list[tuple[int, bytes]] = []
        #: The place of OpenSSL's latest protected handshake record (its Finished), or -1.
        self.last_outgoing_finished = -1
        self._records_seen = 0
        self._flight: list[tuple[int, int, bytes]] = []
        self._flight_open = False
        self._flight_has_ccs = False
        self._flight_max_message_seq = -1

    def _start_flight(self) -> None:
        self._flight = []
        self._flight_has_ccs = False
        self._flight_max_message_seq = -1
        self._flight_open = True

    def outgoing(self, datagram: bytes) -> None:
        """A datagram (or several, concatenated) OpenSSL produced, before it is sent."""
        for content_type, epoch, seq, record in _records(datagram):
            self._records_seen += 1
            if (epoch, seq) > (self.write_epoch, self.write_seq_max):
                self.write_epoch, self.write_seq_max = epoch, seq
            if not self._flight_open:
                self._start_flight()
            # A record that repeats one already in this flight starts OpenSSL's timer
            # retransmission of the flight (RFC 6347 4.2.4): keep only the newest copy.
            if content_type == ContentType.CHANGE_CIPHER_SPEC:
                if self._flight_has_ccs:
                    self._start_flight()
                self._flight_has_ccs = True
            elif content_type == ContentType.HANDSHAKE and epoch == 0 and len(record) >= 19:
                # message_seq sits at bytes 4-5 of the handshake header (RFC 6347 4.2.2).
                (message_seq,) = _MESSAGE_SEQ.unpack_from(record, RECORD_HEADER_SIZE + 4)
                if message_seq <= self._flight_max_message_seq:
                    self._start_flight()
                self._flight_max_message_seq = max(self._flight_max_message_seq, message_seq)
            if content_type == ContentType.HANDSHAKE and epoch > 0:
                self.last_outgoing_finished = self._records_seen
            self._flight.append((content_type, epoch, record))

    def incoming(self, datagram: bytes) -> None:
        """A datagram from the peer, before OpenSSL is given it."""
        records = _records(datagram)
        if records:
            self._flight_open = False  # our next output is a new flight
        for _content_type, epoch, _seq, record in records:
            self._records_seen += 1
            if epoch == 0:
                continue
            # Keep the latest: forgeries sent early in the handshake cannot push out the
            # peer's Finished, which comes last.
            if len(self.incoming_protected) == MAX_KEPT_INCOMING:
                del self.incoming_protected[0]
            self.incoming_protected.append((self._records_seen, record))

    def our_last_flight(self) -> tuple[bytes, list[bytes]]:
        """(epoch-0 records, protected records) of the latest flight OpenSSL sent."""
        head = b"".join(record for _type, epoch, record in self._flight if epoch == 0)
        protected = [record for _type, epoch, record in self._flight if epoch > 0]
        return head, protected


def layer_from_connection(
    connection: SSL.Connection, tracker: HandshakeRecordTracker, *, is_server: bool
) -> DtlsRecordLayer:
    """The record layer of the DTLS 1.2 session ``connection`` has established.

    ``tracker`` must have seen every datagram of the handshake in both directions.
    Afterwards use only the returned layer for records: OpenSSL's write state is stale.
    RecordHandoverError if the handshake is not finished, not DTLS 1.2, or was not tracked;
    UnsupportedCipherSuiteError if the suite is not one the layer seals.
    """
    if connection.get_state_string() != b"SSL negotiation finished successfully":
        raise RecordHandoverError(
            "the DTLS handshake has not finished "
            f"({connection.get_state_string().decode(errors='replace')})"
        )
    if connection.get_protocol_version_name() != "DTLSv1.2":
        raise RecordHandoverError(
            f"the session is {connection.get_protocol_version_name()}, not DTLSv1.2"
        )
    cipher_name = connection.get_cipher_name()
    master_secret = connection.master_key()
    client_random = connection.client_random()
    server_random = connection.server_random()
    if cipher_name is None or master_secret is None or client_random is None:
        raise RecordHandoverError("OpenSSL has no negotiated session to take the keys from")
    if server_random is None:
        raise RecordHandoverError("OpenSSL has no server random for this session")
    if tracker.write_epoch == 0 or tracker.write_seq_max < 0:
        raise RecordHandoverError(
            "the tracker saw no protected record from OpenSSL: pass every datagram it "
            "produced to HandshakeRecordTracker.outgoing()"
        )
    suite = suite_named(cipher_name)
    keys = derive_traffic_keys(suite, master_secret, client_random, server_random)
    # Each side moves to epoch 1 once per handshake (RFC 6347 4.1; no renegotiation), so
    # the peer's epoch is ours. Not read from its records: those are not yet authenticated.
    layer = DtlsRecordLayer(
        keys,
        is_server=is_server,
        read_epoch=tracker.write_epoch,
        write_epoch=tracker.write_epoch,
        write_seq=tracker.write_seq_max + 1,  # continue after OpenSSL's last record
    )
    # Seed the replay window with the peer's records OpenSSL consumed that authenticate;
    # note where the peer's latest genuine Finished came, and any genuine data.
    peer_has_our_flight = False
    last_peer_finished = -1
    for place, record in tracker.incoming_protected:
        opened = layer.open_record(record)
        if opened is None:
            continue  # forged, garbled or of another epoch: it leaves no trace
        if opened[0] == ContentType.APPLICATION_DATA:
            peer_has_our_flight = True  # it finished its handshake (RFC 6347 4.2.4)
        elif opened[0] == ContentType.HANDSHAKE:
            last_peer_finished = max(last_peer_finished, place)
    # Whoever sent the last Finished sent the handshake's final flight: the server in a full
    # handshake, the client in a resumed one (RFC 5246 7.3); only that side retransmits it.
    if tracker.last_outgoing_finished > last_peer_finished and not peer_has_our_flight:
        head, protected = tracker.our_last_flight()
        # Our Finished, opened from the record OpenSSL sealed by a layer of the other role.
        mirror = DtlsRecordLayer(
            keys, is_server=not is_server, read_epoch=tracker.write_epoch
        )
        for record in reversed(protected):
            opened = mirror.open_record(record)
            if (
                opened is not None
                and opened[0] == ContentType.HANDSHAKE
                and opened[1][:1] == bytes((HandshakeType.FINISHED,))
            ):
                layer.keep_last_flight(head, opened[1])
                break
    return layer
