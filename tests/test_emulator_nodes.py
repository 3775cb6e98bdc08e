"""Emulated devices spread over several server endpoints, failing over when one dies.

The unit tests check each device's endpoint order (rendezvous hashing: stable, even, and a
dead endpoint's devices spread over the others) and the CLI's failover from a refusing
endpoint. The end-to-end test starts two separate ``ota server`` processes (``--workers 2``
each) as the nodes of one installation: copies of one data directory without the store (the
blob directory shared) and one SQLite database (``--db-url``); it runs emulated devices on
both transports over both, makes an immediate release through one node and SIGKILLs that
node as soon as one of its devices holds 30% of the image. Every device ends on the new
version: the other node's own devices through the store's event relay, the killed node's
devices by failing over to the other node, where those cut off mid-download resume from the
chunks they hold. Then all take a further release made through the survivor.

(On SQLite each node needs its own data directory: a server on the embedded store holds its
directory's lock alone once server/data_lock.py is in.)

Separate ``ota server`` processes pass events to each other through the store event relay,
which every node runs; the nodes here run ``--workers 2`` so that worker processes are
covered too (tests/test_multinode_e2e.py runs single-process nodes).
"""

from __future__ import annotations

import json
import os
import signal
import socket
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
import trio

from otacore.errors import ValidationError
from otacore.signing import TrustStore
from server.bench.fleet.nodes import copy_for_nodes
from server.bench.fleet.procs import free_port
from server.cli.emulate_cmd import emulate
from server.devices.keys import TRUST_FILE, read_trust_file
from server.emulator.endpoints import Endpoint, endpoint_order, format_address
from server.emulator.fleet import EmulatedFleet, FleetMember, FleetSettings, find_credentials
from server.identity import pki_dir, provision_devices
from server.store import Store
from server.store.schema import devices
from tests.server_nodes import Node, provisioned_product, release, running_node, upload
from tests.test_emulated_device import KEY, PRODUCT, SYSTEM, V1, V2, Offer, ScriptedCloud
from tests.test_emulator_fleet import CloudHandler, address, offer_when_behind, start_rig
from tests.test_ota_e2e_kit import APP_V1, FAST, SYSTEM_5003, app, updated_to

REPO = Path(__file__).resolve().parent.parent
#: Near the 256 KiB limit of a Boron application, so that transfers are cut off mid-way.
BIG_APP = 250_000


def _endpoints(count: int) -> list[Endpoint]:
    return [Endpoint(("10.0.0.1", 5684 + n)) for n in range(count)]


def test_endpoint_order_is_stable_even_and_spreads_a_dead_endpoints_devices() -> None:
    endpoints = _endpoints(3)
    ids = [f"{n:024x}" for n in range(3000)]
    orders = {device: endpoint_order(device, endpoints) for device in ids}
    assert all(sorted(order) == [0, 1, 2] for order in orders.values())
    assert orders == {device: endpoint_order(device, endpoints) for device in ids}  # stable
    first = [order[0] for order in orders.values()]
    assert all(900 <= first.count(n) <= 1100 for n in range(3)), [first.count(n) for n in range(3)]
    # Endpoint 0 dies: its devices' next choices are spread over 1 and 2, not all on one.
    second = [order[1] for order in orders.values() if order[0] == 0]
    assert 0.4 < second.count(1) / len(second) < 0.6
    # Removing an endpoint moves only the devices whose first choice it was.
    fewer = [endpoints[0], endpoints[2]]
    for device, order in orders.items():
        if order[0] != 1:
            assert fewer[endpoint_order(device, fewer)[0]] == endpoints[order[0]]


def test_endpoint_names_and_settings_checks() -> None:
    assert format_address(("::1", 5684)) == "[::1]:5684"
    both = Endpoint(("h", 1), ("h", 2))
    assert (both.address("tcp"), both.address("udp"), both.name) == (("h", 1), ("h", 2), "h:1")
    assert Endpoint(("h", 1)).address("udp") == ("h", 1)
    with pytest.raises(ValidationError, match="given twice"):
        FleetSettings(endpoints=(Endpoint(("h", 1)), Endpoint(("h", 1), ("h", 9))))
    assert FleetSettings(server=("h", 3)).node_endpoints() == (Endpoint(("h", 3)),)


