"""Two real ``ota server`` nodes on one PostgreSQL database hand devices and jobs over when
one dies (issue 16 item 3).

Node A starts alone and takes every device (the emulated devices name both nodes; B does not
listen yet, so they fail over to A) and every job lease. Node B then starts on a copy of the
data directory and the same database: A's devices stay online, A keeps its job leases.
SIGKILL A: the devices that can fail over reconnect to B, which takes their session leases;
two devices that know only A stay away, and their leases expire: B, having taken the
sweeper's lease after A's expired, marks them offline. B then holds every job lease (the
rollout ticker among them): a rollout made through B, scheduled to start by time alone,
starts once (its events) and reaches the devices B holds.
Short lease settings (2 s, renewed every 0.5 s); every wait is for a condition.
"""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path

import httpx
import sqlalchemy as sa
import trio

from otacore.signing import TrustStore
from server.bench.fleet.nodes import copy_for_nodes
from server.bench.fleet.procs import free_port
from server.devices.keys import TRUST_FILE, read_trust_file
from server.emulator.endpoints import Endpoint
from server.emulator.fleet import EmulatedFleet, FleetMember, FleetSettings, find_credentials
from server.leases import (
    BLOB_SWEEPER,
    EVENT_HISTORY_PRUNING,
    EVENT_LOG_PRUNING,
    ROLLOUT_TICKS,
    SESSION_SWEEPER,
)
from server.store.schema import devices, leases
from tests.server_nodes import Node, provisioned_product, running_node, upload
from tests.test_ota_e2e_kit import APP_V1, FAST, SYSTEM_5003, app, updated_to

REPO = Path(__file__).resolve().parent.parent
#: Devices that fail over (both nodes known), alternating TLS / DTLS.
MOVING = 4
#: Devices that know node A only (they never come back: their leases must expire).
STAYING = 2
LEASE = ["--session-lease", "2", "--lease-renew-interval", "0.5",
         "--set", "rollouts.tick_interval=0.2"]
JOBS = (BLOB_SWEEPER, EVENT_HISTORY_PRUNING, EVENT_LOG_PRUNING, ROLLOUT_TICKS, SESSION_SWEEPER)


def presence(engine: sa.Engine) -> dict[str, tuple[bool, str | None]]:
    """Device -> (online, node holding its session lease)."""
    with engine.connect() as conn:
        rows = conn.execute(sa.select(devices.c.id, devices.c.online, devices.c.session_node))
        return {row[0]: (bool(row[1]), row[2]) for row in rows}


def job_holders(engine: sa.Engine) -> dict[str, str]:
    """Job lease -> the node holding it (a holder is a process origin, node id first)."""
    with engine.connect() as conn:
        rows = conn.execute(sa.select(leases.c.name, leases.c.holder))
        return {name: holder.partition(":")[0] for name, holder in rows}


async def wait_for(check: object, what: str, timeout: float = 60.0) -> None:
    """Poll ``check()`` (a store read in a thread) until true, failing after ``timeout``."""
    assert callable(check)
    with trio.fail_after(timeout):
        while not await trio.to_thread.run_sync(check):
            await trio.sleep(0.05)
    print("reached:", what)


