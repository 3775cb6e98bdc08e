"""Chunk framing kernel: native == twin on any input, the batch equals the per-chunk path
byte for byte, and batch-sealed records open with OpenSSL peers and our own layers."""

from __future__ import annotations

import os
import random
import zlib
from collections.abc import Callable
from dataclasses import replace
from types import ModuleType
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from hypothesis import event, given, settings
from hypothesis import strategies as st

from otacore import chunk_framing
from otacore._select import load_native, load_twin
from otacore.chunk_framing import (
    ChunkFramingError,
    ChunkRangeError,
    WindowTooLargeError,
    encoded_options,
    frame_and_seal_window,
    frame_window,
)
from otacore.coap import Code, MessageType, OptionNumber, decode_tcp_stream, decode_udp
from otacore.coap_reliability import ReliableLayer
from otacore.errors import RecordError, RecordOverflowError, RecordSequenceExhaustedError
from otacore.protocol.link import TcpLink, UdpLink
from otacore.protocol.ota_wire import parse_transfer, transfer_request
from otacore.records import dtls12, tls13
from otacore.records.dtls12 import MAX_SEQUENCE, DtlsRecordLayer
from otacore.records.dtls12_handover import layer_from_connection
from otacore.records.tls12_keys import SUITES as DTLS_TLS12_SUITES
from otacore.records.tls12_keys import TrafficKeys
from otacore.records.tls13 import Tls13RecordLayer
from otacore.transfer import (
    Chunk,
    PreparedFile,
    RetransmitPolicy,
    StartReply,
    TransferSender,
    TransferStatus,
    decode_message,
)
from otacore.transfer.framing import frame_chunks, split_chunk_runs, transfer_options
from otacore.transfer.messages import MAX_WINDOW
from tests import tls13_peers
from tests.test_record_dtls12 import (
    SUITE_NAMES as DTLS_SUITES,
)
from tests.test_record_dtls12 import (
    assert_no_nonce_reuse,
    client_reads,
    dtls_pki,  # noqa: F401 - the module-scoped fixture
    established,
    opened_data,
    records_of,
)

TWIN = load_twin("chunk_framing")
NATIVE = load_native("chunk_framing")
KERNELS = [pytest.param(TWIN, id="twin")] + (
    [pytest.param(NATIVE, id="native")] if NATIVE is not None else []
)
needs_native = pytest.mark.skipif(NATIVE is None, reason="native chunk_framing kernel not built")
URI_PATH_U = encoded_options([(int(OptionNumber.URI_PATH), b"u")])


