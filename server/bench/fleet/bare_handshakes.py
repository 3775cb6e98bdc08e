"""The load generator's ``handshakes`` command: bare handshakes of every device of one
transport at its first-choice endpoint, all held until the last is up, then all closed;
each device's session kept to resume in the next round.

Separate from the load-generator process (:mod:`server.bench.fleet.loadgen`) and from its
emulated fleet (:mod:`server.bench.fleet.fleet_driver`): it owns the saved TLS contexts and
sessions of the rounds and nothing else.
"""

from __future__ import annotations

import gc
import os
import socket
import ssl
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from contextlib import suppress
from typing import Any, cast

import trio
from OpenSSL import SSL

from otacore.errors import RecordError, RecordHandoverError
from otacore.protocol.link import TcpLink, Transport, UdpLink
from server.bench.fleet import error_text
from server.bench.fleet.loadgen_spec import LoadGenSpec
from server.bench.fleet.procs import rss_kib
from server.bench.fleet.record_devices import DeviceResumption, connect_records
from server.emulator.endpoints import Endpoint, endpoint_order
from server.transport.client import connect_dtls, dtls_session, dtls_session_reused
from server.transport.dtls import send_close_notify

_READ_SIZE = 65536


def _ping(transport: Transport) -> list[bytes]:
    """What a device sends first: over TCP its CSM (RFC 8323 5.3) and a 7.02 Ping, over
    UDP an Empty CON (CoAP ping)."""
    link = TcpLink() if transport == "tcp" else UdpLink()
    link.ping(0.0)
    return link.take_outgoing()


