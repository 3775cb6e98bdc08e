"""The restored sessions' devices are authorized all at once with the handshake's own rule
(``server.devices.restored_auth``), on a real SQLite store and on PostgreSQL: every verdict
equals what the one-by-one path (``SessionService.authorize_device``'s read and rule)
decides, or is None for a certificate the one-by-one path would record as seen."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa

from server.authorization import ClientCertificate
from server.devices import restored_auth
from server.devices.restored_auth import authorize_restored
from server.fleet.sessions import _admits
from server.store import Store
from server.store import schema as t
from tests.provisioning import provision_product


@pytest.fixture
def provisioned(store: Store, data_dir: Path, tmp_path: Path) -> Store:
    """``store`` (each backend) with 7 provisioned devices in the states a restart meets."""
    _, devices = provision_product(store, data_dir, tmp_path / "creds", 7, name="S")
    opened = store
    ids = sorted(d.device_id for d in devices)
    with opened.write() as tx:
        for device_id in ids[:6]:  # seen at a handshake (as every restored session was)
            for cert in tx.list_certificates(device_id):
                tx.record_seen_certificate(sha256=cert.sha256, serial=cert.serial,
                                           device_id=device_id, not_after=cert.not_after, now=1)
        tx.revoke_device_certificates(ids[1], by="test", now=2)  # revoked while down
        tx.delete_device(ids[2])  # removed from its product while down
    return opened


def _certificates(store: Store) -> list[ClientCertificate]:
    with store.read() as tx:
        ids = sorted(tx.conn.execute(
            sa.select(t.device_certificates.c.device_id).distinct()).scalars())
        certificates = [ClientCertificate(c.device_id, c.sha256, c.serial, c.not_after)
                        for device_id in ids for c in tx.list_certificates(device_id)]
    # A certificate the store never heard of, for a device it does not know.
    certificates.append(ClientCertificate("f" * 24, "ab" * 32, "01", 2**40))
    return certificates


@pytest.mark.parametrize("chunk", [1, 2, 500])
def test_verdicts_match_the_one_by_one_rule(provisioned: Store, chunk: int,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    store = provisioned
    monkeypatch.setattr(restored_auth, "CHUNK", chunk)  # several statements, or one
    certificates = _certificates(store)
    with store.read() as tx:
        verdicts = authorize_restored(tx, certificates)
        expected = []
        for cert in certificates:
            standing = tx.certificate_standing(cert.device_id, cert.sha256)
            admitted = _admits(standing)
            known = standing.certificate
            never_seen = known is None or known.first_seen_at is None
            expected.append(None if admitted and never_seen else admitted)
    assert verdicts == expected
    # What the cases are: 4 seen and admitted, 1 revoked, 1 removed, 1 issued but never
    # seen (asked alone), and the stranger (refused: not registered).
    assert verdicts.count(True) == 4
    assert verdicts.count(None) == 1
    assert verdicts.count(False) == 3


def test_no_certificates_no_statement(provisioned: Store) -> None:
    with provisioned.read() as tx:
        assert authorize_restored(tx, []) == []
