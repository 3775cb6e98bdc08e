"""What device sessions tell the control plane, and what they ask of it.

The device-protocol layer (next issues) calls these from its sessions: hello, describe,
online / offline, updates enabled, certificates; and asks which firmware a device should
run and which online devices need an update after a release. What a device then reports
about an update (transfer progress, flash outcome) is :mod:`server.fleet.update_reports`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any, cast

from otacore.errors import ValidationError
from otacore.platforms import ModuleFunction
from server.authorization import ClientCertificate, KnownCertificate, may_connect
from server.events import DEVICE_REVOKED, STATUS, UPDATES_PENDING, Event
from server.fleet.base import (
    FleetBase,
    Outcome,
    check_version,
    normalize_device_id,
    unknown_device,
)
from server.fleet.devices import updates_pending_for
from server.fleet.errors import WrongPlatformError
from server.fleet.firmware import PRODUCT_FIRMWARE_FUNCTIONS
from server.fleet.presence import PresenceService, offline_events
from server.fleet.roles import Actor, Permission
from server.fleet.targets import UNREAD, DeviceTarget, Unread, device_targets, target_view
from server.store import DeviceRecord, FlashRecord, ProductRecord, Tx
from server.store.tx_certs import CertificateStanding

#: The module store a device runs from (particle-facts: 0 main, 1 factory, 2 backup, 3
#: scratchpad); a Describe may list modules of the others.
MAIN_STORE = 0
#: Emitted when a Describe reports other modules than the device record holds.
DESCRIBE_CHANGED = "spark/device/describe"


def _admits(standing: CertificateStanding) -> bool:
    """``may_connect`` over what the store holds for one presented certificate."""
    known = standing.certificate
    return may_connect(
        None if known is None else KnownCertificate(known.issued_at is not None, known.revoked),
        registered=standing.registered,
        device_revoked=standing.revocation is not None,
    )


def _module_summary(modules: Any) -> list[tuple[int, int, int]]:
    """(function, index, version) of each module, sorted: what a describe change means."""
    if not modules:
        return []
    return sorted((int(m["function"]), int(m["index"]), int(m["version"])) for m in modules)


class SessionService(FleetBase):
    """Hooks for device sessions."""

    def _refresh_pending(
        self,
        tx: Tx,
        device: DeviceRecord,
        product: ProductRecord,
        now: int,
        events: list[Event],
        pending_flash: FlashRecord | Unread | None = UNREAD,
    ) -> DeviceTarget:
        """Re-derive a device's "updates pending" flag and return its target. ``device`` is
        the device's row as this transaction left it (the caller applied its own change, so
        no re-read), ``pending_flash`` its pending flash when the caller read it already."""
        device_id = device.id
        view = target_view(tx, device, product, pending_flash=pending_flash)
        pending = updates_pending_for(view.device, view.product, view.target)
        if pending != view.device.updates_pending:
            tx.update_device(device_id, {"updates_pending": pending}, now)
            events.append(
                Event(
                    UPDATES_PENDING,
                    "true" if pending else "false",
                    product_id=view.product.id,
                    device_id=device_id,
                    coreid=device_id,
                    published_at=now,
                )
            )
            # The target does not depend on the flag: only the device row changed.
            changed = replace(view.device, updates_pending=pending, updated_at=now)
            view = replace(view, device=changed)
        return view

    async def startup(self, *, exclusive: bool = True) -> int:
        """At a server's start: the sessions that did not survive are offline; also remove
        blobs left by a crash between blob write and commit. Returns devices marked offline.

        ``exclusive``: this server is the store's only one (the embedded store, locked to
        it: ``server.data_lock``), so every device is offline. Otherwise other nodes share
        the store (issue 16 item 3): only the leases of this node's previous incarnation
        are freed (with spark/status "offline" events), the other nodes' devices stay as
        they are and leases of a dead node expire (``sweep_expired_sessions``)."""

        def sweep_blobs() -> None:
            self.store.sweep_blobs()

        if exclusive:

            def work() -> int:
                with self.store.write() as tx:
                    count = tx.mark_all_offline(self.clock())
                self.store.sweep_blobs()
                return count

            return await self._read(work)
        node = cast(PresenceService, self).session_node  # Fleet mixes both in

        def release(tx: Tx) -> Outcome:
            now = self.clock()
            devices = tx.release_node_sessions(node, now)
            return Outcome(len(devices), offline_events(devices, now))

        count: int = await self._run_grouped(release)
        await self._read(sweep_blobs)
        return count

    async def target_for_device(self, device_id: str) -> DeviceTarget:
        """The firmware the rules give a device now, with its pending flash if any."""

        def work(tx: Tx) -> DeviceTarget:
            device, product = self._device_and_product(tx, device_id)
            return target_view(tx, device, product)

        return await self._read_grouped(work)

    async def record_device_hello(
        self,
        device_id: str,
        *,
        platform_id: int,
        product_version: int | None,
        system_version: int | None,
        ip: str | None = None,
        session: str | None = None,
        updates_enabled: bool | None = None,
        reset_pending: bool | None = None,
        bound_platform: bool = False,
    ) -> DeviceTarget:
        """A device completed its handshake: note what it says it runs and that it is online.

        One group-committed write, the Hello's only store round trip: with
        ``bound_platform`` the product's platform is checked first in the same transaction
        (WrongPlatformError, nothing recorded: a device is bound to its product's platform),
        and what the Hello says of ``updates_enabled`` (System.enableUpdates) and
        ``reset_pending`` (a held reset; None: leave as stored) is recorded with it, so the
        returned target's "updates pending" already reflects them.

        The reported product version is a claim: it is shown (``firmware_version``), decides
        whether an update is needed, and completes a requested flash of that version; it
        never marks firmware as seen running (that unlocks a release, and takes the image's
        SHA-256 in a Describe: :meth:`record_describe`). A ``session``
        that marked the device online itself (``device_online``) leaves its presence alone:
        a Hello of an old session recorded after the device moved on must not mark it
        online again with no session owning that.
        """

        def work(tx: Tx) -> Outcome:
            events: list[Event] = []
            now = self.clock()
            device, product = self._device_and_product(tx, device_id)
            if bound_platform and platform_id != product.platform_id:
                raise WrongPlatformError(product.platform_id, platform_id)
            version = None if product_version is None else check_version(product_version)
            fields: dict[str, Any] = {
                "platform_id": platform_id,
                "firmware_version": version,
                "system_version": system_version,
                "last_handshake_at": now,
                "last_heard_at": now,
            }
            if updates_enabled is not None:
                fields["firmware_updates_enabled"] = bool(updates_enabled)
            if reset_pending is not None:
                # A held reset (staged update) survives reconnects; a reset clears it.
                fields["reset_pending"] = bool(reset_pending)
            if session is None:
                fields["online"] = True
            if ip is not None:
                fields["last_ip_address"] = ip
            if device.flash_requested and version == device.desired_firmware_version:
                fields["flash_requested"] = False
            flash = tx.pending_flash(device.id)
            pending: FlashRecord | Unread | None = flash
            if flash is not None and flash.kind == "product" and flash.version == version:
                tx.finish_flash(flash.id, "succeeded", "", now)  # it runs that version now
                # A store written by an older server may hold an older open flash (a new
                # request now supersedes every open one): read what is next again.
                pending = UNREAD
            tx.update_device(device.id, fields, now)
            updated = replace(device, updated_at=now, **fields)  # the row as updated
            if session is None and not device.online:
                events.append(
                    Event(
                        STATUS,
                        "online",
                        product_id=device.product_id,
                        device_id=device.id,
                        coreid=device.id,
                        published_at=now,
                    )
                )
            view = self._refresh_pending(tx, updated, product, now, events, pending)
            return Outcome(view, events)

        return await self._run_grouped(work)

    async def record_describe(
        self, device_id: str, modules: Sequence[Mapping[str, Any]]
    ) -> DeviceTarget:
        """Store the modules a device reported (dicts with at least function, index,
        version); system part 1's version becomes the device's Device OS version.

        A running module (store 0) whose ``sha256`` is the image of one of the product's
        firmware versions, in that firmware's module slot, marks that version as seen
        running: the proof a release needs (a bare version claim in the Hello is not)."""
        clean: list[dict[str, Any]] = []
        for module in modules:
            try:
                entry = {k: int(module[k]) for k in ("function", "index", "version")}
            except (KeyError, TypeError, ValueError) as exc:
                raise ValidationError(
                    "each module needs integer function, index and version"
                ) from exc
            entry.update({k: v for k, v in module.items() if k not in entry})
            clean.append(entry)

        def work(tx: Tx) -> Outcome:
            events: list[Event] = []
            now = self.clock()
            device, product = self._device_and_product(tx, device_id)
            fields: dict[str, Any] = {"modules": clean, "last_heard_at": now}
            for entry in clean:
                if entry["function"] == ModuleFunction.SYSTEM_PART and entry["index"] == 1:
                    fields["system_version"] = entry["version"]
            tx.update_device(device.id, fields, now)
            self._note_images_running(tx, device, clean, now)
            # The row as updated; modules as a re-read gives them back (the JSON round trip
            # turns tuples into lists).
            stored = {**fields, "modules": json.loads(json.dumps(clean))}
            updated = replace(device, updated_at=now, **stored)
            view = self._refresh_pending(tx, updated, product, now, events)
            if _module_summary(device.modules) != _module_summary(clean):
                summary = [[m["function"], m["index"], m["version"]] for m in clean]
                events.append(
                    Event(
                        DESCRIBE_CHANGED,
                        json.dumps({"modules": summary}, separators=(",", ":")),
                        product_id=device.product_id,
                        device_id=device.id,
                        coreid=device.id,
                        published_at=now,
                    )
                )
            return Outcome(view, events)

        return await self._run_grouped(work)

    @staticmethod
    def _note_images_running(
        tx: Tx, device: DeviceRecord, modules: Sequence[Mapping[str, Any]], now: int
    ) -> None:
        """Mark the product firmware whose exact image (SHA-256 of the whole file, as the
        blob is named and the signed manifest says) a Describe reports running."""
        for module in modules:
            sha256 = module.get("sha256")
            if (module["function"] not in PRODUCT_FIRMWARE_FUNCTIONS
                    or int(module.get("store", MAIN_STORE)) != MAIN_STORE
                    or not isinstance(sha256, str)):
                continue
            for version in tx.mark_image_running_seen(device.product_id, sha256.lower(),
                                                      module["function"], module["index"], now):
                tx.add_audit(
                    actor=f"device:{device.id}",
                    action="firmware.seen_running",
                    product_id=device.product_id,
                    target=f"firmware:{version}",
                    details={"device_id": device.id, "sha256": sha256.lower()},
                    now=now,
                )

    async def authorize_device(self, certificate: ClientCertificate) -> bool:
        """True when the certificate's device belongs to a product and the certificate may
        connect (``server.authorization.may_connect``: not revoked, and issued after the
        device's revocation if it has one). Asked at every handshake, so a revocation takes
        effect at the next one. A certificate admitted for the first time is recorded as
        seen, so a later revocation of its device revokes it too."""

        def read(tx: Tx) -> CertificateStanding:
            return tx.certificate_standing(certificate.device_id, certificate.sha256)

        # Fresh at every handshake (never cached: a revocation by any process sharing the
        # store takes effect at the next one), in a read shared with concurrent handshakes.
        standing = await self._read_grouped(read)
        if not _admits(standing):
            return False
        known = standing.certificate
        if known is not None and known.first_seen_at is not None:
            return True  # nothing to record: no write on the reconnect path

        def record(tx: Tx) -> Outcome:
            # Decide again inside the write: a revocation that committed since the read
            # either revoked this certificate already or finds it recorded.
            if not _admits(tx.certificate_standing(certificate.device_id, certificate.sha256)):
                return Outcome(False)
            tx.record_seen_certificate(
                sha256=certificate.sha256,
                serial=certificate.serial,
                device_id=certificate.device_id,
                not_after=certificate.not_after_ms,
                now=self.clock(),
            )
            return Outcome(True)

        return bool(await self._run_grouped(record))

    async def set_certs_revoked(
        self, actor: Actor, product_ref: int | str, device_id: str, revoked: bool
    ) -> None:
        """Revoke (or, explicitly, reinstate) the certificates of a device of the product
        ``product_ref`` (UnknownDeviceError if it is not in that product, checked in the
        same transaction as the change); audit-logged.

        A revocation revokes every certificate known for the device (issued through the
        server or seen at a handshake) and puts the device under revocation, which outlives
        removing and importing the device: from then on only a certificate issued later
        (``ota device provision --id``) is accepted for it. It emits ``DEVICE_REVOKED`` so
        the process holding the device's session closes it. A reinstate lifts both."""

        def work() -> Outcome:
            actor.require(Permission.MANAGE_DEVICES, "revoke devices")
            now = self.clock()
            with self.store.write() as tx:
                device = self._device_in(tx, self._product(tx, product_ref), device_id)
                tx.update_device(device.id, {"certs_revoked": bool(revoked)}, now)
                if revoked:
                    count = tx.revoke_device_certificates(device.id, by=actor.subject, now=now)
                    details: dict[str, Any] = {"certificates_revoked": count}
                else:
                    was_revoked, count = tx.reinstate_device_certificates(device.id)
                    details = {"was_revoked": was_revoked, "certificates_reinstated": count}
                tx.add_audit(
                    actor=actor.subject,
                    action="device.certs_revoked" if revoked else "device.certs_reinstated",
                    product_id=device.product_id,
                    target=f"device:{device.id}",
                    details=details,
                    now=now,
                )
            if not revoked:
                return Outcome(None)
            event = Event(
                DEVICE_REVOKED,
                "true",
                product_id=device.product_id,
                device_id=device.id,
                coreid=device.id,
                published_at=now,
            )
            return Outcome(None, [event])

        await self._run(work)

    async def set_updates_enabled(self, device_id: str, enabled: bool) -> DeviceTarget:
        """The device reported System.enableUpdates()/disableUpdates()."""

        def work(tx: Tx) -> Outcome:
            events: list[Event] = []
            now = self.clock()
            device, product = self._device_and_product(tx, device_id)
            fields: dict[str, Any] = {"firmware_updates_enabled": bool(enabled)}
            tx.update_device(device.id, fields, now)
            updated = replace(device, updated_at=now, **fields)
            view = self._refresh_pending(tx, updated, product, now, events)
            return Outcome(view, events)

        return await self._run_grouped(work)

    async def set_reset_pending(self, device_id: str, pending: bool) -> None:
        """The device holds a reset its staged update needs (``pending``), or no longer
        does (it reset); shown as the device object's ``reset_pending``."""

        def work(tx: Tx) -> Outcome:
            now = self.clock()
            # One statement: no row updated means no such device.
            fields = {"reset_pending": bool(pending)}
            if not tx.update_device(normalize_device_id(device_id), fields, now):
                raise unknown_device(device_id)
            return Outcome(None)

        await self._run_grouped(work)

    async def online_devices_needing_update(
        self, product_ref: int | str, *, immediate_only: bool = False
    ) -> list[DeviceTarget]:
        """Online devices of a product whose target differs from what they run (or that
        have a pending flash); with ``immediate_only``, only those whose deciding release is
        intelligent, or that have a pending flash (pushed at once after a release)."""

        def work() -> list[DeviceTarget]:
            with self.store.read() as tx:
                product = self._product(tx, product_ref)
                devices, _ = tx.list_devices(product.id, online=True)
                views = device_targets(tx, product, devices)
            return [
                view
                for view in views
                if view.update_needed
                and (not immediate_only or view.target.immediate or view.pending_flash is not None)
            ]

        return await self._read(work)

    @staticmethod
    def binary_sha256_for(view: DeviceTarget) -> str | None:
        """SHA-256 of what to send: the pending flash first, else the target firmware."""
        if view.pending_flash is not None:
            return view.pending_flash.sha256
        return view.firmware.sha256 if view.firmware is not None else None

    async def binary_for(self, view: DeviceTarget) -> tuple[str, bytes] | None:
        """(sha256, image) of what to send: the pending flash first, else the target firmware."""
        sha256 = self.binary_sha256_for(view)
        if sha256 is None:
            return None
        return sha256, await self._read(self.store.blobs.get, sha256)
