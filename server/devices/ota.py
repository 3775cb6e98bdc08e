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

import contextlib
import itertools
import logging
import math
import secrets
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import trio

from otacore.coap import BlockOption, Code, Message, MessageType, block_slice, szx_for_size
from otacore.errors import OtaError, PayloadSchemaError
from otacore.messages import Event
from otacore.module import ModuleInfo, dependency_met, parse_module
from otacore.platforms import ModuleFunction
from otacore.protocol.ota_wire import (
    OFFER_ACCEPTED,
    OFFER_UNAVAILABLE,
    PATH_FIRMWARE,
    RESET_PENDING_EVENT,
    UPDATE_RESULT_EVENT,
    UPDATES_ENABLED_EVENT,
    UPDATES_FORCED_EVENT,
    UPDATES_PENDING_EVENT,
    UpdateResult,
    is_transfer,
    offer_request,
    parse_transfer,
    parse_update_result,
    transfer_request,
)
from otacore.signing import manifest_for_module, sign_manifest
from otacore.transfer import (
    PreparedFile,
    TransferCompleted,
    TransferFailed,
    TransferMessage,
    TransferProgress,
    TransferProtocolError,
    TransferSender,
)
from server.devices.deltas import DeltaCache, DeltaOffer
from server.devices.keys import product_signing_key
from server.devices.session import DeviceSessionHandler, DeviceUnreachableError
from server.events import FIRMWARE_RELEASED, FLASH_REQUESTED, UPDATES_FORCED
from server.transport.session import SessionClosed

if TYPE_CHECKING:
    from server.devices.plane import DevicePlane
    from server.fleet import DeviceTarget

log = logging.getLogger("ota.engine")


@dataclass(frozen=True)
class OtaConfig:
    """How updates are delivered."""

    max_concurrent_transfers: int = 512
    udp_chunk_size: int = 1024
    tcp_chunk_size: int = 8192
    #: Chunks in flight beyond the acknowledged ones (the device may ask for fewer).
    window_limit: int = 64
    offer_timeout: float = 30.0
    #: Persist transfer progress every this many bytes (not per chunk).
    progress_step: int = 32 * 1024
    #: Prepared files (chunk CRCs) kept for reuse across devices.
    prepared_cache: int = 16
    #: After a Hello, wait this long for the session's Describe before planning from the
    #: modules an earlier session reported (a device that sends none is served anyway).
    describe_wait: float = 5.0
    #: In the first session after a delivered image, wait this long for the device to
    #: report how it booted (UPDATE_RESULT_EVENT) before planning again, so an image it
    #: rolled back from is not re-offered.
    result_wait: float = 5.0
    #: Send a delta patch only when it is at most this fraction of the full image.
    delta_max_ratio: float = 0.8
    #: Worker threads computing delta patches at once (CPU bound; bounded so a release to a
    #: large fleet does not starve the event loop's store threads).
    delta_threads: int = 1


@dataclass(frozen=True)
class Delivery:
    """An image a device validated and is about to boot (or booted without reporting yet)."""

    sha256: str
    #: True for the last module of its update (the application); False for a Device OS
    #: module sent ahead of it, whose success is a step, not the end, of the update.
    final: bool
    #: Serial of the session that delivered it (see SessionUpdater.serial).
    session: int
    #: True once a later session waited for its result (each delivery costs one wait).
    awaited: bool = False


@dataclass(frozen=True)
class PlannedModule:
    """One module to deliver."""

    image: bytes
    sha256: str
    info: ModuleInfo