class HandshakeRounds:
    """Bare handshakes of every device of one transport: connect all, hold, close all."""

    def __init__(self, spec: LoadGenSpec) -> None:
        self.spec = spec
        self._tls_contexts: dict[str, ssl.SSLContext] = {}
        self._tls_sessions: dict[str, ssl.SSLSession] = {}
        self._dtls_sessions: dict[str, SSL.Session] = {}
        #: records stack: each device's credentials and last session, per transport.
        self._resumables: dict[tuple[str, str], DeviceResumption] = {}

    async def run(
        self,
        transport: str,
        endpoints: list[Endpoint],
        *,
        resume: bool,
        concurrency: int,
        timeout: float,
    ) -> dict[str, Any]:
        """One round, each device at its first-choice endpoint; returns counts (in all and
        per endpoint), first start, last completion and per-connection times."""
        devices = [
            (position, device_id)
            for position, (device_id, kind) in enumerate(self.spec.devices)
            if kind == transport
        ]
        home = {
            device_id: endpoints[endpoint_order(device_id, endpoints)[0]]
            for _, device_id in devices
        }
        ok_by_endpoint: Counter[str] = Counter()
        slots = trio.Semaphore(concurrency)
        closers: list[Callable[[], Awaitable[None]]] = []
        errors: Counter[str] = Counter()
        latencies: list[float] = []
        reused = 0
        starts: list[float] = []
        ends: list[float] = []
        rss_before = rss_kib(os.getpid())
        connect = self._records if self.spec.device_stack == "records" else (
            self._tls if transport == "tcp" else self._dtls
        )

        async def one(position: int, device_id: str) -> None:
            nonlocal reused
            async with slots:
                started = time.monotonic()
                starts.append(started)
                endpoint = home[device_id]
                address = endpoint.address(cast(Transport, transport))
                try:
                    with trio.fail_after(timeout):
                        closer, was_reused = await connect(
                            transport, device_id, address, position, resume
                        )
                except (
                    RecordError,
                    RecordHandoverError,
                    trio.TooSlowError,
                    trio.BrokenResourceError,
                    trio.ClosedResourceError,
                    SSL.Error,
                    OSError,
                    ValueError,
                ) as exc:
                    errors[error_text(exc)] += 1
                    return
                done = time.monotonic()
                ends.append(done)
                latencies.append(done - started)
                reused += was_reused
                closers.append(closer)
                ok_by_endpoint[endpoint.name] += 1

        async with trio.open_nursery() as nursery:
            for position, device_id in devices:
                nursery.start_soon(one, position, device_id)
        # Every connection is up and idle: what holding them costs this process.
        gc.collect()
        rss_held = rss_kib(os.getpid())
        async with trio.open_nursery() as nursery:  # disconnect all, gracefully
            for closer in closers:
                nursery.start_soon(closer)
        return {
            "transport": transport,
            "resume": resume,
            "devices": len(devices),
            "ok": len(latencies),
            "ok_by_endpoint": dict(ok_by_endpoint),
            "reused": reused,
            "failed": sum(errors.values()),
            "errors": dict(errors.most_common(5)),
            "t_first": min(starts, default=None),
            "t_last": max(ends, default=None),
            "latencies": latencies,
            "device_stack": self.spec.device_stack,
            "loadgen_rss_before_kib": rss_before,
            "loadgen_rss_held_kib": rss_held,
        }

    async def _records(
        self, transport: str, device_id: str, address: tuple[str, int], position: int,
        resume: bool,
    ) -> tuple[Callable[[], Awaitable[None]], bool]:
        """The records stack: our handshake objects, then our record layers."""
        key = (device_id, transport)
        resumable = self._resumables.get(key)
        if resumable is None:
            resumable = self._resumables[key] = DeviceResumption(
                self.spec.credentials(device_id)
            )
        connection, was_reused = await connect_records(
            transport, address, resumable, resume=resume, source=self.spec.source(position)
        )
        try:
            # A CoAP ping answered proves the server authorised the session (as below).
            await connection.send(_ping(cast(Transport, transport)))
            await connection.receive()
        except BaseException:
            with trio.CancelScope(shield=True):
                await connection.aclose()
            raise
        if connection.session is not None:
            resumable.session = connection.session

        async def close() -> None:
            with trio.move_on_after(2.0):
                await connection.aclose()

        return close, was_reused

    async def _tls(
        self, _transport: str, device_id: str, address: tuple[str, int], position: int,
        resume: bool,
    ) -> tuple[Callable[[], Awaitable[None]], bool]:
        context = self._tls_contexts.get(device_id)
        if context is None:  # a ticket only resumes with the context that received it
            context = self._tls_contexts[device_id] = self.spec.credentials(device_id).tls_context()
        tcp = await trio.open_tcp_stream(*address, local_address=self.spec.source(position))
        stream = trio.SSLStream(tcp, context)
        try:
            session = self._tls_sessions.get(device_id) if resume else None
            if session is not None:
                stream.session = session
            await stream.do_handshake()
            # A CoAP ping answered proves the server authorised the session and runs its
            # handler; the TLS 1.3 NewSessionTicket comes before the answer (RFC 8446 4.6.1).
            await stream.send_all(b"".join(_ping("tcp")))
            if not await stream.receive_some(_READ_SIZE):
                raise trio.BrokenResourceError("the server closed the connection at once")
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
        if stream.session is not None:
            self._tls_sessions[device_id] = stream.session

        async def close() -> None:
            with trio.move_on_after(2.0):
                try:
                    await stream.aclose()  # close_notify, then the socket
                    return
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    pass
            await trio.aclose_forcefully(stream)

        return close, bool(stream.session_reused)

    async def _dtls(
        self, _transport: str, device_id: str, address: tuple[str, int], position: int,
        resume: bool,
    ) -> tuple[Callable[[], Awaitable[None]], bool]:
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            await sock.bind((self.spec.source(position), 0))
        except OSError:
            sock.close()
            raise
        endpoint = trio.DTLSEndpoint(sock)
        try:
            session = self._dtls_sessions.get(device_id) if resume else None
            channel = await connect_dtls(
                endpoint, address, self.spec.credentials(device_id), session=session
            )
        except BaseException:
            endpoint.close()
            raise
        try:
            for datagram in _ping("udp"):  # answered with an empty ACK (RFC 7252 4.3)
                await channel.send(datagram)
            await channel.receive()
        except BaseException:
            channel.close()
            endpoint.close()
            raise
        saved = dtls_session(channel)
        if saved is not None:
            self._dtls_sessions[device_id] = saved

        async def close() -> None:
            # trio sends no close_notify itself (RFC 6347 4.2.7: a DTLS session ends with it)
            with trio.move_on_after(1.0):
                with suppress(SSL.Error, OSError, trio.BrokenResourceError):
                    await send_close_notify(channel)
            channel.close()
            endpoint.close()

        return close, dtls_session_reused(channel)
