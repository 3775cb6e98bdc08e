"""Fuzzing the DTLS 1.2 record layer with records from a real OpenSSL client (issue 14).

Garbled records, bit flips, replays (exact and old), wrong epochs, truncated headers,
oversized lengths, trailing junk, renegotiation ClientHellos: each is discarded and counted,
or answered, and the session goes on; nothing raises. Hypothesis runs derandomized (the same
examples every run; ``--hypothesis-seed`` changes them), and prints a failing example.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from otacore.errors import RecordStateFormatError
from otacore.records import replay_window
from otacore.records.dtls12 import (
    MAX_CIPHERTEXT,
    MAX_PLAINTEXT,
    RECORD_HEADER,
    AlertDescription,
    AlertLevel,
    ApplicationData,
    DiscardReason,
    DtlsRecordLayer,
    NewHandshakeRequested,
    PeerAlert,
    PeerRepeatedFlight,
    RecordDiscarded,
    RecordEvent,
    RenegotiationRefused,
    SessionClosed,
)
from otacore.records.dtls12_handover import layer_from_connection
from otacore.records.tls12_keys import derive_traffic_keys, suite_named
from server.identity import ProvisionedDevice
from tests.test_record_dtls12 import SUITE_NAMES, handshake, make_dtls_pki, make_peers

FUZZ = settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
EVENT_TYPES = (
    ApplicationData, RecordDiscarded, PeerAlert, SessionClosed, PeerRepeatedFlight,
    RenegotiationRefused, NewHandshakeRequested,
)  # fmt: skip


@dataclass
class Corpus:
    """A server layer's saved state and genuine records from its OpenSSL client."""

    suite_name: str
    saved_layer: bytes
    #: (record, plaintext), in the order the client sealed them.
    records: list[tuple[bytes, bytes]]
    #: A genuine renegotiation ClientHello in epoch 1, sealed last.
    client_hello: bytes
    #: A genuine record sealed after ``records``, to prove the session still works.
    sentinel: bytes


def build_corpus(pki: tuple[object, ProvisionedDevice], suite_name: str) -> Corpus:
    server, client = make_peers(pki, suite_name)
    handshake(server, client)
    layer = layer_from_connection(server.conn, server.tracker, is_server=True)
    records = []
    for index in range(12):
        payload = bytes([index]) * (index * 37 % 300 + 1)
        client.conn.send(payload)
        records.append((client.drain(), payload))
    client.conn.send(b"sentinel")
    sentinel = client.drain()
    assert client.conn.renegotiate()
    client.step()  # OpenSSL writes no data while it renegotiates: the ClientHello comes last
    return Corpus(suite_name, layer.to_bytes(), records, client.drain(), sentinel)


@pytest.fixture(scope="module", params=SUITE_NAMES)
def corpus(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    pki = make_dtls_pki(tmp_path_factory.mktemp("dtls12-fuzz"))
    return build_corpus(pki, request.param)


def fresh_layer(corpus: Corpus) -> DtlsRecordLayer:
    # Test only: the same saved state is restored for every example. Nothing sealed here
    # reaches a peer; a real deployment restores a saved state once (see DtlsRecordLayer).
    return DtlsRecordLayer.from_bytes(corpus.saved_layer)


def open_safely(layer: DtlsRecordLayer, datagram: bytes) -> list[RecordEvent]:
    events = layer.open_datagram(datagram)
    assert all(isinstance(event, EVENT_TYPES) for event in events), events
    return events


def assert_still_works(layer: DtlsRecordLayer, corpus: Corpus) -> None:
    assert not layer.closed
    assert open_safely(layer, corpus.sentinel) == [ApplicationData(b"sentinel")]


def set_u16(data: bytes, offset: int, value: int) -> bytes:
    return data[:offset] + struct.pack(">H", value) + data[offset + 2 :]


mutations = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10_000), st.integers(0, 7)),
    st.tuples(st.just("truncate"), st.integers(0, 10_000)),
    st.tuples(st.just("junk"), st.binary(min_size=1, max_size=40)),
    st.tuples(st.just("epoch"), st.integers(0, 0xFFFF).filter(lambda e: e != 1)),
    st.tuples(st.just("length"), st.integers(0, 0xFFFF)),
    st.tuples(st.just("version"), st.integers(0, 0xFFFF).filter(lambda v: v != 0xFEFD)),
    st.tuples(st.just("type"), st.integers(0, 255)),
    st.tuples(st.just("garbage"), st.binary(max_size=200)),
)


