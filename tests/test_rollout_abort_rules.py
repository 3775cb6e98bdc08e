"""What an abort leaves, over the rollout service and a real SQLite file (the rule of
README "Rolling out safely"): devices that succeeded keep the version, with no offer, until
a release of their scope made after the abort, a lock, or a later rollout that reaches
them; other devices fall back to the releases; the product stays "may steer" only while
an aborted rollout keeps devices. tests/test_rollout_abort.py proves it over real sockets.
"""

from __future__ import annotations

import pytest

from otacore.rollout import Verdict
from server.events import EventBus
from server.fleet import SYSTEM_ACTOR
from server.fleet.rollouts import RolloutOffer, RolloutService
from server.store import Store
from tests import test_rollout_service as service_tests
from tests.test_rollout_service import CANARY, MIN, Clock

# The rollout service's fixtures: a fake clock, the service, 60 devices on v1.
clock = service_tests.clock
bus_events = service_tests.bus_events
service = service_tests.service
product = service_tests.product

#: Phase 1 is four devices; phase 2 waits an hour after it: it stays closed here.
HELD = {"phases": "#4,all", "phase_wait": 60, "force": True}


async def _offer(service: RolloutService, store: Store, device_id: str) -> RolloutOffer | None:
    with store.read() as tx:
        device = tx.get_device(device_id)
        assert device is not None
        record = tx.get_product(device.product_id)
        assert record is not None
    return await service.rollout_offer(device, record)


def _set(store: Store, device_id: str, clock: Clock, **fields: object) -> None:
    with store.write() as tx:
        tx.update_device(device_id, dict(fields), clock.now)


def _release(store: Store, product_id: int, version: int, clock: Clock,
             group: str | None = None) -> None:
    with store.write() as tx:
        group_id = None
        if group is not None:
            found = tx.get_group(product_id, group)
            assert found is not None
            group_id = found.id
        tx.set_release(product_id, group_id, version=version, intelligent=False,
                       actor="test", now=clock.now)


async def _succeed(service: RolloutService, store: Store, clock: Clock, rollout_id: int,
                   device_id: str, version: int) -> None:
    for outcome in ("offered", "downloading", "rebooting", "succeeded"):
        await service.record_rollout_outcome("sensors", rollout_id, device_id, outcome)
    _set(store, device_id, clock, firmware_version=version)


def _census(store: Store, clock: Clock) -> RolloutService:
    """A service of a process that knows nothing yet (its first ask reads the store)."""
    return RolloutService(store, EventBus(), clock=clock)


async def test_succeeded_devices_keep_the_version_until_a_release_after_the_abort(
    service: RolloutService, store: Store, clock: Clock, product: int
) -> None:
    _release(store, product, 1, clock)
    clock.now += MIN
    view = await service.create_rollout(SYSTEM_ACTOR, "sensors", {"version": 2, **HELD})
    rollout_id = view.record.id
    first = sorted(view.rollout.members(0))
    kept, discarded = first[0], first[1]
    await _succeed(service, store, clock, rollout_id, kept, 2)
    await service.record_rollout_outcome("sensors", rollout_id, discarded, "offered")
    clock.now += MIN
    aborted = await service.abort_rollout(SYSTEM_ACTOR, "sensors", rollout_id, "bad build")
    assert aborted.rollout.aborted_at == clock.now
    clock.now += MIN

    offer = await _offer(service, store, kept)
    assert offer is not None and offer.steers and not offer.new_offer
    assert offer.decision.verdict is Verdict.SUCCEEDED and offer.version == 2
    assert await _census(store, clock).rollouts_may_steer(product)
    # Not kept: the device mid-download (it discards), a device never reached.
    assert await _offer(service, store, discarded) is None
    later = next(d for d in sorted(view.rollout.targets) if d not in first)
    assert await _offer(service, store, later) is None

    # A device that left the version since is never sent back to it.
    _set(store, kept, clock, firmware_version=1)
    assert await _offer(service, store, kept) is None
    _set(store, kept, clock, firmware_version=2)
    # An operator's lock wins; unlocked, the device is kept again.
    _set(store, kept, clock, desired_firmware_version=1)
    assert await _offer(service, store, kept) is None
    _set(store, kept, clock, desired_firmware_version=None)
    assert (await _offer(service, store, kept)) is not None

    # The release made again after the abort supersedes the rollout, in every process.
    clock.now += MIN
    _release(store, product, 1, clock)
    assert await _offer(service, store, kept) is None
    assert not await _census(store, clock).rollouts_may_steer(product)


