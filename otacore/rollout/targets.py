"""A rollout's target set: the devices whose firmware its release would decide, after
Particle's precedence rules (``otacore.precedence``), and that have something to receive."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from otacore.precedence import (
    DeviceTargeting,
    ProductReleases,
    Release,
    TargetReason,
    target_firmware_for,
)


@dataclass(frozen=True)
class RolloutScope:
    """What a rollout releases and where: a version to the product default (``groups``
    empty) or to groups, immediate (intelligent) or standard."""

    version: int
    groups: tuple[str, ...] = ()
    immediate: bool = False

    def overlay(self, current: ProductReleases) -> ProductReleases:
        """The product's releases as if this rollout's release were made."""
        release = Release(self.version, self.immediate)
        if self.groups:
            return ProductReleases(
                current.product_default,
                {**current.group_releases, **dict.fromkeys(self.groups, release)},
            )
        return ProductReleases(release, current.group_releases)

    def decides(
        self,
        device_id: str,
        targeting: DeviceTargeting,
        running_version: int | None,
        overlay: ProductReleases,
        touched: Collection[str] = (),
    ) -> bool:
        """True when the release (in ``overlay``, from :meth:`overlay`) decides the device's
        firmware by its own rule (product default, or one of its groups) and there is
        something to deliver: the device runs another version, or the rollout already
        touched it (``touched``: devices with progress, which stay counted)."""
        return self.decided_by(targeting, overlay) and (
            running_version != self.version or device_id in touched)

    def decided_by(self, targeting: DeviceTargeting, overlay: ProductReleases) -> bool:
        """The first half of :meth:`decides`: the release decides the firmware of devices
        targeted like this (the same for every device of the same development flag, lock
        and groups: a target set of 100,000 devices asks it a few times)."""
        target = target_firmware_for(targeting, overlay)
        if target.version != self.version:
            return False
        if self.groups:
            return target.reason is TargetReason.GROUP_RELEASE and target.group in self.groups
        return target.reason is TargetReason.PRODUCT_DEFAULT
