"""DTLS 1.2 records after the handshake: seal, open, replay window, alerts (RFC 6347, RFC 5246).

One :class:`DtlsRecordLayer` is one established session's record state: the two AEADs,
the epochs, the write sequence number, the replay window and (until the peer proves it has
it) our last handshake flight for retransmission. It is sans-IO: ``seal*`` return datagram
bytes to send, ``open_datagram`` takes a received datagram and returns events. It can be
saved with :meth:`DtlsRecordLayer.to_bytes` and restored with :meth:`DtlsRecordLayer.from_bytes`.

Records that fail to open are discarded silently (RFC 6347 4.1.2.7): ``open_datagram``
returns a :class:`RecordDiscarded` event and counts it, and the session goes on. Only an
authenticated alert or an authenticated protocol violation ends a session.

Nonces never repeat: the write sequence number starts after the last one OpenSSL used
(see ``dtls12_handover``), grows by one per sealed record, is saved with the state, and
sealing refuses to pass 2^48 - 1 (RFC 6347 4.1). A saved state must be restored at most
once: restoring the same bytes twice would seal two records under one nonce.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESCCM, AESGCM, ChaCha20Poly1305

from otacore._select import load_kernel
from otacore._types import Buffer
from otacore.errors import (
    RecordError,
    RecordLayerClosedError,
    RecordOverflowError,
    RecordSequenceExhaustedError,
    RecordStateFormatError,
    UnsupportedCipherSuiteError,
)
from otacore.records import replay_window
from otacore.records.dtls12_events import (
    DTLS12_VERSION,
    HANDSHAKE_HEADER_SIZE,
    MAX_CIPHERTEXT,
    MAX_PLAINTEXT,
    MAX_SEQUENCE,
    RECORD_HEADER,
    RECORD_HEADER_SIZE,
    AlertDescription,
    AlertLevel,
    ApplicationData,
    ContentType,
    DiscardReason,
    HandshakeType,
    NewHandshakeRequested,
    PeerAlert,
    PeerRepeatedFlight,
    RecordDiscarded,
    RecordEvent,
    RenegotiationRefused,
    SessionClosed,
)
from otacore.records.tls12_keys import CipherSuite, TrafficKeys, suite_with_code

__all__ = [
    "DTLS12_VERSION",
    "HANDSHAKE_HEADER_SIZE",
    "MAX_CIPHERTEXT",
    "MAX_PLAINTEXT",
    "MAX_SEQUENCE",
    "RECORD_HEADER",
    "RECORD_HEADER_SIZE",
    "AlertDescription",
    "AlertLevel",
    "ApplicationData",
    "ContentType",
    "DiscardReason",
    "DtlsRecordLayer",
    "HandshakeType",
    "NewHandshakeRequested",
    "PeerAlert",
    "PeerRepeatedFlight",
    "RecordDiscarded",
    "RecordEvent",
    "RenegotiationRefused",
    "SessionClosed",
]

#: A ClientHello's record may say DTLS 1.0 (0xFEFF), as OpenSSL's does (RFC 6347 4.1).
_CLIENT_HELLO_VERSIONS: Final = (0xFEFF, DTLS12_VERSION)
#: additional_data = seq_num(8: epoch||seq) + type + version + length (RFC 5246 6.2.3.3,
#: with DTLS's epoch||seq as seq_num, RFC 6347 4.1.2.1).
_AAD: Final = struct.Struct(">QBHH")
# Plain ints for the per-record path (enum attribute lookups cost more than the AEAD).
_APPLICATION_DATA: Final = 23
_ALERT: Final = 21
_HANDSHAKE: Final = 22

Aead = AESGCM | ChaCha20Poly1305 | AESCCM

#: Seals batches of records (ext/chunk_framing.pyx, or its twin).
_framing_kernel = load_kernel("chunk_framing")

_STATE_MAGIC: Final = b"D12"
_STATE_VERSION: Final = 1
#: magic, version, flags, suite, read epoch, write epoch, write seq, replay top, replay bitmap,
#: discarded count, closing alert (-1: open), flight head length, finished length.
_STATE_HEAD: Final = struct.Struct(">3sBBHHHQqQQhHB")
_FLAG_SERVER: Final = 1
_OPEN: Final = -1


class DtlsRecordLayer:
    """One established DTLS 1.2 session's record layer (sans-IO).

    Make one with ``otacore.records.dtls12_handover.layer_from_connection`` after an OpenSSL
    handshake, or restore one with :meth:`from_bytes`.
    """

    __slots__ = (
        "_flight_finished",
        "_flight_head",
        "_key_block",
        "_open_aead",
        "_replay_bitmap",
        "_replay_top",
        "_seal_aead",
        "close_alert",
        "discarded",
        "is_server",
        "read_epoch",
        "suite",
        "write_epoch",
        "write_seq",
    )

    def __init__(
        self,
        keys: TrafficKeys,
        *,
        is_server: bool,
        read_epoch: int = 1,
        write_epoch: int = 1,
        write_seq: int = 0,
        replay_top: int = replay_window.EMPTY_TOP,
        replay_bitmap: int = 0,
        flight_head: bytes = b"",
        flight_finished: bytes = b"",
    ) -> None:
        """``flight_head``: the epoch-0 records of our last handshake flight, verbatim;
        ``flight_finished``: our Finished message (handshake header included), re-sealed in
        the write epoch with a fresh sequence number on each retransmission."""
        suite = keys.suite
        self.suite: CipherSuite = suite
        self.is_server = is_server
        if is_server:
            seal_key, seal_iv = keys.server_write_key, keys.server_write_iv
            open_key, open_iv = keys.client_write_key, keys.client_write_iv
        else:
            seal_key, seal_iv = keys.client_write_key, keys.client_write_iv
            open_key, open_iv = keys.server_write_key, keys.server_write_iv
        for material, size in ((seal_key, suite.key_size), (open_key, suite.key_size),
                               (seal_iv, suite.fixed_iv_size), (open_iv, suite.fixed_iv_size)):
            if len(material) != size:
                raise RecordError(
                    f"{suite.openssl_name} needs {suite.key_size}-byte keys and "
                    f"{suite.fixed_iv_size}-byte IVs"
                )  # fmt: skip
        # Seal key, open key, seal IV, open IV in one bytes object (one per idle session,
        # issue 14 item 4: four objects would cost ~120 bytes more); see _seal_key() etc.
        self._key_block = seal_key + open_key + seal_iv + open_iv
        # Made on first use and dropped by release_aeads() while the session is idle.
        self._seal_aead: Aead | None = None
        self._open_aead: Aead | None = None
        self.read_epoch = read_epoch
        self.write_epoch = write_epoch
        #: The sequence number the next sealed record gets (in ``write_epoch``).
        self.write_seq = write_seq
        self._replay_top = replay_top
        self._replay_bitmap = replay_bitmap
        self._flight_head = flight_head
        self._flight_finished = flight_finished
        #: Records discarded so far (RFC 6347 4.1.2.7).
        self.discarded = 0
        #: The alert that closed the session, or -1 while it is open.
        self.close_alert = _OPEN

    # --- state --------------------------------------------------------------------------

    def _seal_key(self) -> bytes:
        return self._key_block[: self.suite.key_size]

    def _open_key(self) -> bytes:
        size = self.suite.key_size
        return self._key_block[size : 2 * size]

    def _seal_iv(self) -> bytes:
        suite = self.suite
        start = 2 * suite.key_size
        return self._key_block[start : start + suite.fixed_iv_size]

    def _open_iv(self) -> bytes:
        return self._key_block[2 * self.suite.key_size + self.suite.fixed_iv_size :]

    @property
    def closed(self) -> bool:
        """True once either side has closed the session."""
        return self.close_alert != _OPEN

    @property
    def holds_last_flight(self) -> bool:
        """True while our last handshake flight is kept for retransmission."""
        return bool(self._flight_finished)

    @property
    def holds_aeads(self) -> bool:
        """True while an AEAD object is held (made by a seal or an open, dropped by
        :meth:`release_aeads`)."""
        return self._seal_aead is not None or self._open_aead is not None

    def release_aeads(self) -> None:
        """Drop the two AEAD objects while the session is idle. `cryptography`'s AES-GCM and
        ChaCha20-Poly1305 objects hold initialised OpenSSL contexts, ~2.3 KB each (measured,
        bench/test_bench_record_dtls12.py); the next seal or open rebuilds them (~1 us)."""
        self._seal_aead = None
        self._open_aead = None

    def keep_last_flight(self, head: bytes, finished: bytes) -> None:
        """Keep our final handshake flight for retransmission: ``head`` its epoch-0 records
        verbatim, ``finished`` our Finished message (12-byte handshake header included)."""
        if len(head) > 0xFFFF or len(finished) > 0xFF:
            raise RecordError(
                f"a last flight of {len(head)} + {len(finished)} bytes is too large to keep"
            )
        self._flight_head = head
        self._flight_finished = finished

    def forget_last_flight(self) -> None:
        """Drop the kept flight: the peer has proven it received it."""
        self._flight_head = b""
        self._flight_finished = b""

    # --- sealing ------------------------------------------------------------------------

    def _seal_record(self, content_type: int, plaintext: bytes) -> bytes:
        seq = self.write_seq
        if seq > MAX_SEQUENCE:
            raise RecordSequenceExhaustedError(
                f"write sequence number of epoch {self.write_epoch} is exhausted (2^48 records);"
                " close the session and let the device handshake again"
            )
        size = len(plaintext)
        if size > MAX_PLAINTEXT:
            raise RecordOverflowError(
                f"a record holds at most {MAX_PLAINTEXT} bytes of plaintext, got {size};"
                " split the message"
            )
        self.write_seq = seq + 1  # before sealing: no path seals two records under one seq
        epoch_seq = (self.write_epoch << 48) | seq
        aad = _AAD.pack(epoch_seq, content_type, DTLS12_VERSION, size)
        aead = self._seal_aead
        if aead is None:
            aead = self._seal_aead = self.suite.make_aead(self._seal_key())
        if self.suite.explicit_nonce_size:
            # salt || explicit nonce; the explicit part is epoch||seq, which never repeats
            # under one key (RFC 5288 section 3, RFC 6655 section 3).
            explicit = epoch_seq.to_bytes(8, "big")
            body = explicit + aead.encrypt(self._seal_iv() + explicit, plaintext, aad)
        else:
            # RFC 7905 section 2: the 64-bit epoch||seq, left-padded to 12 bytes, XOR the IV.
            nonce = (int.from_bytes(self._seal_iv(), "big") ^ epoch_seq).to_bytes(12, "big")
            body = aead.encrypt(nonce, plaintext, aad)
        return RECORD_HEADER.pack(content_type, DTLS12_VERSION, epoch_seq, len(body)) + body

    def _check_open_for_sealing(self) -> None:
        if self.close_alert != _OPEN:
            raise RecordLayerClosedError(
                f"the session is closed (alert {self.close_alert}); no more records can be sent"
            )

    def seal(self, data: bytes) -> bytes:
        """One application_data record holding ``data`` (at most 2^14 bytes), as a datagram.

        RecordOverflowError if ``data`` is too large, RecordSequenceExhaustedError after
        2^48 records, RecordLayerClosedError once the session is closed."""
        self._check_open_for_sealing()
        return self._seal_record(_APPLICATION_DATA, data)

    def seal_many(self, payloads: Sequence[Buffer]) -> list[bytes]:
        """One application_data record per payload, in order (each its own datagram): the
        very records ``[self.seal(p) for p in payloads]`` gives, sealed in one call of the
        chunk framing kernel (``otacore.chunk_framing``), which builds nonces and additional
        data in C. The layer reserves the sequence numbers first, as N seals would advance
        them; the batch is checked whole before any of it is sealed, so an oversized payload
        or an exhausted sequence space seals nothing and moves nothing."""
        self._check_open_for_sealing()
        for payload in payloads:
            size = len(payload)
            if size > MAX_PLAINTEXT:
                raise RecordOverflowError(
                    f"a record holds at most {MAX_PLAINTEXT} bytes of plaintext, got {size};"
                    " split the message"
                )
        count = len(payloads)
        seq = self.write_seq
        if seq + count - 1 > MAX_SEQUENCE:
            raise RecordSequenceExhaustedError(
                f"write sequence number of epoch {self.write_epoch} is exhausted (2^48 records);"
                " close the session and let the device handshake again"
            )
        if not count:
            return []
        aead = self._seal_aead
        if aead is None:
            aead = self._seal_aead = self.suite.make_aead(self._seal_key())
        self.write_seq = seq + count  # reserved before sealing, as _seal_record does
        return _framing_kernel.seal_dtls12(
            aead.encrypt,
            self._seal_iv(),
            self.write_epoch,
            seq,
            bool(self.suite.explicit_nonce_size),
            _APPLICATION_DATA,
            payloads,
        )

    def seal_alert(self, level: AlertLevel, description: int) -> bytes:
        """An alert record. A fatal alert closes the session (RFC 5246 7.2)."""
        self._check_open_for_sealing()
        record = self._seal_record(ContentType.ALERT, bytes((level, description)))
        if level == AlertLevel.FATAL:
            self.close_alert = description
        return record

    def close(self) -> bytes:
        """Our close_notify (RFC 5246 7.2.1) as a datagram; the session is closed after it."""
        record = self.seal_alert(AlertLevel.WARNING, AlertDescription.CLOSE_NOTIFY)
        self.close_alert = AlertDescription.CLOSE_NOTIFY
        return record

    def retransmit_last_flight(self) -> tuple[bytes, ...]:
        """Our last handshake flight as datagrams to send again (RFC 6347 4.2.4): the
        epoch-0 records as they were, our Finished re-sealed under a new sequence number.
        Empty if no flight is kept."""
        if not self._flight_finished or self.close_alert != _OPEN:
            return ()
        finished = self._seal_record(ContentType.HANDSHAKE, self._flight_finished)
        return (self._flight_head + finished,)

    # --- opening ------------------------------------------------------------------------

    def _discard(self, events: list[RecordEvent], reason: DiscardReason) -> None:
        self.discarded += 1
        events.append(RecordDiscarded(reason))

    def open_datagram(self, datagram: bytes) -> list[RecordEvent]:
        """Open every record in one received datagram (RFC 6347 4.1.1: a datagram may hold
        several). Never raises for anything the network can send: bad records become
        :class:`RecordDiscarded` events; an authenticated alert or violation becomes
        :class:`SessionClosed`, after which the rest of the datagram is ignored."""
        events: list[RecordEvent] = []
        if self.close_alert != _OPEN:
            self._discard(events, DiscardReason.CLOSED)
            return events
        end = len(datagram)
        offset = 0
        while offset < end:
            if end - offset < RECORD_HEADER_SIZE:
                # RFC 6347 4.1.2.7: what cannot be parsed is dropped, here the rest.
                self._discard(events, DiscardReason.TRUNCATED)
                break
            content_type, version, epoch_seq, length = RECORD_HEADER.unpack_from(datagram, offset)
            body_start = offset + RECORD_HEADER_SIZE
            offset = body_start + length
            if offset > end:
                self._discard(events, DiscardReason.TRUNCATED)
                break
            if (
                epoch_seq >> 48 == 0
                and self.is_server
                and content_type == _HANDSHAKE
                and version in _CLIENT_HELLO_VERSIONS
                and length
                and datagram[body_start] == HandshakeType.CLIENT_HELLO
            ):
                events.append(NewHandshakeRequested())  # RFC 6347 4.2.8
                break
            if version != DTLS12_VERSION:
                self._discard(events, DiscardReason.BAD_VERSION)
                continue
            if length > MAX_CIPHERTEXT:
                self._discard(events, DiscardReason.OVERSIZED)
                continue
            if epoch_seq >> 48 != self.read_epoch:
                self._discard(events, DiscardReason.WRONG_EPOCH)  # RFC 6347 4.1
                continue
            plaintext = self._open_record(content_type, epoch_seq, datagram, body_start, offset)
            if isinstance(plaintext, DiscardReason):
                self._discard(events, plaintext)
                continue
            if content_type == _APPLICATION_DATA:
                events.append(ApplicationData(plaintext))
                # Application data in the read epoch proves the peer finished its handshake,
                # so it has our last flight (RFC 6347 4.2.4): stop keeping it.
                if self._flight_finished:
                    self.forget_last_flight()
            elif content_type == _ALERT:
                self._on_alert(events, plaintext)
            elif content_type == _HANDSHAKE:
                self._on_handshake(events, plaintext)
            else:  # CCS or an unknown type: authenticated, but meaningless after the handshake
                self._discard(events, DiscardReason.UNEXPECTED_CONTENT)
            if self.close_alert != _OPEN:
                break
        return events

    def open_record(self, record: bytes) -> tuple[int, bytes] | None:
        """Authenticate and decrypt one whole record of the read epoch, moving the replay
        window, without acting on it: (content type, plaintext), or None if it does not
        open. Used at hand-over; ``open_datagram`` is the normal path."""
        if len(record) < RECORD_HEADER_SIZE:
            return None
        content_type, version, epoch_seq, length = RECORD_HEADER.unpack_from(record)
        if (
            version != DTLS12_VERSION
            or length != len(record) - RECORD_HEADER_SIZE
            or epoch_seq >> 48 != self.read_epoch
        ):
            return None
        plaintext = self._open_record(
            content_type, epoch_seq, record, RECORD_HEADER_SIZE, len(record)
        )
        if isinstance(plaintext, DiscardReason):
            return None
        return content_type, plaintext

    def _open_record(
        self, content_type: int, epoch_seq: int, datagram: bytes, start: int, stop: int
    ) -> bytes | DiscardReason:
        """Check the window, authenticate and decrypt the record whose body is
        ``datagram[start:stop]``: its plaintext, or why it is to be discarded."""
        seq = epoch_seq & MAX_SEQUENCE
        if seq <= self._replay_top:  # only then can it be a replay (RFC 6347 4.1.2.6)
            verdict = replay_window.check(self._replay_top, self._replay_bitmap, seq)
            if verdict == replay_window.ReplayVerdict.DUPLICATE:
                return DiscardReason.REPLAYED
            if verdict == replay_window.ReplayVerdict.TOO_OLD:
                return DiscardReason.TOO_OLD
        suite = self.suite
        plaintext_size = stop - start - suite.overhead
        if plaintext_size < 0:
            return DiscardReason.AUTHENTICATION_FAILED
        if suite.explicit_nonce_size:
            # The explicit nonce is whatever the sender carried (RFC 5288 section 3).
            nonce = self._open_iv() + datagram[start : start + 8]
            ciphertext = datagram[start + 8 : stop]
        else:
            nonce = (int.from_bytes(self._open_iv(), "big") ^ epoch_seq).to_bytes(12, "big")
            ciphertext = datagram[start:stop]
        aad = _AAD.pack(epoch_seq, content_type, DTLS12_VERSION, plaintext_size)
        try:
            aead = self._open_aead
            if aead is None:
                aead = self._open_aead = suite.make_aead(self._open_key())
            plaintext = aead.decrypt(nonce, ciphertext, aad)
        except InvalidTag:
            return DiscardReason.AUTHENTICATION_FAILED  # RFC 6347 4.1.2.7
        if plaintext_size > MAX_PLAINTEXT:
            return DiscardReason.OVERSIZED  # RFC 5246 6.2.1 (record_overflow), dropped as DTLS may
        # Only now, authenticated, does the record move the window (RFC 6347 4.1.2.6).
        self._replay_top, self._replay_bitmap = replay_window.mark(
            self._replay_top, self._replay_bitmap, seq
        )
        return plaintext

    def _close_with(self, events: list[RecordEvent], alert: int, *, by_peer: bool,
                    fatal: bool, reply: bytes) -> None:  # fmt: skip
        self.close_alert = alert
        self.forget_last_flight()
        events.append(SessionClosed(alert, fatal, by_peer, reply))

    def _fail(self, events: list[RecordEvent], alert: AlertDescription) -> None:
        """The peer broke the protocol in an authenticated record: fatal alert, close."""
        reply = self._seal_record(ContentType.ALERT, bytes((AlertLevel.FATAL, alert)))
        self._close_with(events, alert, by_peer=False, fatal=True, reply=reply)

    def _on_alert(self, events: list[RecordEvent], plaintext: bytes) -> None:
        if len(plaintext) != 2:  # an alert is level(1) description(1) (RFC 5246 7.2)
            self._fail(events, AlertDescription.DECODE_ERROR)
            return
        level, description = plaintext[0], plaintext[1]
        if description == AlertDescription.CLOSE_NOTIFY:
            # RFC 5246 7.2.1: answer with our own close_notify and close at once.
            reply = self._seal_record(
                ContentType.ALERT, bytes((AlertLevel.WARNING, AlertDescription.CLOSE_NOTIFY))
            )
            self._close_with(events, description, by_peer=True, fatal=False, reply=reply)
        elif level == AlertLevel.WARNING:
            events.append(PeerAlert(description))
        else:  # fatal, or an unknown level, which cannot be trusted to be harmless
            self._close_with(events, description, by_peer=True, fatal=True, reply=b"")

    def _on_handshake(self, events: list[RecordEvent], plaintext: bytes) -> None:
        if len(plaintext) < HANDSHAKE_HEADER_SIZE:  # every DTLS fragment has the full header
            self._fail(events, AlertDescription.DECODE_ERROR)
            return
        msg_type = plaintext[0]
        first_fragment = plaintext[6:9] == b"\x00\x00\x00"  # fragment_offset == 0
        if msg_type == HandshakeType.FINISHED:
            # The peer's Finished again: our last flight was lost (RFC 6347 4.2.4).
            events.append(PeerRepeatedFlight(self.retransmit_last_flight()))
        elif first_fragment and (
            (self.is_server and msg_type == HandshakeType.CLIENT_HELLO)
            or (not self.is_server and msg_type == HandshakeType.HELLO_REQUEST)
        ):
            # RFC 5246 7.2.2: no_renegotiation "is always a warning"; the peer decides whether
            # to go on without renegotiating or to close. One authenticated request, one alert.
            reply = self._seal_record(
                ContentType.ALERT, bytes((AlertLevel.WARNING, AlertDescription.NO_RENEGOTIATION))
            )
            events.append(RenegotiationRefused(reply))
        else:  # a later fragment of the same request, or a message with no place here
            self._discard(events, DiscardReason.UNEXPECTED_CONTENT)

    # --- persistence ---------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        """The whole state, for :meth:`from_bytes`. It holds the session keys: store it
        encrypted, and restore it at most once (a second restore would reuse nonces)."""
        suite = self.suite
        keys = self._key_block  # seal key, open key, seal IV, open IV
        head = _STATE_HEAD.pack(
            _STATE_MAGIC,
            _STATE_VERSION,
            _FLAG_SERVER if self.is_server else 0,
            suite.code,
            self.read_epoch,
            self.write_epoch,
            self.write_seq,
            self._replay_top,
            self._replay_bitmap,
            self.discarded,
            self.close_alert,
            len(self._flight_head),
            len(self._flight_finished),
        )
        return head + keys + self._flight_head + self._flight_finished

    @classmethod
    def from_bytes(cls, data: bytes) -> DtlsRecordLayer:
        """Restore a state saved by :meth:`to_bytes`; RecordStateFormatError if it is not one."""
        if len(data) < _STATE_HEAD.size:
            raise RecordStateFormatError(
                f"saved DTLS record state is {len(data)} bytes, shorter than its header"
            )
        fields = _STATE_HEAD.unpack_from(data)
        magic, version, flags, code, read_epoch, write_epoch, write_seq = fields[:7]
        top, bitmap, discarded, close_alert, head_size, finished_size = fields[7:]
        if magic != _STATE_MAGIC or version != _STATE_VERSION:
            raise RecordStateFormatError(
                f"not a saved DTLS 1.2 record state of format {_STATE_VERSION} "
                f"(magic {magic!r}, version {version})"
            )
        try:
            suite = suite_with_code(code)
        except UnsupportedCipherSuiteError as exc:
            raise RecordStateFormatError(f"saved DTLS record state: {exc}") from None
        if (
            not read_epoch
            or not write_epoch
            or write_seq > MAX_SEQUENCE + 1
            or not replay_window.EMPTY_TOP <= top <= MAX_SEQUENCE
            or close_alert < _OPEN
            or flags & ~_FLAG_SERVER
        ):
            raise RecordStateFormatError(
                "saved DTLS record state is corrupt: epochs, sequence numbers or flags out of range"
            )
        key, iv = suite.key_size, suite.fixed_iv_size
        offset = _STATE_HEAD.size
        expected = offset + 2 * (key + iv) + head_size + finished_size
        if len(data) != expected:
            raise RecordStateFormatError(
                f"saved DTLS record state is {len(data)} bytes, its header says {expected}"
            )
        seal_key = data[offset : offset + key]
        open_key = data[offset + key : offset + 2 * key]
        seal_iv = data[offset + 2 * key : offset + 2 * key + iv]
        open_iv = data[offset + 2 * key + iv : offset + 2 * (key + iv)]
        offset += 2 * (key + iv)
        is_server = bool(flags & _FLAG_SERVER)
        if is_server:
            keys = TrafficKeys(suite, open_key, seal_key, open_iv, seal_iv)
        else:
            keys = TrafficKeys(suite, seal_key, open_key, seal_iv, open_iv)
        layer = cls(
            keys,
            is_server=is_server,
            read_epoch=read_epoch,
            write_epoch=write_epoch,
            write_seq=write_seq,
            replay_top=top,
            replay_bitmap=bitmap,
            flight_head=data[offset : offset + head_size],
            flight_finished=data[offset + head_size :],
        )
        layer.discarded = discarded
        layer.close_alert = close_alert
        return layer
