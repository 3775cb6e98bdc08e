"""What the device updater gathers for its planner (otacore.transfer.planner) from the
store's records and the device's answers: the plain facts and names the planner decides
from."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from otacore.protocol.ota_wire import OFFER_ACCEPTED, OFFER_UNAVAILABLE
from otacore.transfer.module_plan import installed_modules
from otacore.transfer.planner import OfferAnswer, TargetFacts

if TYPE_CHECKING:
    from server.fleet import DeviceTarget


def target_facts(view: DeviceTarget) -> TargetFacts:
    """What the planner reads of a device's target as the store holds it."""
    device = view.device
    firmware = view.firmware
    target_sha256 = (view.pending_flash.sha256 if view.pending_flash is not None
                     else firmware.sha256 if firmware is not None else None)
    return TargetFacts(
        update_needed=view.update_needed, updates_allowed=view.updates_allowed,
        updates_forced=view.updates_forced, reset_pending=bool(device.reset_pending),
        modules=installed_modules(device.modules), target_sha256=target_sha256,
    )


class RefusedFor:
    """One device's slice of a cache's refusals (keys that begin with its id), for the
    planner's ``in`` tests without copying the process-wide set."""

    __slots__ = ("_device_id", "_refused")

    def __init__(self, refused: set[Any], device_id: str) -> None:
        self._refused, self._device_id = refused, device_id

    def __contains__(self, key: object) -> bool:
        rest = key if isinstance(key, tuple) else (key,)
        return (self._device_id, *rest) in self._refused


def offer_answer(code: int) -> OfferAnswer:
    """The planner's name for the device's answer to an offer."""
    if code == OFFER_ACCEPTED:
        return OfferAnswer.ACCEPTED
    if code == OFFER_UNAVAILABLE:
        return OfferAnswer.UNAVAILABLE
    return OfferAnswer.REFUSED


def release_version(view: DeviceTarget) -> int | None:
    """The product firmware version an update delivers (None for a development binary)."""
    flash = view.pending_flash
    if flash is not None:
        return flash.version if flash.kind == "product" else None
    return view.target.version
