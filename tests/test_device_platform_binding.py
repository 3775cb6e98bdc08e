"""A device is bound to its product's platform (issue 13, finding 12), over real TLS and DTLS:
a Hello naming another platform is refused before anything of it is recorded, and no path
(the Block2 ``fw/<sha256>`` download included) hands it another platform's Device OS module;
the key rotation statements of a Hello answer come a page at a time (finding 4)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import trio

from otacore.coap import Code, Message, MessageType
from otacore.module import build_module
from otacore.platforms import ModuleFunction
from otacore.protocol.ota_wire import UDP_MAX_MESSAGE, key_request, parse_hello_answer
from otacore.signing import TrustStore, parse_statement
from server.devices.keys import product_signing_key, product_statements, rotate_product_key
from tests.device_client import LinkDevice
from tests.device_server import DeviceServerKit, start_device_server
from tests.key_helpers import keys_caught_up

TRANSPORTS = ["tcp", "udp"]
ARGON, BORON = 12, 13  # the kit's product is a Boron product


def _system_part(platform: int) -> bytes:
    body = hashlib.shake_256(f"system part of {platform}".encode()).digest(4000)
    return build_module(body, platform_id=platform, function=ModuleFunction.SYSTEM_PART,
                        index=1, version=5003)


async def _upload_device_os(kit: DeviceServerKit, image: bytes) -> str:
    async with kit.api() as api:
        files = {"binary": ("system-part1.bin", image, "application/octet-stream")}
        response = await api.post("/v1/device-os", files=files)
    assert response.status_code == 201, response.text
    return hashlib.sha256(image).hexdigest()  # how the server names the blob


def _firmware_get(sha256: str) -> Message:
    message = Message(MessageType.CON, Code.GET)
    message.set_uri_path("fw", sha256)
    return message


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_hello_naming_another_platform_is_refused_and_gets_nothing(
    nursery: trio.Nursery, tmp_path: Path, transport: str
) -> None:
    kit = await start_device_server(nursery, tmp_path, count=1)
    device_id = kit.device_ids[0]
    argon = await _upload_device_os(kit, _system_part(ARGON))
    boron = await _upload_device_os(kit, _system_part(BORON))
    device = await LinkDevice.connect(kit.creds_dir, device_id, transport,
                                      kit.address(transport))
    answer = await device.hello(platform_id=ARGON)
    text = bytes(answer.payload).decode()
    assert answer.code == Code.FORBIDDEN and f"platform {BORON}" in text, text
    assert f"names platform {ARGON}" in text
    await device.wait_closed()
    await device.aclose()
    async with kit.api() as api:
        record = (await api.get(f"/v1/products/{kit.product_id}/devices/{device_id}")).json()
    assert record["platform_id"] != ARGON and record["online"] is False
    # A stock client (no Hello at all) may download its own platform's modules, never
    # another's: the platform comes from the product, not from anything the device said.
    stock = await LinkDevice.connect(kit.creds_dir, device_id, transport,
                                     kit.address(transport))
    assert (await stock.request(_firmware_get(argon))).code == Code.NOT_FOUND
    assert (await stock.request(_firmware_get(boron))).code == Code.CONTENT
    await stock.aclose()


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_key_statements_come_in_pages_that_fit_the_device(
    nursery: trio.Nursery, tmp_path: Path, transport: str
) -> None:
    """A Hello with ``key_sequence`` gets only later statements, as many as fit its message
    size (and a DTLS datagram), and ``more``; ``GET k`` pages on; a Hello without it gets the
    legacy array of the first statements that fit."""
    kit = await start_device_server(nursery, tmp_path, count=1)
    device_id = kit.device_ids[0]
    keys = kit.handle.store, kit.data_dir
    original = product_signing_key(*keys, kit.product_id)
    await trio.to_thread.run_sync(
        lambda: [rotate_product_key(*keys, kit.product_id) for _ in range(30)])
    statements = product_statements(kit.handle.store, kit.product_id)
    await keys_caught_up(*keys, kit.handle.devices, kit.product_id)
    device = await LinkDevice.connect(kit.creds_dir, device_id, transport,
                                      kit.address(transport))
    answer = await device.hello(key_sequence=3, max_message_size=1500)
    assert answer.code == Code.CHANGED
    limit = 1500 if transport == "tcp" else UDP_MAX_MESSAGE
    assert len(answer.payload) < limit
    page = parse_hello_answer(answer.payload)
    assert page.more and page.statements == tuple(statements[3 : 3 + len(page.statements)])
    store = TrustStore.initial(kit.product_id, [original.public_key])
    store = store.catch_up(statements[:3]).catch_up(page.statements)
    while page.more:
        answer = await device.request(key_request(store.sequence))
        assert answer.code == Code.CONTENT and len(answer.payload) < limit
        page = parse_hello_answer(answer.payload)
        assert page.statements and parse_statement(page.statements[0]).sequence == (
            store.sequence + 1)
        store = store.catch_up(page.statements)
    assert store.sequence == len(statements)
    assert product_signing_key(*keys, kit.product_id).key_id in store.key_ids
    bad = Message(MessageType.CON, Code.GET)
    bad.set_uri_path("k")
    bad.add_uri_query("after=minus-one")
    assert (await device.request(bad)).code == Code.BAD_REQUEST
    await device.aclose()
    # A device from before paging (no key_sequence): the first statements that fit, as the
    # legacy array, never a closed session.
    legacy = await LinkDevice.connect(kit.creds_dir, device_id, transport,
                                      kit.address(transport))
    answer = await legacy.hello(max_message_size=600)
    assert answer.code == Code.CHANGED and len(answer.payload) < 600
    first = parse_hello_answer(answer.payload)
    assert not first.more and first.statements == tuple(statements[: len(first.statements)])
    assert len(first.statements) >= 3
    await legacy.aclose()
