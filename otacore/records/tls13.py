"""The TLS 1.3 record layer of an established session (RFC 8446 5, 6, 4.6).

:class:`Tls13RecordLayer` is what is left of a TLS 1.3 session once OpenSSL has run its
handshake and handed the traffic secrets over (:mod:`otacore.records.tls13_handover`): the
suite, one secret and one sequence number per direction, and a few bytes of buffered input.
It seals application data, opens the peer's records from arbitrary TCP chunks, answers
alerts, close_notify and KeyUpdate, and serialises to ~100 bytes so a session can be saved
and restored (issue 14 item 6). Sans-IO: bytes in, events and bytes out.

Bytes to transmit come from :meth:`Tls13RecordLayer.send_application_data`,
:meth:`~Tls13RecordLayer.close` and :meth:`~Tls13RecordLayer.data_to_send`; write them in
the order the calls returned them. Every protocol violation by the peer is fatal over TLS:
the layer queues the matching alert (sealed, 6.2), closes, and raises a
:class:`~otacore.errors.RecordError` subclass; :attr:`Tls13RecordLayer.alert_sent` says
which alert went out.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from cryptography.exceptions import InvalidTag

from otacore._select import load_kernel
from otacore._types import Buffer
from otacore.errors import (
    PeerAlertError,
    RecordAuthenticationError,
    RecordError,
    RecordOverflowError,
    RecordProtocolViolationError,
)
from otacore.records.tls13_keys import (
    SUITES_BY_CODE,
    Aead,
    CipherSuite,
    next_traffic_secret,
    traffic_key_and_iv,
)
from otacore.records.tls13_protocol import (
    DEFAULT_REKEY_AFTER_RECORDS,
    MAX_CIPHERTEXT,
    MAX_HANDSHAKE_MESSAGE,
    MAX_INNER_PLAINTEXT,
    MAX_PLAINTEXT,
    AlertDescription,
    ApplicationData,
    CloseNotifyReceived,
    ContentType,
    KeyUpdateReceived,
    SessionTicketReceived,
    Tls13Event,
    alert_name,
)

__all__ = [
    "DEFAULT_REKEY_AFTER_RECORDS",
    "AlertDescription",
    "ApplicationData",
    "CloseNotifyReceived",
    "ContentType",
    "KeyUpdateReceived",
    "SessionTicketReceived",
    "Tls13Event",
    "Tls13RecordLayer",
]


# Handshake message types that may follow the handshake (RFC 8446 4.6, B.3).
_NEW_SESSION_TICKET = 4
_KEY_UPDATE = 24
_UPDATE_NOT_REQUESTED = 0
_UPDATE_REQUESTED = 1
#: RFC 8446 5.2: legacy_record_version of every TLSCiphertext.
_RECORD_HEADER_PREFIX = bytes((ContentType.APPLICATION_DATA, 3, 3))

# _flags bits.
_IS_SERVER = 1
_READ_CLOSED = 2
_WRITE_CLOSED = 4
_KEY_UPDATE_OWED = 8  # the peer asked for an update (4.6.3): ours goes before our next record
_PEER_UPDATE_ASKED = 16  # we asked the peer to update its keys and await its KeyUpdate

#: Seals batches of records (ext/chunk_framing.pyx, or its twin).
_framing_kernel = load_kernel("chunk_framing")

_SERIAL_MAGIC = b"T13R"
_SERIAL_VERSION = 1
_SERIAL_HEAD = struct.Struct("!4sBBHQQQB")
_NO_ALERT = 255


class Tls13RecordLayer:
    """Record protection for one established TLS 1.3 session, either side.

    ``read_secret``/``write_secret`` are the current application traffic secrets (the
    client's and the server's, 7.1, swapped by role); ``read_seq``/``write_seq`` the
    number of records already protected under them (5.3). ``rekey_after`` is the record
    count after which this side updates its keys (RFC 8446 5.5).
    """

    __slots__ = (
        "_flags",
        "_handshake_buffer",
        "_inbuf",
        "_outbuf",
        "_read_aead",
        "_read_iv",
        "_read_key_iv",
        "_write_aead",
        "_write_iv",
        "_write_key_iv",
        "alert_received",
        "alert_sent",
        "read_secret",
        "read_seq",
        "rekey_after",
        "suite",
        "write_secret",
        "write_seq",
    )

    def __init__(
        self,
        suite: CipherSuite,
        *,
        is_server: bool,
        read_secret: bytes,
        write_secret: bytes,
        read_seq: int = 0,
        write_seq: int = 0,
        rekey_after: int = DEFAULT_REKEY_AFTER_RECORDS,
    ) -> None:
        if len(read_secret) != suite.hash_length or len(write_secret) != suite.hash_length:
            raise RecordError(
                f"{suite.name} traffic secrets are {suite.hash_length} bytes, "
                f"got {len(read_secret)} and {len(write_secret)}"
            )
        if not 0 <= read_seq < 2**64 or not 0 <= write_seq < 2**64:
            raise RecordError("sequence numbers are 64-bit unsigned (RFC 8446 5.3)")
        if not 1 <= rekey_after < 2**64:
            raise RecordError("rekey_after must be at least 1 record")
        self.suite = suite
        self.read_secret = bytes(read_secret)
        self.write_secret = bytes(write_secret)
        self.read_seq = read_seq
        self.write_seq = write_seq
        self.rekey_after = rekey_after
        self._flags = _IS_SERVER if is_server else 0
        #: Each direction's write key and IV (RFC 8446 7.3), concatenated: derived from its
        #: secret on first use (b"" until then, and again after a KeyUpdate) and kept, so
        #: waking an idle session rebuilds its AEAD objects without running HKDF again.
        self._read_key_iv = b""
        self._write_key_iv = b""
        #: AEAD objects and IVs (as ints, for the nonce XOR) are built from those on first
        #: use and dropped by :meth:`release_ciphers`, so an idle session holds only its
        #: secrets, its keys and IVs (28-44 bytes a direction) and counters.
        self._read_aead: Aead | None = None
        self._write_aead: Aead | None = None
        self._read_iv = 0
        self._write_iv = 0
        self._inbuf: bytes = b""
        self._handshake_buffer: bytes = b""
        self._outbuf: bytes = b""
        #: The alert this side sent when it closed the session (None while open).
        self.alert_sent: AlertDescription | None = None
        #: The peer's closing alert, if any.
        self.alert_received: int | None = None

    # --- state -------------------------------------------------------------------------

    @property
    def is_server(self) -> bool:
        """True on the server's side of the session."""
        return bool(self._flags & _IS_SERVER)

    @property
    def closed(self) -> bool:
        """True once neither side may send (after close_notify both ways or any error)."""
        return self._flags & (_READ_CLOSED | _WRITE_CLOSED) == (_READ_CLOSED | _WRITE_CLOSED)

    @property
    def can_send(self) -> bool:
        """True while application data may still be sent."""
        return not self._flags & _WRITE_CLOSED

    def release_ciphers(self) -> None:
        """Drop the AEAD objects (rebuilt from the kept keys and IVs on next use), so an
        idle session costs only its secrets, keys, IVs and counters."""
        self._read_aead = None
        self._write_aead = None
        self._read_iv = 0  # a small int: the 96-bit one is freed (rebuilt with the AEAD)
        self._write_iv = 0

    def _read_cipher(self) -> Aead:
        aead = self._read_aead
        if aead is None:
            key_iv = self._read_key_iv
            if not key_iv:
                key_iv = self._read_key_iv = b"".join(
                    traffic_key_and_iv(self.suite, self.read_secret)
                )
            key_length = self.suite.key_length
            aead = self._read_aead = self.suite.aead(key_iv[:key_length])
            self._read_iv = int.from_bytes(key_iv[key_length:], "big")
        return aead

    def _write_cipher(self) -> Aead:
        aead = self._write_aead
        if aead is None:
            key_iv = self._write_key_iv
            if not key_iv:
                key_iv = self._write_key_iv = b"".join(
                    traffic_key_and_iv(self.suite, self.write_secret)
                )
            key_length = self.suite.key_length
            aead = self._write_aead = self.suite.aead(key_iv[:key_length])
            self._write_iv = int.from_bytes(key_iv[key_length:], "big")
        return aead

    # --- sending -----------------------------------------------------------------------

    def _seal(self, content_type: int, content: bytes) -> bytes:
        """One TLSCiphertext record of ``content`` under the current write key (5.2)."""
        aead = self._write_cipher()
        seq = self.write_seq
        if seq >= 2**64 - 1:  # 5.3: a sequence number MUST NOT wrap (rekey_after < 2^64)
            raise RecordError("write sequence number exhausted; the session must close")
        # 5.2: length = len(content) + 1 (inner type) + tag; header is the AAD.
        header = _RECORD_HEADER_PREFIX + (len(content) + 1 + self.suite.tag_length).to_bytes(
            2, "big"
        )
        # 5.3: nonce = IV XOR the 64-bit sequence number, left-padded to the IV length.
        nonce = (self._write_iv ^ seq).to_bytes(12, "big")
        self.write_seq = seq + 1
        return header + aead.encrypt(nonce, content + bytes((content_type,)), header)

    def _update_write_keys(self, request_peer_update: bool) -> bytes:
        """Seal a KeyUpdate under the current key, then switch to the next secret (4.6.3)."""
        request = _UPDATE_REQUESTED if request_peer_update else _UPDATE_NOT_REQUESTED
        record = self._seal(ContentType.HANDSHAKE, bytes((_KEY_UPDATE, 0, 0, 1, request)))
        self.write_secret = next_traffic_secret(self.suite, self.write_secret)
        self._write_key_iv = b""  # 7.3: derived again from the next secret
        self._write_aead = None
        self.write_seq = 0  # 5.3: the sequence number resets with each new key
        self._flags &= ~_KEY_UPDATE_OWED
        if request_peer_update:
            self._flags |= _PEER_UPDATE_ASKED
        return record

    def _take_output(self) -> bytes:
        out = self._outbuf
        self._outbuf = b""
        return out

    def _rekey_due(self) -> bytes:
        """The KeyUpdate this side owes before its next record, if any (4.6.3, 5.5)."""
        flags = self._flags
        if flags & _WRITE_CLOSED:
            return b""
        ask_peer = self.read_seq >= self.rekey_after and not flags & _PEER_UPDATE_ASKED
        if flags & _KEY_UPDATE_OWED or ask_peer or self.write_seq >= self.rekey_after:
            return self._update_write_keys(ask_peer)
        return b""

    def send_application_data(self, data: bytes) -> bytes:
        """Seal ``data`` as application data records of at most 2^14 bytes each (5.1) and
        return them, preceded by anything queued (a KeyUpdate answer, 4.6.3). Empty
        ``data`` gives one zero-length record (allowed for application data, 5.1)."""
        if self._flags & _WRITE_CLOSED:
            raise RecordError(
                "the session is closed for sending"
                + (f" (alert {self.alert_sent.name.lower()} was sent)" if self.alert_sent else "")
            )
        out = [self._take_output()]
        view = memoryview(data)
        offset = 0
        while True:
            if self.write_seq >= self.rekey_after or self._flags & _KEY_UPDATE_OWED:
                out.append(self._rekey_due())
            out.append(
                self._seal(
                    ContentType.APPLICATION_DATA, bytes(view[offset : offset + MAX_PLAINTEXT])
                )
            )
            offset += MAX_PLAINTEXT
            if offset >= len(data):
                break
        return b"".join(out)

    def seal_many(self, payloads: Sequence[Buffer]) -> bytes:
        """One application_data record per payload (each at most 2^14 bytes), concatenated
        for one stream write and preceded by anything queued: the very bytes that
        ``send_application_data`` of each payload in turn gives, KeyUpdates included (5.5,
        4.6.3), sealed by the chunk framing kernel (``otacore.chunk_framing``) in runs
        between key changes. The layer reserves each run's sequence numbers first; the
        batch is checked whole before any of it is sealed (RecordOverflowError)."""
        if self._flags & _WRITE_CLOSED:
            raise RecordError(
                "the session is closed for sending"
                + (f" (alert {self.alert_sent.name.lower()} was sent)" if self.alert_sent else "")
            )
        for payload in payloads:
            size = len(payload)
            if size > MAX_PLAINTEXT:
                raise RecordOverflowError(
                    f"a record holds at most {MAX_PLAINTEXT} bytes of plaintext (RFC 8446 5.1), "
                    f"got {size}; split the data or use send_application_data"
                )
        out = [self._take_output()]
        done = 0
        count = len(payloads)
        tag_length = self.suite.tag_length
        while done < count:
            if self.write_seq >= self.rekey_after or self._flags & _KEY_UPDATE_OWED:
                out.append(self._rekey_due())
            aead = self._write_cipher()
            seq = self.write_seq
            # Up to the rekey point, which is below 2^64 (5.3: the sequence never wraps).
            run = min(count - done, self.rekey_after - seq)
            self.write_seq = seq + run  # reserved before sealing: no nonce is used twice
            out.append(
                _framing_kernel.seal_tls13(
                    aead.encrypt,
                    self._write_iv.to_bytes(12, "big"),
                    seq,
                    tag_length,
                    ContentType.APPLICATION_DATA,
                    payloads[done : done + run],
                )
            )
            done += run
        return b"".join(out)

    def update_keys(self, *, request_peer_update: bool = False) -> bytes:
        """Send a KeyUpdate now (4.6.3) and return the bytes to transmit."""
        if self._flags & _WRITE_CLOSED:
            raise RecordError("the session is closed for sending")
        return self._take_output() + self._update_write_keys(request_peer_update)

    def close(self) -> bytes:
        """Send close_notify (6.1) and close the write side; returns the bytes to send."""
        out = self._take_output()
        if not self._flags & _WRITE_CLOSED:
            out += self._seal(ContentType.ALERT, bytes((1, AlertDescription.CLOSE_NOTIFY)))
            self._flags |= _WRITE_CLOSED
        return out

    def data_to_send(self) -> bytes:
        """Bytes queued by :meth:`receive_data` (KeyUpdate answers, alerts, close_notify)."""
        return self._take_output()

    # --- receiving ---------------------------------------------------------------------

    def _fail(self, alert: AlertDescription, error: RecordError) -> RecordError:
        """Queue the fatal ``alert`` (sealed, RFC 8446 6.2), close both sides, and return
        ``error`` for the caller to raise."""
        if not self._flags & _WRITE_CLOSED:
            # 6: alerts are encrypted under the current write key; level is ignored in 1.3.
            self._outbuf += self._seal(ContentType.ALERT, bytes((2, alert)))
            self.alert_sent = alert
        self._flags |= _READ_CLOSED | _WRITE_CLOSED
        self._inbuf = b""
        self._handshake_buffer = b""
        return error

    def _violation(self, alert: AlertDescription, message: str) -> RecordError:
        return self._fail(
            alert,
            RecordProtocolViolationError(f"{message}; sent alert {alert.name.lower()}"),
        )

    def receive_data(self, data: bytes) -> list[Tls13Event]:
        """Take a chunk of the TCP stream (any size, any split) and return the events of
        every record completed by it. Raises a RecordError subclass on a fatal error, after
        queuing the alert (see :meth:`data_to_send`). After close, input is ignored (6.1)."""
        if self._flags & _READ_CLOSED:
            return []  # 6.1: data received after a closure alert MUST be ignored
        buf = self._inbuf + data if self._inbuf else bytes(data)
        events: list[Tls13Event] = []
        pos = 0
        end_of_data = len(buf)
        try:
            while end_of_data - pos >= 5:
                length = (buf[pos + 3] << 8) | buf[pos + 4]
                if length > MAX_CIPHERTEXT:
                    raise self._fail(
                        AlertDescription.RECORD_OVERFLOW,
                        RecordOverflowError(
                            f"record of {length} bytes exceeds 2^14+256 (RFC 8446 5.2); "
                            "sent alert record_overflow"
                        ),
                    )
                end = pos + 5 + length
                if end > end_of_data:
                    break
                self._open_record(buf[pos : pos + 5], buf[pos + 5 : end], events)
                pos = end
                if self._flags & _READ_CLOSED:  # close_notify: the rest is ignored (6.1)
                    return events
        finally:
            if not self._flags & _READ_CLOSED:
                self._inbuf = buf[pos:] if pos < end_of_data else b""
        due = self._rekey_due()
        if due:
            self._outbuf += due
        return events

    def _open_record(self, header: bytes, body: bytes, events: list[Tls13Event]) -> None:
        outer_type = header[0]
        if outer_type != ContentType.APPLICATION_DATA:
            # 5: after the handshake every record is protected. A change_cipher_spec is
            # dropped only before the peer's Finished (5, D.4), which was handled by
            # OpenSSL before takeover: here it, a plaintext alert or handshake (e.g. a
            # renegotiation ClientHello) and unknown types are unexpected_message.
            raise self._violation(
                AlertDescription.UNEXPECTED_MESSAGE,
                f"unprotected record of type {outer_type} after the handshake (RFC 8446 5)",
            )
        aead = self._read_cipher()
        nonce = (self._read_iv ^ self.read_seq).to_bytes(12, "big")  # 5.3
        try:
            inner = aead.decrypt(nonce, body, header)  # 5.2: AAD is the record header
        except InvalidTag:
            raise self._fail(
                AlertDescription.BAD_RECORD_MAC,
                RecordAuthenticationError(
                    f"record {self.read_seq} failed to open (RFC 8446 5.2: wrong key, "
                    "tampered or truncated); sent alert bad_record_mac"
                ),
            ) from None
        self.read_seq += 1
        if len(inner) > MAX_INNER_PLAINTEXT:
            raise self._fail(
                AlertDescription.RECORD_OVERFLOW,
                RecordOverflowError(
                    f"inner plaintext of {len(inner)} bytes exceeds 2^14+1 (RFC 8446 5.4); "
                    "sent alert record_overflow"
                ),
            )
        if inner and inner[-1]:  # common case: no padding
            content_type = inner[-1]
            content = inner[:-1]
        else:
            stripped = inner.rstrip(b"\x00")  # 5.4: zero padding after the type
            if not stripped:
                raise self._violation(
                    AlertDescription.UNEXPECTED_MESSAGE,
                    "record without a content type (all zeros, RFC 8446 5.4)",
                )
            content_type = stripped[-1]
            content = stripped[:-1]
        if self._handshake_buffer and content_type != ContentType.HANDSHAKE:
            # 5.1: handshake messages MUST NOT be interleaved with other record types.
            raise self._violation(
                AlertDescription.UNEXPECTED_MESSAGE,
                "a handshake message was interrupted by another record type (RFC 8446 5.1)",
            )
        if content_type == ContentType.APPLICATION_DATA:
            if content:
                events.append(ApplicationData(content))
        elif content_type == ContentType.ALERT:
            self._receive_alert(content, events)
        elif content_type == ContentType.HANDSHAKE:
            self._receive_handshake(content, events)
        else:
            raise self._violation(
                AlertDescription.UNEXPECTED_MESSAGE,
                f"protected record of content type {content_type} (RFC 8446 5)",
            )

    def _receive_alert(self, content: bytes, events: list[Tls13Event]) -> None:
        if len(content) != 2:
            # 5.1: alerts MUST NOT be fragmented or coalesced; an Alert is 2 bytes (6).
            raise self._violation(
                AlertDescription.DECODE_ERROR, f"alert record of {len(content)} bytes (RFC 8446 6)"
            )
        description = content[1]
        if description == AlertDescription.CLOSE_NOTIFY:
            self.alert_received = description
            self._flags |= _READ_CLOSED
            self._inbuf = b""
            if not self._flags & _WRITE_CLOSED:  # 6.1: answer with our own close_notify
                self._outbuf += self._seal(
                    ContentType.ALERT, bytes((1, AlertDescription.CLOSE_NOTIFY))
                )
                self._flags |= _WRITE_CLOSED
            events.append(CloseNotifyReceived())
            return
        if description == AlertDescription.USER_CANCELED:
            return  # 6.1: a closure alert; the peer follows it with close_notify
        # 6.2: every other alert is an error alert, whatever its level; no reply, no
        # further data in either direction.
        self.alert_received = description
        self._flags |= _READ_CLOSED | _WRITE_CLOSED
        self._inbuf = b""
        raise PeerAlertError(f"the peer closed the session with alert {alert_name(description)}")

    def _receive_handshake(self, content: bytes, events: list[Tls13Event]) -> None:
        if not content:
            # 5.1: zero-length fragments of handshake messages MUST NOT be sent.
            raise self._violation(
                AlertDescription.UNEXPECTED_MESSAGE, "empty handshake record (RFC 8446 5.1)"
            )
        buf = self._handshake_buffer + content if self._handshake_buffer else content
        pos = 0
        while len(buf) - pos >= 1:
            message_type = buf[pos]
            allowed = message_type == _KEY_UPDATE or (
                message_type == _NEW_SESSION_TICKET and not self._flags & _IS_SERVER
            )
            if not allowed:
                # 4.6: after the handshake only NewSessionTicket (to clients) and
                # KeyUpdate may come; post-handshake auth was not offered; a ClientHello
                # here is a renegotiation attempt, which TLS 1.3 does not have.
                raise self._violation(
                    AlertDescription.UNEXPECTED_MESSAGE,
                    f"handshake message type {message_type} after the handshake (RFC 8446 4.6)",
                )
            if len(buf) - pos < 4:
                break
            length = int.from_bytes(buf[pos + 1 : pos + 4], "big")
            if (message_type == _KEY_UPDATE and length != 1) or length > MAX_HANDSHAKE_MESSAGE:
                raise self._violation(
                    AlertDescription.DECODE_ERROR,
                    f"handshake message type {message_type} of length {length} (RFC 8446 4.6)",
                )
            start, end = pos, pos + 4 + length
            if end > len(buf):
                break  # 5.1: the message continues in the next record
            body = buf[start + 4 : end]
            pos = end
            if message_type == _NEW_SESSION_TICKET:
                events.append(SessionTicketReceived(buf[start:end]))
                continue
            if body[0] not in (_UPDATE_NOT_REQUESTED, _UPDATE_REQUESTED):
                raise self._violation(
                    AlertDescription.ILLEGAL_PARAMETER,
                    f"KeyUpdate request_update {body[0]} (RFC 8446 4.6.3)",
                )
            if pos != len(buf):
                # 5.1: handshake messages MUST NOT span key changes; KeyUpdate ends its record.
                raise self._violation(
                    AlertDescription.UNEXPECTED_MESSAGE,
                    "data after a KeyUpdate in the same record (RFC 8446 5.1)",
                )
            # 4.6.3 / 7.2: the peer's later records use the next-generation secret.
            self.read_secret = next_traffic_secret(self.suite, self.read_secret)
            self._read_key_iv = b""  # 7.3: derived again from the next secret
            self._read_aead = None
            self.read_seq = 0
            self._flags &= ~_PEER_UPDATE_ASKED
            requested = body[0] == _UPDATE_REQUESTED
            if requested:
                # 4.6.3: answer before our next record; several requests while we are
                # silent get one answer (the flag is cleared when ours is sent).
                self._flags |= _KEY_UPDATE_OWED
            events.append(KeyUpdateReceived(requested))
        self._handshake_buffer = buf[pos:] if pos < len(buf) else b""

    # --- persistence -------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        """The session's state as bytes (secrets included: encrypt them at rest)."""
        alert = _NO_ALERT if self.alert_sent is None else int(self.alert_sent)
        head = _SERIAL_HEAD.pack(
            _SERIAL_MAGIC,
            _SERIAL_VERSION,
            self._flags,
            self.suite.code,
            self.read_seq,
            self.write_seq,
            self.rekey_after,
            alert,
        )
        parts = [head, self.read_secret, self.write_secret]
        for blob in (self._inbuf, self._handshake_buffer, self._outbuf):
            parts.append(len(blob).to_bytes(4, "big"))
            parts.append(blob)
        return b"".join(parts)

    @classmethod
    def from_bytes(cls, data: bytes) -> Tls13RecordLayer:
        """Restore a layer saved by :meth:`to_bytes`; RecordError if ``data`` is not one."""
        try:
            magic, version, flags, code, read_seq, write_seq, rekey_after, alert = (
                _SERIAL_HEAD.unpack_from(data)
            )
        except struct.error:
            raise RecordError("saved TLS 1.3 session is truncated") from None
        if magic != _SERIAL_MAGIC or version != _SERIAL_VERSION:
            raise RecordError("not a saved TLS 1.3 session of a version this build reads")
        suite = SUITES_BY_CODE.get(code)
        if suite is None:
            raise RecordError(f"saved TLS 1.3 session names unknown suite 0x{code:04x}")
        pos = _SERIAL_HEAD.size
        size = suite.hash_length
        read_secret = data[pos : pos + size]
        write_secret = data[pos + size : pos + 2 * size]
        pos += 2 * size
        blobs = []
        for _ in range(3):
            if len(data) < pos + 4:
                raise RecordError("saved TLS 1.3 session is truncated")
            length = int.from_bytes(data[pos : pos + 4], "big")
            pos += 4
            if len(data) < pos + length:
                raise RecordError("saved TLS 1.3 session is truncated")
            blobs.append(bytes(data[pos : pos + length]))
            pos += length
        if pos != len(data):
            raise RecordError("saved TLS 1.3 session has trailing bytes")
        if alert != _NO_ALERT and alert not in AlertDescription._value2member_map_:
            raise RecordError(f"saved TLS 1.3 session names unknown alert {alert}")
        layer = cls(
            suite,
            is_server=bool(flags & _IS_SERVER),
            read_secret=read_secret,
            write_secret=write_secret,
            read_seq=read_seq,
            write_seq=write_seq,
            rekey_after=rekey_after,
        )
        layer._flags = flags
        layer._inbuf, layer._handshake_buffer, layer._outbuf = blobs
        layer.alert_sent = None if alert == _NO_ALERT else AlertDescription(alert)
        return layer
