"""Store queries on how a release is going: update results, and the few narrow reads a
release's progress is computed from (``server.fleet.release_progress``).

The progress needs each device's target under Particle's precedence rules; rather than
restate the rules in SQL (a per-device correlated subquery measured 2.4 s on SQLite and
0.2-11 s on PostgreSQL for 10,000 devices), the store hands over five narrow, indexed reads
and the fleet applies ``otacore.precedence.resolve_fleet``, the rules' vectorised form, to
the whole product at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from server.store import schema as t
from server.store.records import ReleaseRecord

_RESULTS = t.device_update_results
_UPDATES = t.device_updates

#: The product firmware version of the image the outcome is about (ix_firmware_product_sha256):
#: a rollout steers an update past the release's target, so the image says which version
#: the device got, not the target the releases give it.
_SHA256 = sa.bindparam("sha256", type_=sa.String)
_IMAGE_VERSION = (
    sa.select(t.firmware.c.version)
    .where(t.firmware.c.product_id == sa.bindparam("product_id"),
           t.firmware.c.sha256 == _SHA256)
    .limit(1)
    .scalar_subquery()
)
#: One statement per recorded outcome: the version comes from the image when the firmware
#: is known (else the target's), the transfer and its start from the update in flight
#: (``device_updates``), read by the same INSERT before the caller clears it. An image of
#: another version than the target's is no outcome of that release: kind "other".
INSERT_UPDATE_RESULT = sa.insert(_RESULTS).values(
    product_id=sa.bindparam("product_id"),
    device_id=sa.bindparam("device_id"),
    version=sa.func.coalesce(_IMAGE_VERSION, sa.bindparam("version", type_=sa.Integer)),
    sha256=_SHA256,
    kind=sa.case(
        (sa.func.coalesce(_IMAGE_VERSION, sa.bindparam("version", type_=sa.Integer))
         == sa.bindparam("version", type_=sa.Integer), sa.bindparam("kind", type_=sa.String)),
        (sa.bindparam("version", type_=sa.Integer).is_(None),
         sa.bindparam("kind", type_=sa.String)),
        else_="other"),
    result=sa.bindparam("result"),
    error=sa.bindparam("error"),
    transfer=sa.select(_UPDATES.c.transfer)
    .where(_UPDATES.c.device_id == sa.bindparam("device_id"))
    .scalar_subquery(),
    started_at=sa.select(_UPDATES.c.started_at)
    .where(_UPDATES.c.device_id == sa.bindparam("device_id"))
    .scalar_subquery(),
    finished_at=sa.bindparam("now"),
)


@dataclass(frozen=True)
class UpdateResultRecord:
    """How one update of a device ended."""

    id: int
    product_id: int
    device_id: str
    version: int | None
    sha256: str | None
    kind: str
    result: str
    error: str
    transfer: str | None
    started_at: int | None
    finished_at: int


@dataclass(frozen=True)
class UpdatingDevice:
    """A targeted device with a transfer of the version in flight."""

    device_id: str
    transfer: str
    bytes_done: int
    bytes_total: int
    status: str
    started_at: int
    updated_at: int
    online: bool


@dataclass(frozen=True)
class DeviceColumns:
    """The product's devices, one sequence per column, sorted by id (columns, not a record
    per device: 10,000 devices cost five tuples)."""

    ids: Sequence[str] = ()
    development: Sequence[bool] = ()
    locked_version: Sequence[int | None] = ()
    firmware_version: Sequence[int | None] = ()
    online: Sequence[bool] = ()


@dataclass(frozen=True)
class ResultRow:
    """One recorded outcome of an update to the version."""

    device_id: str
    result: str
    finished_at: int
    id: int
    error: str


@dataclass(frozen=True)
class ProgressInputs:
    """What the store holds about one version's releases in one product."""

    devices: DeviceColumns
    #: (device id, group name) of every membership of a group that has a release.
    memberships: list[tuple[str, str]]
    releases: list[ReleaseRecord]
    #: Outcomes of updates to the version since its earliest release, oldest first.
    results: list[ResultRow]
    #: Transfers of the version in flight to the product's devices.
    in_flight: list[UpdatingDevice]


class ReleaseProgressQueries:
    """Update results and release progress; mixed into the store's Tx."""

    conn: Connection

    def record_update_result(
        self,
        *,
        product_id: int,
        device_id: str,
        version: int | None,
        sha256: str | None,
        kind: str,
        result: str,
        error: str,
        now: int,
    ) -> None:
        """Append how an update ended (call it before clearing the update in flight, whose
        transfer kind and start it copies)."""
        self.conn.execute(INSERT_UPDATE_RESULT, {
            "product_id": product_id, "device_id": device_id, "version": version,
            "sha256": sha256, "kind": kind, "result": result, "error": error[:2000],
            "now": now,
        })

    def list_update_results(
        self, device_id: str, *, limit: int = 20
    ) -> list[UpdateResultRecord]:
        """A device's update results, newest first."""
        query = (sa.select(*(_RESULTS.c[name] for name in UpdateResultRecord.__dataclass_fields__))
                 .where(_RESULTS.c.device_id == device_id)
                 .order_by(_RESULTS.c.id.desc()).limit(limit))
        return [UpdateResultRecord(*row) for row in self.conn.execute(query)]

    def release_progress_inputs(self, product_id: int, version: int) -> ProgressInputs:
        """What the progress of ``version``'s releases in the product is computed from, in
        five indexed reads whatever the fleet's size: the product's devices (five narrow
        columns), their memberships of groups that have a release, the releases, the
        update results of the version since its earliest release, and its transfers in
        flight."""
        d, dg, g, r, u, res = (t.devices, t.device_groups, t.groups, t.releases, _UPDATES,
                               _RESULTS)
        rows = self.conn.execute(
            sa.select(d.c.id, d.c.development, d.c.desired_firmware_version,
                      d.c.firmware_version, d.c.online)
            .where(d.c.product_id == product_id).order_by(d.c.id)).all()
        devices = DeviceColumns(*zip(*rows, strict=True)) if rows else DeviceColumns()
        memberships = [
            (str(device_id), str(name)) for device_id, name in self.conn.execute(
                sa.select(dg.c.device_id, g.c.name)
                .select_from(dg.join(g, g.c.id == dg.c.group_id))
                .where(g.c.product_id == product_id,
                       sa.exists().where(r.c.group_id == g.c.id)))
        ]
        releases = self.list_releases(product_id)  # type: ignore[attr-defined]
        times = [release.released_at for release in releases if release.version == version]
        results: list[ResultRow] = []
        in_flight: list[UpdatingDevice] = []
        if times:
            results = [
                ResultRow(*row) for row in self.conn.execute(
                    sa.select(res.c.device_id, res.c.result, res.c.finished_at, res.c.id,
                              res.c.error)
                    .where(res.c.product_id == product_id, res.c.version == version,
                           res.c.finished_at >= min(times))
                    .order_by(res.c.id))
            ]
            in_flight = [
                UpdatingDevice(*row) for row in self.conn.execute(
                    sa.select(u.c.device_id, u.c.transfer, u.c.bytes_done, u.c.bytes_total,
                              u.c.status, u.c.started_at, u.c.updated_at, d.c.online)
                    .select_from(u.join(d, d.c.id == u.c.device_id))
                    .where(d.c.product_id == product_id, u.c.version == version))
            ]
        return ProgressInputs(devices, memberships, releases, results, in_flight)
