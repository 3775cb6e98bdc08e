"""Product firmware: the upload rules, the release rules, and firmware bookkeeping."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from otacore.errors import ModuleFormatError, ValidationError
from otacore.module import ModuleInfo, validate_module
from otacore.platforms import ModuleFunction, platform_name
from server.events import FIRMWARE_CREATED, FIRMWARE_RELEASED, UPDATES_PENDING, Event
from server.fleet.base import FleetBase, Outcome, check_version, releases_of, target_of
from server.fleet.errors import (
    DuplicateError,
    FirmwareRejectedError,
    ReleaseRefusedError,
    UnknownFirmwareError,
)
from server.fleet.roles import Actor, Permission
from server.fleet.text import clean_filename, clean_text
from server.fleet.windows import FORCED_WINDOW_ACTION, forced_window_details
from server.store import FirmwareRecord, ProductRecord, ReleaseRecord, Tx

#: Module functions a product firmware upload may carry: the application.
PRODUCT_FIRMWARE_FUNCTIONS = (ModuleFunction.USER_PART, ModuleFunction.MONOLITHIC)


@dataclass(frozen=True)
class FirmwareView:
    """A firmware version with where it is released and how many devices run it."""

    record: FirmwareRecord
    product_default: bool
    groups: tuple[str, ...]
    intelligent: bool
    device_count: int
    #: Update outcomes across the releases of this version: started, succeeded, failed.
    updates_started: int = 0
    updates_succeeded: int = 0
    updates_failed: int = 0
    #: What delivering this version cost: bytes_sent, bytes_full, delta/full transfers.
    transfer_bytes: Mapping[str, int] | None = None
    #: The rollouts of this version as (id, state), oldest first (issue 15: firmware
    #: objects link to their rollouts).
    rollouts: tuple[tuple[int, str], ...] = ()


@dataclass(frozen=True)
class ReleaseOutcome:
    """The result of a release: the firmware's new release state and who it reaches."""

    firmware: FirmwareView
    forced: bool
    #: Devices whose target version changed, and those of them online now.
    affected_devices: tuple[str, ...]
    affected_online: tuple[str, ...]


def foreign_product(info: ModuleInfo, product: ProductRecord) -> str | None:
    """Why a module may not become firmware of ``product``: its suffix names another
    product (a product id equal to the platform id names none); None when it may."""
    named = info.named_product_id
    if named is None or named == product.id:
        return None
    return (
        f"the binary is built for product {named} (the product id in its module suffix) but "
        f"this is product {product.slug} (id {product.id}); build it with PRODUCT_ID("
        f"{product.id}), or without a product id (Device OS 4.0 and later)"
    )


def check_product_module(image: bytes, product: ProductRecord, version: int) -> ModuleInfo:
    """Apply the upload rules to a binary; return its parsed module info.

    The binary must be a valid module (CRC-32, SHA-256, size limit of its function), an
    application, for the product's platform, naming no other product, with an embedded
    product version equal to the version given with the upload.
    """
    try:
        info = validate_module(image)
    except ModuleFormatError as exc:
        raise FirmwareRejectedError(f"the binary is not a valid firmware module: {exc}") from exc
    if info.module_function not in PRODUCT_FIRMWARE_FUNCTIONS:
        raise FirmwareRejectedError(
            f"the binary is a {ModuleFunction(info.module_function).name.lower()} module; "
            "product firmware must be an application (user part)"
        )
    if info.platform_id != product.platform_id:
        raise FirmwareRejectedError(
            f"the binary is built for {platform_name(info.platform_id)} (platform "
            f"{info.platform_id}) but product {product.slug} is for "
            f"{platform_name(product.platform_id)} (platform {product.platform_id})"
        )
    foreign = foreign_product(info, product)
    if foreign is not None:
        raise FirmwareRejectedError(foreign)
    if info.product_version is None:
        raise FirmwareRejectedError(
            "the binary carries no product version; build it with PRODUCT_VERSION(n) "
            "so devices can report which version they run"
        )
    if info.product_version != version:
        raise FirmwareRejectedError(
            f"the binary's embedded product version is {info.product_version} but the upload "
            f"says version {version}; they must match (devices report the embedded one)"
        )
    if not info.size_ok:
        raise FirmwareRejectedError(
            f"the binary is {info.size} bytes; the limit for its function is {info.max_size}"
        )
    return info


