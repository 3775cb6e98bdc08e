"""The OTA engine: decide what each connected device needs, and deliver it.

On every Hello/Describe (and when a release, a lock with "flash now" or a development flash
asks for it) a session's updater computes the device's target with the precedence engine,
plans the modules to send (Device OS parts the application depends on first, in dependency
order, never a downgrade; then the application), offers each one with its signed manifest
and streams it with the windowed, resumable transfer protocol (``otacore.transfer``). At
most ``max_concurrent_transfers`` transfers run in the process at once, so an immediate
release to every online device does not stampede the server.
"""
from __future__ import annotations

import itertools
import logging
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING

import trio

from otacore.downgrade import authorize_downgrade
from otacore.errors import OtaError, PayloadSchemaError
from otacore.messages import Event, Hello
from otacore.module import parse_module
from otacore.platforms import ModuleFunction
from otacore.precedence import TargetReason
from otacore.protocol.ota_wire import (
    RESET_PENDING_EVENT,
    UPDATE_RESULT_EVENT,
    UPDATES_ENABLED_EVENT,
    UpdateResult,
    parse_update_result,
)
from otacore.signing import Manifest, SigningKey, manifest_for_module, sign_manifest
from otacore.transfer import PreparedFile
from otacore.transfer.module_plan import (
    CannotPlan,
    CatalogEntry,
    NeedCatalog,
    NeedModule,
    installed_modules,
    plan_modules,
)
from otacore.transfer.planner import (
    DeliveryPolicy,
    downgrade_needs_authorization,
)
from server import metrics
from server.devices.compression import CompressedImageCache
from server.devices.deltas import DeltaCache
from server.devices.live import Updaters
from server.devices.once_cache import OnceCache
from server.devices.session import DeviceSessionHandler
from server.devices.tally import Tally
from server.events import FIRMWARE_RELEASED, FLASH_REQUESTED, UPDATES_FORCED
from server.fleet.base import Outcome
from server.fleet.rollouts import ROLLOUT_EVENT_PREFIX
from server.fleet.windows import WINDOW_CHANGED, window_change_cleared
from server.store import Tx
from server.store.tx_ota import OtaMemoryRecord

if TYPE_CHECKING:
    from server.devices.plane import DevicePlane
    from server.fleet import DeviceTarget

from server.devices.delivery import (  # noqa: F401 - OtaConfig and SentFile are re-exported
    Delivery,
    DowngradePolicy,
    OtaConfig,
    PlannedModule,
    SentFile,
)
from server.devices.updater import SessionUpdater

log = logging.getLogger("ota.engine")
#: The cloud events the engine acts on (see OtaEngine.watch_requests).
_WATCHED = (FLASH_REQUESTED, UPDATES_FORCED, FIRMWARE_RELEASED)
#: Rollout events (``ota/rollout/<kind>``) after which a product's devices re-check.
_ROLLOUT_KICKS = frozenset({"started", "phase_started", "resumed", "aborted"})


