"""A relay between emulated devices and a real server that the test can cut silently.

It forwards TCP (the TLS 1.3 stream, byte for byte) and UDP (the DTLS 1.2 datagrams) on
real loopback sockets, like the path through a cellular network and a NAT:

- :meth:`SilentRelay.cut`: the path goes dead, and neither end learns it: no socket is
  closed, no FIN, RST or ICMP crosses, as when a device loses coverage. UDP datagrams are
  dropped both ways. TCP bytes are held (the relay stops reading; what it read waits):
  TCP retransmits a lost segment until the path is back or an end gives up, so a stream
  never loses bytes in its middle; an end that closes during the cut is seen closed by
  the other end only once the path is back. A device's new connection during the cut
  reaches the server once the path is back (TCP), or is dropped (UDP: its handshake gets
  no answer until it retransmits after the cut).
- :meth:`SilentRelay.restore`: the path is back; with ``rebind=True`` through a NAT that
  forgot the device (:meth:`rebind` first).
- :meth:`SilentRelay.rebind`: a NAT rebinding. Each UDP device's datagrams reach the
  server from a new source port from now on; what the server sends to the old port is
  lost.

This module holds no tests.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field

import trio

Address = tuple[str, int]
_READ = 65536


@dataclass
class RelayStats:
    """What the relay carried and dropped (bytes for TCP, datagrams for UDP)."""

    tcp_connections: int = 0
    udp_mappings: int = 0
    udp_dropped: int = 0
    rebinds: int = 0
    #: Device addresses (UDP) seen, in order of their first datagram.
    udp_devices: list[Address] = field(default_factory=list)


class _UdpMapping:
    """One device's NAT binding: the upstream socket its datagrams leave from."""

    def __init__(self, device: Address) -> None:
        self.device = device
        self.upstream: trio.socket.SocketType | None = None
        self.scope = trio.CancelScope()


class SilentRelay:
    """Forwards a TCP and a UDP port to the server's (see the module docstring)."""

    def __init__(self, tcp_target: Address, udp_target: Address) -> None:
        self.tcp_target = tcp_target
        self.udp_target = udp_target
        self.stats = RelayStats()
        self.tcp_address: Address = ("", 0)
        self.udp_address: Address = ("", 0)
        self._dead = False
        self._restored = trio.Event()
        self._front: trio.socket.SocketType | None = None
        self._mappings: dict[Address, _UdpMapping] = {}
        self._nursery: trio.Nursery | None = None

    @property
    def dead(self) -> bool:
        """True while the path is cut."""
        return self._dead

    # --- the test's switches ------------------------------------------------------------------

    def cut(self) -> None:
        """The path goes dead, silently (see the module docstring)."""
        if not self._dead:
            self._dead = True
            self._restored = trio.Event()

    def restore(self, *, rebind: bool = False) -> None:
        """The path is back; ``rebind``: through a NAT that gave the devices new ports."""
        if rebind:
            self.rebind()
        if self._dead:
            self._dead = False
            self._restored.set()

    def rebind(self) -> None:
        """Every UDP device's datagrams come from a new source port from now on."""
        assert self._nursery is not None
        for mapping in list(self._mappings.values()):
            mapping.scope.cancel()  # the old binding's reader ends and its socket closes
            fresh = _UdpMapping(mapping.device)
            self._mappings[mapping.device] = fresh
            self._nursery.start_soon(self._run_mapping, fresh)
            self.stats.rebinds += 1

    # --- running ------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[SilentRelay] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Listen on ephemeral loopback ports and forward until cancelled."""
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        (listener,) = listeners
        host, port = listener.socket.getsockname()[:2]
        self.tcp_address = (host, port)
        front = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        await front.bind(("127.0.0.1", 0))
        self._front = front
        self.udp_address = front.getsockname()[:2]
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._accept, listener)
                nursery.start_soon(self._udp_front)
                task_status.started(self)
        finally:
            front.close()
            await listener.aclose()

    # --- TCP ----------------------------------------------------------------------------------

    async def _accept(self, listener: trio.SocketListener) -> None:
        assert self._nursery is not None
        while True:
            stream = await listener.accept()
            self.stats.tcp_connections += 1
            self._nursery.start_soon(self._tcp_pair, stream)

    async def _tcp_pair(self, device: trio.SocketStream) -> None:
        async with device:
            # A connection made during the cut reaches the server once the path is back
            # (its SYN and ClientHello are retransmitted until then, or it gives up).
            await self._wait_restored()
            try:
                server = await trio.open_tcp_stream(*self.tcp_target)
            except OSError:
                return
            async with server, trio.open_nursery() as nursery:
                nursery.start_soon(self._pump, device, server, nursery.cancel_scope)
                nursery.start_soon(self._pump, server, device, nursery.cancel_scope)

    async def _wait_restored(self) -> None:
        if self._dead:
            await self._restored.wait()

    async def _pump(self, source: trio.SocketStream, sink: trio.SocketStream,
                    pair: trio.CancelScope) -> None:
        """Carry one direction. During a cut nothing crosses: what was read waits here and
        the rest in the kernel's buffers (a sender whose window fills blocks), as TCP
        retransmits lost segments until the path is back. An end that closes is seen by
        the other end once the path is back (its FIN, or the RST answering its data)."""
        try:
            while True:
                data = await source.receive_some(_READ)
                await self._wait_restored()
                if not data:
                    break
                await sink.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            await self._wait_restored()
        pair.cancel()

    # --- UDP ----------------------------------------------------------------------------------

    async def _udp_front(self) -> None:
        front = self._front
        assert front is not None and self._nursery is not None
        while True:
            data, device = await front.recvfrom(_READ)
            device = device[:2]
            mapping = self._mappings.get(device)
            if mapping is None:
                mapping = _UdpMapping(device)
                self._mappings[device] = mapping
                self.stats.udp_mappings += 1
                self.stats.udp_devices.append(device)
                await self._nursery.start(self._run_mapping, mapping)
            if self._dead or mapping.upstream is None:
                self.stats.udp_dropped += 1
                continue
            try:
                await mapping.upstream.send(data)
            except OSError:
                self.stats.udp_dropped += 1

    async def _run_mapping(self, mapping: _UdpMapping,
                           task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                           ) -> None:
        """The binding's upstream socket (a new source port) and its reader."""
        front = self._front
        assert front is not None
        with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as upstream:
            await upstream.bind(("127.0.0.1", 0))
            await upstream.connect(self.udp_target)
            mapping.upstream = upstream
            task_status.started()
            with mapping.scope:
                while True:
                    try:
                        data = await upstream.recv(_READ)
                    except OSError:  # an ICMP error from the server's port: keep reading
                        continue
                    if self._dead or self._mappings.get(mapping.device) is not mapping:
                        self.stats.udp_dropped += 1
                        continue
                    try:
                        await front.sendto(data, mapping.device)
                    except OSError:
                        self.stats.udp_dropped += 1
            mapping.upstream = None
