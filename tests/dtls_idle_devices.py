"""Idle DTLS devices in a process of their own, for measuring what a server keeps per session.

    python -m tests.dtls_idle_devices HOST PORT CREDS_DIR DEVICE_ID [DEVICE_ID ...]

For each device in turn: a full mutual-auth DTLS 1.2 handshake (pyOpenSSL through
``trio.DTLSEndpoint``, one socket per device, as a real device has) and what a device sends
first over UDP, an Empty CON (a CoAP ping, RFC 7252 4.3), answered by the server's link
(its Reset). Then it prints ``ready N`` and holds every session, silent, until its stdin
closes or says anything. Running the devices in another process keeps their allocations out
of the server's tracemalloc census (``tests/test_dtls_session_footprint.py``,
``bench/sessions/dtls_census.py``).
"""

from __future__ import annotations

import sys
from contextlib import AsyncExitStack
from pathlib import Path

import trio

from otacore.protocol.link import UdpLink
from server.transport.client import DeviceCredentials, connect_dtls

#: Seconds to wait for the ping's answer before sending it again, and tries.
ANSWER_WAIT = 2.0
PING_TRIES = 5


async def _open(address: tuple[str, int], creds_dir: Path, device_id: str,
                stack: AsyncExitStack) -> None:
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
            return
    raise trio.TooSlowError(f"device {device_id}: no answer to {PING_TRIES} pings")


async def main(host: str, port: int, creds_dir: Path, device_ids: list[str]) -> None:
    """Open every session, say so, hold them until stdin says otherwise."""
    async with AsyncExitStack() as stack:
        for device_id in device_ids:
            await _open((host, port), creds_dir, device_id, stack)
        print(f"ready {len(device_ids)}", flush=True)
        stdin = trio.lowlevel.FdStream(0)
        await stdin.receive_some()


if __name__ == "__main__":
    if len(sys.argv) < 5:
        sys.exit(__doc__)
    trio.run(main, sys.argv[1], int(sys.argv[2]), Path(sys.argv[3]), sys.argv[4:])