class OtaEngine:
    """Per-process update orchestration over the device plane's sessions."""

    def __init__(self, plane: DevicePlane, config: OtaConfig | None = None) -> None:
        self.plane = plane
        self.fleet = plane.fleet
        self.config = config or OtaConfig()
        self.limiter = trio.CapacityLimiter(self.config.max_concurrent_transfers)
        self._prepared: OrderedDict[tuple[str, int], PreparedFile] = OrderedDict()
        self._manifests: dict[tuple[int, str], bytes] = {}
        #: Images a device refused or rolled back from: not offered again to it (until
        #: the server restarts or the target changes).
        self.failed: dict[str, set[str]] = {}
        self.updaters: dict[str, SessionUpdater] = {}
        #: The image each device was last sent, to attribute its update result.
        self.delivered: dict[str, Delivery] = {}
        #: Device -> SHA-256 of the application of the update it is going through: one
        #: update (one "started", one outcome) even when Device OS modules go first.
        self.updating: dict[str, str] = {}
        self._serials = itertools.count(1)
        #: Delta patches per (base, target), shared by every device on the same base.
        self.deltas = DeltaCache(self.fleet, threads=self.config.delta_threads,
                                 max_ratio=self.config.delta_max_ratio)
        plane.ota = self

    # -- plane hooks ------------------------------------------------------------------------

    def attach_session(self, handler: DeviceSessionHandler, nursery: trio.Nursery) -> None:
        """Give a new session its updater task (in the session's own nursery)."""
        updater = SessionUpdater(self, handler)
        self.updaters[handler.device_id] = updater
        handler.extra_routes.append(updater.route)
        handler.on_hello.append(updater.kick)
        nursery.start_soon(updater.run)

    def detach_session(self, handler: DeviceSessionHandler) -> None:
        """Forget a session's updater when the session ends (a newer one may own the id)."""
        updater = self.updaters.get(handler.device_id)
        if updater is not None and updater.handler is handler:
            del self.updaters[handler.device_id]

    async def on_device_event(self, handler: DeviceSessionHandler, event: Event) -> None:
        """Availability changes, held resets and update results reported by devices."""
        device_id = handler.device_id
        if event.name == UPDATES_ENABLED_EVENT:
            await self.fleet.set_updates_enabled(device_id, event.data == "true")
            updater = self.updaters.get(device_id)
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
                return
            await self._on_update_result(device_id, result)
            updater = self.updaters.get(device_id)
            if updater is not None:
                updater.result_seen.set()

    async def _on_update_result(self, device_id: str, result: UpdateResult) -> None:
        delivery = self.delivered.pop(device_id, None)
        if result.status == "committed":
            if delivery is not None and not delivery.final:
                # A Device OS module ahead of the application: the update goes on (the
                # session's Describe already kicked its updater).
                log.info("device %s booted Device OS module %s", device_id, delivery.sha256)
                return
            self.updating.pop(device_id, None)
            await self.fleet.record_flash_status(device_id, "success")
        else:
            if delivery is not None:  # never offer the image it rolled back from again
                self.failed.setdefault(device_id, set()).add(delivery.sha256)
            self.updating.pop(device_id, None)
            await self.fleet.record_flash_status(
                device_id, "failed", error=f"{result.status}: {result.detail}"[:200])

    async def watch_requests(self) -> None:
        """Push immediate releases and flash requests to the online devices this process
        holds (bounded by the transfer limiter, not by this loop)."""
        while True:  # a subscriber that fell behind is dropped by the bus: subscribe again
            with self.plane.bus.subscribe(name_prefix="") as subscription:
                async for event in subscription.receive:
                    if event.name in (FLASH_REQUESTED, UPDATES_FORCED) and event.device_id:
                        self.kick(event.device_id)  # the updater tells the device "forced"
                    elif event.name == UPDATES_FORCED and event.product_id is not None:
                        # Product-wide forced updates: every session of the product re-checks.
                        for updater in list(self.updaters.values()):
                            if updater.handler.product_id == event.product_id:
                                updater.kick()
                    elif event.name == FIRMWARE_RELEASED and event.product_id is not None:
                        await self._push_release(event.product_id, event.data or "")

    async def _push_release(self, product_id: int, data: str) -> None:
        if '"immediate": true' not in data and '"immediate":true' not in data:
            return  # standard release: devices get it at their next handshake
        try:
            views = await self.fleet.online_devices_needing_update(product_id,
                                                                   immediate_only=True)
        except OtaError as exc:
            log.warning("immediate release of product %s: %s", product_id, exc)
            return
        for view in views:
            self.kick(view.device.id)

    def kick(self, device_id: str) -> None:
        """Re-check a device's target now, if this process holds its session."""
        updater = self.updaters.get(device_id)
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
                        module: PlannedModule) -> bytes:
        """The product-key-signed manifest of an image (signed once, then cached)."""
        key = (product_id, module.sha256)
        signed = self._manifests.get(key)
        if signed is None:
            signing_key = product_signing_key(self.plane.config.data_dir, product_id)
            manifest = manifest_for_module(module.image, product_id=product_id,
                                           product_version=product_version)
            signed = sign_manifest(signing_key, manifest).to_bytes()
            self._manifests[key] = signed
        return signed

    # -- planning ---------------------------------------------------------------------------

    async def plan(self, view: DeviceTarget) -> list[PlannedModule] | str:
        """The modules to send, Device OS first; or a reason why nothing can be sent."""
        binary = await self.fleet.binary_for(view)
        if binary is None:
            return "the target firmware is missing"
        sha256, image = binary
        app = PlannedModule(image, sha256, parse_module(image))
        installed = {
            (int(m["function"]), int(m["index"])): int(m["version"])
            for m in (view.device.modules or [])
        }
        platform = view.device.platform_id or view.product.platform_id
        catalog = await self.fleet.list_device_os(platform)
        plan: list[PlannedModule] = []
        # Dependencies first, deepest first: a system part may need a newer bootloader.
        pending = list(app.info.dependencies)
        needed: list[tuple[int, int, int]] = []
        while pending:
            dep = pending.pop()
            triples = [(f, i, v) for (f, i), v in installed.items()]
            if dependency_met(dep, triples) or (dep.function, dep.index) in {
                (f, i) for f, i, _ in needed
            }:
                continue
            candidates = [
                m for m in catalog
                if m["module_function"] == dep.function and m["module_index"] == dep.index
                and m["module_version"] >= dep.version
                # Never downgrade Device OS: only newer than what runs.
                and m["module_version"] > installed.get((dep.function, dep.index), -1)
            ]
            if not candidates:
                return (f"needs {ModuleFunction(dep.function).name.lower()} {dep.index} "
                        f"version >= {dep.version}, which no stored Device OS module provides")
            chosen = min(candidates, key=lambda m: m["module_version"])
            needed.append((dep.function, dep.index, chosen["module_version"]))
            blob = await self.fleet.device_os_binary(chosen["sha256"])
            module = PlannedModule(blob, chosen["sha256"], parse_module(blob))
            plan.insert(0, module)
            pending.extend(module.info.dependencies)
        return [*plan, app]