@pytest.fixture(scope="module")
def provisioned(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[str]]:
    root = tmp_path_factory.mktemp("nodes")
    made = provision_devices(pki_dir(root / "data"), 4, root / "devices")
    return root / "data", root / "devices", sorted(d.device_id for d in made)


async def test_emulate_command_fails_over_from_a_refusing_endpoint(
    nursery: trio.Nursery,
    provisioned: tuple[Path, Path, list[str]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    offer = Offer.of(V2)
    handler = CloudHandler(lambda t, log: ScriptedCloud(t, log, policy=offer_when_behind(offer, 2)))
    rig = await start_rig(nursery, provisioned, handler)
    (tmp_path / "system.bin").write_bytes(SYSTEM)
    (tmp_path / "app.bin").write_bytes(V1)
    live = format_address(address(rig, "tcp"))
    dead = f"127.0.0.1:{free_port()}"  # nothing listens: connections are refused

    def run_cli() -> None:
        emulate(
            creds=rig.creds,
            transport="tcp",
            count=4,
            state=tmp_path / "state",
            firmware=[tmp_path / "system.bin", tmp_path / "app.bin"],
            server=[dead, live],
            trust_key=[KEY.public_key.hex()],
            product_id=PRODUCT,
            no_fsync=True,
            connect_timeout=5.0,
            duration=60.0,  # a limit only: the run ends once every device runs version 2
            until_version=2,
            json_output=True,
        )

    await trio.to_thread.run_sync(run_cli)
    out = capsys.readouterr().out
    # Whichever endpoint each device chose first, all end at the live one.
    assert f"4 devices: online 4; committed 4; online at {dead} 0, {live} 4" in out
    statuses = json.loads(out[out.index("\n[\n") :])
    assert [s["endpoint"] for s in statuses] == [live] * 4
    assert sorted(handler.sessions) == sorted(s["device_id"] for s in statuses)


async def test_devices_fail_over_from_an_endpoint_that_never_finishes_the_handshake(
    nursery: trio.Nursery, provisioned: tuple[Path, Path, list[str]], tmp_path: Path
) -> None:
    """A silent endpoint (TCP accepted by the kernel but no TLS answer; UDP swallowed) makes
    the handshake time out: its devices go to their next endpoint, on both transports."""
    policy = offer_when_behind(Offer.of(V2), 1)  # devices run version 1: no offer
    handler = CloudHandler(lambda t, log: ScriptedCloud(t, log, policy=policy))
    rig = await start_rig(nursery, provisioned, handler)
    live = Endpoint(address(rig, "tcp"), address(rig, "udp"))
    # A silent endpoint that some device prefers (each try: 15 in 16 that one of 4 does).
    for _ in range(50):
        listener = trio.socket.socket()
        await listener.bind(("127.0.0.1", 0))
        listener.listen(16)  # the kernel completes TCP handshakes; nobody ever answers TLS
        swallower = trio.socket.socket(type=socket.SOCK_DGRAM)
        await swallower.bind(("127.0.0.1", 0))  # datagrams queue unread
        silent = Endpoint(listener.getsockname(), swallower.getsockname())
        if any(endpoint_order(d, [silent, live])[0] == 0 for d in rig.device_ids):
            break
        listener.close()
        swallower.close()
    settings = rig.settings(endpoints=(silent, live), connect_timeout=2.0)
    fleet = EmulatedFleet.from_credentials(
        rig.creds, tmp_path / "state", settings, count=4, transport="both"
    )
    with listener, swallower:
        async with trio.open_nursery() as inner:
            await inner.start(fleet.run)
            await fleet.wait_until(lambda f: f.summary().online == 4, timeout=30)
            assert fleet.online_by_endpoint() == {silent.name: 0, live.name: 4}
            inner.cancel_scope.cancel()
    starting_silent = [d for d, order in fleet.endpoint_orders.items() if order[0] == 0]
    print("first choice the silent endpoint:", starting_silent)
    assert starting_silent
    for device_id, runner in fleet.runners.items():
        assert fleet.endpoint_of(device_id) == live
        if device_id in starting_silent:  # (a loaded machine may add a round trip)
            assert runner.failovers >= 1 and "TooSlowError" in runner.last_connect_error


def children(pid: int) -> list[int]:
    """Direct children of a process (its worker processes)."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def session_owner_pids(store: Store) -> dict[str, int]:
    """Device -> pid of the server process holding its live session (the store's presence)."""
    with store.read() as tx:
        rows = tx.conn.execute(sa.select(devices.c.id, devices.c.session_owner)).all()
    # session_owner is "<role>-<pid>/<session>"
    return {
        row.id: int(row.session_owner.partition("/")[0].rpartition("-")[2])
        for row in rows
        if row.session_owner
    }


DEVICES = 16  # alternating TLS / DTLS


async def test_devices_fail_over_to_the_other_node_and_resume_their_download(
    tmp_path: Path,
) -> None:
    data, creds = tmp_path / "data", tmp_path / "creds"
    product, ids, token = await trio.to_thread.run_sync(provisioned_product, data, creds, DEVICES)
    headers = {"Authorization": f"Bearer {token}"}
    trust = TrustStore.initial(product, read_trust_file(creds / TRUST_FILE))
    found = dict(find_credentials(creds))
    kinds = {d: ("tcp" if n % 2 == 0 else "udp") for n, d in enumerate(ids)}
    store = Store.open_dir(data, pool_size=1)
    # The nodes of one installation: copies of the data directory without the store (blobs
    # shared), one database (issue 16 item 4).
    dir_a, dir_b = copy_for_nodes(data, 2, tmp_path)
    db_url = f"sqlite:///{(data / 'ota.db').resolve()}"
    async with (
        running_node(dir_a, db_url, tmp_path / "node-a.log", workers=2) as node_a,
        running_node(dir_b, db_url, tmp_path / "node-b.log", workers=2) as node_b,
        httpx.AsyncClient(base_url=node_a.api_url, headers=headers, timeout=30) as api_a,
        httpx.AsyncClient(base_url=node_b.api_url, headers=headers, timeout=30) as api_b,
        trio.open_nursery() as nursery,
    ):
        nodes = [node_a, node_b]
        response = await api_a.post(
            "/v1/device-os",
            files={"binary": ("system-part1.bin", SYSTEM_5003, "application/octet-stream")},
        )
        assert response.status_code == 201, response.text
        await upload(api_a, product, 2, app(2, size=BIG_APP))
        await upload(api_a, product, 3, app(3))
        members = [
            FleetMember(d, found[d], tmp_path / "state" / d, kinds[d])  # type: ignore[arg-type]
            for d in ids
        ]
        settings = FleetSettings(
            endpoints=(node_a.endpoint, node_b.endpoint),
            firmware=(SYSTEM_5003, APP_V1), trust_store=trust, **FAST,
            # A DTLS device learns that its node died from a missed keep-alive (no FIN),
            # and a DTLS handshake with a dead node ends by this timeout (no ICMP error
            # reaches an unconnected UDP socket).
            keepalive_interval=1.0, keepalive_timeout=2.0,
        )  # fmt: skip
        fleet = EmulatedFleet(members, settings, seed=1)
        await nursery.start(fleet.run)
        await fleet.wait_until(lambda f: f.summary().online == DEVICES, timeout=60)

        # Spread, each device at its first choice, and the nodes agree on who holds whom.
        at = {d: fleet.endpoint_of(d) for d in ids}
        assert all(fleet.device(d).endpoint_index == 0 for d in ids)
        assert all(at[d] == fleet.endpoints[fleet.endpoint_orders[d][0]] for d in ids)
        by_endpoint = fleet.online_by_endpoint()
        print("devices per endpoint:", by_endpoint)
        assert sum(by_endpoint.values()) == DEVICES
        with trio.fail_after(30):
            while len(owners := session_owner_pids(store)) < DEVICES:
                await trio.sleep(0.05)
        # Each node is a main process and its workers (--workers: one per CPU).
        node_of = {pid: node for node in nodes for pid in (node.pid, *children(node.pid))}
        for device, pid in owners.items():
            assert node_of[pid].endpoint == at[device], device
        assert "online at" in fleet.summary().line()

        # The victim: a node holding devices of both transports (one of the two does
        # unless a transport's 8 devices all chose one node and the other's all the other).
        def holds_both(node: Node) -> bool:
            return {kinds[d] for d in ids if at[d] == node.endpoint} == {"tcp", "udp"}

        victim, survivor = (node_a, node_b) if holds_both(node_a) else (node_b, node_a)
        assert holds_both(victim), by_endpoint
        api_victim, api_survivor = (
            (api_a, api_b) if victim is node_a else (api_b, api_a)
        )
        moved = [d for d in ids if at[d] == victim.endpoint]
        # Bytes each moved device's link delivers, by endpoint; the victim is SIGKILLed as
        # soon as one of them holds 30% of the new image.
        received: dict[str, dict[str, int]] = {d: {} for d in moved}
        killed_at: dict[str, int] = {}

        def count(device_id: str) -> None:
            runner = fleet.device(device_id)
            machine = runner.device
            deliver = machine.receive

            def receive(data: bytes, now: float) -> None:
                name = fleet.endpoint_of(device_id).name
                counts = received[device_id]
                counts[name] = counts.get(name, 0) + len(data)
                deliver(data, now)
                total = machine.bytes_total
                if not killed_at and total and machine.bytes_received >= 0.3 * total:
                    os.kill(victim.pid, signal.SIGKILL)
                    killed_at.update({d: fleet.device(d).device.bytes_received for d in moved})

            machine.receive = receive  # type: ignore[method-assign]  # instrumentation

        for device_id in moved:
            count(device_id)
        await release(api_victim, product, 2)
        with trio.fail_after(120):
            await victim.process.wait()
        assert killed_at, "the victim died before any device held 30% of the image"
        # Every device of the victim fails over to the survivor and takes v2 there; the
        # survivor's own devices got the release through the store's event relay.
        await fleet.wait_until(lambda f: all(updated_to(d, 2)(f) for d in ids), timeout=120)
        assert all(fleet.endpoint_of(d) == survivor.endpoint for d in moved)
        assert {kinds[d] for d in moved} == {"tcp", "udp"}
        assert all(fleet.device(d).failovers >= 1 for d in moved)
        # Resumed, not restarted: what a device got from the survivor plus what it had
        # from the victim is one image and protocol overhead, not the image again on top.
        mid_way = 0
        for device_id in moved:
            counts = received[device_id]
            before, after = counts.get(victim.endpoint.name, 0), counts.get(
                survivor.endpoint.name, 0
            )
            print(kinds[device_id], "bytes from victim", before, "from survivor", after,
                  "held at kill", killed_at[device_id])  # fmt: skip
            assert before + after < 1.2 * BIG_APP, (device_id, counts)
            if 0.1 * BIG_APP < killed_at[device_id] < 0.9 * BIG_APP:
                mid_way += 1
                assert after < BIG_APP - 0.5 * killed_at[device_id], (device_id, counts)
        assert mid_way >= 1, killed_at

        # Everyone is on the survivor now and takes a release made there.
        await fleet.wait_until(
            lambda f: f.online_by_endpoint()[survivor.endpoint.name] == DEVICES, timeout=60
        )
        await release(api_survivor, product, 3)
        await fleet.wait_until(lambda f: all(updated_to(d, 3)(f) for d in ids), timeout=120)
        summary = fleet.summary()
        assert summary.endpoints == {victim.endpoint.name: 0, survivor.endpoint.name: DEVICES}
        assert not fleet.crashed
        nursery.cancel_scope.cancel()
    store.close()