@pytest.fixture(params=KERNELS)
def kernel(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """Run the test with this kernel behind the front and both record layers."""
    module: ModuleType = request.param
    monkeypatch.setattr(chunk_framing, "_kernel", module)
    monkeypatch.setattr(dtls12, "_framing_kernel", module)
    monkeypatch.setattr(tls13, "_framing_kernel", module)
    return module


def outcome(call: Callable[[], Any]) -> tuple[str, Any]:
    """A call's result, or its error's type and message, for comparing the two kernels."""
    try:
        return "ok", call()
    except (ChunkFramingError, OverflowError) as exc:
        return "error", (type(exc), str(exc))


# --- native == twin --------------------------------------------------------------------

BREAKABLE = ["size", "window", "number", "crcs", "transfer", "type", "code", "ids", "tokens"]


@st.composite
def framing_args(draw: st.DrawFn) -> dict[str, Any]:
    """Coherent arguments half the time (so results are compared, not only errors), else
    with one field broken."""
    broken = draw(st.sampled_from([None] * len(BREAKABLE) + BREAKABLE))
    image = draw(st.binary(min_size=0, max_size=3000))
    chunk_size = draw(st.integers(1, 700))
    if broken == "size":
        chunk_size = draw(st.sampled_from([0, -4, 65533, 2**70]))
    chunk_count = -(-len(image) // chunk_size) if chunk_size > 0 else 0
    count = draw(st.integers(0, 24)) if chunk_count else 0
    if broken == "window":
        count = draw(st.sampled_from([MAX_WINDOW + 1, MAX_WINDOW * 3]))
    numbers = draw(st.lists(st.integers(1, max(chunk_count, 1)), min_size=count,
                            max_size=count))  # fmt: skip
    if broken == "number":
        numbers.insert(draw(st.integers(0, len(numbers))),
                       draw(st.sampled_from([0, -1, chunk_count + 1, 2**70])))  # fmt: skip
        count += 1
    ids: Any = draw(st.one_of(
        st.integers(0, 0xFFFF), st.lists(st.integers(0, 0xFFFF), min_size=count, max_size=count)
    ))  # fmt: skip
    if broken == "ids":
        ids = draw(st.sampled_from([-1, 0x10000, [0x10000] * count, [1] * (count + 1)]))
    tokens: Any = draw(st.one_of(
        st.binary(max_size=8), st.lists(st.binary(max_size=8), min_size=count, max_size=count)
    ))  # fmt: skip
    if broken == "tokens":
        tokens = draw(st.sampled_from([b"123456789", [b"x"] * (count + 1), [b"123456789"] * count]))
    return {
        "image": image,
        "chunk_size": chunk_size,
        "numbers": numbers,
        "with_crcs": draw(
            st.sampled_from(["short"] if broken == "crcs" else ["none", "exact", "huge"])
        ),
        "transfer_id": draw(
            st.sampled_from([-1, 2**32]) if broken == "transfer" else st.integers(0, 2**32 - 1)
        ),
        "tcp": draw(st.booleans()),
        "msg_type": draw(st.sampled_from([-1, 4]) if broken == "type" else st.integers(0, 3)),
        "code": draw(st.sampled_from([0, 256, -1]) if broken == "code" else st.integers(1, 255)),
        "message_ids": ids,
        "tokens": tokens,
        "options": draw(st.one_of(st.just(URI_PATH_U), st.binary(max_size=300))),
    }


def _call_frame(kernel: ModuleType, args: dict[str, Any]) -> list[bytes]:
    image = args["image"]
    size = max(args["chunk_size"], 1)
    ends = range(0, len(image), size)
    crcs: list[int] | None = {
        "none": None,
        "exact": [zlib.crc32(image[offset : offset + size]) for offset in ends],
        "short": [0] * max(len(ends) - 1, 0),
        "huge": [2**40 + n for n in range(len(ends))],  # only the low 32 bits count
    }[args["with_crcs"]]
    result: list[bytes] = kernel.frame_chunks(
        image, args["chunk_size"], args["numbers"], crcs, args["transfer_id"], args["tcp"],
        args["msg_type"], args["code"], args["message_ids"], args["tokens"], args["options"],
    )  # fmt: skip
    return result


@needs_native
@settings(max_examples=400, deadline=None)
@given(framing_args())
def test_frame_chunks_native_equals_twin(args: dict[str, Any]) -> None:
    native = outcome(lambda: _call_frame(NATIVE, args))
    assert native == outcome(lambda: _call_frame(TWIN, args))
    event("framed" if native[0] == "ok" else f"refused: {native[1][0].__name__}")


seal_payloads = st.lists(
    st.one_of(st.binary(max_size=300), st.sampled_from([b"\0" * 16384, b"\1" * 16385])),
    max_size=6,
)


@needs_native
@settings(max_examples=200, deadline=None)
@given(
    payloads=seal_payloads,
    epoch=st.one_of(st.integers(0, 3), st.sampled_from([0xFFFF, 0x10000, -1])),
    first_seq=st.one_of(st.integers(0, 100), st.integers(MAX_SEQUENCE - 8, MAX_SEQUENCE + 1)),
    explicit=st.booleans(),
    content_type=st.one_of(st.sampled_from([21, 22, 23]), st.sampled_from([256, -1])),
    iv_size=st.sampled_from([4, 12, 11]),
)
def test_seal_dtls12_native_equals_twin(payloads: list[bytes], epoch: int, first_seq: int,
                                        explicit: bool, content_type: int,
                                        iv_size: int) -> None:  # fmt: skip
    aead = AESGCM(bytes(range(16))) if explicit else ChaCha20Poly1305(bytes(range(32)))
    iv = bytes(range(100, 100 + iv_size))
    args = (aead.encrypt, iv, epoch, first_seq, explicit, content_type, payloads)
    assert outcome(lambda: NATIVE.seal_dtls12(*args)) == outcome(lambda: TWIN.seal_dtls12(*args))


@needs_native
@settings(max_examples=200, deadline=None)
@given(
    payloads=seal_payloads,
    first_seq=st.one_of(st.integers(0, 100), st.integers(2**64 - 8, 2**64)),
    tag_length=st.sampled_from([16, 8, 0, 17]),
    content_type=st.one_of(st.sampled_from([21, 22, 23]), st.sampled_from([256, -1])),
    iv_size=st.sampled_from([12, 11]),
)
def test_seal_tls13_native_equals_twin(payloads: list[bytes], first_seq: int, tag_length: int,
                                       content_type: int, iv_size: int) -> None:  # fmt: skip
    aead = AESGCM(bytes(range(16)))
    iv = bytes(range(100, 100 + iv_size))
    args = (aead.encrypt, iv, first_seq, tag_length, content_type, payloads)
    assert outcome(lambda: NATIVE.seal_tls13(*args)) == outcome(lambda: TWIN.seal_tls13(*args))


# --- adversarial inputs, each kernel -----------------------------------------------------


def test_empty_window_and_the_short_last_chunk(kernel: ModuleType) -> None:
    image = bytes(range(256)) * 5 + b"tail"  # 1284 bytes: chunks of 512, 512 and 260
    assert frame_window(image, 512, [], transfer_id=1, transport="udp", options=URI_PATH_U) == []
    last, first = frame_window(
        image, 512, [3, 1], transfer_id=9, transport="udp", options=URI_PATH_U, message_ids=7
    )
    message = decode_udp(last)
    chunk = parse_transfer_payload(message.payload)
    assert (chunk.transfer_id, chunk.index, bytes(chunk.data)) == (9, 3, image[1024:])
    assert chunk.crc32 == zlib.crc32(image[1024:])
    assert (message.message_id, decode_udp(first).message_id) == (7, 8)
    # An image that is a single short chunk, and odd chunk sizes (the kernel takes any).
    (only,) = frame_window(b"x", 5, [1], transfer_id=0, transport="tcp", options=b"")
    assert bytes(parse_transfer_payload(decode_tcp_stream(only)[0].payload).data) == b"x"
    frames = frame_window(image, 7, range(1, 185), transfer_id=2, transport="udp",
                          options=URI_PATH_U)  # fmt: skip
    assert b"".join(bytes(parse_transfer_payload(decode_udp(f).payload).data)
                    for f in frames) == image  # fmt: skip


def parse_transfer_payload(payload: bytes) -> Chunk:
    message = decode_message(payload)
    assert isinstance(message, Chunk)
    return message


def test_message_ids_wrap_at_65536(kernel: ModuleType) -> None:
    frames = frame_window(bytes(4096), 512, [1, 2, 3, 4], transfer_id=1, transport="udp",
                          options=URI_PATH_U, message_ids=65534)  # fmt: skip
    assert [decode_udp(f).message_id for f in frames] == [65534, 65535, 0, 1]
    given_ids = [65535, 0, 17, 65535]
    frames = frame_window(bytes(4096), 512, [4, 3, 2, 1], transfer_id=1, transport="udp",
                          options=URI_PATH_U, message_ids=given_ids)  # fmt: skip
    assert [decode_udp(f).message_id for f in frames] == given_ids


@pytest.mark.parametrize(
    ("change", "error", "words"),
    [
        ({"numbers": [1] * (MAX_WINDOW + 1)}, WindowTooLargeError, "1025 chunks exceeds"),
        ({"numbers": [0]}, ChunkRangeError, "chunk 0 is outside the file's chunks 1..8"),
        ({"numbers": [1, 9]}, ChunkRangeError, "chunk 9 is outside"),
        ({"chunk_size": 0}, ChunkFramingError, "chunk size 0"),
        ({"transfer_id": 2**32}, ChunkFramingError, "does not fit in 32 bits"),
        ({"message_ids": 65536}, ChunkFramingError, "message id 65536"),
        ({"message_ids": [1, 2, 3]}, ChunkFramingError, "3 message ids for 2 chunks"),
        ({"tokens": b"123456789"}, ChunkFramingError, "token of 9 bytes"),
        ({"tokens": [b"a"]}, ChunkFramingError, "1 tokens for 2 chunks"),
        ({"code": 0}, ChunkFramingError, "code 0 is outside 1..255"),
        ({"msg_type": 4}, ChunkFramingError, "message type 4"),
        ({"crcs": [0] * 7}, ChunkFramingError, "7 CRCs for a file of 8 chunks"),
        ({"transport": "sctp"}, ChunkFramingError, "transport must be"),
    ],
)
def test_bad_arguments_get_specific_errors(kernel: ModuleType, change: dict[str, Any],
                                           error: type[Exception], words: str) -> None:  # fmt: skip
    args: dict[str, Any] = {
        "numbers": [1, 2], "chunk_size": 512, "transfer_id": 1, "transport": "udp",
        "options": URI_PATH_U, "message_ids": 0, "tokens": b"", "code": Code.POST,
        "msg_type": MessageType.NON, "crcs": None,
    }  # fmt: skip
    args.update(change)
    numbers, chunk_size = args.pop("numbers"), args.pop("chunk_size")
    with pytest.raises(error, match=words):
        frame_window(bytes(4096), chunk_size, numbers, **args)


# --- the batch is the per-chunk path ----------------------------------------------------


def sender_chunks(image: bytes, chunk_size: int, window: int, seed: int) -> tuple[
        PreparedFile, list[Chunk]]:  # fmt: skip
    """The chunks a real sender hands out for its first window."""
    prepared = PreparedFile(image, chunk_size)
    policy = RetransmitPolicy(congestion_control=False)  # the whole window at once
    sender = TransferSender(prepared, chunk_size, window, seed + 1, policy=policy)
    sender.start(0.0)
    outputs = sender.handle(StartReply(seed + 1, TransferStatus.OK, window, 0), 0.01)
    chunks = [item for item in outputs if isinstance(item, Chunk)]
    assert chunks
    return prepared, chunks


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_udp_batch_equals_per_chunk_path(kernel: ModuleType, seed: int) -> None:
    rng = random.Random(seed)
    print(f"seed {seed}")
    image = rng.randbytes(rng.randrange(5000, 40000))
    prepared, chunks = sender_chunks(image, rng.choice([512, 1024, 1136]), 16, seed)
    first_id = rng.choice([0, 65530, rng.randrange(65536)])
    link = UdpLink(ReliableLayer(first_message_id=first_id, answer_pings_with_ack=True))
    for chunk in chunks:
        link.notify(transfer_request(chunk), 0.0)
    per_chunk = link.take_outgoing()
    batch = frame_chunks(prepared, chunks, transport="udp", message_ids=first_id)
    assert batch == per_chunk
    assert [parse_transfer(decode_udp(d)) for d in batch] == chunks


@pytest.mark.parametrize("seed", [0, 1])
def test_tcp_batch_equals_per_chunk_path(kernel: ModuleType, seed: int) -> None:
    rng = random.Random(seed)
    print(f"seed {seed}")
    image = rng.randbytes(rng.randrange(5000, 90000))
    prepared, chunks = sender_chunks(image, rng.choice([512, 1024, 4096, 65532]), 16, seed)
    link = TcpLink()
    link.take_outgoing()  # its CSM
    for chunk in chunks:
        link.notify(transfer_request(chunk), 0.0)
    assert frame_chunks(prepared, chunks, transport="tcp") == link.take_outgoing()


def test_split_chunk_runs_keeps_the_order() -> None:
    prepared, chunks = sender_chunks(bytes(8192), 512, 4, 0)
    sender = TransferSender(prepared, 512, 4, 1)
    start = sender.start(0.0)
    outputs = [*start, *chunks[:2], *start, chunks[2]]
    assert list(split_chunk_runs(outputs)) == [start[0], chunks[:2], start[0], [chunks[2]]]


def test_frame_chunks_refuses_mixed_transfers_and_a_wrong_sealer(kernel: ModuleType) -> None:
    prepared, chunks = sender_chunks(bytes(8192), 512, 4, 0)
    other = replace(chunks[1], transfer_id=chunks[0].transfer_id + 1)
    with pytest.raises(ChunkFramingError, match="in one window"):
        frame_chunks(prepared, [chunks[0], other], transport="udp")
    layer = Tls13RecordLayer.__new__(Tls13RecordLayer)
    with pytest.raises(ChunkFramingError, match="seals tcp messages"):
        frame_chunks(prepared, chunks, transport="udp", sealer=layer)  # type: ignore[call-overload]
    assert transfer_options() == URI_PATH_U


# --- sealed: DTLS 1.2 ---------------------------------------------------------------------


@pytest.mark.parametrize("suite_name", DTLS_SUITES)
def test_dtls_batch_opens_with_openssl_and_sequence_continues(
    kernel: ModuleType, dtls_pki: Any, suite_name: str  # noqa: F811
) -> None:
    server, client, layer = established(dtls_pki, suite_name)
    prepared, chunks = sender_chunks(os.urandom(20000), 512, 16, 3)
    twin_layer = DtlsRecordLayer.from_bytes(layer.to_bytes())  # sealing under the same state
    start = layer.write_seq
    datagrams = frame_chunks(prepared, chunks, transport="udp", message_ids=100, sealer=layer)
    frames = frame_chunks(prepared, chunks, transport="udp", message_ids=100)
    # N single seals give the very same records, and the layer moved on by N.
    assert datagrams == [twin_layer.seal(frame) for frame in frames]
    assert layer.write_seq == twin_layer.write_seq == start + len(chunks)
    assert [seq for d in datagrams for _t, _e, seq in records_of(d)] == list(
        range(start, start + len(chunks))
    )
    # OpenSSL opens every record, then a single seal after the batch, then another batch.
    assert [client_reads(client, d) for d in datagrams] == frames
    assert client_reads(client, layer.seal(b"after")) == b"after"
    again = frame_chunks(prepared, chunks[:3], transport="udp", message_ids=7, sealer=layer)
    assert [client_reads(client, d) for d in again] == frame_chunks(
        prepared, chunks[:3], transport="udp", message_ids=7
    )
    assert assert_no_nonce_reuse([*server.wire, *datagrams, *again]) >= len(chunks) + 4
    # The device side of our own layer opens them too, in any order, and no replay passes.
    device = layer_from_connection(client.conn, client.tracker, is_server=False)
    batch = frame_and_seal_window(prepared.view, 512, [5, 1], sealer=layer, transfer_id=4,
                                  options=URI_PATH_U, message_ids=[9, 10])  # fmt: skip
    assert opened_data(device.open_datagram(batch[1])) == [
        frame_window(prepared.view, 512, [1], transfer_id=4, transport="udp",
                     options=URI_PATH_U, message_ids=10)[0]
    ]  # fmt: skip
    assert len(opened_data(device.open_datagram(batch[0]))) == 1
    assert device.open_datagram(batch[0])[0].__class__.__name__ == "RecordDiscarded"


def test_dtls_batch_is_checked_whole_before_sealing(kernel: ModuleType,
                                                    dtls_pki: Any) -> None:  # noqa: F811
    _server, _client, layer = established(dtls_pki, DTLS_SUITES[0])
    closed = DtlsRecordLayer.from_bytes(layer.to_bytes())  # a copy, never sent (test only)
    closed.close()
    with pytest.raises(RecordError, match="closed"):
        closed.seal_many([b"late"])
    start = layer.write_seq
    with pytest.raises(RecordOverflowError, match="at most 16384"):
        layer.seal_many([b"ok", bytes(16385)])
    assert layer.write_seq == start
    assert layer.seal_many([]) == []
    layer.write_seq = MAX_SEQUENCE - 1  # a session that has sealed that many (test only)
    with pytest.raises(RecordSequenceExhaustedError, match="exhausted"):
        layer.seal_many([b"a", b"b", b"c"])
    assert layer.write_seq == MAX_SEQUENCE - 1
    assert len(layer.seal_many([b"a", b"b"])) == 2
    assert layer.write_seq == MAX_SEQUENCE + 1


# --- sealed: TLS 1.3 ----------------------------------------------------------------------


@pytest.mark.parametrize("suite", tls13_peers.SUITE_NAMES)
def test_tls13_batch_opens_with_openssl_and_sequence_continues(kernel: ModuleType,
                                                               suite: str) -> None:
    session = tls13_peers.handshake(suite)
    layer, peer = session.layer, session.peer
    tls13_peers.drain(peer)  # nothing pending from the peer side
    prepared, chunks = sender_chunks(os.urandom(60000), 1024, 24, 5)
    twin_layer = Tls13RecordLayer.from_bytes(layer.to_bytes())
    start = layer.write_seq
    wire = frame_chunks(prepared, chunks, transport="tcp", sealer=layer)
    stream = b"".join(frame_chunks(prepared, chunks, transport="tcp"))
    # The same bytes the layer's own send path gives the joined stream (2^14-byte records).
    assert wire == twin_layer.send_application_data(stream)
    records = tls13_peers.split_records(wire)
    assert len(records) == -(-len(stream) // 16384)
    assert layer.write_seq == twin_layer.write_seq == start + len(records)
    assert tls13_peers.recv_all(peer, wire) == stream
    assert tls13_peers.recv_all(peer, layer.send_application_data(b"after")) == b"after"
    inner = tls13_peers.open_raw(
        layer.suite, layer.write_secret, start, records[0]
    )  # RFC 8446 5.2: content then its type
    assert inner == stream[:16384] + b"\x17"


def test_tls13_batch_rekeys_as_single_sends_would(kernel: ModuleType) -> None:
    session = tls13_peers.handshake("TLS_AES_128_GCM_SHA256", rekey_after=4)
    layer, peer = session.layer, session.peer
    twin_layer = Tls13RecordLayer.from_bytes(layer.to_bytes())
    payloads = [b"record %d" % n for n in range(11)]
    wire = layer.seal_many(payloads)
    assert wire == b"".join(twin_layer.send_application_data(p) for p in payloads)
    assert layer.write_seq == twin_layer.write_seq
    assert layer.write_secret == twin_layer.write_secret != session.handover.write_secret
    assert tls13_peers.recv_all(peer, wire) == b"".join(payloads)
    # OpenSSL's own records still open after the key updates.
    peer.send(b"hello")
    events = layer.receive_data(tls13_peers.drain(peer))
    assert b"".join(e.data for e in events if hasattr(e, "data")) == b"hello"


def test_tls13_batch_is_checked_whole_before_sealing(kernel: ModuleType) -> None:
    session = tls13_peers.handshake("TLS_CHACHA20_POLY1305_SHA256")
    layer = session.layer
    start = layer.write_seq
    with pytest.raises(RecordOverflowError, match="at most 16384"):
        layer.seal_many([b"ok", bytes(16385)])
    assert layer.write_seq == start
    assert layer.seal_many([]) == b""
    layer.close()
    with pytest.raises(RecordError, match="closed for sending"):
        layer.seal_many([b"late"])


def test_seal_window_refuses_other_sealers() -> None:
    with pytest.raises(TypeError, match="DtlsRecordLayer or a Tls13RecordLayer"):
        chunk_framing.seal_window([b"x"], object())  # type: ignore[call-overload]


def test_native_flag_matches_the_loaded_kernel() -> None:
    name = chunk_framing._kernel.__name__
    assert name in ("otacore._chunk_framing", "otacore._chunk_framing_py")
    assert chunk_framing.NATIVE is (name == "otacore._chunk_framing")


# --- a batch seal is N single seals, any sizes, any counters ---------------------------------


record_payloads = st.lists(
    st.one_of(st.binary(max_size=64), st.integers(0, 16384).map(bytes)), max_size=12
)


@pytest.mark.parametrize("module", KERNELS)
@settings(max_examples=60, deadline=None)
@given(
    suite=st.sampled_from(DTLS_TLS12_SUITES),
    payloads=record_payloads,
    write_seq=st.one_of(st.integers(0, 1000), st.integers(MAX_SEQUENCE - 14, MAX_SEQUENCE + 1)),
    epoch=st.integers(1, 0xFFFF),
    seed=st.integers(0, 2**32 - 1),
)
def test_dtls_seal_many_is_single_seals(module: ModuleType, suite: Any, payloads: list[bytes],
                                        write_seq: int, epoch: int, seed: int) -> None:  # fmt: skip
    rng = random.Random(seed)
    keys = TrafficKeys(
        suite, rng.randbytes(suite.key_size), rng.randbytes(suite.key_size),
        rng.randbytes(suite.fixed_iv_size), rng.randbytes(suite.fixed_iv_size),
    )  # fmt: skip
    batch = DtlsRecordLayer(keys, is_server=True, write_epoch=epoch, write_seq=write_seq)
    single = DtlsRecordLayer(keys, is_server=True, write_epoch=epoch, write_seq=write_seq)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(dtls12, "_framing_kernel", module)
        batch_out = outcome_records(lambda: batch.seal_many(payloads))
    single_out = outcome_records(lambda: [single.seal(p) for p in payloads])
    if batch_out[0] == "ok":
        assert batch_out == single_out
        assert batch.write_seq == single.write_seq == write_seq + len(payloads)
    else:  # refused whole: nothing sealed, nothing reserved
        assert batch_out[1][0] is RecordSequenceExhaustedError
        assert single_out[0] == "error"
        assert batch.write_seq == write_seq


@pytest.mark.parametrize("module", KERNELS)
@settings(max_examples=60, deadline=None)
@given(
    suite=st.sampled_from(tls13_peers.SUITES),
    payloads=record_payloads,
    write_seq=st.integers(0, 40),
    rekey_after=st.integers(1, 12),
    owed=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_tls13_seal_many_is_single_sends(module: ModuleType, suite: Any, payloads: list[bytes],
                                         write_seq: int, rekey_after: int, owed: bool,
                                         seed: int) -> None:  # fmt: skip
    rng = random.Random(seed)
    secrets = rng.randbytes(suite.hash_length), rng.randbytes(suite.hash_length)
    layers = [
        Tls13RecordLayer(suite, is_server=False, read_secret=secrets[0], write_secret=secrets[1],
                         write_seq=write_seq, rekey_after=rekey_after)
        for _ in range(2)
    ]  # fmt: skip
    if owed:  # the peer asked for a KeyUpdate (RFC 8446 4.6.3): it goes before our records
        for layer in layers:
            layer._flags |= tls13._KEY_UPDATE_OWED
    batch, single = layers
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tls13, "_framing_kernel", module)
        wire = batch.seal_many(payloads)
    assert wire == b"".join(single.send_application_data(p) for p in payloads)
    assert (batch.write_seq, batch.write_secret) == (single.write_seq, single.write_secret)
    # Every record opens in order under the secrets the layer moved through.
    reader = Tls13RecordLayer(suite, is_server=True, read_secret=secrets[1],
                              write_secret=secrets[0], read_seq=write_seq)  # fmt: skip
    events = reader.receive_data(wire)
    assert b"".join(e.data for e in events if hasattr(e, "data")) == b"".join(payloads)


def outcome_records(call: Callable[[], list[bytes]]) -> tuple[str, Any]:
    try:
        return "ok", call()
    except RecordError as exc:
        return "error", (type(exc), str(exc))


tls13_operations = st.lists(
    st.sampled_from(["send", "seal_many", "update", "save_restore", "release"]), max_size=30
)


@pytest.mark.parametrize("module", KERNELS)
@settings(max_examples=60, deadline=None)
@given(ops=tls13_operations, rekey_after=st.integers(1, 6))
def test_tls13_no_nonce_is_used_twice_with_batches(module: ModuleType, ops: list[str],
                                                   rekey_after: int) -> None:  # fmt: skip
    """Whatever mix of single sends, batch seals, key updates, save/restore and cipher
    release: the stream opens record by record at a reader that counts from the first
    sequence number, so every record took the next (secret, sequence) pair: no nonce twice."""
    suite = tls13_peers.SUITES[0]
    secrets = bytes(range(32)), bytes(range(32, 64))
    layer = Tls13RecordLayer(suite, is_server=True, read_secret=secrets[0],
                             write_secret=secrets[1], write_seq=3,
                             rekey_after=rekey_after)  # fmt: skip
    reader = Tls13RecordLayer(suite, is_server=False, read_secret=secrets[1],
                              write_secret=secrets[0], read_seq=3)  # fmt: skip
    wire: list[bytes] = []
    expected: list[bytes] = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tls13, "_framing_kernel", module)
        for n, op in enumerate(ops):
            if op == "send":
                wire.append(layer.send_application_data(b"s%d" % n))
                expected.append(b"s%d" % n)
            elif op == "seal_many":
                batch = [b"b%d.%d" % (n, i) for i in range(n % 4)]
                wire.append(layer.seal_many(batch))
                expected += batch
            elif op == "update":
                wire.append(layer.update_keys())
            elif op == "save_restore":  # the old object is dropped, as a restart would
                layer = Tls13RecordLayer.from_bytes(layer.to_bytes())
            else:
                layer.release_ciphers()
    events = reader.receive_data(b"".join(wire))
    assert [e.data for e in events if hasattr(e, "data")] == [p for p in expected if p]
