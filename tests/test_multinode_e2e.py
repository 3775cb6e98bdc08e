"""Three nodes on one PostgreSQL database, one fleet (issue 16, done when).

Three separate ``ota server`` processes are the nodes of one installation: copies of one
data directory (CA, server certificate, signing keys) and one ``--db-url``. 300 emulated
devices, alternating TLS and DTLS, spread over them (each device's own order of the three
endpoints, failing over as a device with several DNS answers does). Then:

- an immediate release made through node C's API reaches the devices of nodes A and B;
- node A is SIGKILLed in the middle of that release, as soon as one of its devices holds
  30% of the image; its devices fail over to B and C and resume there;
- every device ends on the new version;
- no acknowledged write is lost: a client writes through all three APIs during the release,
  and every write a node answered with a 2xx (A's included, before it died) is in the
  store at the end;
- no device is counted twice: the release's counters and the device list count each device
  once (300 succeeded, none updating or failed, 300 online, each once).
"""

from __future__ import annotations

import os
import signal
from functools import partial
from pathlib import Path

import httpx
import trio

from otacore.signing import TrustStore
from server.bench.fleet.nodes import copy_for_nodes
from server.devices.keys import TRUST_FILE, read_trust_file
from server.emulator.fleet import EmulatedFleet, FleetMember, FleetSettings, find_credentials
from tests.server_nodes import provisioned_product, running_node, upload
from tests.test_ota_e2e_kit import APP_V1, FAST, SYSTEM_5003, app, updated_to

DEVICES = 300  # alternating TLS / DTLS
#: A Boron application near its size limit, so that node A dies mid-transfer.
APP_SIZE = 64_000
#: How long the whole fleet may take for one step on a busy 2-core machine (a failure
#: only: every wait ends as soon as its condition holds).
STEP = 120


async def _devices(api: httpx.AsyncClient, product: int) -> list[dict[str, object]]:
    """Every device of the product, through the API's pages."""
    found: list[dict[str, object]] = []
    page = 1
    while True:
        response = await api.get(f"/v1/products/{product}/devices",
                                 params={"page": page, "per_page": 100})
        assert response.status_code == 200, response.text
        batch = response.json()["devices"]
        found += batch
        if len(batch) < 100:
            return found
        page += 1