def firmware_views(
    tx: Tx, product_id: int, records: Sequence[FirmwareRecord]
) -> list[FirmwareView]:
    """Attach release state and device counts to firmware records."""
    releases = tx.list_releases(product_id)
    counts = tx.device_counts_by_version(product_id)
    rollouts = tx.rollout_links(product_id)
    views = []
    for rec in records:
        mine = [r for r in releases if r.version == rec.version]
        views.append(
            FirmwareView(
                record=rec,
                product_default=any(r.group_name is None for r in mine),
                groups=tuple(sorted(r.group_name for r in mine if r.group_name is not None)),
                intelligent=any(r.intelligent for r in mine),
                device_count=counts.get(rec.version, 0),
                updates_started=sum(r.devices_started for r in mine),
                updates_succeeded=sum(r.devices_succeeded for r in mine),
                updates_failed=sum(r.devices_failed for r in mine),
                transfer_bytes=tx.get_transfer_bytes(product_id, rec.version),
                rollouts=tuple(rollouts.get(rec.version, ())),
            )
        )
    return views


class FirmwareService(FleetBase):
    """Upload, list, edit, delete and release product firmware."""

    async def upload_firmware(
        self,
        actor: Actor,
        product_ref: int | str,
        image: bytes,
        *,
        version: object,
        title: object,
        description: object = "",
        filename: object = "firmware.bin",
    ) -> FirmwareView:
        """Check and store a new firmware version (see :func:`check_product_module`)."""
        return await self._run(
            self._upload_sync, actor, product_ref, image, version, title, description, filename
        )

    def _upload_sync(
        self,
        actor: Actor,
        product_ref: int | str,
        image: bytes,
        version_in: object,
        title_in: object,
        description_in: object,
        filename_in: object,
    ) -> Outcome:
        actor.require(Permission.MANAGE_DEVICES, "upload firmware")
        version = check_version(version_in)
        title = clean_text(title_in, "title", 200, required=True)
        description = clean_text(description_in, "description", 10_000)
        filename = clean_filename(filename_in)
        with self.store.read() as tx:
            product = self._product(tx, product_ref)
            self._refuse_existing(tx, product, version)
        info = check_product_module(image, product, version)
        sha256 = self.store.blobs.put(image)  # durable before the row that names it
        now = self.clock()
        with self.store.write() as tx:
            self._refuse_existing(tx, product, version)  # another upload may have won
            record = tx.insert_firmware(
                product_id=product.id,
                version=version,
                title=title,
                description=description,
                filename=filename,
                size=len(image),
                sha256=sha256,
                platform_id=info.platform_id,
                module_function=info.module_function,
                module_index=info.module_index,
                module_version=info.module_version,
                module_info=info.to_json(),
                uploaded_by=actor.subject,
                uploaded_at=now,
            )
            tx.add_audit(
                actor=actor.subject,
                action="firmware.upload",
                product_id=product.id,
                target=f"firmware:{version}",
                details={"version": version, "sha256": sha256, "size": len(image)},
                now=now,
            )
            view = firmware_views(tx, product.id, [record])[0]
        data = {"version": version, "title": title, "size": len(image), "sha256": sha256}
        event = Event(FIRMWARE_CREATED, json.dumps(data), product_id=product.id, published_at=now)
        return Outcome(view, [event])

    @staticmethod
    def _refuse_existing(tx: Tx, product: ProductRecord, version: int) -> None:
        if tx.get_firmware(product.id, version) is not None:
            raise FirmwareRejectedError(
                f"product {product.slug} already has firmware version {version}; "
                "versions are immutable, upload under a new version number"
            )

    def _firmware(self, tx: Tx, product: ProductRecord, version: object) -> FirmwareRecord:
        number = check_version(version)
        record = tx.get_firmware(product.id, number)
        if record is None:
            raise UnknownFirmwareError(f"product {product.slug} has no firmware version {number}")
        return record

    async def list_firmware(self, product_ref: int | str) -> list[FirmwareView]:
        """A product's firmware, newest first."""

        def work() -> list[FirmwareView]:
            with self.store.read() as tx:
                product = self._product(tx, product_ref)
                return firmware_views(tx, product.id, tx.list_firmware(product.id))

        return await self._read(work)

    async def get_firmware(self, product_ref: int | str, version: object) -> FirmwareView:
        """One firmware version."""

        def work() -> FirmwareView:
            with self.store.read() as tx:
                product = self._product(tx, product_ref)
                return firmware_views(tx, product.id, [self._firmware(tx, product, version)])[0]

        return await self._read(work)

    async def firmware_binary(
        self, product_ref: int | str, version: object
    ) -> tuple[FirmwareRecord, bytes]:
        """A firmware record and its binary (verified against its SHA-256)."""

        def work() -> tuple[FirmwareRecord, bytes]:
            with self.store.read() as tx:
                record = self._firmware(tx, self._product(tx, product_ref), version)
            return record, self.store.blobs.get(record.sha256)

        return await self._read(work)

    async def downloadable_size(
        self, product_id: int, platform_id: int | None, sha256: str
    ) -> int | None:
        """The size of image ``sha256`` if a device of the product (and platform) may
        download it (its product firmware, or a Device OS module of its platform); None
        otherwise. One indexed query, whatever the number of firmware versions."""

        def work(tx: Tx) -> int | None:
            return tx.downloadable_size(product_id, platform_id, sha256)

        return await self._read_grouped(work)

    async def read_image_range(self, sha256: str, offset: int, length: int) -> bytes:
        """``length`` bytes of stored image ``sha256`` from ``offset`` (fewer at its end),
        read without the rest of the file (BlobMissingError when it is gone)."""
        return await self._read(self.store.blobs.read_range, sha256, offset, length)

    async def update_firmware(
        self,
        actor: Actor,
        product_ref: int | str,
        version: object,
        *,
        title: object = None,
        description: object = None,
    ) -> FirmwareView:
        """Change a firmware's title and/or description (the binary is immutable)."""

        def work() -> Outcome:
            actor.require(Permission.MANAGE_DEVICES, "edit firmware")
            fields = {}
            if title is not None:
                fields["title"] = clean_text(title, "title", 200, required=True)
            if description is not None:
                fields["description"] = clean_text(description, "description", 10_000)
            now = self.clock()
            with self.store.write() as tx:
                product = self._product(tx, product_ref)
                record = self._firmware(tx, product, version)
                if fields:
                    tx.update_firmware(record.id, fields)
                    tx.add_audit(
                        actor=actor.subject,
                        action="firmware.edit",
                        product_id=product.id,
                        target=f"firmware:{record.version}",
                        details=fields,
                        now=now,
                    )
                record = self._firmware(tx, product, record.version)
                return Outcome(firmware_views(tx, product.id, [record])[0])

        return await self._run(work)

    async def delete_firmware(self, actor: Actor, product_ref: int | str, version: object) -> None:
        """Delete an unreleased firmware no device is locked to."""

        def work() -> Outcome:
            actor.require(Permission.MANAGE_DEVICES, "delete firmware")
            now = self.clock()
            with self.store.write() as tx:
                product = self._product(tx, product_ref)
                record = self._firmware(tx, product, version)
                view = firmware_views(tx, product.id, [record])[0]
                if view.product_default or view.groups:
                    raise DuplicateError(
                        f"firmware version {record.version} is released; release another "
                        "version to its product default and groups before deleting it"
                    )
                locked = tx.devices_locked_to(product.id, record.version)
                if locked:
                    raise DuplicateError(
                        f"{len(locked)} device(s) are locked to firmware version "
                        f"{record.version} (e.g. {locked[0]}); unlock them first"
                    )
                tx.delete_firmware(record.id)
                tx.add_audit(
                    actor=actor.subject,
                    action="firmware.delete",
                    product_id=product.id,
                    target=f"firmware:{record.version}",
                    details={"sha256": record.sha256},
                    now=now,
                )
            # The blob stays until the blob sweeper (server.leases) finds it unreferenced and
            # older than its grace period: deleting it here could race an upload of the same
            # bytes that stored (refreshed) the blob and has not committed its row yet.
            return Outcome(None)

        await self._run(work)

    async def release_firmware(
        self,
        actor: Actor,
        product_ref: int | str,
        version: object,
        *,
        product_default: bool | None = None,
        groups: Sequence[str] | None = None,
        intelligent: bool = False,
        force: bool = False,
        force_window: bool = False,
    ) -> ReleaseOutcome:
        """Set where ``version`` is released, as Particle's release call does.

        ``product_default=True`` makes it the product default; ``False`` withdraws it from
        being the default (if it is); None leaves the default alone. ``groups`` releases it to
        exactly those groups (groups now releasing it but not listed are withdrawn); None
        leaves group releases alone. Adding a release needs the firmware to have been
        reported running on a device of the product, unless ``force`` (audit-logged).
        Offers of the release start only inside each device's maintenance window, unless
        ``force_window`` (audit-logged as forced past the window; a later release of the
        same version without it withdraws the force).
        """
        return await self._run(
            self._release_sync,
            actor,
            product_ref,
            version,
            product_default,
            None if groups is None else list(groups),
            intelligent,
            force,
            force_window,
        )

    def _release_sync(
        self,
        actor: Actor,
        product_ref: int | str,
        version: object,
        product_default: bool | None,
        group_names: list[str] | None,
        intelligent: bool,
        force: bool,
        force_window: bool = False,
    ) -> Outcome:
        actor.require(Permission.MANAGE_DEVICES, "release firmware")
        for flag, name in (
            (product_default, "product_default"),
            (intelligent, "intelligent"),
            (force, "force"),
            (force_window, "force_window"),
        ):
            if flag is not None and not isinstance(flag, bool):
                raise ValidationError(f"{name} must be true or false")
        if product_default is None and group_names is None:
            raise ValidationError("say where to release: give product_default and/or groups")
        now = self.clock()
        with self.store.write() as tx:
            product = self._product(tx, product_ref)
            record = self._firmware(tx, product, version)
            wanted: dict[int | None, str | None] = {None: None} if product_default else {}
            for name in group_names or ():
                group = tx.get_group(product.id, name) if isinstance(name, str) else None
                if group is None:
                    raise ReleaseRefusedError(
                        f"group {name!r} does not exist in product {product.slug}; create it first"
                    )
                wanted[group.id] = group.name
            before = tx.list_releases(product.id)
            current = {r.group_id for r in before if r.version == record.version}
            adding = [gid for gid in wanted if gid not in current]
            if adding and record.running_seen_at is None and not force:
                raise ReleaseRefusedError(
                    f"firmware version {record.version} has not been reported running on any "
                    f"device of product {product.slug}; lock a test device to it and let it "
                    "connect first, or pass force=true to release it anyway"
                )
            for gid in wanted:
                tx.set_release(
                    product.id,
                    gid,
                    version=record.version,
                    intelligent=intelligent,
                    actor=actor.subject,
                    now=now,
                )
            for gid in current - set(wanted):
                decided = product_default is not None if gid is None else group_names is not None
                if decided:  # only the scopes this request speaks about are withdrawn
                    tx.delete_release(product.id, gid)
            after = tx.list_releases(product.id)
            affected, online, events = self._apply_release_effects(tx, product, before, after, now)
            forced = bool(adding) and record.running_seen_at is None
            details = {
                "version": record.version,
                "product_default": product_default,
                "groups": None
                if group_names is None
                else sorted(n for n in wanted.values() if n is not None),
                "intelligent": intelligent,
                "force": force,
                "force_window": force_window,  # what the window gate reads back
                "affected_devices": len(affected),
            }
            action = "firmware.release.forced" if forced else "firmware.release"
            tx.add_audit(
                actor=actor.subject,
                action=action,
                product_id=product.id,
                target=f"firmware:{record.version}",
                details=details,
                now=now,
            )
            if force_window:
                tx.add_audit(
                    actor=actor.subject,
                    action=FORCED_WINDOW_ACTION,
                    product_id=product.id,
                    target=f"firmware:{record.version}",
                    details=forced_window_details(
                        release=True, version=record.version,
                        product_default=product_default, groups=details["groups"],
                        intelligent=intelligent),
                    now=now,
                )
            view = firmware_views(tx, product.id, [record])[0]
        data = {
            "version": record.version,
            "immediate": intelligent,
            "product_default": view.product_default,
            "groups": list(view.groups),
        }
        events.insert(
            0, Event(FIRMWARE_RELEASED, json.dumps(data), product_id=product.id, published_at=now)
        )
        return Outcome(ReleaseOutcome(view, forced, tuple(affected), tuple(online)), events)

    def _apply_release_effects(
        self,
        tx: Tx,
        product: ProductRecord,
        before: list[ReleaseRecord],
        after: list[ReleaseRecord],
        now: int,
    ) -> tuple[list[str], list[str], list[Event]]:
        """Find devices whose target changed; flag "updates pending" where updates are off."""
        old, new = releases_of(before), releases_of(after)
        devices, _ = tx.list_devices(product.id)
        affected, online, events = [], [], []
        for device in devices:
            target = target_of(device, new)
            if target.version == target_of(device, old).version:
                continue
            affected.append(device.id)
            if device.online:
                online.append(device.id)
            forced = device.firmware_updates_forced or product.firmware_updates_forced
            pending = (
                target.version is not None
                and target.version != device.firmware_version
                and not device.firmware_updates_enabled
                and not forced
            )
            if pending != device.updates_pending:
                tx.update_device(device.id, {"updates_pending": pending}, now)
                events.append(
                    Event(
                        UPDATES_PENDING,
                        "true" if pending else "false",
                        product_id=product.id,
                        device_id=device.id,
                        coreid=device.id,
                        published_at=now,
                    )
                )
        return affected, online, events
