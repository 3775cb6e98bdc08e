"""The device plane of one server process: listeners, live sessions, and who owns which.

It authorises devices against the fleet store (every handshake), starts one
:class:`DeviceSessionHandler` per authenticated session, keeps the one registry of live
sessions (the transport's, read by device id through
:class:`~server.devices.live.LiveDevices`: a release or flash reaches the process and
session that holds the device), and closes a live session when its device's certificates
are revoked.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import trio

from otacore.messages import Event
from otacore.signing import SigningKey
from server.authorization import ClientCertificate
from server.devices.key_cache import ProductKeyCache
from server.devices.keys import trusted_key_ids
from server.devices.live import LiveDevices
from server.devices.restored_auth import authorize_restored
from server.devices.restored_start import RestoredStarts
from server.devices.session import DeviceSessionHandler
from server.devices.tuning import DeviceTuning
from server.events import DEVICE_REVOKED, EventBus
from server.fleet import Fleet
from server.identity import init_pki, pki_dir
from server.transport import (
    CloseReason,
    DeviceServer,
    DeviceServerConfig,
    DeviceSession,
    SessionLimits,
    SessionRegistry,
    serve_devices,
)
from server.transport.timers import ProcessTimers

log = logging.getLogger("ota.devices")


@dataclass(frozen=True)
class DevicePlaneConfig:
    """Settings of the device listeners and sessions."""

    data_dir: Path
    host: str = "127.0.0.1"
    #: TCP (TLS) and UDP (DTLS) port; 0 picks free ones, None disables both.
    port: int | None = 5684
    #: The UDP port when it differs from ``port`` (a worker binding the ports the main
    #: process got when it asked for port 0).
    udp_port: int | None = None
    #: SO_REUSEPORT on both listeners: several server processes share the ports.
    reuse_port: bool = False
    limits: SessionLimits = field(default_factory=SessionLimits)
    #: Frame, request and shutdown settings and the listeners' socket and certificate
    #: settings (``[devices]`` of ``ota server --config``).
    tuning: DeviceTuning = field(default_factory=DeviceTuning)
    #: This process's name among the server processes sharing the store (prefix of its
    #: sessions' presence tokens; see ``PresenceService.sessions_lost``). None: from the pid.
    origin: str | None = None

    @property
    def max_frame_size(self) -> int:
        """Largest CoAP-over-TCP frame a device may send (``tuning.max_frame_size``)."""
        return self.tuning.max_frame_size

    @property
    def request_timeout(self) -> float:
        """Seconds to wait for a device's answer (``tuning.request_timeout``)."""
        return self.tuning.request_timeout

    @property
    def shutdown_hold_off(self) -> int:
        """Seconds a device waits after a graceful shutdown (``tuning.shutdown_hold_off``)."""
        return self.tuning.shutdown_hold_off


