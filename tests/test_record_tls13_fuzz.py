"""Hostile input to the TLS 1.3 record layer: every case ends in the right alert and a closed
session, or is ignored where RFC 8446 says so, and never in an unexpected exception.

The secrets come from a real OpenSSL handshake (once per suite); the attacker is a
client-side view of the same secrets sealing records with :func:`seal_raw`, which is written
independently of the layer so the tests can break any part of a record. Hypothesis prints
the failing example and its reproduction blob (``print_blob``).
"""

from __future__ import annotations

import functools
import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from otacore.errors import (
    PeerAlertError,
    RecordAuthenticationError,
    RecordError,
    RecordOverflowError,
    RecordProtocolViolationError,
)
from otacore.records.tls13 import (
    AlertDescription,
    ApplicationData,
    CloseNotifyReceived,
    KeyUpdateReceived,
    SessionTicketReceived,
    Tls13Event,
    Tls13RecordLayer,
)
from otacore.records.tls13_handover import Tls13Handover
from tests.tls13_peers import handshake, open_raw, seal_raw

SUITE = "TLS_AES_128_GCM_SHA256"
FUZZ = settings(max_examples=150, print_blob=True)


@functools.cache
def _handover(suite: str) -> Tls13Handover:
    return handshake(suite).handover


class Attacker:
    """The client's side of the session's secrets, sealing whatever a test asks for."""

    def __init__(self, handover: Tls13Handover) -> None:
        self.suite = handover.suite
        self.secret = handover.read_secret  # the client's write secret
        self.seq = 0
        self.our_secret = handover.write_secret

    def record(self, inner: bytes, **kwargs: int) -> bytes:
        wire = seal_raw(self.suite, self.secret, self.seq, inner, **kwargs)
        self.seq += 1
        return wire

    def data(self, content: bytes) -> bytes:
        return self.record(content + b"\x17")

    def handshake_message(self, message: bytes) -> bytes:
        return self.record(message + b"\x16")

    def alert(self, description: int, level: int = 2) -> bytes:
        return self.record(bytes((level, description)) + b"\x15")


def _pair(suite: str = SUITE, **kwargs: int) -> tuple[Tls13RecordLayer, Attacker]:
    handover = _handover(suite)
    layer = Tls13RecordLayer(
        handover.suite,
        is_server=True,
        read_secret=handover.read_secret,
        write_secret=handover.write_secret,
        **kwargs,
    )
    return layer, Attacker(handover)


def _expect_fatal(
    layer: Tls13RecordLayer,
    wire: bytes,
    alert: AlertDescription,
    error: type[RecordError],
    attacker: Attacker,
) -> None:
    """``wire`` closes the session with ``alert``: raised as ``error``, the alert sealed in
    the output (the peer can read it), and later input ignored."""
    with pytest.raises(error, match=alert.name.lower()):
        layer.receive_data(wire)
    assert layer.closed
    assert layer.alert_sent is alert
    _assert_alert_on_wire(layer, attacker, alert)
    assert layer.receive_data(b"\x17\x03\x03\x00\x20" + bytes(32)) == []
    with pytest.raises(RecordError, match="closed for sending"):
        layer.send_application_data(b"no")


def _assert_alert_on_wire(layer: Tls13RecordLayer, attacker: Attacker, alert: int) -> None:
    wire = layer.data_to_send()
    inner = open_raw(attacker.suite, attacker.our_secret, layer.write_seq - 1, wire)
    assert inner == bytes((2, alert, 21))


# --- oversized records (5.1, 5.2, 5.4) ---------------------------------------------------


def test_ciphertext_length_over_limit_is_record_overflow_at_the_header() -> None:
    layer, attacker = _pair()
    header = b"\x17\x03\x03" + (2**14 + 257).to_bytes(2, "big")
    _expect_fatal(layer, header, AlertDescription.RECORD_OVERFLOW, RecordOverflowError, attacker)


