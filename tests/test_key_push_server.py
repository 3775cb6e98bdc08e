"""The server's side of key rotation during a session (server.devices.key_sync), against a
scripted device over real TLS and DTLS: it pushes (``POST k``) only what the device lacks,
in pieces that fit the device's messages, goes on from the sequence the device reports,
stops when the device refuses or makes no progress, and asks older firmware to reconnect
only when a new Hello would bring it further."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from otacore.coap import Code, Message, MessageType
from otacore.protocol.link import RequestReceived
from otacore.protocol.ota_wire import (
    UDP_MAX_MESSAGE,
    key_page_for,
    key_push_answer,
    parse_hello_answer,
    statement_budget,
)
from otacore.signing import TrustStore, parse_statement
from server.devices.key_sync import RECONNECT_FOR_KEYS, offer_signing_key, push_key_statements
from server.devices.keys import (
    product_signing_key,
    product_statements,
    rotate_product_key,
    withdraw_product_key,
)
from server.devices.session import DeviceSessionHandler
from tests.device_client import LinkDevice, is_request_to
from tests.device_server import DeviceServerKit, start_device_server
from tests.key_helpers import keys_caught_up

TRANSPORTS = ["tcp", "udp"]
#: The scripted device's message size: a page holds a few statements only.
MESSAGE_SIZE = 600


def _rotate(kit: DeviceServerKit, count: int) -> None:
    for _ in range(count):
        rotate_product_key(kit.handle.store, kit.data_dir, kit.product_id)


async def _rotated(kit: DeviceServerKit, count: int) -> None:
    """``count`` rotations, then the server's key cache holds them."""
    await trio.to_thread.run_sync(_rotate, kit, count)
    await keys_caught_up(kit.handle.store, kit.data_dir, kit.handle.devices, kit.product_id)


def _handler(kit: DeviceServerKit, device_id: str) -> DeviceSessionHandler:
    plane = kit.handle.devices
    assert plane is not None
    return plane.sessions[device_id]


async def _answer(device: LinkDevice, request: RequestReceived, code: int,
                  payload: bytes = b"") -> None:
    device.link.respond(request.message, Message(MessageType.ACK, code, payload=payload),
                        trio.current_time())
    await device.flush()