async def test_a_dead_nodes_devices_and_jobs_move_to_the_live_node(
    tmp_path: Path, pg_database: str
) -> None:
    data, creds = tmp_path / "data", tmp_path / "creds"
    product, ids, token = await trio.to_thread.run_sync(
        partial(provisioned_product, data, creds, MOVING + STAYING, db_url=pg_database))
    headers = {"Authorization": f"Bearer {token}"}
    trust = TrustStore.initial(product, read_trust_file(creds / TRUST_FILE))
    found = dict(find_credentials(creds))
    moving, staying = ids[:MOVING], ids[MOVING:]
    kinds = {d: ("tcp" if n % 2 == 0 else "udp") for n, d in enumerate(ids)}
    dir_a, dir_b = copy_for_nodes(data, 2, tmp_path)
    engine = sa.create_engine(pg_database)

    def members(chosen: list[str]) -> list[FleetMember]:
        return [FleetMember(d, found[d], tmp_path / "state" / d, kinds[d])  # type: ignore[arg-type]
                for d in chosen]

    try:
        async with (
            running_node(dir_a, pg_database, tmp_path / "node-a.log", node_id="node-a",
                         extra=LEASE) as node_a,
            trio.open_nursery() as nursery,
        ):
            # Node B's device port, told to the devices before B listens (refused till then).
            port_b = free_port()
            endpoint_b = Endpoint(("127.0.0.1", port_b), ("127.0.0.1", port_b))
            fast = {**FAST, "keepalive_interval": 1.0, "keepalive_timeout": 2.0}
            both = FleetSettings(endpoints=(node_a.endpoint, endpoint_b),
                                 firmware=(SYSTEM_5003, APP_V1), trust_store=trust, **fast)
            only_a = FleetSettings(endpoints=(node_a.endpoint,),
                                   firmware=(SYSTEM_5003, APP_V1), trust_store=trust, **fast)
            fleet = EmulatedFleet(members(moving), both, seed=1)
            stayers = EmulatedFleet(members(staying), only_a, seed=2)
            await nursery.start(fleet.run)
            await nursery.start(stayers.run)
            await fleet.wait_until(lambda f: f.summary().online == MOVING, timeout=60)
            await stayers.wait_until(lambda f: f.summary().online == STAYING, timeout=60)
            await wait_for(lambda: all(p == (True, "node-a") for p in presence(engine).values()),
                           "node A holds every device's lease")
            await wait_for(lambda: job_holders(engine) == dict.fromkeys(JOBS, "node-a"),
                           "node A holds every job lease")

            # Node B starts: A's devices stay online and A's, A keeps its job leases.
            node_b = await nursery.start(_run_node_b, dir_b, pg_database,
                                         tmp_path / "node-b.log", port_b)
            assert all(p == (True, "node-a") for p in presence(engine).values())
            assert job_holders(engine) == dict.fromkeys(JOBS, "node-a")

            node_a.process.kill()  # SIGKILL: no farewell, no lease given up
            await node_a.process.wait()
            # The devices that know B reconnect there; B takes their leases.
            await wait_for(lambda: all(presence(engine)[d] == (True, "node-b") for d in moving),
                           "the moving devices' leases are node B's")
            # The others never come back: their leases expire and B's sweeper (B took
            # the sweeper's lease once A's expired) marks them offline.
            await wait_for(lambda: all(presence(engine)[d] == (False, None) for d in staying),
                           "the staying devices are offline")
            await wait_for(lambda: job_holders(engine) == dict.fromkeys(JOBS, "node-b"),
                           "node B holds every job lease")
            await fleet.wait_until(
                lambda f: f.online_by_endpoint()[endpoint_b.name] == MOVING, timeout=60)
            assert all(fleet.endpoint_of(d) == endpoint_b for d in moving)

            # A release made through B reaches the devices B holds: a rollout that starts
            # by time alone (only the rollout ticker starts it: B's now), once.
            async with httpx.AsyncClient(base_url=node_b.api_url, headers=headers,
                                         timeout=30) as api_b:
                await upload(api_b, product, 2, app(2))
                start_at = time.time_ns() // 1_000_000 + 1500
                response = await api_b.post(
                    f"/v1/products/{product}/rollouts",
                    json={"version": 2, "phases": "100", "force": True, "start_at": start_at})
                assert response.status_code == 201, response.text
                rollout = response.json()["rollout"]
                assert rollout["state"] == "scheduled", rollout
                await fleet.wait_until(lambda f: all(updated_to(d, 2)(f) for d in moving),
                                       timeout=120)
                shown = (await api_b.get(
                    f"/v1/products/{product}/rollouts/{rollout['id']}")).json()["rollout"]
                listed = (await api_b.get(f"/v1/products/{product}/devices")).json()
            kinds_seen = [event["kind"] for event in shown["events"]]
            print("rollout events:", kinds_seen)
            assert kinds_seen.count("started") == 1 and kinds_seen.count("phase_started") == 1
            online = {d["id"]: d["online"] for d in listed["devices"]}
            assert online == {**dict.fromkeys(moving, True), **dict.fromkeys(staying, False)}
            assert not fleet.crashed
            nursery.cancel_scope.cancel()
    finally:
        engine.dispose()


async def _run_node_b(data: Path, db_url: str, log_path: Path, device_port: int, *,
                      task_status: trio.TaskStatus[Node]) -> None:
    """Node B on ``device_port`` until cancelled."""
    async with running_node(data, db_url, log_path, node_id="node-b", extra=LEASE,
                            device_port=device_port) as node:
        task_status.started(node)
        await trio.sleep_forever()
