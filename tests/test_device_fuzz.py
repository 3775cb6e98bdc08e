"""Hypothesis throws malformed CoAP and msgpack at a live server session: only the offending
session may end, the server keeps serving, and the device record is never corrupted."""

from __future__ import annotations

from pathlib import Path

import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from otacore.coap import Code, Message, MessageType, encode_tcp, encode_udp
from tests.device_client import LinkDevice
from tests.device_server import start_device_server

PATHS = st.sampled_from([["h"], ["d"], ["e", "x"], ["g"], ["u"], ["m"], ["fw", "ab"], ["zz"]])


@st.composite
def hostile_frames(draw: st.DrawFn) -> tuple[str, bytes]:
    """Random bytes, or a well-framed CoAP request whose payload is junk."""
    transport = draw(st.sampled_from(["tcp", "udp"]))
    if draw(st.booleans()):
        return transport, draw(st.binary(min_size=1, max_size=300))
    message = Message(MessageType.CON, draw(st.sampled_from([Code.GET, Code.POST, Code.PUT])),
                      message_id=draw(st.integers(0, 0xFFFF)),
                      token=draw(st.binary(max_size=8)),
                      payload=draw(st.binary(max_size=200)))
    message.set_uri_path(*draw(PATHS))
    return transport, encode_tcp(message) if transport == "tcp" else encode_udp(message)


def test_hostile_frames_never_hurt_the_server(tmp_path: Path) -> None:
    frames: list[tuple[str, bytes]] = []

    @settings(max_examples=60, deadline=None, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(hostile_frames())
    def collect(frame: tuple[str, bytes]) -> None:
        frames.append(frame)

    collect()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            kit = await start_device_server(nursery, tmp_path, count=2)
            victim_id, bystander_id = kit.device_ids
            bystander = await LinkDevice.connect(kit.creds_dir, bystander_id, "tcp", kit.tcp)
            assert (await bystander.hello(product_version=3)).code == Code.CHANGED
            for transport, data in frames:
                victim = await LinkDevice.connect(kit.creds_dir, victim_id, transport,
                                                  kit.address(transport))
                await victim.send_raw(data)
                with trio.move_on_after(0.3):
                    await victim._receive_once(trio.current_time() + 0.3)
                await victim.aclose()
                # The server still answers the bystander after every hostile frame.
                assert (await bystander.hello(product_version=3)).code == Code.CHANGED
            async with kit.api() as api:
                record = (await api.get(
                    f"/v1/products/{kit.product_id}/devices/{bystander_id}")).json()
                assert record["firmware_version"] == 3 and record["online"] is True
                victim_record = await api.get(
                    f"/v1/products/{kit.product_id}/devices/{victim_id}")
                assert victim_record.status_code == 200
            await bystander.aclose()
            nursery.cancel_scope.cancel()

    trio.run(main)
