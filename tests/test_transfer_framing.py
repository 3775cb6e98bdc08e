"""Whole transfers whose chunks go out through the chunk framing kernel, sealed in batches.

The server side runs a real :class:`TransferSender`; every run of chunks it hands out is
framed and sealed by :func:`otacore.transfer.framing.frame_chunks` (its other messages go
the per-message way), over a session established with OpenSSL: DTLS 1.2 with a lossy,
reordering datagram path opened by our device-side layer, and TLS 1.3 read by the OpenSSL
peer. The device is a real :class:`TransferReceiver` that validates the module.
"""

from __future__ import annotations

import random
from typing import Any

import pytest

from otacore.coap import TcpFrameReader, decode_udp
from otacore.coap_reliability import ReliableLayer
from otacore.module import build_module
from otacore.protocol.link import TcpLink, UdpLink
from otacore.protocol.ota_wire import parse_transfer, transfer_request
from otacore.records.dtls12 import ApplicationData
from otacore.records.dtls12_handover import layer_from_connection
from otacore.transfer import (
    Chunk,
    Message,
    PreparedFile,
    SenderPhase,
    TransferReceiver,
    TransferSender,
    WriteChunk,
)
from otacore.transfer.framing import frame_chunks, split_chunk_runs
from tests import tls13_peers
from tests.test_record_dtls12 import (
    assert_no_nonce_reuse,
    dtls_pki,  # noqa: F401 - the module-scoped fixture
    established,
)


def firmware(seed: int, size: int) -> bytes:
    return build_module(random.Random(seed).randbytes(size), platform_id=32, function=5,
                        version=7)  # fmt: skip


@pytest.mark.parametrize("seed", [1, 2])
def test_dtls_transfer_through_the_kernel_with_loss(dtls_pki: Any, seed: int) -> None:  # noqa: F811
    rng = random.Random(seed)
    print(f"seed {seed}")
    image = firmware(seed, 40_000 + seed * 333)
    _server, client, server_layer = established(dtls_pki, "ECDHE-ECDSA-AES128-GCM-SHA256")
    device_layer = layer_from_connection(client.conn, client.tracker, is_server=False)
    prepared = PreparedFile(image, 512)
    sender = TransferSender(prepared, 512, 32, transfer_id=5, module_function=5,
                            module_index=1, module_version=7)  # fmt: skip
    slot = bytearray(len(image))
    view = memoryview(slot)
    receiver = TransferReceiver(read_stored=lambda offset, length: view[offset : offset + length])
    message_layer = ReliableLayer(first_message_id=65500)  # the ids wrap during the transfer
    link = UdpLink(message_layer)
    wire: list[bytes] = []
    kernel_datagrams = 0

    def send(outputs: list[Any]) -> list[bytes]:
        nonlocal kernel_datagrams
        datagrams: list[bytes] = []
        for item in split_chunk_runs(outputs):
            if isinstance(item, list):  # a run of chunks: one framing call, one batch seal
                ids = [message_layer.next_message_id() for _ in item]
                sealed = frame_chunks(prepared, item, transport="udp", message_ids=ids,
                                      sealer=server_layer)  # fmt: skip
                kernel_datagrams += len(sealed)
                datagrams += sealed
            elif isinstance(item, Message):
                link.notify(transfer_request(item), 0.0)
                datagrams += [server_layer.seal(d) for d in link.take_outgoing()]
        wire.extend(datagrams)
        return datagrams

    now = 0.0
    in_flight = send(sender.start(now))
    for _ in range(2000):
        if sender.finished:
            break
        now += 0.02
        rng.shuffle(in_flight)  # reordered on the path
        replies: list[Message] = []
        for datagram in in_flight:
            if rng.random() < 0.05:
                continue  # lost on the way
            for event in device_layer.open_datagram(datagram):
                assert isinstance(event, ApplicationData), event
                message = parse_transfer(decode_udp(event.data))
                for out in receiver.handle(message, now):
                    if isinstance(out, WriteChunk):
                        slot[out.offset : out.offset + len(out.data)] = out.data
                    elif isinstance(out, Message):
                        replies.append(out)
        replies += [m for m in receiver.poll(now) if isinstance(m, Message)]
        outputs: list[Any] = []
        for reply in replies:
            outputs += sender.handle(reply, now)
        if not outputs and not replies:
            deadline = sender.next_deadline()
            if deadline is not None:
                now = max(now, deadline)
        outputs += sender.poll(now)
        in_flight = send(outputs)
    assert sender.phase is SenderPhase.DONE, sender.phase
    assert bytes(slot) == image
    assert kernel_datagrams >= prepared.chunk_count
    assert assert_no_nonce_reuse(wire) == len(wire)
    assert sender.stats().chunks_retransmitted > 0  # the loss was felt and repaired


def test_tls_transfer_through_the_kernel() -> None:
    image = firmware(9, 70_000)
    session = tls13_peers.handshake("TLS_AES_128_GCM_SHA256", rekey_after=3)
    server_layer, peer = session.layer, session.peer
    tls13_peers.drain(peer)
    prepared = PreparedFile(image, 1024)
    sender = TransferSender(prepared, 1024, 64, transfer_id=6, module_function=5,
                            module_index=1, module_version=7)  # fmt: skip
    slot = bytearray(len(image))
    view = memoryview(slot)
    receiver = TransferReceiver(read_stored=lambda offset, length: view[offset : offset + length])
    link = TcpLink()
    reader = TcpFrameReader()
    reader.feed(tls13_peers.recv_all(peer, server_layer.send_application_data(
        b"".join(link.take_outgoing()))))  # the CSM  # fmt: skip

    def send(outputs: list[Any]) -> bytes:
        parts = []
        for item in split_chunk_runs(outputs):
            if isinstance(item, list):
                assert all(isinstance(chunk, Chunk) for chunk in item)
                parts.append(frame_chunks(prepared, item, transport="tcp", sealer=server_layer))
            elif isinstance(item, Message):
                link.notify(transfer_request(item), 0.0)
                parts.append(server_layer.send_application_data(b"".join(link.take_outgoing())))
        return b"".join(parts)

    now = 0.0
    stream = send(sender.start(now))
    for _ in range(500):
        if sender.finished:
            break
        now += 0.02
        replies: list[Message] = []
        for coap in reader.feed(tls13_peers.recv_all(peer, stream)):
            for out in receiver.handle(parse_transfer(coap), now):
                if isinstance(out, WriteChunk):
                    slot[out.offset : out.offset + len(out.data)] = out.data
                elif isinstance(out, Message):
                    replies.append(out)
        replies += [m for m in receiver.poll(now) if isinstance(m, Message)]
        outputs: list[Any] = []
        for reply in replies:
            outputs += sender.handle(reply, now)
        stream = send(outputs + sender.poll(now))
    assert sender.phase is SenderPhase.DONE, sender.phase
    assert bytes(slot) == image
    assert server_layer.write_secret != session.handover.write_secret  # rekeyed on the way
