"""The device list's filters in the store (SQLite and PostgreSQL: the ``store`` fixture runs
both): a random fleet, every filter and the update status checked against an independent
model built from the same facts in Python (the precedence rules of ``otacore.precedence``),
and paging that returns each device exactly once.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest

from otacore.precedence import DeviceTargeting, ProductReleases, Release, target_firmware_for
from server.store import Store, UpdateStateRecord
from server.store.device_status import UPDATE_STATUSES

GROUPS = ("alpha", "beta", "gamma")


@dataclass
class Facts:
    """What the test wrote for one device."""

    device_id: str
    online: bool
    development: bool
    lock: int | None
    groups: frozenset[str]
    version: int | None
    updating: bool
    flash_open: bool
    last: str | None


def _expected_status(facts: Facts, releases: ProductReleases) -> str:
    target = target_firmware_for(
        DeviceTargeting(facts.development, facts.lock, facts.groups), releases).version
    if facts.updating:
        return "updating"
    if facts.flash_open:
        return "pending"
    if target is not None and facts.version == target:
        return "up_to_date"
    if facts.last == "failed":
        return "failed"
    return "pending" if target is not None else "no_target"


def _build(store: Store, seed: int, count: int = 120) -> tuple[int, list[Facts], ProductReleases]:
    rng = random.Random(seed)
    facts: list[Facts] = []
    with store.write() as tx:
        product = tx.insert_product(slug="w", name="W", platform_id=13, description="", now=1)
        other = tx.insert_product(slug="o", name="O", platform_id=13, description="", now=1)
        groups = {name: tx.insert_group(product.id, name, description="", color="", now=1)
                  for name in GROUPS}
        tx.insert_group(other.id, "alpha", description="", color="", now=1)
        default = rng.choice([None, 2, 3])
        group_versions = {name: rng.choice([1, 3, 4]) for name in GROUPS if rng.random() < 0.6}
        if default is not None:
            tx.set_release(product.id, None, version=default, intelligent=False, actor="t", now=2)
        for name, version in group_versions.items():
            tx.set_release(product.id, groups[name].id, version=version,
                           intelligent=rng.random() < 0.5, actor="t", now=2)
        for n in range(count):
            device_id = f"{n:024x}"
            tx.insert_device(device_id, product.id, 3)
            fact = Facts(
                device_id=device_id,
                online=rng.random() < 0.5,
                development=rng.random() < 0.15,
                lock=rng.choice([None, None, None, 1, 4]),
                groups=frozenset(g for g in GROUPS if rng.random() < 0.3),
                version=rng.choice([None, 1, 2, 3, 4]),
                updating=rng.random() < 0.1,
                flash_open=rng.random() < 0.1,
                last=rng.choice([None, None, "started", "succeeded", "failed"]),
            )
            facts.append(fact)
            tx.update_device(device_id, {
                "online": fact.online, "development": fact.development,
                "desired_firmware_version": fact.lock, "firmware_version": fact.version,
                "last_update_status": fact.last,
                "last_update_error": "bad image" if fact.last == "failed" else None,
            }, 4)
            tx.set_device_groups(device_id, [groups[g].id for g in fact.groups])
            if fact.updating:
                tx.put_update_state(UpdateStateRecord(device_id, "ab" * 32, 4, "full", 10,
                                                      100, "in_progress", 5, 5))
            if fact.flash_open or rng.random() < 0.2:  # closed flashes count for nothing
                tx.insert_flash(device_id=device_id, kind="product", version=4,
                                sha256="cd" * 32, size=1, filename="", module_info=None,
                                status="pending" if fact.flash_open else "succeeded",
                                error="", requested_by="t", requested_at=6, finished_at=None)
        # A device of another product matches no filter of this one.
        tx.insert_device("f" * 24, other.id, 3)
        tx.update_device("f" * 24, {"online": True, "firmware_version": 1}, 4)
    releases = ProductReleases(
        None if default is None else Release(default),
        {name: Release(version) for name, version in group_versions.items()})
    return product.id, facts, releases


@pytest.mark.parametrize("run", [1, 2])
def test_filters_and_statuses_match_the_model(store: Store, run: int) -> None:
    seed = random.randrange(2**32)  # drawn here: xdist workers must collect the same ids
    print(f"run {run}: seed {seed}")
    product_id, facts, releases = _build(store, seed)
    expected = {f.device_id: _expected_status(f, releases) for f in facts}
    cases: list[tuple[dict[str, object], set[str]]] = [
        ({}, {f.device_id for f in facts}),
        ({"online": True}, {f.device_id for f in facts if f.online}),
        ({"online": False}, {f.device_id for f in facts if not f.online}),
        ({"development": True}, {f.device_id for f in facts if f.development}),
        ({"locked": True}, {f.device_id for f in facts if f.lock is not None}),
        ({"locked": False}, {f.device_id for f in facts if f.lock is None}),
        ({"firmware_version": 3}, {f.device_id for f in facts if f.version == 3}),
        ({"group_names": ["beta"]}, {f.device_id for f in facts if "beta" in f.groups}),
        ({"group_names": ["beta"], "online": True, "locked": False},
         {f.device_id for f in facts if "beta" in f.groups and f.online and f.lock is None}),
    ]
    cases += [({"update_status": status}, {d for d, s in expected.items() if s == status})
              for status in UPDATE_STATUSES]
    with store.read() as tx:
        for filters, wanted in cases:
            records, total = tx.list_devices(product_id, **filters)  # type: ignore[arg-type]
            assert {r.id for r in records} == wanted, filters
            assert total == len(wanted), filters
        statuses = tx.device_statuses(product_id, [f.device_id for f in facts])
        assert {d: s.update_status for d, s in statuses.items()} == expected
        assert {d: s.last_update_error for d, s in statuses.items() if s.last_update_error} == {
            f.device_id: "bad image" for f in facts if f.last == "failed"}
        # Pages of 7 cover the matching devices once each, in id order.
        wanted = sorted(d for d, s in expected.items() if s in ("pending", "failed"))
        seen: list[str] = []
        for status in ("pending", "failed"):
            offset = 0
            while True:
                page, total = tx.list_devices(product_id, update_status=status,
                                              offset=offset, limit=7)
                assert len(page) <= 7
                seen += [r.id for r in page]
                offset += 7
                if offset >= total:
                    break
        assert sorted(seen) == wanted and len(seen) == len(set(seen))


def test_an_unknown_update_status_is_refused(store: Store) -> None:
    with store.write() as tx:
        product = tx.insert_product(slug="w", name="W", platform_id=13, description="", now=1)
    with store.read() as tx, pytest.raises(ValueError, match="unknown update status"):
        tx.list_devices(product.id, update_status="sideways")
