"""Both device listeners (TLS on TCP, DTLS on UDP) in one nursery, with graceful shutdown."""

from __future__ import annotations

import hashlib
import socket
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import trio
from cryptography.hazmat.primitives.serialization import Encoding

from otacore.errors import OtaError, ValidationError
from server.authorization import DeviceDirectory
from server.identity import InstallationPki, init_pki
from server.transport.dtls import make_dtls_server_context, serve_dtls
from server.transport.limits import SessionLimits
from server.transport.session import CloseReason, HandlerFactory, logger
from server.transport.session_host import SessionHost, TransportStats
from server.transport.session_registry import SessionRegistry
from server.transport.timers import ProcessTimers
from server.transport.tls import make_tls_handshake_context, serve_tls
from server.transport.udp_endpoint import UdpEndpoint
from server.transport.udp_saved import SavedDtlsSession, SessionVault

#: CoAP over DTLS (RFC 7252 section 12.8) and over TLS (RFC 8323 section 8.2) share 5684.
DEFAULT_DEVICE_PORT = 5684


@dataclass(frozen=True)
class DeviceServerConfig:
    """Where and how the device endpoint listens.

    ``tcp_port``/``udp_port`` 0 pick ephemeral ports (tests); ``None`` disables a transport.
    """

    pki_dir: Path
    host: str = "0.0.0.0"
    tcp_port: int | None = DEFAULT_DEVICE_PORT
    udp_port: int | None = DEFAULT_DEVICE_PORT
    limits: SessionLimits = field(default_factory=SessionLimits)
    #: Names and addresses devices use to reach the server (the server certificate's SANs,
    #: used only when the PKI is created).
    server_dns_names: tuple[str, ...] = ("localhost",)
    server_ip_addresses: tuple[str, ...] = ("127.0.0.1", "::1")
    #: Datagrams kept per DTLS peer that its handshake or session has not read yet; more
    #: are dropped (UDP allows it; CoAP retransmits, RFC 7252 section 4.2).
    dtls_queue_size: int = 10
    #: Let several processes bind the same ports (SO_REUSEPORT, Linux 3.9+): the kernel
    #: spreads TCP connections, and UDP flows by 4-tuple hash, over their sockets.
    reuse_port: bool = False
    #: Receive and send buffer asked for the DTLS socket, bytes (None: the system default).
    #: Linux caps SO_RCVBUF/SO_SNDBUF at net.core.rmem_max/wmem_max; SO_RCVBUFFORCE
    #: (CAP_NET_ADMIN) is tried first and passes the cap.
    udp_buffer_bytes: int | None = 8 * 1024 * 1024
    #: Save established DTLS sessions on graceful shutdown and restore them on start (issue
    #: 14 item 6), sealed in ``pki_dir`` (AES-GCM, key file 0600): devices go on without a
    #: handshake. Not with ``reuse_port`` (a flow may reach another process after restart).
    save_dtls_sessions: bool = True
    #: Saved sessions idle for longer than this many seconds (or a file older) are dropped.
    saved_session_max_age: float = 600.0

    def __post_init__(self) -> None:
        for port in (self.tcp_port, self.udp_port):
            if port is not None and not 0 <= port <= 65535:
                raise ValidationError(f"device port {port} is not between 0 and 65535")
        if self.tcp_port is None and self.udp_port is None:
            raise ValidationError("enable at least one device transport (TCP or UDP)")
        if self.saved_session_max_age <= 0:
            raise ValidationError(
                f"saved_session_max_age must be positive seconds, got {self.saved_session_max_age}"
            )

    @property
    def saves_dtls_sessions(self) -> bool:
        """True if DTLS sessions are saved at graceful shutdown and restored on start."""
        return self.save_dtls_sessions and self.udp_port is not None and not self.reuse_port


