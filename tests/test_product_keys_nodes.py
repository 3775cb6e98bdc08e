"""A key rotation made through one node is used by another node at once: two real ``ota
server`` nodes on one PostgreSQL database (tests/test_relay_nodes.two_nodes: copies of one
data directory, the KEK among them), no restart, no copying of key files.

``ota product rotate-key`` runs on node A's data directory; node B's next Hello answer
carries the new statement (its key cache heard of the change through the event relay; the
delay is printed), and the update node B then offers a device is signed with the new key:
the device learns it first (its trust store reaches sequence 1) and applies the update.
"""

from __future__ import annotations

import json
from pathlib import Path

import trio
from typer.testing import CliRunner

from otacore.protocol.ota_wire import parse_hello_answer
from otacore.signing import KeyAction, TrustStore, parse_statement
from server.cli.main import app as ota_app
from server.devices.keys import TRUST_FILE, read_trust_file
from server.emulator.flash import Flash
from server.emulator.fleet import EmulatedFleet, FleetMember, FleetSettings, find_credentials
from tests.device_client import LinkDevice
from tests.server_nodes import release, upload
from tests.test_ota_e2e_kit import APP_V1, FAST, SYSTEM_5003, app, running, updated_to
from tests.test_relay_nodes import Installation, two_nodes


def _one_device_fleet(nodes: Installation, device_id: str) -> EmulatedFleet:
    """``device_id`` alone, on node B, trusting the provisioned key."""
    trust = TrustStore.initial(nodes.product, read_trust_file(nodes.creds / TRUST_FILE))
    found = dict(find_credentials(nodes.creds))
    member = FleetMember(device_id, found[device_id], nodes.state / device_id,
                         nodes.kinds[device_id])  # type: ignore[arg-type]
    return EmulatedFleet([member], FleetSettings(
        endpoints=(nodes.node_b.endpoint,), firmware=(SYSTEM_5003, APP_V1),
        trust_store=trust, **FAST), seed=1)


async def _statements_from_node_b(nodes: Installation, device_id: str) -> list[bytes]:
    """The statements node B's Hello answer carries for a device at sequence 0."""
    device = await LinkDevice.connect(nodes.creds, device_id, "tcp",
                                      nodes.node_b.address("TLS"))
    try:
        answer = await device.hello(key_sequence=0, key_push=True)
    finally:
        await device.aclose()
    return list(parse_hello_answer(answer.payload).statements)


async def test_a_rotation_through_node_a_is_used_by_node_b_without_a_restart(
    pg_database: str, tmp_path: Path
) -> None:
    async with two_nodes(pg_database, tmp_path) as nodes:
        hello_device = next(d for d in nodes.ids if nodes.kinds[d] == "tcp")
        updated_device = next(d for d in nodes.ids if nodes.kinds[d] == "udp")
        assert await _statements_from_node_b(nodes, hello_device) == []
        provisioned = read_trust_file(nodes.creds / TRUST_FILE)

        node_a_data = tmp_path / "node-0"  # two_nodes' copy for node A (copy_for_nodes)
        result = await trio.to_thread.run_sync(lambda: CliRunner().invoke(ota_app, [
            "product", "rotate-key", "--data", str(node_a_data), "--db-url", pg_database,
            "--product", str(nodes.product), "--json"]))
        assert result.exit_code == 0, result.output
        rotated_at = trio.current_time()
        new_key_id = json.loads(result.output)["new_key_id"]

        with trio.fail_after(30):
            while not (statements := await _statements_from_node_b(nodes, hello_device)):
                await trio.sleep(0.02)
        print(f"rotate-key on node A -> node B's Hello answer carries it: "
              f"{(trio.current_time() - rotated_at) * 1000:.0f} ms")
        (statement,) = [parse_statement(s) for s in statements]
        assert (statement.action, statement.sequence, statement.subject_key_id) == (
            KeyAction.INTRODUCE, 1, new_key_id)
        assert statement.signer_key_id != new_key_id

        # Node B signs its next offer with the new key: the device (provisioned trusting
        # the old key only) learns it first, then verifies and applies the update.
        await upload(nodes.api_a, nodes.product, 2, app(2))
        await release(nodes.api_a, nodes.product, 2)
        fleet = _one_device_fleet(nodes, updated_device)
        async with running(fleet):
            await fleet.wait_until(updated_to(updated_device, 2), timeout=60)
        trust = Flash.open(nodes.state / updated_device, fsync=False).load_trust_store()
        assert trust is not None and trust.sequence == 1
        assert new_key_id in trust.key_ids
        assert len(provisioned) == 1