def test_inner_plaintext_over_limit_is_record_overflow() -> None:
    layer, attacker = _pair()
    wire = attacker.record(bytes(2**14 + 1) + b"\x17")  # 2^14+1 content bytes
    _expect_fatal(layer, wire, AlertDescription.RECORD_OVERFLOW, RecordOverflowError, attacker)


def test_padding_that_overflows_is_record_overflow() -> None:
    layer, attacker = _pair()
    wire = attacker.record(b"x" * 2**14 + b"\x17" + bytes(50))
    _expect_fatal(layer, wire, AlertDescription.RECORD_OVERFLOW, RecordOverflowError, attacker)


def test_largest_records_and_padding_are_accepted() -> None:
    layer, attacker = _pair()
    full = bytes(range(256)) * 64  # 2^14
    events = layer.receive_data(attacker.data(full) + attacker.record(b"pad\x17" + bytes(200)))
    assert events == [ApplicationData(full), ApplicationData(b"pad")]


# --- wrong types -------------------------------------------------------------------------


@pytest.mark.parametrize("outer_type", [0, 20, 21, 22, 24, 255])
def test_unprotected_or_unknown_record_type_is_unexpected(outer_type: int) -> None:
    """A CCS after the peer's Finished, a plaintext alert or handshake, unknown types (5)."""
    layer, attacker = _pair()
    wire = bytes((outer_type, 3, 3, 0, 1, 1))
    _expect_fatal(
        layer, wire, AlertDescription.UNEXPECTED_MESSAGE, RecordProtocolViolationError, attacker
    )


@pytest.mark.parametrize("inner_type", [20, 24, 99])
def test_unknown_inner_content_type_is_unexpected(inner_type: int) -> None:
    layer, attacker = _pair()
    wire = attacker.record(b"\x01" + bytes((inner_type,)))
    _expect_fatal(
        layer, wire, AlertDescription.UNEXPECTED_MESSAGE, RecordProtocolViolationError, attacker
    )


def test_inner_plaintext_of_zeros_only_is_unexpected() -> None:
    """5.4: no non-zero octet means no content type."""
    layer, attacker = _pair()
    _expect_fatal(
        layer,
        attacker.record(bytes(20)),
        AlertDescription.UNEXPECTED_MESSAGE,
        RecordProtocolViolationError,
        attacker,
    )


# --- post-handshake messages (4.6) -------------------------------------------------------


@pytest.mark.parametrize(
    "message_type",
    [1, 2, 4, 8, 11, 13, 15, 20, 254],
    ids=[
        "client_hello-renegotiation",
        "server_hello",
        "new_session_ticket-to-server",
        "encrypted_extensions",
        "certificate",
        "certificate_request",
        "certificate_verify",
        "finished",
        "message_hash",
    ],
)
def test_unexpected_handshake_message_after_takeover(message_type: int) -> None:
    layer, attacker = _pair()
    wire = attacker.handshake_message(bytes((message_type, 0, 0, 2, 3, 3)))
    _expect_fatal(
        layer, wire, AlertDescription.UNEXPECTED_MESSAGE, RecordProtocolViolationError, attacker
    )


def test_unexpected_handshake_type_is_refused_from_its_first_byte() -> None:
    """A renegotiation attempt split across records is refused at its first fragment."""
    layer, attacker = _pair()
    _expect_fatal(
        layer,
        attacker.handshake_message(b"\x01"),
        AlertDescription.UNEXPECTED_MESSAGE,
        RecordProtocolViolationError,
        attacker,
    )


@pytest.mark.parametrize(
    ("message", "alert"),
    [
        (b"\x18\x00\x00\x02\x00\x00", AlertDescription.DECODE_ERROR),
        (b"\x18\x00\x00\x00", AlertDescription.DECODE_ERROR),
        (b"\x18\x00\x00\x01\x02", AlertDescription.ILLEGAL_PARAMETER),
        (b"\x18\x00\x00\x01\x00" + b"\x18\x00\x00\x01\x00", AlertDescription.UNEXPECTED_MESSAGE),
    ],
    ids=["long", "empty", "bad-request-value", "two-in-one-record"],
)
def test_malformed_key_update(message: bytes, alert: AlertDescription) -> None:
    layer, attacker = _pair()
    _expect_fatal(
        layer, attacker.handshake_message(message), alert, RecordProtocolViolationError, attacker
    )