async def test_three_nodes_one_release_one_node_killed(tmp_path: Path, pg_database: str) -> None:
    db_url = pg_database
    data, creds = tmp_path / "data", tmp_path / "creds"
    product, ids, token = await trio.to_thread.run_sync(
        partial(provisioned_product, data, creds, DEVICES, db_url=db_url))
    headers = {"Authorization": f"Bearer {token}"}
    trust = TrustStore.initial(product, read_trust_file(creds / TRUST_FILE))
    found = dict(find_credentials(creds))
    kinds = {d: ("tcp" if n % 2 == 0 else "udp") for n, d in enumerate(ids)}
    # Copies of the data directory (CA, server certificate, signing keys), no blob
    # directory: on PostgreSQL the nodes share nothing but the database.
    dirs = copy_for_nodes(data, 3, tmp_path, link_blobs=False)
    async with (
        running_node(dirs[0], db_url, tmp_path / "node-a.log") as node_a,
        running_node(dirs[1], db_url, tmp_path / "node-b.log") as node_b,
        running_node(dirs[2], db_url, tmp_path / "node-c.log") as node_c,
        trio.open_nursery() as nursery,
    ):
        nodes = {"A": node_a, "B": node_b, "C": node_c}
        apis = {name: httpx.AsyncClient(base_url=node.api_url, headers=headers, timeout=30)
                for name, node in nodes.items()}
        api_c = apis["C"]
        response = await api_c.post(
            "/v1/device-os",
            files={"binary": ("system-part1.bin", SYSTEM_5003, "application/octet-stream")},
        )
        assert response.status_code == 201, response.text
        await upload(api_c, product, 2, app(2, size=APP_SIZE))

        members = [
            FleetMember(d, found[d], tmp_path / "state" / d, kinds[d])  # type: ignore[arg-type]
            for d in ids
        ]
        settings = FleetSettings(
            endpoints=tuple(node.endpoint for node in nodes.values()),
            firmware=(SYSTEM_5003, APP_V1), trust_store=trust, **FAST,
            # A DTLS device learns its node died from a missed keep-alive (no FIN).
            keepalive_interval=2.0, keepalive_timeout=3.0,
        )  # fmt: skip
        fleet = EmulatedFleet(members, settings, seed=16)
        await nursery.start(fleet.run)
        await fleet.wait_until(lambda f: f.summary().online == DEVICES, timeout=STEP)
        at = {d: fleet.endpoint_of(d) for d in ids}
        print("devices per node:", fleet.online_by_endpoint())
        victims = [d for d in ids if at[d] == node_a.endpoint]
        assert {kinds[d] for d in victims} == {"tcp", "udp"}, "node A holds both transports"

        # A client writing through every node while the release runs; what a node
        # acknowledged (2xx) must be in the store at the end.
        acknowledged: list[str] = []
        writing = trio.CancelScope()

        async def write_through_every_node() -> None:
            with writing:
                for n in range(10_000):
                    name = "ABC"[n % 3]
                    group = f"w-{name.lower()}-{n}"
                    try:
                        written = await apis[name].post(f"/v1/products/{product}/groups",
                                                        json={"name": group})
                    except httpx.HTTPError:
                        continue  # node A is gone: not acknowledged
                    if written.status_code == 201:
                        acknowledged.append(group)
                    await trio.sleep(0.02)

        nursery.start_soon(write_through_every_node)

        killed = trio.Event()

        def kill_at_30_percent(device_id: str) -> None:
            machine = fleet.device(device_id).device
            deliver = machine.receive

            def receive(data: bytes, now: float) -> None:
                deliver(data, now)
                total = machine.bytes_total
                if not killed.is_set() and total and machine.bytes_received >= 0.3 * total:
                    os.kill(node_a.pid, signal.SIGKILL)
                    killed.set()

            machine.receive = receive  # type: ignore[method-assign]  # instrumentation

        for device_id in victims:
            kill_at_30_percent(device_id)
        released = await api_c.put(
            f"/v1/products/{product}/firmware/release",
            json={"version": 2, "product_default": True, "intelligent": True, "force": True},
        )
        assert released.status_code == 200, released.text
        with trio.fail_after(STEP):
            await killed.wait()
            await node_a.process.wait()

        await fleet.wait_until(lambda f: all(updated_to(d, 2)(f) for d in ids), timeout=STEP)
        assert all(fleet.endpoint_of(d) != node_a.endpoint for d in victims)
        writing.cancel()
        assert not fleet.crashed

        # Nothing acknowledged is lost (asked of node B: another node than most writers).
        groups = await apis["B"].get(f"/v1/products/{product}/groups")
        assert groups.status_code == 200, groups.text
        stored = {g["name"] for g in groups.json()["groups"]}
        assert set(acknowledged) <= stored, set(acknowledged) - stored
        assert any(g.startswith("w-a-") for g in acknowledged), "node A acknowledged writes"

        # Each device counted once: in the release's counters and in the device list.
        seen: list[object] = []

        async def counted_once() -> bool:
            firmware = (await api_c.get(f"/v1/products/{product}/firmware/2")).json()
            listed = await _devices(apis["B"], product)
            online = [d["id"] for d in listed if d["online"]]
            offline = sorted(set(ids) - set(online))
            stats = firmware["release_stats"]
            counts = {key: stats[key] for key in ("running", "updating", "succeeded", "failed")}
            seen[:] = [stats, len(online), len(set(online)),
                       [(d, kinds[d], d in victims, fleet.endpoint_of(d).name,
                         fleet.device(d).device.sessions) for d in offline]]
            return (counts == {"running": DEVICES, "updating": 0, "succeeded": DEVICES,
                               "failed": 0}
                    and len(online) == len(set(online)) == DEVICES)

        try:
            with trio.fail_after(STEP):
                while not await counted_once():
                    await trio.sleep(0.5)
        finally:
            print("release stats, online, distinct online:", seen)
        for api in apis.values():
            await api.aclose()
        nursery.cancel_scope.cancel()