@FUZZ
@given(
    picks=st.lists(st.integers(0, 11), min_size=1, max_size=6),
    mutation=mutations,
    replay_first=st.booleans(),
)
def test_mutated_datagrams_are_discarded_and_the_session_goes_on(
    corpus: Corpus, picks: list[int], mutation: tuple[object, ...], replay_first: bool
) -> None:
    layer = fresh_layer(corpus)
    if replay_first:  # the records were already received once: every copy is a replay
        for record, _payload in corpus.records:
            open_safely(layer, record)
    datagram = b"".join(corpus.records[index][0] for index in picks)
    kind = mutation[0]
    if kind == "flip":
        position = int(mutation[1]) % len(datagram)  # type: ignore[call-overload]
        flipped = datagram[position] ^ (1 << int(mutation[2]))  # type: ignore[call-overload]
        datagram = datagram[:position] + bytes([flipped]) + datagram[position + 1 :]
    elif kind == "truncate":
        datagram = datagram[: int(mutation[1]) % len(datagram)]  # type: ignore[call-overload]
    elif kind == "junk":
        datagram += mutation[1]  # type: ignore[operator]
    elif kind == "epoch":
        datagram = set_u16(datagram, 3, int(mutation[1]))  # type: ignore[call-overload]
    elif kind == "length":
        datagram = set_u16(datagram, 11, int(mutation[1]))  # type: ignore[call-overload]
    elif kind == "version":
        datagram = set_u16(datagram, 1, int(mutation[1]))  # type: ignore[call-overload]
    elif kind == "type":
        datagram = bytes([int(mutation[1])]) + datagram[1:]  # type: ignore[call-overload]
    else:
        datagram = mutation[1]  # type: ignore[assignment]
    before = layer.discarded
    events = open_safely(layer, datagram)  # type: ignore[arg-type]
    genuine = {payload for _record, payload in corpus.records}
    for event in events:
        if isinstance(event, ApplicationData):
            assert event.data in genuine  # nothing forged or altered is ever delivered
            assert not replay_first  # and nothing twice
    discards = sum(isinstance(event, RecordDiscarded) for event in events)
    assert layer.discarded - before == discards
    assert not any(isinstance(event, (SessionClosed, PeerAlert)) for event in events)
    assert_still_works(layer, corpus)


@FUZZ
@given(order=st.permutations(range(12)), duplicates=st.lists(st.integers(0, 11), max_size=8))
def test_reordered_and_duplicated_records_open_exactly_once(
    corpus: Corpus, order: list[int], duplicates: list[int]
) -> None:
    """Within the 64-record window, order does not matter and each record opens once
    (RFC 6347 4.1.2.6)."""
    layer = fresh_layer(corpus)
    delivered: list[bytes] = []
    for index in list(order) + duplicates:
        for event in open_safely(layer, corpus.records[index][0]):
            if isinstance(event, ApplicationData):
                delivered.append(event.data)
            else:
                assert event == RecordDiscarded(DiscardReason.REPLAYED)
    assert sorted(delivered) == sorted(payload for _r, payload in corpus.records)
    assert layer.discarded == len(duplicates)
    assert_still_works(layer, corpus)


def test_records_left_of_the_window_are_too_old(corpus: Corpus) -> None:
    """A genuine record 64 or more behind the newest one is refused unopened."""
    record = corpus.records[0][0]
    seq = RECORD_HEADER.unpack_from(record)[2] & 0xFFFF_FFFF_FFFF
    for newer, verdict in ((63, ApplicationData), (64, RecordDiscarded)):
        layer = fresh_layer(corpus)
        layer._replay_top = seq + newer  # a record `newer` ahead has arrived (test only)
        (event,) = open_safely(layer, record)
        assert isinstance(event, verdict), (newer, event)
    assert event == RecordDiscarded(DiscardReason.TOO_OLD)


def test_renegotiation_in_a_datagram_with_data(corpus: Corpus) -> None:
    """A ClientHello in epoch 1 is answered with a warning and the data beside it opens."""
    layer = fresh_layer(corpus)
    events = open_safely(layer, corpus.records[0][0] + corpus.client_hello)
    assert isinstance(events[0], ApplicationData)
    assert isinstance(events[1], RenegotiationRefused)
    assert open_safely(layer, corpus.client_hello) == [RecordDiscarded(DiscardReason.REPLAYED)]
    assert_still_works(layer, corpus)