class SessionUpdater:
    """The update side of one device session: its inbox of transfer messages and the task
    that runs its updates one module at a time."""

    def __init__(self, engine: OtaEngine, handler: DeviceSessionHandler) -> None:
        self.engine = engine
        self.handler = handler
        self.device_id = handler.device_id
        self._inbox_send, self._inbox = trio.open_memory_channel[TransferMessage](256)
        self._kicked = trio.Event()
        self.sender: TransferSender | None = None
        #: Set when the device reports an update result in this session.
        self.result_seen = trio.Event()
        #: Sessions are numbered in the order they start (a delivery names its session).
        self.serial = next(engine._serials)
        #: True once the device validated an image in this session: it applies it at its
        #: (possibly held) reset, and its next session continues the update.
        self.staged = False
        #: What the device was told about forced updates (None: nothing yet; a device
        #: boots not forced).
        self._told_forced: bool | None = None

    def kick(self) -> None:
        """Ask the updater to re-check the device's target."""
        self._kicked.set()

    async def route(self, message: Message) -> bool:
        """Take the requests that belong to updates: transfer messages and firmware GETs."""
        if is_transfer(message):
            try:
                transfer_message = parse_transfer(message)
            except TransferProtocolError as exc:
                self.handler._violation(f"bad transfer message: {exc}")
                return True
            if message.type is MessageType.CON:
                self.handler._respond(message, Code.CHANGED)
            # The transfer protocol recovers lost messages: never queue unboundedly.
            with contextlib.suppress(trio.WouldBlock):
                self._inbox_send.send_nowait(transfer_message)
            return True
        path = message.uri_path
        if message.code == Code.GET and len(path) == 2 and path[0] == PATH_FIRMWARE:
            await self._serve_firmware_block(message, path[1])
            return True
        return False

    async def _serve_firmware_block(self, message: Message, sha256: str) -> None:
        """Plain CoAP Block2 download (RFC 7959 2.4) of a firmware the device may run."""
        handler = self.handler
        product_id = handler.product_id
        platform = handler.hello.platform_id if handler.hello else None
        if product_id is None or platform is None:
            # A stock client sends no Hello: the device record (or its product) says which
            # platform's Device OS modules it may fetch.
            view = await handler.plane.fleet.target_for_device(self.device_id)
            product_id = view.product.id
            platform = platform or view.device.platform_id or view.product.platform_id
        try:
            image = await handler.plane.fleet.blob_for_product(product_id, platform,
                                                               sha256.lower())
        except OtaError:
            image = None
        if image is None:
            handler._respond(message, Code.NOT_FOUND, b"no such firmware for this device")
            return
        block = message.block2
        szx = block.szx if block is not None else szx_for_size(1024)
        num = block.num if block is not None else 0
        if num * (16 << szx) >= max(len(image), 1):
            handler._respond(message, Code.BAD_OPTION, b"block past the end")
            return
        data, more = block_slice(image, num, szx)
        response = Message(MessageType.ACK, Code.CONTENT, payload=data)
        response.set_block2(BlockOption(num, more, szx))
        response.set_uint_option(28, len(image))  # Size2 (RFC 7959 4)
        handler.link.respond(message, response, trio.current_time())
        handler.wake()

    async def run(self) -> None:
        """Serve kicks until the session ends (it is cancelled with the session)."""
        while True:
            await self._kicked.wait()
            self._kicked = trio.Event()
            try:
                await self.update_once()
            except SessionClosed:
                return  # the session is over (this task is about to be cancelled with it)
            except DeviceUnreachableError as exc:
                log.info("device %s stopped answering: %s", self.device_id, exc)
            except OtaError as exc:
                log.warning("update of %s failed: %s", self.device_id, exc)

    async def _settle(self) -> None:
        """Wait (bounded) until what the device reports after a Hello is in: its modules
        (Describe) and the result of an image it was sent; planning earlier would work
        from stale modules or re-offer an image the device just rolled back from."""
        config = self.engine.config
        hello = self.handler.hello
        delivery = self.engine.delivered.get(self.device_id)
        # One wait per delivery, in the first session after it unless the image is still
        # staged (a held reset): a device that never staged it (killed first) or reports
        # no results must not hold up every later session.
        wait_for_result = (delivery is not None and not delivery.awaited
                           and delivery.session < self.serial
                           and not (hello is not None and hello.reset_pending))
        if wait_for_result:
            assert delivery is not None
            self.engine.delivered[self.device_id] = replace(delivery, awaited=True)
        if not self.handler.described.is_set():
            with trio.move_on_after(config.describe_wait):
                await self.handler.described.wait()
        if wait_for_result and not self.result_seen.is_set():
            with trio.move_on_after(config.result_wait):
                await self.result_seen.wait()

    async def _tell_forced(self, forced: bool) -> None:
        """Tell the device whether the cloud forces updates (it refuses offers while
        updates are disabled unless forced); once per change, and at the first check of a
        session when forced."""
        if self._told_forced is None and not forced:
            self._told_forced = False  # its default
            return
        if self._told_forced != forced:
            await self.handler.send_event(UPDATES_FORCED_EVENT, "true" if forced else "false")
            self._told_forced = forced

    async def update_once(self) -> None:
        """Bring the device to its target, one module per call (it resets after each)."""
        engine, fleet, handler = self.engine, self.engine.fleet, self.handler
        await self._settle()
        view = await fleet.target_for_device(self.device_id)
        await self._tell_forced(view.updates_forced)
        if not view.update_needed or self.staged:
            return
        if not view.device.modules:
            return  # nothing is known of its modules yet: its Describe will kick again
        if view.device.reset_pending:
            return  # an image is staged and waits for the device's held reset
        if not view.updates_allowed:
            await handler.send_event(UPDATES_PENDING_EVENT, "true")
            return
        plan = await engine.plan(view)
        if isinstance(plan, str):
            log.warning("cannot update %s: %s", self.device_id, plan)
            return
        refused = engine.failed.get(self.device_id, set())
        for module in plan:
            if module.sha256 in refused:
                return
            installed = {
                (int(m["function"]), int(m["index"])): str(m.get("sha256", ""))
                for m in (view.device.modules or [])
            }
            key = (module.info.module_function, module.info.module_index)
            if installed.get(key) == module.sha256:
                continue  # already runs exactly this image
            await self.deliver(view, module, update_sha256=plan[-1].sha256)
            return  # the device resets into the new module; its next hello continues

    async def deliver(self, view: DeviceTarget, module: PlannedModule, *,
                      update_sha256: str | None = None) -> bool:
        """Offer and stream one module; True when the device validated it.

        ``update_sha256`` names the application the update ends with (``module`` itself
        when None): the update is reported started once, however many modules it takes.
        """
        engine = self.engine
        update_sha256 = update_sha256 or module.sha256
        async with engine.limiter:
            engine.deltas.max_ratio = engine.config.delta_max_ratio
            info = module.info
            delta = await engine.deltas.choose(view, info.module_function, info.module_index,
                                               module.sha256, module.image)
            if delta is not None:
                verdict = await self._offer_and_stream(view, module, update_sha256, delta)
                if verdict is not None:
                    return verdict
                # The device refused the patch (its base is not what it reported, or it
                # takes no deltas): the full image, in the same session.
                engine.deltas.refused.add((self.device_id, delta.base_sha256, module.sha256))
            return bool(await self._offer_and_stream(view, module, update_sha256, None))

    async def _offer_and_stream(self, view: DeviceTarget, module: PlannedModule,
                                update_sha256: str, delta: DeltaOffer | None) -> bool | None:
        """Offer the module (as ``delta`` when given) and stream it; None when the device
        refused a delta offer (the caller falls back to the full image)."""
        engine, handler, fleet = self.engine, self.handler, self.engine.fleet
        config = engine.config
        # Device OS modules carry no product data: their manifest names version 0.
        product_version = (None if module.info.product_version is not None else 0)
        # The signed manifest always describes the target image, delta or not.
        signed = engine.signed_manifest(view.product.id, product_version, module)
        base = bytes.fromhex(delta.base_sha256) if delta is not None else None
        answer = await handler.request(offer_request(signed, delta_base_sha256=base),
                                       config.offer_timeout)
        if answer.code == OFFER_UNAVAILABLE:
            await fleet.set_updates_enabled(self.device_id, False)
            return False
        if answer.code != OFFER_ACCEPTED:
            reason = bytes(answer.payload).decode(errors="replace")[:200]
            if delta is not None:
                log.info("device %s refused a delta from %s: %s", self.device_id,
                         delta.base_sha256, reason)
                return None
            engine.failed.setdefault(self.device_id, set()).add(module.sha256)
            engine.updating.pop(self.device_id, None)
            await fleet.record_flash_status(self.device_id, "failed", error=reason)
            return False
        if engine.updating.get(self.device_id) != update_sha256:
            engine.updating[self.device_id] = update_sha256
            await fleet.record_flash_status(self.device_id, "started")
        while True:  # drop what a previous transfer left in the inbox
            try:
                self._inbox.receive_nowait()
            except trio.WouldBlock:
                break
        chunk_size = (config.tcp_chunk_size if handler.session.transport == "tcp"
                      else (handler.hello.ota_chunk_size if handler.hello and
                            handler.hello.ota_chunk_size else config.udp_chunk_size))
        info = module.info
        prepared = (engine.prepared(module.image, module.sha256, chunk_size) if delta is None
                    else engine.prepared(delta.patch, delta.patch_sha256, chunk_size))
        sender = TransferSender(
            prepared, chunk_size, config.window_limit, secrets.randbits(31),
            module_function=info.module_function, module_index=info.module_index,
            module_version=info.module_version, base_sha256=base,
            progress_step=config.progress_step,
        )
        self.sender = sender
        try:
            return await self._stream(sender, view, module,
                                      final=module.sha256 == update_sha256, delta=delta)
        finally:
            self.sender = None

    async def _stream(self, sender: TransferSender, view: DeviceTarget,
                      module: PlannedModule, *, final: bool, delta: DeltaOffer | None) -> bool:
        outputs: list[Any] = sender.start(trio.current_time())
        while True:
            verdict = await self._emit(outputs, view, module, final=final, delta=delta)
            if verdict is not None:
                return verdict
            deadline = sender.next_deadline()
            message = None
            with trio.move_on_at(math.inf if deadline is None else deadline):
                message = await self._inbox.receive()
            now = trio.current_time()
            outputs = sender.poll(now) if message is None else sender.handle(message, now)

    async def _emit(self, outputs: list[Any], view: DeviceTarget, module: PlannedModule, *,
                    final: bool, delta: DeltaOffer | None) -> bool | None:
        handler, fleet = self.handler, self.engine.fleet
        transfer = "full" if delta is None else "delta"
        sent_size = len(module.image) if delta is None else len(delta.patch)
        verdict: bool | None = None
        for item in outputs:
            if isinstance(item, TransferProgress):
                await fleet.record_update_progress(
                    self.device_id, sha256=module.sha256, version=view.target.version,
                    transfer=transfer, bytes_done=item.bytes_acked, bytes_total=item.total)
            elif isinstance(item, TransferCompleted):
                self.engine.delivered[self.device_id] = Delivery(module.sha256, final,
                                                                 self.serial)
                self.staged = True
                # Shielded: the device resets now and its session may close under us; what
                # happened must still be recorded (two short store writes).
                with trio.CancelScope(shield=True):
                    # The device validated the whole file and applies it at its (next) reset.
                    await fleet.record_update_progress(
                        self.device_id, sha256=module.sha256, version=view.target.version,
                        transfer=transfer, bytes_done=sent_size, bytes_total=sent_size,
                        status="applying")
                    version = _release_version(view)
                    if version is not None:  # the data this release's deltas saved
                        await fleet.record_transfer_bytes(
                            view.product.id, version, self.device_id, bytes_sent=sent_size,
                            bytes_full=len(module.image), delta=delta is not None)
                verdict = True
            elif isinstance(item, TransferFailed):
                log.info("transfer to %s failed: %s", self.device_id, item.reason)
                self.engine.updating.pop(self.device_id, None)
                await fleet.record_flash_status(self.device_id, "failed", error=item.reason)
                verdict = False
            elif hasattr(item, "encode"):
                handler.link.notify(transfer_request(item), trio.current_time())
        await handler.flush()  # backpressure: a slow device slows its own sender
        return verdict


def _release_version(view: DeviceTarget) -> int | None:
    """The product firmware version an update delivers (None for a development binary)."""
    flash = view.pending_flash
    if flash is not None:
        return flash.version if flash.kind == "product" else None
    return view.target.version