class DeviceServer:
    """The device endpoint: accepts devices over TLS and DTLS and runs their sessions.

    Use ``await nursery.start(server.serve)``; later ``await server.shutdown()`` for a
    graceful stop (farewell + close_notify to every device; established DTLS sessions are
    saved for the next process instead, see ``udp_saved``), or cancel for a hard stop.
    """

    def __init__(
        self,
        config: DeviceServerConfig,
        handler_factory: HandlerFactory,
        directory: DeviceDirectory,
        *,
        registry: SessionRegistry | None = None,
        pki: InstallationPki | None = None,
        timers: ProcessTimers | None = None,
    ) -> None:
        self.config = config
        self.pki = pki
        self.registry = registry if registry is not None else SessionRegistry()
        self.host = SessionHost(
            directory=directory,
            handler_factory=handler_factory,
            registry=self.registry,
            limits=config.limits,
            timers=timers,
        )
        #: Bound (address, port) of each transport once serving; None if disabled.
        self.tcp_address: tuple[str, int] | None = None
        self.udp_address: tuple[str, int] | None = None
        #: (SO_RCVBUF, SO_SNDBUF) of the DTLS socket as the kernel reports them (Linux
        #: reports twice the usable size: socket(7)); None until bound.
        self.udp_buffers: tuple[int, int] | None = None
        self._tcp_listeners: list[trio.SocketListener] = []
        self._udp_socket: socket.socket | None = None
        #: The UDP endpoint once serving (its ``stats`` count dropped and discarded datagrams).
        self.udp_endpoint: UdpEndpoint | None = None
        #: The sealed file of saved DTLS sessions (None when not saving them).
        self.vault: SessionVault | None = None
        self._stop = trio.Event()

    @property
    def stats(self) -> TransportStats:
        """Handshake, refusal and close counters."""
        return self.host.stats

    async def serve(
        self, *, task_status: trio.TaskStatus[DeviceServer] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Bind both transports, report ``self`` as started, serve until stopped."""
        if self.pki is None:
            self.pki = await trio.to_thread.run_sync(
                lambda: init_pki(
                    self.config.pki_dir,
                    dns_names=self.config.server_dns_names,
                    ip_addresses=self.config.server_ip_addresses,
                )
            )
        pki = self.pki
        saved: list[SavedDtlsSession] = []
        if self.config.saves_dtls_sessions:
            self.vault = self._make_vault(pki)
            # Read and deleted before anything is served: a state is restored at most once.
            saved = await trio.to_thread.run_sync(self.vault.take)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.host.report_refusals)
                if self.host.owns_timers:
                    nursery.start_soon(self.host.timers.run)
                if self.config.tcp_port is not None:
                    self._tcp_listeners = await open_tcp_listeners(
                        self.config.tcp_port, self.config.host, reuse_port=self.config.reuse_port
                    )
                    self.tcp_address = _address_of(self._tcp_listeners[0].socket)
                    await nursery.start(
                        serve_tls, self._tcp_listeners, make_tls_handshake_context(pki), self.host
                    )
                if self.config.udp_port is not None:
                    self._udp_socket = await self._open_udp_socket()
                    self.udp_address = _address_of(self._udp_socket)
                    self.udp_endpoint = await nursery.start(
                        partial(
                            serve_dtls,
                            self._udp_socket,
                            make_dtls_server_context(pki),
                            self.host,
                            self.config.dtls_queue_size,
                            restore=saved,
                        )
                    )
                    if saved:
                        logger.info("restored %d saved DTLS sessions (authorizing them again)",
                                    len(saved))  # fmt: skip
                    del saved
                logger.info(
                    "device endpoint listening: tcp %s, udp %s (buffers %s)",
                    self.tcp_address,
                    self.udp_address,
                    self.udp_buffers,
                )
                task_status.started(self)
                await self._stop.wait()
                nursery.cancel_scope.cancel()
        finally:
            for listener in self._tcp_listeners:
                listener.socket.close()
            if self._udp_socket is not None:
                trio.lowlevel.notify_closing(self._udp_socket)
                self._udp_socket.close()

    async def _open_udp_socket(self) -> socket.socket:
        """The bound, non-blocking UDP socket the DTLS endpoint serves."""
        assert self.config.udp_port is not None
        infos = await trio.socket.getaddrinfo(
            self.config.host, self.config.udp_port, type=socket.SOCK_DGRAM
        )
        family, _, _, _, address = infos[0]
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            if self.config.reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if self.config.udp_buffer_bytes is not None:
                self.udp_buffers = size_socket_buffers(sock, self.config.udp_buffer_bytes)
            sock.bind(address)  # a local bind: never blocks
        except OSError:
            sock.close()
            raise
        return sock

    def _make_vault(self, pki: InstallationPki) -> SessionVault:
        ca_der = pki.ca_cert.public_bytes(Encoding.DER)
        return SessionVault(
            self.config.pki_dir,
            hashlib.sha256(ca_der).digest(),
            max_age=self.config.saved_session_max_age,
        )

    async def shutdown(self, grace: float | None = None) -> None:
        """Stop accepting, tell every device to come back later, then stop serving.

        Live TLS sessions get their handler's ``farewell`` and a close_notify; established
        DTLS sessions are saved for the next process instead (if
        ``config.save_dtls_sessions``), else treated alike. After ``grace`` seconds
        (default: the farewell timeout plus one second) whatever remains is cancelled.
        """
        if grace is None:
            grace = self.config.limits.farewell_timeout + 1.0
        endpoint = self.udp_endpoint
        if self.vault is not None and endpoint is not None:
            # Before anything can refuse a restored session for the shutdown: it is
            # saved again instead (UdpEndpoint._save_again).
            endpoint.start_saving()
        self.host.stop_accepting()
        for listener in self._tcp_listeners:
            await listener.aclose()
        closing = self.registry.close_all(CloseReason.SHUTDOWN)
        logger.info("device endpoint shutting down; closing %d sessions", closing)
        with trio.move_on_after(grace):
            await self.host.wait_all_closed()
        if self.vault is not None and endpoint is not None and endpoint.saving:
            await self._save_sessions(self.vault, endpoint)
        self._stop.set()

    async def _save_sessions(self, vault: SessionVault, endpoint: UdpEndpoint) -> None:
        """Seal the saved sessions to the vault file. A failure is logged, and the
        sessions end as closed ones (their devices offline, within the farewell
        timeout); the devices then handshake again, as after a crash."""
        sessions = endpoint.saving or []
        started = trio.current_time()
        with trio.CancelScope(shield=True) as scope:
            try:
                size = await trio.to_thread.run_sync(vault.save, sessions)
            except (OSError, OtaError) as exc:
                logger.error("could not save %d DTLS sessions to %s: %s",
                             len(sessions), vault.path, exc)  # fmt: skip
                scope.deadline = trio.current_time() + self.config.limits.farewell_timeout
                await endpoint.saving_failed()
                return
        logger.info("saved %d DTLS sessions to %s (%d bytes, %.3f s)", len(sessions),
                    vault.path, size, trio.current_time() - started)  # fmt: skip


#: Listen backlog (the kernel caps it at net.core.somaxconn), as trio's default.
_BACKLOG = 0xFFFF
#: Linux socket options not named in every Python's socket module (asm-generic/socket.h).
_SO_SNDBUFFORCE = getattr(socket, "SO_SNDBUFFORCE", 32)
_SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)


def size_socket_buffers(
    sock: trio.socket.SocketType | socket.socket, size: int
) -> tuple[int, int]:
    """Ask for ``size``-byte receive and send buffers: the FORCE variants first (they pass
    net.core.rmem_max/wmem_max but need CAP_NET_ADMIN), then the capped ones. Returns
    (SO_RCVBUF, SO_SNDBUF) as the kernel reports them."""
    for forced, capped in (
        (_SO_RCVBUFFORCE, socket.SO_RCVBUF),
        (_SO_SNDBUFFORCE, socket.SO_SNDBUF),
    ):
        try:
            sock.setsockopt(socket.SOL_SOCKET, forced, size)
        except OSError:  # EPERM without CAP_NET_ADMIN (also in a user namespace)
            sock.setsockopt(socket.SOL_SOCKET, capped, size)
    return (
        int(sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)),
        int(sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)),
    )


async def open_tcp_listeners(
    port: int, host: str, *, reuse_port: bool = False
) -> list[trio.SocketListener]:
    """TCP listeners on every address of ``host``; with ``reuse_port`` each socket sets
    SO_REUSEPORT so other processes may listen on the same port (the kernel spreads new
    connections over them). Port 0 picks one free port and binds every address to it."""
    if not reuse_port:
        return await trio.open_tcp_listeners(port, host=host)
    infos = await trio.socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    listeners: list[trio.SocketListener] = []
    try:
        for family, kind, proto, _, address in infos:
            sock = trio.socket.socket(family, kind, proto)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                if family == socket.AF_INET6:  # one socket per family, as trio does
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                if port == 0 and listeners:  # every address on the port the first one got
                    address = (address[0], listeners[0].socket.getsockname()[1], *address[2:])
                await sock.bind(address)
                sock.listen(_BACKLOG)
            except OSError:
                sock.close()
                raise
            listeners.append(trio.SocketListener(sock))
    except OSError:
        for listener in listeners:
            listener.socket.close()
        raise
    return listeners


def _address_of(sock: trio.socket.SocketType | socket.socket) -> tuple[str, int]:
    address = sock.getsockname()
    return (str(address[0]), int(address[1]))


async def serve_devices(
    config: DeviceServerConfig,
    handler_factory: HandlerFactory,
    directory: DeviceDirectory,
    *,
    registry: SessionRegistry | None = None,
    timers: ProcessTimers | None = None,
    task_status: trio.TaskStatus[DeviceServer] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the device endpoint (TLS on TCP and DTLS on UDP) until cancelled or shut down.

    ``await nursery.start(serve_devices, config, factory, directory)`` returns the running
    :class:`DeviceServer` (bound addresses, registry, stats, ``shutdown()``).
    """
    server = DeviceServer(config, handler_factory, directory, registry=registry, timers=timers)
    await server.serve(task_status=task_status)