class DevicePlane:
    """Listeners plus the registry of live device sessions in this process."""

    def __init__(self, config: DevicePlaneConfig, fleet: Fleet, bus: EventBus) -> None:
        self.config = config
        self.fleet = fleet
        self.bus = bus
        #: The one registry of live sessions in this process: the transport's, of its
        #: DeviceSession objects (replacement, revocation and shutdown are the
        #: transport's); each session leads to its handler (``session.handler``).
        self.registry = SessionRegistry()
        #: Device id -> live session handler: a read-only view of ``registry``; the OTA
        #: engine's per-session updater hangs off the handler (``handler.updater``).
        self.live = LiveDevices(self.registry)
        self.origin = config.origin or f"server-{os.getpid()}"
        self._session_serials = itertools.count(1)
        self.server: DeviceServer | None = None
        #: The products' signing keys and statements as this process last read them
        #: (kept current by ``serve``: server.devices.key_cache).
        self.keys = ProductKeyCache(fleet.store, config.data_dir, fleet.limiter)
        #: Hooks of the OTA engine (set by ``server.devices.ota.OtaEngine``).
        self.ota: Any = None
        #: The one timer structure of the process's sessions (link retransmissions),
        #: served by one task of :meth:`serve`.
        self.timers = ProcessTimers()
        #: The nursery of the sessions' on-demand tasks (requests, updates; see
        #: ``DeviceSessionHandler.spawn``): it outlives every session. Set by serve().
        self._tasks: trio.Nursery | None = None
        #: The starts of the sessions restored after a graceful restart, in batches.
        self.restored_starts = RestoredStarts(self)

    def spawn(self, fn: Callable[..., Awaitable[object]], *args: object) -> None:
        """Start ``fn(*args)`` in the plane's nursery of session tasks (which must not
        raise: ``DeviceSessionHandler.spawn`` wraps them)."""
        if self._tasks is None:
            raise RuntimeError("the device plane is not serving: no session can run")
        self._tasks.start_soon(fn, *args)

    def key_statements(self, product_id: int) -> list[bytes]:
        """The product's key rotation statements as this process last read them (the key
        cache: no store access; a rotation anywhere reaches it through the event relay)."""
        return self.keys.statements(product_id)

    def keys_trusted_at(self, product_id: int, applied: int, current: SigningKey) -> frozenset[str]:
        """The key ids a device of the product trusts once it applied its first ``applied``
        key rotation statements (``current``: the product's key when it has none), computed
        once per statements read and sequence (a fleet-wide release asks for every device)."""
        snapshot = self.keys.cached(product_id)
        if snapshot is None or snapshot.key.key_id != current.key_id:
            # ``current`` is not the cached key (read before a refresh): compute afresh.
            statements = [] if snapshot is None else snapshot.statements
            if not statements:
                return frozenset({current.key_id})
            applied = min(max(applied, 0), len(statements))
            return frozenset(trusted_key_ids(statements, current, applied))
        return snapshot.trusted_at(applied)

    # -- DeviceDirectory -------------------------------------------------------------------

    async def authorize(self, certificate: ClientCertificate) -> bool:
        """A device may connect when it belongs to a product and the certificate it
        presented is not revoked (``server.authorization.may_connect``)."""
        return await self.fleet.authorize_device(certificate)

    async def authorize_restored(
        self, certificates: list[ClientCertificate]
    ) -> list[bool | None]:
        """:meth:`authorize` for the sessions restored after a graceful restart, all in
        one read (``server.devices.restored_auth``); None for a certificate to ask
        :meth:`authorize` alone (never recorded as seen)."""

        def read() -> list[bool | None]:
            with self.fleet.store.read() as tx:
                return authorize_restored(tx, certificates)

        return await trio.to_thread.run_sync(read, limiter=self.fleet.limiter)

    # -- sessions --------------------------------------------------------------------------

    def handler_factory(self, session: DeviceSession) -> DeviceSessionHandler:
        """One handler per authenticated session."""
        return DeviceSessionHandler(self, session)

    def presence_token(self) -> str:
        """A new session's name in the store's presence column: unique among the sessions
        of every server process sharing the store."""
        return f"{self.origin}/{next(self._session_serials)}"

    @property
    def sessions(self) -> LiveDevices:
        """Device id -> live session handler (read-only; see ``live``)."""
        return self.live

    def on_session_end(self, handler: DeviceSessionHandler) -> None:
        """A session's run ended: it leaves the registry at once (the transport, which
        would drop it once the handler has returned, then finds it gone), so it is no
        longer its device's live session while its last store writes run; then the engine
        forgets what it held for the device unless a newer session owns it."""
        self.registry.unregister(handler.session)  # a newer session of the device stays
        if self.ota is not None:
            self.ota.detach_session(handler)

    def on_session_start(self, handler: DeviceSessionHandler) -> None:
        """Give the OTA engine its per-session hooks."""
        if self.ota is not None:
            self.ota.attach_session(handler)

    async def on_device_event(self, handler: DeviceSessionHandler, event: Event) -> bool:
        """Events with a meaning for the cloud (availability, reset, update results); False
        when the event could not be recorded (the device should report it again)."""
        if self.ota is not None:
            return bool(await self.ota.on_device_event(handler, event))
        return True

    async def _close_revoked_sessions(self) -> None:
        """Close the live session of every device whose certificates get revoked."""
        while True:  # a subscriber that fell behind is dropped by the bus: subscribe again
            with self.bus.subscribe(name_prefix=DEVICE_REVOKED, cloud_only=True) as subscription:
                async for event in subscription.receive:
                    if event.device_id and self.registry.close_device(
                        event.device_id, CloseReason.REVOKED
                    ):
                        log.info("closed the session of revoked device %s", event.device_id,
                                 extra={"event": "session_closed_revoked",
                                        "device_id": event.device_id,
                                        "product_id": event.product_id})

    # -- listeners -------------------------------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[DeviceServer]) -> None:
        """Run the TLS and DTLS listeners until cancelled."""
        directory = pki_dir(self.config.data_dir)
        config = self.config
        await trio.to_thread.run_sync(
            partial(init_pki, directory, dns_names=config.tuning.server_dns_names,
                    ip_addresses=config.tuning.server_ip_addresses)
        )
        listener_config = DeviceServerConfig(
            pki_dir=directory, host=config.host, tcp_port=config.port,
            udp_port=config.port if config.udp_port is None else config.udp_port,
            limits=config.limits, reuse_port=config.reuse_port,
            server_dns_names=config.tuning.server_dns_names,
            server_ip_addresses=config.tuning.server_ip_addresses,
            dtls_queue_size=config.tuning.dtls_queue_size,
            udp_buffer_bytes=config.tuning.udp_buffer_bytes,
            save_dtls_sessions=config.tuning.save_dtls_sessions,
            saved_session_max_age=config.tuning.saved_session_max_age,
        )
        async with trio.open_nursery() as nursery:
            self._tasks = nursery
            nursery.start_soon(self.timers.run)
            nursery.start_soon(self._close_revoked_sessions)
            # The keys are read (an older release's key files imported) before any device
            # connects: its Hello answer carries the statements.
            await nursery.start(self.keys.run, self.bus)
            self.server = await nursery.start(
                partial(serve_devices, listener_config, self.handler_factory, self,
                        registry=self.registry, timers=self.timers)
            )
            task_status.started(self.server)
