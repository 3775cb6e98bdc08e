"""A device's target as a session sees it: :class:`DeviceTarget` and how it is read.

What the precedence rules give one device (or many devices of one product) with the fewest
store queries, together with the device's pending flash and whether updates are forced.
Separate from the session hooks (:mod:`server.fleet.sessions`) and the update reports
(:mod:`server.fleet.update_reports`) because both read it, as do the updater and the
maintenance windows: the view is shared, its owners are not.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

from otacore.precedence import Target
from server.fleet.base import releases_of, target_of
from server.store import DeviceRecord, FirmwareRecord, FlashRecord, ProductRecord, ReleaseRecord, Tx


class Unread(enum.Enum):
    """Marks a value the caller has not read in this transaction (None is a real value)."""

    UNREAD = enum.auto()


UNREAD = Unread.UNREAD


@dataclass(frozen=True)
class DeviceTarget:
    """Everything a session needs to decide on an update for one device."""

    device: DeviceRecord
    product: ProductRecord
    target: Target
    #: The product firmware of ``target.version`` (None when no target or it is missing).
    firmware: FirmwareRecord | None
    #: A per-device flash waiting to be delivered (it goes before any release).
    pending_flash: FlashRecord | None
    updates_forced: bool

    @property
    def updates_allowed(self) -> bool:
        """Devices refuse updates unless enabled or forced (particle-facts.md)."""
        return self.device.firmware_updates_enabled or self.updates_forced

    @property
    def update_needed(self) -> bool:
        """True when there is something to send: a pending flash or a different target."""
        if self.pending_flash is not None:
            return True
        return self.target.version is not None and self.target.version != (
            self.device.firmware_version
        )


def target_view(
    tx: Tx,
    device: DeviceRecord,
    product: ProductRecord,
    *,
    releases: Sequence[ReleaseRecord] | None = None,
    pending_flash: FlashRecord | Unread | None = UNREAD,
    with_firmware: bool = True,
) -> DeviceTarget:
    """The target of one device with the fewest queries (the session hot path): the
    product, ``releases`` and ``pending_flash`` are what the caller already read in this
    transaction (the last two are read here when not given); the target's firmware is
    left None unless ``with_firmware``. Same result as :func:`device_targets`."""
    released: dict[int, FirmwareRecord] = {}
    if releases is None:  # with the released versions' firmware: one query for both
        releases, released = tx.list_releases_with_firmware(product.id)
    target = target_of(device, releases_of(releases))
    firmware = None
    if with_firmware and target.version is not None:
        firmware = released.get(target.version)
        if firmware is None:  # e.g. a locked version that is not released
            firmware = tx.get_firmware(product.id, target.version)
    if pending_flash is UNREAD:
        pending_flash = tx.pending_flash(device.id)
    return DeviceTarget(
        device,
        product,
        target,
        firmware,
        pending_flash,
        device.firmware_updates_forced or product.firmware_updates_forced,
    )


def device_targets(
    tx: Tx, product: ProductRecord, devices: list[DeviceRecord]
) -> list[DeviceTarget]:
    """Targets of many devices of one product with a fixed number of queries."""
    releases = releases_of(tx.list_releases(product.id))
    firmware: dict[int, FirmwareRecord | None] = {}  # few distinct targets: load lazily
    flashes = tx.pending_flashes([device.id for device in devices])
    views = []
    for device in devices:
        target = target_of(device, releases)
        if target.version is not None and target.version not in firmware:
            firmware[target.version] = tx.get_firmware(product.id, target.version)
        views.append(
            DeviceTarget(
                device,
                product,
                target,
                None if target.version is None else firmware[target.version],
                flashes.get(device.id),
                device.firmware_updates_forced or product.firmware_updates_forced,
            )
        )
    return views


def targets_of_devices(tx: Tx, device_ids: Sequence[str]) -> dict[str, DeviceTarget]:
    """The targets of many devices of any products (e.g. the sessions restored after a
    graceful restart), with a fixed number of queries per product and per
    ``MANY_CHUNK`` devices instead of three or four per device (:func:`target_view`):
    device id -> target (with its firmware), for each device that exists. Same result as
    :func:`target_view` per device (:func:`device_targets` for each product)."""
    by_product: dict[int, list[DeviceRecord]] = {}
    for device in tx.get_devices(device_ids):
        by_product.setdefault(device.product_id, []).append(device)
    views: dict[str, DeviceTarget] = {}
    for product_id, devices in by_product.items():
        product = tx.get_product(product_id)
        if product is None:  # the foreign key forbids it; as target_for_device's "unknown"
            continue
        for view in device_targets(tx, product, devices):
            views[view.device.id] = view
    return views