def test_key_update_fragmented_across_records_is_reassembled() -> None:
    """5.1: handshake messages may be fragmented; a KeyUpdate in three records works."""
    layer, attacker = _pair()
    wire = b"".join(
        attacker.handshake_message(part) for part in (b"\x18", b"\x00\x00", b"\x01\x01")
    )
    assert layer.receive_data(wire) == [KeyUpdateReceived(True)]
    assert layer.read_seq == 0
    answer = layer.data_to_send()
    assert open_raw(attacker.suite, attacker.our_secret, 0, answer) == b"\x18\x00\x00\x01\x00\x16"


def test_handshake_fragment_interrupted_by_data_is_unexpected() -> None:
    layer, attacker = _pair()
    wire = attacker.handshake_message(b"\x18\x00") + attacker.data(b"x")
    _expect_fatal(
        layer, wire, AlertDescription.UNEXPECTED_MESSAGE, RecordProtocolViolationError, attacker
    )


def test_empty_handshake_record_is_unexpected() -> None:
    layer, attacker = _pair()
    _expect_fatal(
        layer,
        attacker.handshake_message(b""),
        AlertDescription.UNEXPECTED_MESSAGE,
        RecordProtocolViolationError,
        attacker,
    )


def test_client_layer_reassembles_a_fragmented_ticket() -> None:
    handover = _handover(SUITE)
    client = Tls13RecordLayer(
        handover.suite,
        is_server=False,
        read_secret=handover.write_secret,
        write_secret=handover.read_secret,
    )
    ticket = b"\x04\x00\x01\x00" + bytes(range(256))
    wire = b"".join(
        seal_raw(handover.suite, handover.write_secret, seq, ticket[n : n + 100] + b"\x16")
        for seq, n in enumerate(range(0, len(ticket), 100))
    )
    assert client.receive_data(wire) == [SessionTicketReceived(ticket)]


# --- alerts and close_notify (6) ---------------------------------------------------------


@pytest.mark.parametrize("content", [b"\x02", b"\x02\x00\x00", b""], ids=["1", "3", "0"])
def test_malformed_alert_is_decode_error(content: bytes) -> None:
    layer, attacker = _pair()
    _expect_fatal(
        layer,
        attacker.record(content + b"\x15"),
        AlertDescription.DECODE_ERROR,
        RecordProtocolViolationError,
        attacker,
    )


@pytest.mark.parametrize("level", [1, 2])
def test_peer_error_alert_closes_without_reply(level: int) -> None:
    """6.2: any alert but close_notify/user_canceled is an error, whatever its level."""
    layer, attacker = _pair()
    with pytest.raises(PeerAlertError, match="handshake_failure"):
        layer.receive_data(attacker.alert(AlertDescription.HANDSHAKE_FAILURE, level))
    assert layer.closed
    assert layer.alert_received == AlertDescription.HANDSHAKE_FAILURE
    assert layer.alert_sent is None
    assert layer.data_to_send() == b""
    assert layer.receive_data(attacker.data(b"late")) == []


@given(junk=st.binary(max_size=300), more=st.binary(max_size=300))
@FUZZ
def test_junk_after_close_notify_is_ignored(junk: bytes, more: bytes) -> None:
    layer, attacker = _pair()
    wire = attacker.alert(AlertDescription.USER_CANCELED, 1)
    wire += attacker.alert(AlertDescription.CLOSE_NOTIFY, 1)
    assert layer.receive_data(wire + junk) == [CloseNotifyReceived()]
    assert layer.receive_data(more) == []
    answer = layer.data_to_send()
    assert open_raw(attacker.suite, attacker.our_secret, 0, answer) == b"\x01\x00\x15"
    assert layer.closed