async def test_a_later_rollout_waiting_for_its_phase_does_not_downgrade_kept_devices(
    service: RolloutService, store: Store, clock: Clock, product: int
) -> None:
    _release(store, product, 1, clock)
    view = await service.create_rollout(SYSTEM_ACTOR, "sensors", {"version": 2, **HELD})
    first = sorted(view.rollout.members(0))
    for device_id in first:
        await _succeed(service, store, clock, view.record.id, device_id, 2)
    clock.now += MIN
    await service.abort_rollout(SYSTEM_ACTOR, "sensors", view.record.id)
    clock.now += MIN
    newer = await service.create_rollout(SYSTEM_ACTOR, "sensors",
                                         {"version": 3, "phases": "#1,all",
                                          "phase_wait": 60, "force": True})
    reached = set(newer.rollout.members(0))
    for device_id in first:
        offer = await _offer(service, store, device_id)
        assert offer is not None and offer.steers, device_id
        if device_id in reached:  # the newer rollout's phase is open for it: v3
            assert offer.rollout_id == newer.record.id and offer.new_offer
        else:  # its phase is not open: it stays on v2 meanwhile, never back to v1
            assert offer.rollout_id == view.record.id and offer.version == 2
            assert offer.decision.verdict is Verdict.SUCCEEDED
    assert any(d not in reached for d in first)


async def test_a_group_rollout_is_superseded_by_its_group_s_release_only(
    service: RolloutService, store: Store, clock: Clock, product: int
) -> None:
    _release(store, product, 1, clock)
    view = await service.create_rollout(
        SYSTEM_ACTOR, "sensors",
        {"version": 2, "groups": ["canary"], "phases": "#2,all", "phase_wait": 60,
         "force": True})
    kept = sorted(view.rollout.members(0))[0]
    assert kept in CANARY
    await _succeed(service, store, clock, view.record.id, kept, 2)
    clock.now += MIN
    await service.abort_rollout(SYSTEM_ACTOR, "sensors", view.record.id)
    clock.now += MIN
    _release(store, product, 1, clock)  # the product default: not the rollout's scope
    offer = await _offer(service, store, kept)
    assert offer is not None and offer.version == 2 and not offer.new_offer
    clock.now += MIN
    _release(store, product, 1, clock, group="canary")  # its group's release: superseded
    assert await _offer(service, store, kept) is None


@pytest.mark.parametrize("outcome", ["rolled_back", "succeeded"])
async def test_a_device_rebooting_at_the_abort_still_reports(
    service: RolloutService, store: Store, clock: Clock, product: int, outcome: str
) -> None:
    _release(store, product, 1, clock)
    view = await service.create_rollout(SYSTEM_ACTOR, "sensors", {"version": 2, **HELD})
    device_id = sorted(view.rollout.members(0))[0]
    for step in ("offered", "downloading", "rebooting"):
        await service.record_rollout_outcome("sensors", view.record.id, device_id, step)
    await service.abort_rollout(SYSTEM_ACTOR, "sensors", view.record.id)
    # Its product's sessions still consult the rollout, so the result is recorded.
    assert await _census(store, clock).rollouts_may_steer(product)
    shown = await service.record_rollout_outcome("sensors", view.record.id, device_id,
                                                 outcome)
    assert shown.counts.total.to_dict()[outcome] == 1
    _set(store, device_id, clock, firmware_version=2 if outcome == "succeeded" else 1)
    offer = await _offer(service, store, device_id)
    if outcome == "succeeded":
        assert offer is not None and offer.version == 2 and not offer.new_offer
    else:
        assert offer is None
        assert not await _census(store, clock).rollouts_may_steer(product)
