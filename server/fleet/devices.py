"""Products and their devices: import, remove, list, settings, locks and per-device flashes."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from otacore.errors import ModuleFormatError, ValidationError
from otacore.module import validate_module
from otacore.platforms import PLATFORMS, platform_name
from otacore.precedence import Target
from server.events import FLASH_REQUESTED, UPDATES_FORCED, UPDATES_PENDING, Event
from server.fleet.base import (
    FleetBase,
    Outcome,
    check_version,
    normalize_device_id,
    releases_of,
    target_of,
)
from server.fleet.errors import DeviceRuleError, DuplicateError, UnknownFirmwareError
from server.fleet.firmware import PRODUCT_FIRMWARE_FUNCTIONS, foreign_product
from server.fleet.roles import Actor, Permission
from server.fleet.text import clean_filename, clean_group_name, clean_text, slugify
from server.fleet.windows import FORCED_WINDOW_ACTION, forced_window_details
from server.store import DeviceRecord, FlashRecord, ProductRecord, Tx, UpdateStateRecord
from server.store.device_status import UPDATE_STATUSES
from server.store.records import DeviceStatusRecord

#: Fields ``PUT /v1/products/:p/devices/:id`` accepts (Particle's names).
DEVICE_FIELDS = frozenset(
    {
        "development",
        "desired_firmware_version",
        "flash",
        "force_window",
        "groups",
        "firmware_updates_forced",
        "name",
        "notes",
    }
)
MAX_PER_PAGE = 1000
#: The highest page number a listing accepts (an offset past any real fleet).
MAX_PAGE = 1_000_000


@dataclass(frozen=True)
class DeviceView:
    """A device with the firmware the precedence rules give it and any pending flash."""

    record: DeviceRecord
    target: Target
    pending_flash: FlashRecord | None = None
    #: The transfer in flight to the device, if any.
    update: UpdateStateRecord | None = None
    #: Its update status (up_to_date, pending, updating, failed or no_target:
    #: ``server.store.device_status``) and how its last update ended.
    status: DeviceStatusRecord | None = None

    @property
    def update_status(self) -> str | None:
        """up_to_date, pending, updating, failed or no_target (None: not read)."""
        return None if self.status is None else self.status.update_status


@dataclass(frozen=True)
class DevicePage:
    """One page of a device listing."""

    devices: list[DeviceView]
    total: int
    page: int
    per_page: int

    @property
    def total_pages(self) -> int:
        """Number of pages at this page size."""
        return max(1, -(-self.total // self.per_page))


@dataclass(frozen=True)
class ImportResult:
    """Particle's import answer: which ids were added, already there, or invalid."""

    updated: tuple[str, ...]
    existing: tuple[str, ...]
    invalid: tuple[str, ...]


def _bool(value: object, what: str) -> bool:
    if not isinstance(value, bool):
        raise ValidationError(f"{what} must be true or false")
    return value


def updates_pending_for(device: DeviceRecord, product: ProductRecord, target: Target) -> bool:
    """True when the device should update but has updates disabled and not forced."""
    forced = device.firmware_updates_forced or product.firmware_updates_forced
    return (
        target.version is not None
        and target.version != device.firmware_version
        and not device.firmware_updates_enabled
        and not forced
    )


