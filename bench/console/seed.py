"""A large product in a store, fast: the console benchmark's and screenshots' fleet.

Device rows are written in bulk (one INSERT of many rows per table, in one transaction: ~1 s
for 10,000 devices here) with what an operator's fleet has after running a while: most
devices on v1, a share already on v2 (a release under way), a few in development, a few
locked, some updates in flight, groups by region (and a small canary group), each device's
last Hello, and audit entries for the locks and development flags. The values come from a
seeded ``random.Random``; the caller prints the seed and records it with the results.

Devices seeded this way have no certificates: they never connect. Their ``online`` flag is
left for the server to settle (the embedded store's server marks every device offline when
it starts).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import sqlalchemy as sa

from server.store import Store
from server.store.schema import audit_log, device_groups, device_updates, devices

#: Groups by region, and a small canary group (1 in 100 devices).
REGIONS = ("north", "south", "east", "west")
CANARY_GROUP = "canary"
BORON = 13
SYSTEM_VERSION = 5003


@dataclass
class SeedPlan:
    """How the seeded devices look (shares are fractions of ``count``)."""

    count: int
    seed: int
    #: Versions the devices run: the first for most, the last for ``updated_share``.
    versions: tuple[int, int] = (1, 2)
    updated_share: float = 0.35
    development_share: float = 0.02
    locked_share: float = 0.01
    in_flight_share: float = 0.01
    id_prefix: str = ""


@dataclass
class SeededFleet:
    """What :func:`seed_devices` wrote: every id, and the devices of each kind."""

    device_ids: list[str]
    updated: list[str] = field(default_factory=list)
    development: list[str] = field(default_factory=list)
    locked: list[str] = field(default_factory=list)
    in_flight: list[str] = field(default_factory=list)
    groups: dict[str, list[str]] = field(default_factory=dict)


def _device_id(rng: random.Random, prefix: str) -> str:
    """24 lowercase hex digits, as Particle's device ids (``prefix`` first)."""
    return (prefix + f"{rng.getrandbits(96):024x}")[:24]


def seed_devices(store: Store, product_id: int, plan: SeedPlan, *, now: int) -> SeededFleet:
    """Write ``plan.count`` devices of ``product_id`` (and their groups, updates in flight
    and events) into ``store`` in one transaction; ``now`` in epoch milliseconds."""
    rng = random.Random(plan.seed)
    old, new = plan.versions
    ids: set[str] = set()
    while len(ids) < plan.count:
        ids.add(_device_id(rng, plan.id_prefix))
    seeded = SeededFleet(sorted(ids))
    device_rows: list[dict[str, object]] = []
    update_rows: list[dict[str, object]] = []
    audit_rows: list[dict[str, object]] = []
    for device_id in seeded.device_ids:
        updated = rng.random() < plan.updated_share
        locked = rng.random() < plan.locked_share
        development = rng.random() < plan.development_share
        in_flight = not updated and rng.random() < plan.in_flight_share
        heard = now - rng.randrange(10_000, 7 * 86_400_000)
        version = new if updated else old
        for kind, chosen in (("updated", updated), ("locked", locked),
                             ("development", development), ("in_flight", in_flight)):
            if chosen:
                getattr(seeded, kind).append(device_id)
        device_rows.append({
            "id": device_id, "product_id": product_id, "name": None, "notes": "",
            "development": development,
            "desired_firmware_version": old if locked else None,
            "flash_requested": False, "firmware_updates_forced": False,
            "firmware_updates_enabled": True, "updates_pending": False,
            "reset_pending": False, "online": False, "certs_revoked": False,
            "last_ip_address": f"198.51.100.{rng.randrange(1, 255)}",
            "last_handshake_at": heard, "last_heard_at": heard, "platform_id": BORON,
            "firmware_version": version, "system_version": SYSTEM_VERSION,
            "created_at": heard - 86_400_000, "updated_at": heard,
        })  # fmt: skip
        if in_flight:
            total = 96 * 1024
            update_rows.append({
                "device_id": device_id, "sha256": "0" * 64, "version": new, "transfer": "delta",
                "bytes_done": rng.randrange(total), "bytes_total": total,
                "status": "downloading", "started_at": now - 60_000, "updated_at": now - 1000,
            })  # fmt: skip
        for action, chosen, details in (
            ("device.update", development, {"development": True}),
            ("device.lock", locked, {"version": old, "flash_now": False}),
        ):
            if chosen:
                audit_rows.append({"at": heard, "actor": "user:ops@example.com",
                                   "action": action, "product_id": product_id,
                                   "target": f"device:{device_id}", "details": details})
    group_members: dict[str, list[str]] = {name: [] for name in (*REGIONS, CANARY_GROUP)}
    for device_id in seeded.device_ids:
        group_members[rng.choice(REGIONS)].append(device_id)
        if rng.random() < 0.01:
            group_members[CANARY_GROUP].append(device_id)
    seeded.groups = group_members
    audit_rows.sort(key=lambda row: int(str(row["at"])))
    with store.write() as tx:  # one executemany per table
        conn = tx.conn
        conn.execute(sa.insert(devices), device_rows)
        if update_rows:
            conn.execute(sa.insert(device_updates), update_rows)
        membership = []
        for group in tx.ensure_groups(product_id, group_members, now):
            membership += [{"device_id": d, "group_id": group.id}
                           for d in group_members[group.name]]
        conn.execute(sa.insert(device_groups), membership)
        if audit_rows:
            conn.execute(sa.insert(audit_log), audit_rows)
        tx.add_audit(actor="admin:bench-seed", action="device.add", product_id=product_id,
                     target=f"devices:{len(device_rows)}",
                     details={"seed": plan.seed, "count": plan.count}, now=now)
    return seeded