async def _next_push(device: LinkDevice) -> tuple[RequestReceived, list[int]]:
    """The server's next ``POST k`` (a piece that fits the device's messages): the request
    and its statements' sequence numbers."""
    event = await device.wait_for(is_request_to(["k"]))
    assert isinstance(event, RequestReceived) and event.message.code == Code.POST
    assert len(event.message.payload) <= statement_budget(device.transport, MESSAGE_SIZE)
    page = parse_hello_answer(event.message.payload)
    return event, [parse_statement(s).sequence for s in page.statements]


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_pushes_go_on_from_the_sequence_the_device_reports(
    nursery: trio.Nursery, tmp_path: Path, transport: str
) -> None:
    kit = await start_device_server(nursery, tmp_path, count=1)
    (device_id,) = kit.device_ids
    original = product_signing_key(kit.handle.store, kit.data_dir, kit.product_id)
    await _rotated(kit, 4)
    device = await LinkDevice.connect(kit.creds_dir, device_id, transport,
                                      kit.address(transport))
    answer = await device.hello(key_sequence=2, key_push=True, max_message_size=MESSAGE_SIZE)
    assert [parse_statement(s).sequence for s in parse_hello_answer(answer.payload).statements
            ] == [3, 4]
    handler = _handler(kit, device_id)
    assert handler.key_sequence == 4  # what the Hello's answer brought it to

    await _rotated(kit, 10)
    statements = product_statements(kit.handle.store, kit.product_id)
    assert len(statements) == 14
    outcome: list[bool] = []
    done = trio.Event()

    async def push() -> None:
        outcome.append(await push_key_statements(handler, statements, 10.0))
        done.set()

    nursery.start_soon(push)
    # The first piece starts after 4; the device says its store is at 2 (it lost two): the
    # server goes on from 3, a piece per message, until the device has all 14.
    request, sequences = await _next_push(device)
    assert sequences[0] == 5
    store = TrustStore.initial(kit.product_id, [original.public_key]).catch_up(statements[:2])
    await _answer(device, request, Code.CHANGED, key_push_answer(store.sequence))
    pieces = 0
    while store.sequence < len(statements):
        request, sequences = await _next_push(device)
        assert sequences[0] == store.sequence + 1 and sequences == sorted(sequences)
        pieces += 1
        store = store.catch_up(parse_hello_answer(request.message.payload).statements)
        await _answer(device, request, Code.CHANGED, key_push_answer(store.sequence))
    with trio.fail_after(10):
        await done.wait()
    assert outcome == [True] and handler.key_sequence == 14 and pieces >= 3
    current = product_signing_key(kit.handle.store, kit.data_dir, kit.product_id)
    assert current.key_id in store.key_ids

    # A refusal (4.03) or an answer that makes no progress ends the push: False, and the
    # session goes on.
    await _rotated(kit, 1)
    statements = product_statements(kit.handle.store, kit.product_id)
    for code, payload in ((Code.FORBIDDEN, b"SignatureError: bad"),
                          (Code.CHANGED, key_push_answer(14))):
        outcome.clear()
        done = trio.Event()
        nursery.start_soon(push)
        request, sequences = await _next_push(device)
        assert sequences == [15]
        await _answer(device, request, code, payload)
        with trio.fail_after(10):
            await done.wait()
        assert outcome == [False] and handler.key_sequence == 14
    assert not handler.session.closed
    await device.aclose()


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_the_offer_key_waits_for_the_device_or_its_reconnect(
    nursery: trio.Nursery, tmp_path: Path, transport: str
) -> None:
    """offer_signing_key: a key-push device is brought up to date (withdrawal included)
    and the key comes back; a paging device without key push is asked to reconnect (its
    session is closed, no key); a device from before paging whose Hello cannot carry more
    is not (the key comes back, it judges the offer itself)."""
    kit = await start_device_server(nursery, tmp_path, count=1)
    (device_id,) = kit.device_ids
    original = product_signing_key(kit.handle.store, kit.data_dir, kit.product_id)
    address = kit.address(transport)

    pushing = await LinkDevice.connect(kit.creds_dir, device_id, transport, address)
    await pushing.hello(key_sequence=0, key_push=True, max_message_size=MESSAGE_SIZE)
    handler = _handler(kit, device_id)
    rotation = await trio.to_thread.run_sync(rotate_product_key, kit.handle.store,
                                             kit.data_dir, kit.product_id)
    await trio.to_thread.run_sync(withdraw_product_key, kit.handle.store, kit.data_dir,
                                  kit.product_id, original.key_id)
    await keys_caught_up(kit.handle.store, kit.data_dir, kit.handle.devices, kit.product_id)
    chosen: list[object] = []
    done = trio.Event()

    async def choose() -> None:
        chosen.append(await offer_signing_key(handler, kit.product_id, 10.0))
        done.set()

    nursery.start_soon(choose)
    request, sequences = await _next_push(pushing)
    assert sequences == [1, 2]
    await _answer(pushing, request, Code.CHANGED, key_push_answer(2))
    with trio.fail_after(10):
        await done.wait()
    assert chosen == [rotation.new] and handler.key_sequence == 2
    await pushing.aclose()

    # Older firmware that pages (key_sequence, no key push), at 0 in a session opened
    # before a third statement: the session is closed so that it reconnects.
    older = await LinkDevice.connect(kit.creds_dir, device_id, transport, address)
    await older.hello(key_sequence=2, max_message_size=MESSAGE_SIZE)
    handler = _handler(kit, device_id)
    await _rotated(kit, 1)
    assert await offer_signing_key(handler, kit.product_id, 10.0) is None
    assert handler.session.close_reason == RECONNECT_FOR_KEYS
    await older.wait_closed()
    await older.aclose()

    # A device from before paging (no key_sequence) got the first page of statements in its
    # Hello's answer; when that page is all a Hello can carry it, a reconnect would not
    # help: no reconnect, the key comes back (the device refuses what it cannot verify).
    await _rotated(kit, 10)
    statements = product_statements(kit.handle.store, kit.product_id)
    ancient = await LinkDevice.connect(kit.creds_dir, device_id, transport, address)
    answer = await ancient.hello(max_message_size=MESSAGE_SIZE)
    first = parse_hello_answer(answer.payload).statements
    limit = MESSAGE_SIZE if transport == "tcp" else min(MESSAGE_SIZE, UDP_MAX_MESSAGE)
    assert 0 < len(first) == len(key_page_for(statements, 0, limit - 40).statements)
    assert len(first) < len(statements)
    handler = _handler(kit, device_id)
    assert handler.key_sequence == len(first)
    key = await offer_signing_key(handler, kit.product_id, 10.0)
    assert key == product_signing_key(kit.handle.store, kit.data_dir, kit.product_id)
    assert not handler.session.closed
    await ancient.aclose()
