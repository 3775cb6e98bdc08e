"""Encode + decode of a typical firmware chunk datagram: native kernel vs pure-Python twin.

Run: .venv/bin/python -m pytest bench/test_bench_coap.py --benchmark-enable -q -p no:cacheprovider

The message is what the v3 update sends per chunk: NON POST /C with a 4-byte token, the
CHUNK_INDEX option and a 1024-byte payload. Both kernels run in the same session so the
table shows their ratio directly (group "coap-chunk").
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import pytest

from otacore._select import load_native, load_twin
from otacore.coap import (
    Code,
    Message,
    MessageType,
    OptionNumber,
    decode_udp,
    encode_udp,
    encode_uint,
)
from otacore.coap_reliability import ReliableLayer

TWIN = load_twin("coap")
NATIVE = load_native("coap")
KERNELS = [pytest.param(TWIN, id="twin")] + (
    [pytest.param(NATIVE, id="native")] if NATIVE is not None else []
)

CHUNK_PAYLOAD = bytes(range(256)) * 4  # 1024 bytes
CHUNK_OPTIONS = [
    (int(OptionNumber.URI_PATH), b"C"),
    (int(OptionNumber.CHUNK_INDEX), encode_uint(171)),
]
TOKEN = b"\x11\x22\x33\x44"
# Plain ints, so the timing is the codec's and not enum attribute lookups.
NON = int(MessageType.NON)
POST = int(Code.POST)


def _round_trip_udp(kernel: ModuleType) -> Any:
    datagram = kernel.encode_udp(NON, POST, 0x4321, TOKEN, CHUNK_OPTIONS, CHUNK_PAYLOAD)
    return kernel.decode_udp(datagram)


def _round_trip_tcp(kernel: ModuleType) -> Any:
    frame = kernel.encode_tcp(POST, TOKEN, CHUNK_OPTIONS, CHUNK_PAYLOAD)
    return kernel.decode_tcp_stream(frame, 65536)


@pytest.mark.parametrize("kernel", KERNELS)
def test_bench_chunk_udp(benchmark: Any, kernel: ModuleType) -> None:
    benchmark.group = "coap-chunk-udp"
    result = benchmark(_round_trip_udp, kernel)
    assert result[4] == CHUNK_OPTIONS and result[5] == CHUNK_PAYLOAD


@pytest.mark.parametrize("kernel", KERNELS)
def test_bench_chunk_tcp(benchmark: Any, kernel: ModuleType) -> None:
    benchmark.group = "coap-chunk-tcp"
    message, consumed = benchmark(_round_trip_tcp, kernel)
    assert message[2] == CHUNK_OPTIONS and consumed > len(CHUNK_PAYLOAD)


def test_bench_chunk_udp_message(benchmark: Any) -> None:
    """The public Message layer over whichever kernel load_kernel picked (wrapping cost)."""
    benchmark.group = "coap-chunk-udp"
    message = Message(MessageType.NON, Code.POST, 0x4321, TOKEN, list(CHUNK_OPTIONS), CHUNK_PAYLOAD)
    decoded = benchmark(lambda: decode_udp(encode_udp(message)))
    assert decoded.payload == CHUNK_PAYLOAD and decoded.uint_option(OptionNumber.CHUNK_INDEX) == 171


# --- the message layer once the ids wrap -------------------------------------------------

#: Sends (or receives) one per millisecond: 65,536 of them take 65.5 s, well within the
#: NON lifetime (145 s), so every id is reused while its first NON is still remembered.
STEP = 0.001


def _wrapped_layer() -> tuple[ReliableLayer, float]:
    """A layer that sent 3 x 65,536 NONs, one per STEP: both of its tables full and the
    front of its NON table deleted and refilled 2 x 65,536 times."""
    layer = ReliableLayer(first_message_id=0)
    message = Message(MessageType.NON, Code.POST, payload=b"c")
    now = 0.0
    for n in range(3 * 65_536):
        now = n * STEP
        layer.send(message, now)
    return layer, now


def test_bench_non_send_after_the_ids_wrap(benchmark: Any) -> None:
    """One NON send when every id is in use within the NON lifetime (it was 10-50 us with
    the tables as dicts; a send before the wrap costs about 3 us)."""
    benchmark.group = "coap-message-layer"
    layer, now = _wrapped_layer()
    message = Message(MessageType.NON, Code.POST, payload=b"c")
    clock = [now]

    def send() -> int:
        clock[0] += STEP
        return layer.send(message, clock[0]).message_id

    benchmark.pedantic(send, rounds=20_000, iterations=1)
    assert layer.remembered_non == 65_536


def test_bench_non_receive_after_the_ids_wrap(benchmark: Any) -> None:
    """One received NON whose id the peer reuses after its NON lifetime (the duplicate
    table prunes one entry per message from its front)."""
    benchmark.group = "coap-message-layer"
    layer = ReliableLayer(first_message_id=0)
    step = 0.0025  # 65,536 ids in 164 s: each id comes back just after its lifetime
    datagrams = [encode_udp(Message(MessageType.NON, Code.POST, i, payload=b"a"))
                 for i in range(65_536)]  # fmt: skip
    count = 0
    for count in range(3 * 65_536):
        layer.receive(datagrams[count & 0xFFFF], count * step)
    state = [count]

    def receive() -> int:
        state[0] += 1
        return len(layer.receive(datagrams[state[0] & 0xFFFF], state[0] * step))

    benchmark.pedantic(receive, rounds=20_000, iterations=1)
    assert 0 < layer.remembered <= 65_536
