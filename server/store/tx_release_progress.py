"""Store queries on how a release is going: update results and per-release progress.

A firmware version's release progress is aggregated in SQL over the devices whose target the
release decides, with Particle's precedence rules (``otacore.precedence``) written as a query:
a development or locked device is no release's target; a device in groups with released
firmware follows the highest version released to them (then an immediate release, then the
smallest group name); any other device follows the product default. So a product of 10,000
devices costs a few indexed queries, never a load of every device row.
"""

from __future__ import annotations

from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from server.store import schema as t
from server.store.tx_firmware import PRODUCT_SCOPE

_RESULTS = t.device_update_results
_UPDATES = t.device_updates

#: One statement per recorded outcome: the transfer and its start come from the update in
#: flight (``device_updates``), read by the same INSERT before the caller clears it.
INSERT_UPDATE_RESULT = sa.insert(_RESULTS).values(
    product_id=sa.bindparam("product_id"),
    device_id=sa.bindparam("device_id"),
    version=sa.bindparam("version"),
    sha256=sa.bindparam("sha256"),
    kind=sa.bindparam("kind"),
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
class ReleaseCounts:
    """The devices one release (product default or a group's) decides, by state.

    ``target``: devices whose target the release decides; ``updated``: those reporting the
    version; ``updating``: those with a transfer of the version in flight; ``failed``: those
    whose last update of the version since the release failed (and that run something
    else, with nothing in flight); ``pending``: the rest."""

    release_id: int
    scope: str
    group_name: str | None
    intelligent: bool
    released_at: int
    released_by: str
    target: int
    updated: int
    updating: int
    failed: int

    @property
    def pending(self) -> int:
        """Targeted devices neither updated, updating nor failed."""
        return self.target - self.updated - self.updating - self.failed


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
class FailedDevice:
    """A targeted device whose last update of the version since its release failed."""

    device_id: str
    error: str
    failed_at: int
    firmware_version: int | None
    online: bool


@dataclass(frozen=True)
class ProgressRows:
    """What the store knows of one version's release in one product."""

    releases: tuple[ReleaseCounts, ...]
    #: Milliseconds from each updated device's release to its first success since, sorted.
    latencies_ms: tuple[int, ...]
    updating: tuple[UpdatingDevice, ...]
    failed: tuple[FailedDevice, ...]


def _group_order(conn: Connection) -> sa.ColumnElement[str]:
    """Group names in code-point order, as Python's ``min`` compares them in the precedence
    rules (PostgreSQL's default collation may follow the locale instead)."""
    name = t.groups.c.name
    return name.collate("C") if conn.dialect.name == "postgresql" else name


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

    def _deciding_releases(self, product_id: int) -> sa.Subquery:
        """(device_id, release_id) of every device of the product whose target a release
        decides (otacore.precedence rules 1-4)."""
        r, dg, g, d = t.releases, t.device_groups, t.groups, t.devices
        # Rule 3: the device's groups with a release, best first.
        ranked = (
            sa.select(
                dg.c.device_id,
                r.c.id.label("release_id"),
                sa.func.row_number().over(
                    partition_by=dg.c.device_id,
                    order_by=(r.c.version.desc(), r.c.intelligent.desc(),
                              _group_order(self.conn).asc()),
                ).label("rank"),
            )
            .select_from(dg.join(r, r.c.group_id == dg.c.group_id)
                         .join(g, g.c.id == dg.c.group_id))
            .where(r.c.product_id == product_id)
            .subquery("ranked")
        )
        winner = (sa.select(ranked.c.device_id, ranked.c.release_id)
                  .where(ranked.c.rank == 1).subquery("winner"))
        default = (sa.select(r.c.id).where(r.c.product_id == product_id,
                                           r.c.scope == PRODUCT_SCOPE)
                   .scalar_subquery())
        deciding = (
            sa.select(d.c.id.label("device_id"),
                      sa.func.coalesce(winner.c.release_id, default).label("release_id"))
            .select_from(d.outerjoin(winner, winner.c.device_id == d.c.id))
            # Rules 1 and 2: development and locked devices follow no release.
            .where(d.c.product_id == product_id, d.c.development.is_(False),
                   d.c.desired_firmware_version.is_(None))
            .subquery("deciding")
        )
        return deciding

    def _device_states(self, product_id: int, version: int) -> sa.Subquery:
        """One row per device a release of ``version`` decides, with its state and the
        times of its first success and last failure of the version since its release."""
        deciding = self._deciding_releases(product_id)
        r, d, u, res = t.releases, t.devices, _UPDATES, _RESULTS
        since = sa.and_(res.c.device_id == d.c.id, res.c.product_id == product_id,
                        res.c.version == version, res.c.finished_at >= r.c.released_at)
        succeeded_at = sa.func.min(sa.case((res.c.result == "success", res.c.finished_at)))
        failed_id = sa.func.max(sa.case((res.c.result == "failed", res.c.id)))
        return (
            sa.select(
                d.c.id.label("device_id"),
                r.c.id.label("release_id"),
                r.c.released_at,
                d.c.online,
                d.c.firmware_version,
                (sa.func.coalesce(d.c.firmware_version, -1) == version).label("updated"),
                (u.c.device_id.is_not(None)).label("in_flight"),
                succeeded_at.label("succeeded_at"),
                failed_id.label("failed_id"),
            )
            .select_from(
                deciding.join(r, r.c.id == deciding.c.release_id)
                .join(d, d.c.id == deciding.c.device_id)
                .outerjoin(u, sa.and_(u.c.device_id == d.c.id, u.c.version == version))
                .outerjoin(res, since)
            )
            .where(r.c.version == version)
            .group_by(d.c.id, r.c.id, r.c.released_at, d.c.online, d.c.firmware_version,
                      u.c.device_id)
            .subquery("states")
        )

    def release_progress(
        self, product_id: int, version: int, *, list_limit: int = 50
    ) -> ProgressRows:
        """How the releases of ``version`` in the product are going (see
        :class:`ReleaseCounts`); at most ``list_limit`` devices updating and failed each
        (the counts are complete)."""
        states = self._device_states(product_id, version)
        updated = states.c.updated
        updating = sa.and_(sa.not_(updated), states.c.in_flight)
        failed = sa.and_(sa.not_(updated), sa.not_(states.c.in_flight),
                         states.c.failed_id.is_not(None))

        def count(condition: sa.ColumnElement[bool]) -> sa.ColumnElement[int]:
            return sa.func.coalesce(sa.func.sum(sa.case((condition, 1), else_=0)), 0)

        r, g = t.releases, t.groups
        per_release = (
            sa.select(states.c.release_id, sa.func.count().label("target"),
                      count(updated).label("updated"), count(updating).label("updating"),
                      count(failed).label("failed"))
            .group_by(states.c.release_id)
            .subquery("per_release")
        )
        rows = self.conn.execute(
            sa.select(r.c.id, r.c.scope, g.c.name, r.c.intelligent, r.c.released_at,
                      r.c.released_by, per_release.c.target, per_release.c.updated,
                      per_release.c.updating, per_release.c.failed)
            .select_from(r.outerjoin(g, g.c.id == r.c.group_id)
                         .outerjoin(per_release, per_release.c.release_id == r.c.id))
            .where(r.c.product_id == product_id, r.c.version == version)
            .order_by(r.c.group_id.is_not(None), g.c.name)
        ).all()
        releases = tuple(
            ReleaseCounts(int(rid), scope, name, bool(intelligent), int(at), by,
                          int(target or 0), int(done or 0), int(doing or 0), int(bad or 0))
            for rid, scope, name, intelligent, at, by, target, done, doing, bad in rows
        )
        latencies = tuple(int(ms) for ms, in self.conn.execute(
            sa.select((states.c.succeeded_at - states.c.released_at).label("ms"))
            .where(updated, states.c.succeeded_at.is_not(None))
            .order_by("ms")
        ))
        u = _UPDATES
        in_flight = tuple(UpdatingDevice(*row) for row in self.conn.execute(
            sa.select(u.c.device_id, u.c.transfer, u.c.bytes_done, u.c.bytes_total, u.c.status,
                      u.c.started_at, u.c.updated_at, states.c.online)
            .select_from(states.join(u, u.c.device_id == states.c.device_id))
            .where(updating)
            .order_by(u.c.updated_at.desc(), u.c.device_id)
            .limit(list_limit)
        ))
        res = _RESULTS
        failures = tuple(FailedDevice(*row) for row in self.conn.execute(
            sa.select(states.c.device_id, res.c.error, res.c.finished_at,
                      states.c.firmware_version, states.c.online)
            .select_from(states.join(res, res.c.id == states.c.failed_id))
            .where(failed)
            .order_by(res.c.finished_at.desc(), states.c.device_id)
            .limit(list_limit)
        ))
        return ProgressRows(releases, latencies, in_flight, failures)