def test_oversized_records_are_discarded(tmp_path_factory: pytest.TempPathFactory) -> None:
    """RFC 5246 6.2: over 2^14 + 2048 ciphertext bytes is dropped unopened; a record that
    authenticates but holds more than 2^14 bytes of plaintext is dropped too."""
    pki = make_dtls_pki(tmp_path_factory.mktemp("dtls12-oversize"))
    suite_name = SUITE_NAMES[0]
    server, client = make_peers(pki, suite_name)
    handshake(server, client)
    layer = layer_from_connection(server.conn, server.tracker, is_server=True)
    huge = RECORD_HEADER.pack(23, 0xFEFD, (1 << 48) | 5, MAX_CIPHERTEXT + 1)
    assert open_safely(layer, huge + bytes(MAX_CIPHERTEXT + 1)) == [
        RecordDiscarded(DiscardReason.OVERSIZED)
    ]
    # Seal a too-large record the way a misbehaving client would, with its real keys.
    conn = client.conn
    keys = derive_traffic_keys(
        suite_named(suite_name), conn.master_key(), conn.client_random(), conn.server_random()
    )
    aead = keys.suite.make_aead(keys.client_write_key)
    epoch_seq = (1 << 48) | 9
    plaintext = bytes(MAX_PLAINTEXT + 1)
    aad = struct.pack(">QBHH", epoch_seq, 23, 0xFEFD, len(plaintext))
    explicit = epoch_seq.to_bytes(8, "big")
    body = explicit + aead.encrypt(keys.client_write_iv + explicit, plaintext, aad)
    record = RECORD_HEADER.pack(23, 0xFEFD, epoch_seq, len(body)) + body
    assert open_safely(layer, record) == [RecordDiscarded(DiscardReason.OVERSIZED)]
    # The same keys, a legal size: it opens (so the refusal above was for the size).
    plaintext = bytes(MAX_PLAINTEXT)
    aad = struct.pack(">QBHH", epoch_seq, 23, 0xFEFD, len(plaintext))
    body = explicit + aead.encrypt(keys.client_write_iv + explicit, plaintext, aad)
    record = RECORD_HEADER.pack(23, 0xFEFD, epoch_seq, len(body)) + body
    assert open_safely(layer, record) == [ApplicationData(plaintext)]


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.lists(st.integers(0, 400), max_size=120))
def test_replay_window_matches_a_model(sequence_numbers: list[int]) -> None:
    """The two-int window against a set: new iff never accepted and within 64 of the top."""
    top, bitmap = replay_window.EMPTY_TOP, 0
    accepted: set[int] = set()
    for seq in sequence_numbers:
        verdict = replay_window.check(top, bitmap, seq)
        if seq in accepted:
            expected = replay_window.ReplayVerdict.DUPLICATE
            if top - seq >= replay_window.WINDOW_SIZE:
                expected = replay_window.ReplayVerdict.TOO_OLD
        elif top - seq >= replay_window.WINDOW_SIZE:
            expected = replay_window.ReplayVerdict.TOO_OLD
        else:
            expected = replay_window.ReplayVerdict.NEW
        assert verdict == expected, (seq, top)
        if verdict == replay_window.ReplayVerdict.NEW:
            top, bitmap = replay_window.mark(top, bitmap, seq)
            accepted.add(seq)
        assert bitmap < 1 << replay_window.WINDOW_SIZE


operations = st.lists(
    st.sampled_from(["seal", "seal_many", "warning", "flight", "save_restore", "release"]),
    max_size=40,
)


@FUZZ
@given(ops=operations)
def test_no_nonce_is_ever_used_twice(corpus: Corpus, ops: list[str]) -> None:
    """Whatever mix of sealing, warnings, flight retransmissions, save/restore and AEAD
    release: every protected record gets a new (epoch, seq), in increasing order."""
    layer = fresh_layer(corpus)
    first = layer.write_seq
    assert first >= 1  # after OpenSSL's Finished (seq 0)
    sent: list[bytes] = []
    for op in ops:
        if op == "seal":
            sent.append(layer.seal(b"x"))
        elif op == "seal_many":
            sent.extend(layer.seal_many([b"a", b"bb", b""]))
        elif op == "warning":
            sent.append(layer.seal_alert(AlertLevel.WARNING, AlertDescription.USER_CANCELED))
        elif op == "flight":
            sent.extend(layer.retransmit_last_flight())
        elif op == "save_restore":  # the old object is dropped, as a restart would
            layer = DtlsRecordLayer.from_bytes(layer.to_bytes())
        else:
            layer.release_aeads()
    protected = [
        epoch_seq
        for datagram in sent
        for epoch_seq in _protected_epoch_seqs(datagram)
    ]
    assert protected == sorted(set(protected))
    assert [value & 0xFFFF_FFFF_FFFF for value in protected] == list(
        range(first, first + len(protected))
    )
    assert layer.write_seq == first + len(protected)


def _protected_epoch_seqs(datagram: bytes) -> list[int]:
    found, offset = [], 0
    while offset + 13 <= len(datagram):
        _type, _version, epoch_seq, length = RECORD_HEADER.unpack_from(datagram, offset)
        if epoch_seq >> 48:
            found.append(epoch_seq)
        offset += 13 + length
    return found


@FUZZ
@given(position=st.integers(0, 10_000), value=st.integers(0, 255), cut=st.integers(0, 10_000))
def test_corrupt_saved_state_is_refused_by_name(
    corpus: Corpus, position: int, value: int, cut: int
) -> None:
    """A damaged saved state either restores (a changed key or counter is still a state) or
    raises RecordStateFormatError; nothing else."""
    saved = bytearray(corpus.saved_layer)
    saved[position % len(saved)] = value
    damaged = bytes(saved[: len(saved) - cut % 4])
    try:
        layer = DtlsRecordLayer.from_bytes(damaged)
    except RecordStateFormatError as exc:
        assert "saved DTLS" in str(exc)
    else:
        open_safely(layer, corpus.sentinel)  # opening works or discards; it never raises