class DeviceService(FleetBase):
    """Products and devices."""

    # --- products -----------------------------------------------------------------------------

    def create_product_sync(
        self, actor: Actor, name: object, platform_id: object, *, description: object = ""
    ) -> ProductRecord:
        """Create a product (blocking; the CLI calls this directly on the store)."""
        actor.require(Permission.ADMINISTER, "create products")
        clean_name = clean_text(name, "product name", 200, required=True)
        if isinstance(platform_id, bool) or not isinstance(platform_id, int):
            raise ValidationError("platform_id must be an integer")
        if platform_id not in PLATFORMS:
            known = ", ".join(f"{p.name} {p.id}" for p in PLATFORMS.values())
            raise ValidationError(f"unknown platform id {platform_id}; known: {known}")
        text = clean_text(description, "description", 10_000)
        now = self.clock()
        with self.store.write() as tx:
            base = slugify(clean_name)
            slug, n = base, 1
            while tx.get_product(slug) is not None:
                n += 1
                slug = f"{base}-{n}"
            product = tx.insert_product(
                slug=slug, name=clean_name, platform_id=platform_id, description=text, now=now
            )
            tx.add_audit(
                actor=actor.subject,
                action="product.create",
                product_id=product.id,
                target=f"product:{product.slug}",
                details={"name": clean_name, "platform_id": platform_id},
                now=now,
            )
        return product

    async def create_product(
        self, actor: Actor, name: object, platform_id: object, *, description: object = ""
    ) -> ProductRecord:
        """Create a product; its slug is derived from the name (made unique)."""
        return await self._run(
            lambda: Outcome(
                self.create_product_sync(actor, name, platform_id, description=description)
            )
        )

    async def get_product(self, product_ref: int | str) -> ProductRecord:
        """A product by id or slug."""

        def work() -> ProductRecord:
            with self.store.read() as tx:
                return self._product(tx, product_ref)

        return await self._read(work)

    async def update_product(self, actor: Actor, product_ref: int | str,
                             changes: Mapping[str, object]) -> ProductRecord:
        """Change a product's name, description or product-wide ``firmware_updates_forced``
        (which overrides every device's disabled updates); audit-logged."""

        def work() -> Outcome:
            actor.require(Permission.MANAGE_DEVICES, "change products")
            unknown = sorted(set(changes) - {"name", "description", "firmware_updates_forced"})
            if unknown:
                raise ValidationError(f"unknown product field(s): {', '.join(unknown)}")
            fields: dict[str, Any] = {}
            if "name" in changes:
                fields["name"] = clean_text(changes["name"], "product name", 200, required=True)
            if "description" in changes:
                fields["description"] = clean_text(changes["description"], "description", 10_000)
            if "firmware_updates_forced" in changes:
                forced = changes["firmware_updates_forced"]
                if not isinstance(forced, bool):
                    raise ValidationError("firmware_updates_forced must be true or false")
                fields["firmware_updates_forced"] = forced
            now = self.clock()
            with self.store.write() as tx:
                product = self._product(tx, product_ref)
                if fields:
                    tx.update_product(product.id, fields)
                    tx.add_audit(actor=actor.subject, action="product.update",
                                 product_id=product.id, target=f"product:{product.id}",
                                 details=fields, now=now)
                updated = self._product(tx, product.id)
            events = []
            if "firmware_updates_forced" in fields and (
                fields["firmware_updates_forced"] != product.firmware_updates_forced
            ):
                events.append(Event(UPDATES_FORCED,
                                    "true" if fields["firmware_updates_forced"] else "false",
                                    product_id=product.id, published_at=now))
            return Outcome(updated, events)

        return await self._run(work)

    async def list_products(self) -> list[ProductRecord]:
        """Every product."""

        def work() -> list[ProductRecord]:
            with self.store.read() as tx:
                return tx.list_products()

        return await self._read(work)

    # --- devices ------------------------------------------------------------------------------

    async def add_device(
        self, actor: Actor, product_ref: int | str, device_id: object
    ) -> ImportResult:
        """Add (import) a device into a product; a device belongs to one product at a time."""

        def work() -> Outcome:
            actor.require(Permission.MANAGE_DEVICES, "add devices")
            clean_id = normalize_device_id(device_id)
            now = self.clock()
            with self.store.write() as tx:
                product = self._product(tx, product_ref)
                existing = tx.get_device(clean_id)
                if existing is not None and existing.product_id == product.id:
                    return Outcome(ImportResult((), (clean_id,), ()))
                if existing is not None:
                    # Which product holds it is not this caller's to learn (other products
                    # look absent to a team that is not theirs).
                    raise DuplicateError(
                        f"device {clean_id} belongs to another product; it can be imported "
                        "once that product's team removes it"
                    )
                tx.insert_device(clean_id, product.id, now)
                # A revocation is kept with the device's certificates, not its row: a
                # removed device imported again is still revoked (issue 13).
                revoked = tx.certificates_revoked(clean_id)
                if revoked:
                    tx.update_device(clean_id, {"certs_revoked": True}, now)
                tx.add_audit(
                    actor=actor.subject,
                    action="device.add",
                    product_id=product.id,
                    target=f"device:{clean_id}",
                    details={"certs_revoked": True} if revoked else {},
                    now=now,
                )
            return Outcome(ImportResult((clean_id,), (), ()))

        return await self._run(work)

    async def remove_device(self, actor: Actor, product_ref: int | str, device_id: str) -> None:
        """Remove a device from its product (with its groups, flashes and update state).
        Its certificates and any revocation stay recorded: importing it again does not
        undo a revocation."""

        def work() -> Outcome:
            actor.require(Permission.MANAGE_DEVICES, "remove devices")
            now = self.clock()
            with self.store.write() as tx:
                product = self._product(tx, product_ref)
                device = self._device_in(tx, product, device_id)
                tx.delete_device(device.id)
                tx.add_audit(
                    actor=actor.subject,
                    action="device.remove",
                    product_id=product.id,
                    target=f"device:{device.id}",
                    details={},
                    now=now,
                )
            return Outcome(None)

        await self._run(work)

    async def list_devices(
        self,
        product_ref: int | str,
        *,
        device_id: str | None = None,
        name: str | None = None,
        groups: tuple[str, ...] = (),
        online: bool | None = None,
        firmware_version: int | None = None,
        development: bool | None = None,
        locked: bool | None = None,
        update_status: str | None = None,
        page: int = 1,
        per_page: int = 25,
    ) -> DevicePage:
        """A page of a product's devices filtered by id / name substring, group names (any
        of them), online, the firmware version the device reports, development, locked and
        update status (``server.store.device_status``: up_to_date, pending, updating,
        failed, no_target). Counted and paged in the store: two statements for the page,
        one for the statuses of its devices."""
        if not 1 <= per_page <= MAX_PER_PAGE:
            raise ValidationError(f"per_page must be within 1..{MAX_PER_PAGE}")
        if page < 1:
            raise ValidationError("page must be 1 or more")
        if page > MAX_PAGE:
            raise ValidationError(f"page must be at most {MAX_PAGE}")
        if update_status is not None and update_status not in UPDATE_STATUSES:
            raise ValidationError(
                f"update status {update_status!r} is not one of {', '.join(UPDATE_STATUSES)}")
        if firmware_version is not None:
            firmware_version = check_version(firmware_version, "firmware version")

        def work() -> DevicePage:
            with self.store.read() as tx:
                product = self._product(tx, product_ref)
                records, total = tx.list_devices(
                    product.id,
                    id_contains=device_id,
                    name_contains=name,
                    group_names=groups,
                    online=online,
                    firmware_version=firmware_version,
                    development=development,
                    locked=locked,
                    update_status=update_status,
                    offset=(page - 1) * per_page,
                    limit=per_page,
                )
                releases = releases_of(tx.list_releases(product.id))
                statuses = tx.device_statuses(product.id, [rec.id for rec in records])
            views = [DeviceView(rec, target_of(rec, releases), status=statuses.get(rec.id))
                     for rec in records]
            return DevicePage(views, total, page, per_page)

        return await self._read(work)

    async def get_device(self, product_ref: int | str, device_id: str) -> DeviceView:
        """One device of a product, with its target and pending flash."""

        def work() -> DeviceView:
            with self.store.read() as tx:
                product = self._product(tx, product_ref)
                return self._view(tx, product, self._device_in(tx, product, device_id))

        return await self._read(work)

    @staticmethod
    def _view(tx: Tx, product: ProductRecord, device: DeviceRecord) -> DeviceView:
        releases = releases_of(tx.list_releases(product.id))
        return DeviceView(device, target_of(device, releases), tx.pending_flash(device.id),
                          tx.get_update_state(device.id),
                          tx.device_statuses(product.id, [device.id]).get(device.id))

    async def update_device(
        self, actor: Actor, product_ref: int | str, device_id: str, changes: Mapping[str, object]
    ) -> DeviceView:
        """Apply Particle's device PUT fields (see DEVICE_FIELDS); all or nothing."""
        return await self._run(self._update_device_sync, actor, product_ref, device_id, changes)

    def _update_device_sync(
        self, actor: Actor, product_ref: int | str, device_id: str, changes: Mapping[str, object]
    ) -> Outcome:
        unknown = sorted(set(changes) - DEVICE_FIELDS)
        if unknown:
            raise ValidationError(
                f"unknown device field(s) {', '.join(unknown)}; known: "
                f"{', '.join(sorted(DEVICE_FIELDS))}"
            )
        if not changes:
            raise ValidationError(
                f"nothing to change; give one of: {', '.join(sorted(DEVICE_FIELDS))}"
            )
        verb = "flash devices" if changes.get("flash") else "change device settings"
        actor.require(Permission.MANAGE_DEVICES, verb)
        fields: dict[str, Any] = {}
        if "name" in changes:
            fields["name"] = clean_text(changes["name"], "name", 200) or None
        if "notes" in changes:
            fields["notes"] = clean_text(changes["notes"], "notes", 10_000)
        for key in ("development", "firmware_updates_forced"):
            if key in changes:
                fields[key] = _bool(changes[key], key)
        lock_given = "desired_firmware_version" in changes
        if lock_given and changes["desired_firmware_version"] is not None:
            fields["desired_firmware_version"] = check_version(
                changes["desired_firmware_version"], "desired_firmware_version"
            )
        elif lock_given:
            fields["desired_firmware_version"] = None
            fields["flash_requested"] = False
        flash = _bool(changes["flash"], "flash") if "flash" in changes else False
        # Issue 15: flash-now waits for the device's maintenance window unless forced.
        force_window = (_bool(changes["force_window"], "force_window")
                        if "force_window" in changes else False)
        if force_window and not flash:
            raise ValidationError(
                "force_window only applies to a flash: give flash=true with it (a lock "
                "alone is delivered inside the device's maintenance window)"
            )
        group_names: list[str] | None = None
        if "groups" in changes:
            raw = changes["groups"]
            if not isinstance(raw, list):
                raise ValidationError("groups must be a list of group names")
            group_names = [clean_group_name(name) for name in raw]
        now = self.clock()
        events: list[Event] = []
        with self.store.write() as tx:
            product = self._product(tx, product_ref)
            device = self._device_in(tx, product, device_id)
            lock = fields.get("desired_firmware_version", device.desired_firmware_version)
            lock_fw = None
            if lock is not None and (lock_given or flash):
                lock_fw = tx.get_firmware(product.id, lock)
                if lock_fw is None:
                    raise UnknownFirmwareError(
                        f"product {product.slug} has no firmware version {lock} to lock to"
                    )
            undelivered = tx.pending_flash(device.id) if lock_given and not flash else None
            if undelivered and undelivered.kind == "product" and undelivered.version != lock:
                tx.finish_flash(
                    undelivered.id, "cancelled", "the lock changed before delivery", now
                )
            if flash:
                if lock_fw is None:
                    raise DeviceRuleError(
                        "flash=true needs a locked version: give desired_firmware_version too"
                    )
                fields["flash_requested"] = True
                tx.forget_refused_images(device.id, now=now)  # the operator asks for it anew
                tx.insert_flash(
                    device_id=device.id,
                    kind="product",
                    version=lock_fw.version,
                    sha256=lock_fw.sha256,
                    size=lock_fw.size,
                    filename=lock_fw.filename,
                    module_info=lock_fw.module_info,
                    status="pending",
                    error="",
                    requested_by=actor.subject,
                    requested_at=now,
                    finished_at=None,
                )
            if fields:
                tx.update_device(device.id, fields, now)
            if group_names is not None:
                found = tx.ensure_groups(product.id, group_names, now)
                tx.set_device_groups(device.id, [g.id for g in found])
            audit = dict(fields)
            if group_names is not None:
                audit["groups"] = sorted(set(group_names))
            if force_window:
                audit["force_window"] = True  # what the window gate reads back
            tx.add_audit(
                actor=actor.subject,
                action="device.update",
                product_id=product.id,
                target=f"device:{device.id}",
                details=audit,
                now=now,
            )
            if force_window:
                tx.add_audit(
                    actor=actor.subject,
                    action=FORCED_WINDOW_ACTION,
                    product_id=product.id,
                    target=f"device:{device.id}",
                    details=forced_window_details(flash=True, version=lock),
                    now=now,
                )
            updated = self._device_in(tx, product, device.id)
            view = self._view(tx, product, updated)
            pending = updates_pending_for(updated, product, view.target)
            if pending != updated.updates_pending:
                tx.update_device(updated.id, {"updates_pending": pending}, now)
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
                view = self._view(tx, product, self._device_in(tx, product, device.id))
        if fields.get("firmware_updates_forced", device.firmware_updates_forced) != (
            device.firmware_updates_forced
        ):
            data = "true" if fields["firmware_updates_forced"] else "false"
            events.append(
                Event(
                    UPDATES_FORCED,
                    data,
                    product_id=product.id,
                    device_id=device.id,
                    coreid=device.id,
                    published_at=now,
                )
            )
        if fields.get("flash_requested"):
            events.append(Event(FLASH_REQUESTED, "lock", product_id=product.id,
                                device_id=device.id, coreid=device.id, published_at=now))
        return Outcome(view, events)

    async def flash_device_binary(
        self,
        actor: Actor,
        product_ref: int | str,
        device_id: str,
        image: bytes,
        *,
        filename: object = "firmware.bin",
    ) -> FlashRecord:
        """Queue a binary for one development device (the OTA layer delivers it)."""

        def work() -> Outcome:
            actor.require(Permission.MANAGE_DEVICES, "flash devices")
            with self.store.read() as tx:
                product = self._product(tx, product_ref)
                device = self._device_in(tx, product, device_id)
            if not device.development:
                raise DeviceRuleError(
                    f"device {device.id} is not a development device; set development=true "
                    "first, or product firmware would replace the flashed binary"
                )
            try:
                info = validate_module(image)
            except ModuleFormatError as exc:
                raise DeviceRuleError(f"the binary is not a valid firmware module: {exc}") from exc
            if info.platform_id != product.platform_id:
                raise DeviceRuleError(
                    f"the binary is built for {platform_name(info.platform_id)} but device "
                    f"{device.id} is a {platform_name(product.platform_id)}"
                )
            if info.module_function not in PRODUCT_FIRMWARE_FUNCTIONS:
                raise DeviceRuleError("only application (user part) binaries can be flashed here")
            foreign = foreign_product(info, product)
            if foreign is not None:
                raise DeviceRuleError(foreign)
            sha256 = self.store.blobs.put(image)
            now = self.clock()
            with self.store.write() as tx:
                device = self._device_in(tx, product, device.id)
                flash = tx.insert_flash(
                    device_id=device.id,
                    kind="binary",
                    version=info.product_version,
                    sha256=sha256,
                    size=len(image),
                    filename=clean_filename(filename),
                    module_info=info.to_json(),
                    status="pending",
                    error="",
                    requested_by=actor.subject,
                    requested_at=now,
                    finished_at=None,
                )
                tx.add_audit(
                    actor=actor.subject,
                    action="device.flash_binary",
                    product_id=product.id,
                    target=f"device:{device.id}",
                    details={"sha256": sha256, "size": len(image)},
                    now=now,
                )
                tx.forget_refused_images(device.id, now=now)  # the operator asks for it anew
            event = Event(FLASH_REQUESTED, "binary", product_id=product.id,
                          device_id=device.id, coreid=device.id, published_at=now)
            return Outcome(flash, [event])

        return await self._run(work)