# --- garbling, truncation, replay: property tests ----------------------------------------


def _feed_all(layer: Tls13RecordLayer, chunks: list[bytes]) -> list[Tls13Event]:
    events: list[Tls13Event] = []
    for chunk in chunks:
        events += layer.receive_data(chunk)
    return events


def _assert_closed_cleanly(layer: Tls13RecordLayer, attacker: Attacker, error: RecordError) -> None:
    assert layer.closed
    if isinstance(error, PeerAlertError):
        return
    assert layer.alert_sent is not None
    assert layer.alert_sent.name.lower() in str(error)
    _assert_alert_on_wire(layer, attacker, layer.alert_sent)


@given(
    content=st.binary(max_size=2000),
    position=st.integers(min_value=0),
    bit=st.integers(min_value=0, max_value=7),
)
@FUZZ
def test_any_flipped_bit_closes_the_session(content: bytes, position: int, bit: int) -> None:
    layer, attacker = _pair()
    wire = bytearray(attacker.data(content))
    position %= len(wire)
    wire[position] ^= 1 << bit
    try:
        events = layer.receive_data(bytes(wire))
    except RecordError as error:
        _assert_closed_cleanly(layer, attacker, error)
        if position == 0:  # the type byte: no longer application_data
            assert layer.alert_sent is AlertDescription.UNEXPECTED_MESSAGE
        elif position in (1, 2):  # legacy_record_version is ignored but authenticated
            assert layer.alert_sent is AlertDescription.BAD_RECORD_MAC
        else:
            assert layer.alert_sent in (
                AlertDescription.BAD_RECORD_MAC,
                AlertDescription.RECORD_OVERFLOW,
            )
        return
    # Only a flip that makes the length longer (waiting for more) or touches the ignored
    # legacy_record_version... which is in the AAD, so it fails to open: only the former.
    assert events == []
    assert position in (3, 4)


@given(content=st.binary(min_size=0, max_size=500), cut=st.integers(min_value=1))
@FUZZ
def test_truncated_record_waits_then_fails_when_followed(content: bytes, cut: int) -> None:
    """A record cut short is incomplete (no event, no error) until more bytes arrive; bytes
    from the next record then make it fail to open."""
    layer, attacker = _pair()
    wire = attacker.data(content)
    cut %= len(wire)
    assert layer.receive_data(wire[:cut]) == []
    next_record = attacker.data(b"next record " * 50)
    try:
        events = layer.receive_data(next_record)
    except RecordError as error:
        _assert_closed_cleanly(layer, attacker, error)
        return
    assert events == []  # still incomplete


@given(content=st.binary(max_size=100))
@FUZZ
def test_replayed_or_reordered_record_is_bad_record_mac(content: bytes) -> None:
    layer, attacker = _pair()
    first, second = attacker.data(content), attacker.data(content + b"!")
    assert layer.receive_data(first) == ([ApplicationData(content)] if content else [])
    _expect_fatal(
        layer, first, AlertDescription.BAD_RECORD_MAC, RecordAuthenticationError, attacker
    )
    layer, attacker = _pair()
    first, second = attacker.data(content), attacker.data(content)
    _expect_fatal(
        layer, second, AlertDescription.BAD_RECORD_MAC, RecordAuthenticationError, attacker
    )


@given(stream=st.binary(max_size=3000), cuts=st.lists(st.integers(min_value=0), max_size=20))
@FUZZ
def test_arbitrary_bytes_in_arbitrary_chunks(stream: bytes, cuts: list[int]) -> None:
    """Random bytes, cut anywhere: at most a RecordError with its alert on the wire."""
    layer, attacker = _pair()
    points = sorted({cut % (len(stream) + 1) for cut in cuts} | {0, len(stream)})
    chunks = [stream[a:b] for a, b in itertools.pairwise(points)]
    try:
        events = _feed_all(layer, chunks)
    except RecordError as error:
        _assert_closed_cleanly(layer, attacker, error)
        return
    assert events == []  # random bytes never open


