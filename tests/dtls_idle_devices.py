"""Idle DTLS devices in a process of their own, for measuring what a server keeps per session.

    python -m tests.dtls_idle_devices [--hello] HOST PORT CREDS_DIR DEVICE_ID [DEVICE_ID ...]

For each device in turn: a full mutual-auth DTLS 1.2 handshake (pyOpenSSL through
``trio.DTLSEndpoint``, one socket per device, as a real device has) and what a device sends
first over UDP, an Empty CON (a CoAP ping, RFC 7252 4.3), answered by the server's link
(its empty ACK). With ``--hello`` the device then says what a Device OS device says next, a
Hello and a Describe, each answered 2.04 Changed. Then it prints ``ready N`` and holds every
session, silent, until its stdin closes or says anything. Running the devices in another
process keeps their allocations out of the server's tracemalloc census
(``tests/dtls_footprint.py``, ``tests/test_dtls_session_footprint.py``).
"""

from __future__ import annotations

import sys
from contextlib import AsyncExitStack
from pathlib import Path

import trio

from otacore.coap import Code, Message
from otacore.messages import (
    Dependency,
    Describe,
    Direction,
    Hello,
    ModuleDescription,
    to_message,
)
from otacore.protocol.link import ResponseReceived, UdpLink
from server.transport.client import DeviceCredentials, connect_dtls

#: Seconds to wait for the ping's answer before sending it again, and tries.
ANSWER_WAIT = 2.0
PING_TRIES = 5


#: What the devices describe with --hello: a system part and an application.
MODULES = (
    ModuleDescription(4, 1, 5003, 0, 600_000, bytes(range(32)), (Dependency(2, 0, 2001),)),
    ModuleDescription(5, 1, 7, 0, 90_000, bytes(32), (Dependency(4, 1, 5003),)),
)


async def _request(link: UdpLink, channel: trio.DTLSChannel, message: Message,
                   device_id: str) -> None:
    """Send a CON request; return once its response is 2.04 Changed (the link sends the
    CON again on its own schedule, RFC 7252 4.2)."""
    token = link.request(message, trio.current_time())
    with trio.fail_after(ANSWER_WAIT * PING_TRIES):
        while True:
            for data in link.take_outgoing():
                await channel.send(data)
            deadline = link.next_deadline()
            with trio.move_on_at(deadline if deadline is not None else trio.current_time() + 1):
                data = await channel.receive()
                for event in link.receive(data, trio.current_time()):
                    if isinstance(event, ResponseReceived) and event.token == token:
                        if event.message.code != Code.CHANGED:
                            raise RuntimeError(f"device {device_id}: {event.message.code!r}")
                        return
            link.poll(trio.current_time())


async def _hello(link: UdpLink, channel: trio.DTLSChannel, device_id: str) -> None:
    hello = Hello(device_id=device_id, platform_id=13, product_id=13, product_version=1,
                  system_version=5003, supports_immediate_updates=True, updates_enabled=True,
                  reset_pending=False, max_message_size=1500)
    await _request(link, channel, to_message(hello, Direction.TO_CLOUD), device_id)
    describe = Describe(MODULES)
    await _request(link, channel, to_message(describe, Direction.TO_CLOUD), device_id)


async def _open(address: tuple[str, int], creds_dir: Path, device_id: str,
                stack: AsyncExitStack, hello: bool) -> None:
    device_dir = creds_dir / device_id
    creds = DeviceCredentials(device_dir / "cert.pem", device_dir / "key.pem",
                              creds_dir / "ca.pem")
    sock = trio.socket.socket(type=trio.socket.SOCK_DGRAM)
    await sock.bind(("127.0.0.1", 0))
    endpoint = trio.DTLSEndpoint(sock)
    stack.callback(endpoint.close)
    channel = await connect_dtls(endpoint, address, creds)
    link = UdpLink()
    for _ in range(PING_TRIES):
        link.ping(trio.current_time())
        for data in link.take_outgoing():
            await channel.send(data)
        with trio.move_on_after(ANSWER_WAIT):
            link.receive(await channel.receive(), trio.current_time())
            break
    else:
        raise trio.TooSlowError(f"device {device_id}: no answer to {PING_TRIES} pings")
    if hello:
        await _hello(link, channel, device_id)


async def main(host: str, port: int, creds_dir: Path, device_ids: list[str],
               hello: bool = False) -> None:
    """Open every session, say so, hold them until stdin says otherwise."""
    async with AsyncExitStack() as stack:
        for device_id in device_ids:
            await _open((host, port), creds_dir, device_id, stack, hello)
        print(f"ready {len(device_ids)}", flush=True)
        stdin = trio.lowlevel.FdStream(0)
        await stdin.receive_some()


if __name__ == "__main__":
    arguments = sys.argv[1:]
    with_hello = arguments[:1] == ["--hello"]
    if with_hello:
        arguments = arguments[1:]
    if len(arguments) < 4:
        sys.exit(__doc__)
    trio.run(main, arguments[0], int(arguments[1]), Path(arguments[2]), arguments[3:],
             with_hello)