class OtaEngine:
    """Per-process update orchestration over the device plane's sessions."""

    def __init__(self, plane: DevicePlane, config: OtaConfig | None = None) -> None:
        self.plane = plane
        self.fleet = plane.fleet
        self.config = config or OtaConfig()
        self.limiter = trio.CapacityLimiter(self.config.max_concurrent_transfers)
        self._prepared: OrderedDict[tuple[str, int], PreparedFile] = OrderedDict()
        #: (product, image SHA-256, signing key id) -> manifest, signed once: a rotation
        #: changes the key, so nothing signed by a retired key is offered after it.
        self._manifests: dict[tuple[int, str, str], tuple[Manifest, bytes]] = {}
        #: Stored images by SHA-256, parsed (see module()).
        self._modules: OnceCache[str, PlannedModule] = OnceCache(self.config.image_cache)
        #: Images a device refused or rolled back from: not offered again to it (until
        #: the server restarts or the target changes).
        self.failed: dict[str, set[str]] = {}
        #: The image each device was last sent, to attribute its update result.
        self.delivered: dict[str, Delivery] = {}
        #: Device -> SHA-256 of the application of the update it is going through: one
        #: update (one "started", one outcome) even when Device OS modules go first.
        self.updating: dict[str, str] = {}
        self._serials = itertools.count(1)
        #: Delta patches per (base, target), shared by every device on the same base.
        self.deltas = DeltaCache(self.fleet, threads=self.config.delta_threads,
                                 max_ratio=self.config.delta_max_ratio,
                                 effort=self.config.delta_effort,
                                 codec=self.config.delta_codec,
                                 workers=self.config.delta_threads_per_patch,
                                 format_version=self.config.delta_format_version)
        #: zstd frames of full images, for devices that announce compressed OTA.
        self.compressed = CompressedImageCache(max_ratio=self.config.compressed_max_ratio)
        #: Events of each watched name (flash requests, forced updates, releases) handled
        #: so far: the kicks they cause are asked before the count moves (a causal marker,
        #: server.devices.tally; with SessionUpdater.handled it tells when the engine has
        #: acted on a release).
        self.handled: dict[str, Tally] = {name: Tally() for name in _WATCHED}
        #: Rollout events handled (kicks asked) so far: a causal marker, as ``handled``.
        self.rollout_events_handled = Tally()
        #: Window changes (``ota/window/changed``) handled so far: a causal marker.
        self.window_events_handled = Tally()
        #: The planner's settings, rebuilt when ``config`` is replaced (see delivery_policy).
        self._policy: tuple[OtaConfig, DeliveryPolicy] | None = None
        plane.ota = self

    @property
    def updaters(self) -> Updaters:
        """Device id -> updater of each live session in this process: a read-only view of
        the plane's one registry of live sessions (each updater is its handler's)."""
        return self.plane.live.updaters

    @property
    def delivery_policy(self) -> DeliveryPolicy:
        """The delivery planner's settings from the current ``config``."""
        if self._policy is None or self._policy[0] is not self.config:
            self._policy = (self.config, self.config.delivery_policy)
        return self._policy[1]

    # -- plane hooks ------------------------------------------------------------------------

    def attach_session(self, handler: DeviceSessionHandler) -> None:
        """Give a new session its updater, whose task (started on demand) loads the
        device's memory now, then runs while kicks call for checks."""
        updater = SessionUpdater(self, handler)
        handler.updater = updater
        handler.extra_routes += (updater.route,)
        handler.instant_routes += (updater.route_now,)
        handler.on_hello += (updater.on_session_news,)
        updater.start()

    def detach_session(self, handler: DeviceSessionHandler) -> None:
        """A session ends: its updater ends with it, and the device's memory is forgotten
        (the store keeps it for the next session) unless a newer session's updater holds
        it. Called as the session's run ends, once it left the registry (which holds
        the newer session if one replaced it)."""
        owner = self.plane.live.get(handler.device_id)
        if owner is None or owner is handler or owner.updater is None:
            # A newer session without an updater yet loads the memory anew when it gets one.
            self._forget_memory(handler.device_id)

    async def load_memory(self, device_id: str) -> None:
        """Take the device's memory from the store (a new session: the store is the truth;
        the device may last have been served by another process, or before a restart)."""
        handler = self.plane.live.get(device_id)
        # The memory the session's presence write read, if it is there (server.fleet.hand_off).
        memory = (None if handler is None
                  else self.fleet.memory_hand_off.take(handler.presence, device_id))
        if memory is None:
            memory = await self.fleet.load_ota_memory(device_id)
        self._forget_memory(device_id)
        if memory.refused:
            self.failed[device_id] = set(memory.refused)
        if memory.delivered_sha256 is not None:
            # Session 0: delivered before any session of this process.
            self.delivered[device_id] = Delivery(memory.delivered_sha256, memory.delivered_final,
                                                 0, memory.delivered_awaited)
        if memory.updating_sha256 is not None:
            self.updating[device_id] = memory.updating_sha256

    def _forget_memory(self, device_id: str) -> None:
        """Drop this process's copy of the device's memory (the store keeps it)."""
        self.failed.pop(device_id, None)
        self.delivered.pop(device_id, None)
        self.updating.pop(device_id, None)

    async def save_memory(self, device_id: str, *with_: Callable[[Tx], Outcome]) -> None:
        """Write the device's memory through to the store (after every change), in one
        transaction with the fleet writes ``with_`` that record the same change."""
        delivery = self.delivered.get(device_id)
        await self.fleet.save_ota_memory(OtaMemoryRecord(
            device_id,
            updating_sha256=self.updating.get(device_id),
            delivered_sha256=delivery.sha256 if delivery is not None else None,
            delivered_final=delivery.final if delivery is not None else False,
            delivered_awaited=delivery.awaited if delivery is not None else False,
            refused=tuple(sorted(self.failed.get(device_id, ()))),
        ), *with_)

    async def on_device_event(self, handler: DeviceSessionHandler, event: Event) -> bool:
        """Availability changes, held resets and update results reported by devices; False
        when an update result could not be recorded in time (it is not acknowledged)."""
        device_id = handler.device_id
        if event.name == UPDATES_ENABLED_EVENT:
            await self.fleet.set_updates_enabled(device_id, event.data == "true")
            updater = self.plane.live.updater(device_id)
            if updater is not None and event.data == "true":
                updater.kick()
        elif event.name == RESET_PENDING_EVENT:
            log.info("device %s holds its reset: %s", device_id, event.data)
            await self.fleet.set_reset_pending(device_id, True)  # the API shows it
        elif event.name == UPDATE_RESULT_EVENT:
            try:
                result = parse_update_result(event.data)
            except PayloadSchemaError as exc:
                log.info("device %s sent a bad update result: %s", device_id, exc)
                return True  # acknowledged: sending it again would not make it better
            updater = self.plane.live.updater(device_id)
            # Shielded (bounded): the device reported how its update ended; recording that
            # must not be lost when the session closes meanwhile.
            with trio.move_on_after(self.config.record_timeout, shield=True) as scope:
                if updater is not None:
                    await updater.memory_loaded.wait()
                await self._on_update_result(device_id, result, handler.product_id)
            if updater is not None:
                updater.result_seen.set()
            if scope.cancelled_caught:
                log.warning("the update result of %s was not recorded within %g s",
                            device_id, self.config.record_timeout)
                return False
        return True

    async def _rollout_result(self, product_id: int | None, device_id: str,
                              outcome: str) -> list[Callable[[Tx], Outcome]]:
        """The store work recording how the device's update ended in the rollout that has
        its firmware in flight, if the product may have one (issue 15: a rollback after
        boot counts as a failure, never as a success)."""
        fleet = self.fleet
        if product_id is None or not await fleet.rollouts_may_steer(product_id):
            return []
        return [fleet.device_result_work(product_id, device_id, outcome)]

    async def _on_update_result(self, device_id: str, result: UpdateResult,
                                product_id: int | None = None) -> None:
        delivery = self.delivered.pop(device_id, None)
        if delivery is None:
            # Nothing awaits a result (the memory is durable): a report already recorded
            # whose acknowledgement the device missed (its link dropped), sent again.
            log.info("device %s repeated an update result already recorded", device_id)
            return
        if result.status == "committed":
            if delivery is not None and not delivery.final:
                # A Device OS module ahead of the application: the update goes on (the
                # session's Describe already kicked its updater).
                log.info("device %s booted Device OS module %s", device_id, delivery.sha256)
                await self.save_memory(device_id)
                return
            self.updating.pop(device_id, None)
            log.info("update of %s finished: it runs %s", device_id, delivery.sha256[:12],
                     extra={"event": "update_finished", "device_id": device_id,
                            "product_id": product_id, "sha256": delivery.sha256})
            await self.save_memory(device_id,
                                   self.fleet.flash_status_work(
                                       device_id, "success", application_sha256=delivery.sha256),
                                   *await self._rollout_result(product_id, device_id, "succeeded"))
            metrics.update_ended("succeeded")
        else:
            if delivery is not None:  # never offer the image it rolled back from again
                self.failed.setdefault(device_id, set()).add(delivery.sha256)
            self.updating.pop(device_id, None)
            # A rollback after its self-test failed, or an image the device refused at boot.
            outcome = "rolled_back" if result.status == "rolled_back" else "image_refused"
            log.info("update of %s failed: %s: %s", device_id, result.status, result.detail,
                     extra={"event": "update_failed", "device_id": device_id,
                            "product_id": product_id, "sha256": delivery.sha256,
                            "reason": f"{result.status}: {result.detail}"[:200]})
            await self.save_memory(device_id, self.fleet.flash_status_work(
                device_id, "failed", error=f"{result.status}: {result.detail}"[:200],
                application_sha256=delivery.sha256 if delivery.final else None),
                *await self._rollout_result(product_id, device_id, outcome))
            metrics.update_ended(outcome)

    async def watch_requests(self) -> None:
        """Push immediate releases and flash requests to the online devices this process
        holds (bounded by the transfer limiter, not by this loop)."""
        # One subscription per event name: the bus filters, so the flood of device events
        # (status, progress) of a large fleet never fills these buffers and drops them.
        async with trio.open_nursery() as nursery:
            for name in _WATCHED:
                nursery.start_soon(self._watch, name)
            nursery.start_soon(self._watch_rollouts)
            nursery.start_soon(self._watch_windows)

    async def _watch_windows(self) -> None:
        """A product's or group's maintenance window was set or cleared (here or in another
        process): the gate knows it from now, and the product's devices a window held
        re-check (a cleared or changed window may let their offer start now). Devices not
        held are left alone: a new window only holds offers not yet started."""
        while True:  # a subscriber that fell behind is dropped by the bus: subscribe again
            with self.plane.bus.subscribe(name_prefix=WINDOW_CHANGED, buffer=256,
                                          cloud_only=True) as subscription:
                async for event in subscription.receive:
                    if event.name == WINDOW_CHANGED and event.product_id is not None:
                        self.fleet.note_window_change(event.product_id,
                                                      window_change_cleared(event.data))
                        for updater in list(self.updaters.values()):
                            if (updater.handler.product_id == event.product_id
                                    and updater.rollout_retry_at is not None):
                                updater.kick()
                    self.window_events_handled.add()

    async def _watch_rollouts(self) -> None:
        """A rollout's phase started, it started or resumed: the product's online devices
        re-check their targets (as at an immediate release); it aborted: they re-check too,
        and a transfer of its firmware in progress is cancelled (the device discards it)."""
        while True:  # a subscriber that fell behind is dropped by the bus: subscribe again
            with self.plane.bus.subscribe(name_prefix=ROLLOUT_EVENT_PREFIX, buffer=4096,
                                          cloud_only=True) as subscription:
                async for event in subscription.receive:
                    kind = event.name.removeprefix(ROLLOUT_EVENT_PREFIX)
                    if kind in _ROLLOUT_KICKS and event.product_id is not None:
                        # Maybe another process's rollout: this one consults it from now.
                        self.fleet.note_rollout_product(event.product_id)
                        for updater in list(self.updaters.values()):
                            if updater.handler.product_id == event.product_id:
                                updater.kick()
                    self.rollout_events_handled.add()

    async def _watch(self, name: str) -> None:
        while True:  # a subscriber that fell behind is dropped by the bus: subscribe again
            # The cloud's own events only: a device's or an API client's event of the same
            # name must not push releases or clear refusals (reserved names are refused at
            # the door; this holds even if one slipped through).
            with self.plane.bus.subscribe(name_prefix=name, buffer=4096,
                                          cloud_only=True) as subscription:
                async for event in subscription.receive:
                    if event.name != name:
                        continue  # a longer name that shares the prefix
                    if event.name == FLASH_REQUESTED and event.device_id:
                        # The operator asks anew: images the device refused may be offered
                        # again (the store forgot them in the same transaction).
                        self.failed.pop(event.device_id, None)
                        self.kick(event.device_id)
                    elif event.name == UPDATES_FORCED and event.device_id:
                        self.kick(event.device_id)  # the updater tells the device "forced"
                    elif event.name == UPDATES_FORCED and event.product_id is not None:
                        # Product-wide forced updates: every session of the product re-checks.
                        for updater in list(self.updaters.values()):
                            if updater.handler.product_id == event.product_id:
                                updater.kick()
                    elif event.name == FIRMWARE_RELEASED and event.product_id is not None:
                        # Any release may change targets: views read before it are stale
                        # (a standard one reaches devices at their next handshake).
                        for updater in list(self.updaters.values()):
                            if updater.handler.product_id == event.product_id:
                                updater.forget_view()
                        await self._push_release(event.product_id, event.data or "")
                    self.handled[name].add()

    async def _push_release(self, product_id: int, data: str) -> None:
        if '"immediate": true' not in data and '"immediate":true' not in data:
            return  # standard release: devices get it at their next handshake
        read_at = trio.current_time()
        try:
            views = await self.fleet.online_devices_needing_update(product_id,
                                                                   immediate_only=True)
        except OtaError as exc:
            # The one grouped read failed (the database locked or away): every session of
            # the product checks for itself instead, each reading its own target (and
            # retrying on a store error), so the release is not dropped.
            log.warning("immediate release of product %s: %s; each of its sessions checks "
                        "for itself", product_id, exc)
            for session_updater in list(self.updaters.values()):
                if session_updater.handler.product_id == product_id:
                    session_updater.kick()
            return
        for view in views:
            # Each updater plans from the view read here for all: one store read for the
            # release, not one per device (see SessionUpdater.kick for when it is dropped).
            updater = self.plane.live.updater(view.device.id)
            if updater is not None:
                updater.kick_with(view, read_at)

    def kick(self, device_id: str) -> None:
        """Re-check a device's target now, if this process holds its session."""
        updater = self.plane.live.updater(device_id)
        if updater is not None:
            updater.kick()

    # -- shared, cached artefacts -------------------------------------------------------------

    def prepared(self, image: bytes, sha256: str, chunk_size: int) -> PreparedFile:
        """Chunk CRCs of an image, computed once and shared by every device getting it."""
        key = (sha256, chunk_size)
        prepared = self._prepared.get(key)
        if prepared is None:
            prepared = PreparedFile(image, chunk_size)
            self._prepared[key] = prepared
            while len(self._prepared) > self.config.prepared_cache:
                self._prepared.popitem(last=False)
        else:
            self._prepared.move_to_end(key)
        return prepared

    def signed_manifest(self, product_id: int, product_version: int | None,
                        module: PlannedModule, signing_key: SigningKey) -> bytes:
        """The manifest of an image signed with ``signing_key`` (the product's, as
        server.devices.key_sync.offer_signing_key chose it; signed once, then cached)."""
        return self._manifest(product_id, product_version, module, signing_key)[1]

    def _manifest(self, product_id: int, product_version: int | None,
                  module: PlannedModule, signing_key: SigningKey) -> tuple[Manifest, bytes]:
        key = (product_id, module.sha256, signing_key.key_id)
        cached = self._manifests.get(key)
        if cached is None:
            manifest = manifest_for_module(module.image, product_id=product_id,
                                           product_version=product_version)
            signed = sign_manifest(signing_key, manifest)
            cached = (signed.manifest, signed.to_bytes())
            self._manifests[key] = cached
        return cached

    def downgrade_authorization(self, view: DeviceTarget, hello: Hello | None,
                                product_version: int | None, module: PlannedModule,
                                signing_key: SigningKey) -> bytes | None:
        """A downgrade authorisation for this device when ``module`` (the device's target)
        is an application older than the one the device has run (its Hello's version and
        anti-rollback floor) and the downgrade policy allows it: with ``device``, only a
        pending flash (product firmware or a development binary) or a lock; with
        ``targeted`` any target; with ``never`` none. Without one the device refuses the
        older application (otacore.downgrade)."""
        if module.info.module_function != ModuleFunction.USER_PART or hello is None:
            return None
        policy = self.config.downgrades
        per_device = (view.pending_flash is not None
                      or view.target.reason == TargetReason.LOCKED)
        if policy is DowngradePolicy.NEVER or (policy is DowngradePolicy.DEVICE
                                               and not per_device):
            return None
        manifest, _ = self._manifest(view.product.id, product_version, module, signing_key)
        device_version = max(hello.product_version, hello.app_version_floor or 0)
        if not downgrade_needs_authorization(
                policy, application=True, per_device=per_device,
                target_version=manifest.product_version, device_version=device_version):
            return None  # no downgrade: the manifest alone will do
        signed = authorize_downgrade(
            signing_key, manifest, device_id=view.device.id, from_version=device_version,
            issued_at_ms=self.fleet.clock(),
            lifetime_ms=round(self.config.downgrade_lifetime * 1000),
        )
        log.info("device %s: authorised the downgrade from version %d to %d until %d ms",
                 view.device.id, device_version, manifest.product_version,
                 signed.authorization.expires_at_ms)
        return signed.to_bytes()

    # -- planning ---------------------------------------------------------------------------

    async def module(self, sha256: str) -> PlannedModule:
        """A stored image by its SHA-256, parsed, kept in memory (bounded) once read: blobs
        are content-addressed, so a copy never goes stale, and a fleet-wide release reads
        and parses each image once instead of once per device (concurrent askers wait for
        the first one's read)."""

        async def load() -> PlannedModule:
            image = await self.fleet.device_os_binary(sha256)  # any stored blob, verified
            return PlannedModule(image, sha256, parse_module(image))

        return await self._modules.get(sha256, load)

    async def plan(self, view: DeviceTarget) -> list[PlannedModule] | str:
        """The modules to send, Device OS first; or a reason why nothing can be sent. The
        planner (otacore.transfer.planner.plan_modules) decides; this shell fetches what
        it asks for: the platform's stored Device OS modules and the parsed images."""
        sha256 = self.fleet.binary_sha256_for(view)
        if sha256 is None:
            return "the target firmware is missing"
        app = await self.module(sha256)
        installed = installed_modules(view.device.modules)
        # The product's platform, never the one the device reported: Device OS modules of
        # another platform must not reach it (the session refuses such a Hello anyway).
        platform = view.product.platform_id
        catalog: list[CatalogEntry] | None = None  # read only when a dependency is unmet
        parts: dict[str, PlannedModule] = {sha256: app}
        while True:
            planned = plan_modules(sha256, app.info, installed, catalog=catalog,
                                   parsed={key: part.info for key, part in parts.items()})
            if isinstance(planned, NeedCatalog):
                catalog = [CatalogEntry.from_record(entry)
                           for entry in await self.fleet.list_device_os(platform)]
            elif isinstance(planned, NeedModule):
                parts[planned.sha256] = await self.module(planned.sha256)
            elif isinstance(planned, CannotPlan):
                return planned.reason
            else:
                return [parts[key] for key in planned.sha256s]