# --- stream parsing and restore: valid streams, any split ---------------------------------

_ITEMS = st.lists(
    st.one_of(
        st.binary(max_size=1500).map(lambda data: ("data", data)),
        st.booleans().map(lambda requested: ("key_update", requested)),
        st.integers(min_value=0, max_value=300).map(lambda pad: ("padded", pad)),
    ),
    max_size=25,
)


def _stream(items: list[tuple[str, object]]) -> tuple[bytes, list[Tls13Event]]:
    """A valid client stream (built with the layer on the client side, which updates its
    keys as it goes) and the events the server should report for it."""
    handover = _handover(SUITE)
    client = Tls13RecordLayer(
        handover.suite,
        is_server=False,
        read_secret=handover.write_secret,
        write_secret=handover.read_secret,
    )
    wire = b""
    expected: list[Tls13Event] = []
    for kind, value in items:
        if kind == "data":
            assert isinstance(value, bytes)
            wire += client.send_application_data(value)
            if value:
                expected.append(ApplicationData(value))
        elif kind == "key_update":
            wire += client.update_keys(request_peer_update=bool(value))
            expected.append(KeyUpdateReceived(bool(value)))
        else:
            assert isinstance(value, int)
            # A padded record (5.4), sealed by hand at the client's current key and seq.
            wire += seal_raw(
                client.suite, client.write_secret, client.write_seq, b"p\x17" + bytes(value)
            )
            client.write_seq += 1
            expected.append(ApplicationData(b"p"))
    return wire, expected


@given(items=_ITEMS, cuts=st.lists(st.integers(min_value=0), max_size=30))
@FUZZ
def test_any_split_of_a_valid_stream_gives_the_same_events(
    items: list[tuple[str, object]], cuts: list[int]
) -> None:
    wire, expected = _stream(items)
    points = sorted({cut % (len(wire) + 1) for cut in cuts} | {0, len(wire)})
    layer, _ = _pair()
    assert _feed_all(layer, [wire[a:b] for a, b in itertools.pairwise(points)]) == (expected)


@given(items=_ITEMS, cut=st.integers(min_value=0))
@FUZZ
def test_restore_at_any_byte_continues_the_stream(
    items: list[tuple[str, object]], cut: int
) -> None:
    wire, expected = _stream(items)
    cut %= len(wire) + 1
    layer, _ = _pair()
    events = layer.receive_data(wire[:cut])
    restored = Tls13RecordLayer.from_bytes(layer.to_bytes())
    assert restored.to_bytes() == layer.to_bytes()
    rest = restored.receive_data(wire[cut:])
    assert events + rest == expected
    assert layer.receive_data(wire[cut:]) == rest  # the original, fed the same bytes
    # What either would send next is the same bytes (same keys, same sequence number).
    assert restored.send_application_data(b"z") == layer.send_application_data(b"z")


@given(data=st.binary(max_size=400), keep=st.integers(min_value=0, max_value=200))
@FUZZ
def test_restore_refuses_garbage(data: bytes, keep: int) -> None:
    """Random bytes, or a real saved session's prefix followed by random bytes: either a
    layer or RecordError, nothing else."""
    layer, _ = _pair()
    for candidate in (data, layer.to_bytes()[:keep] + data):
        try:
            Tls13RecordLayer.from_bytes(candidate)
        except RecordError:
            continue


def test_restore_refuses_an_unknown_alert_code() -> None:
    layer, _ = _pair()
    saved = bytearray(layer.to_bytes())
    saved[32] = 200  # the alert_sent byte of the header
    with pytest.raises(RecordError, match="unknown alert 200"):
        Tls13RecordLayer.from_bytes(bytes(saved))
