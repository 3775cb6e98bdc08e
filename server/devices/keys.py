"""Per-product Ed25519 firmware signing keys, kept in the store.

Every node of an installation reads the same keys from the shared database (SQLite file or
PostgreSQL): ``product_signing_keys`` holds each key a product ever had, its private half
sealed under the data directory's key-encryption key (server.devices.key_vault), and
``product_key_statements`` the key rotation statements. The first key of a product is made
the first time it is asked for (or imported from an older release's ``<data>/keys`` files:
server.devices.key_import). Devices trust the public half (provisioning writes it next to
their credentials as ``signing-keys.txt``).

Key rotation (``ota product rotate-key`` / ``withdraw-key``, from any process of any node,
while servers run) reads the current key and the statements and appends its statements in
ONE write transaction: statement N is row (product_id, N), so two rotations never take the
same sequence number, whichever processes or nodes run them (the second collides, rolls
back and reads again). The same transaction appends a ``PRODUCT_KEYS_CHANGED`` event to the
event log, which every server process's relay publishes (server.relay): their key caches
(server.devices.key_cache) re-read the product's keys before the next offer.

Functions here block on the store: the async layer runs them in worker threads.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from otacore.errors import ConflictError, NotFoundError, StoreError
from otacore.signing import (
    KeyAction,
    RotationStatement,
    SigningKey,
    generate_signing_key,
    introduce_key,
    parse_statement,
    withdraw_key,
)
from server.devices.key_import import import_product_key_files
from server.devices.key_vault import KeyVault, open_vault
from server.fleet.base import now_ms
from server.private_files import write_private_file
from server.store import Store, Tx
from server.store.errors import StoreConflictError
from server.store.tx_keys import SealedKeyRecord, announce_key_change

TRUST_FILE = "signing-keys.txt"
#: Keys a product keeps trusted: a rotation beyond this withdraws the oldest, so devices'
#: trust stores (at most otacore.signing.MAX_TRUSTED_KEYS keys) never fill up.
MAX_PRODUCT_KEYS = 16
#: Attempts of a key change whose statements collided with another one's (a rotation on
#: another node committed first): each attempt reads the statements again.
CHANGE_ATTEMPTS = 5

log = logging.getLogger("ota.keys")
_T = TypeVar("_T")


def write_trust_file(
    out_dir: Path, keys: list[SigningKey], sequence: int = 0, product_id: int | None = None
) -> Path:
    """Write the public keys devices should trust, one hex key per line, the key rotation
    sequence they start from (devices apply only later statements) and the product the
    keys sign for (``ota device emulate`` reads it back)."""
    path = Path(out_dir) / TRUST_FILE
    lines = [f"# sequence {sequence}\n"]
    if product_id is not None:
        lines.append(f"# product {product_id}\n")
    lines += [f"{key.public_key.hex()}\n" for key in keys]
    write_private_file(path, "".join(lines).encode())  # 0600 like the device's other files
    return path


def read_trust_file(path: Path) -> list[bytes]:
    """Public keys (raw 32 bytes) listed in a trust file."""
    keys = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keys.append(bytes.fromhex(line))
    return keys


def _trust_header(path: Path, name: str) -> int | None:
    for line in path.read_text().splitlines():
        parts = line.split()
        if parts[:2] == ["#", name] and len(parts) == 3 and parts[2].isdecimal():
            return int(parts[2])
    return None


def read_trust_sequence(path: Path) -> int:
    """The key rotation sequence a trust file starts from (0 when it names none)."""
    return _trust_header(path, "sequence") or 0


def read_trust_product(path: Path) -> int | None:
    """The product a trust file's keys sign for (None in files written before it was
    recorded)."""
    return _trust_header(path, "product")


# --- the store ----------------------------------------------------------------------------


def _sealed(vault: KeyVault, product_id: int, key: SigningKey, now: int) -> SealedKeyRecord:
    return SealedKeyRecord(product_id, key.key_id, key.public_key, vault.seal(product_id, key),
                           vault.kek_id, False, None, now)


def _retrying(what: str, product_id: int, change: Callable[[], _T]) -> _T:
    """Run ``change`` (one write transaction) again when its statements collided with a
    concurrent change's."""
    for attempt in range(1, CHANGE_ATTEMPTS + 1):
        try:
            return change()
        except StoreConflictError:
            if attempt == CHANGE_ATTEMPTS:
                raise ConflictError(
                    f"product {product_id}'s signing keys kept changing while {what} ran "
                    f"({CHANGE_ATTEMPTS} attempts collided with other key changes); retry"
                ) from None
            log.info("product %d: %s collided with another key change; reading again",
                     product_id, what)
    raise AssertionError("unreachable")  # pragma: no cover


def _first_key(store: Store, vault: KeyVault, data_dir: Path, product_id: int) -> SealedKeyRecord:
    """Make the product's first key (an older release's key files are imported instead);
    a key another process made meanwhile is kept."""
    import_product_key_files(store, vault, data_dir, product_id)

    def create() -> SealedKeyRecord:
        with store.write() as tx:
            record = tx.current_signing_key(product_id)
            if record is not None:  # made meanwhile (or just imported)
                return record
            if tx.get_product(product_id) is None:
                raise NotFoundError(f"product {product_id} does not exist")
            record = _sealed(vault, product_id, generate_signing_key(), now_ms())
            tx.add_signing_key(record)
            tx.make_current_key(product_id, record.key_id)
            announce_key_change(tx, product_id, record.key_id, 0)
            return record

    return _retrying("creating its first key", product_id, create)


@dataclass(frozen=True)
class ProductKeyState:
    """A product's current signing key and its statements, as one transaction read them."""

    key: SigningKey
    statements: list[bytes]


def product_key_state(store: Store, data_dir: Path, product_id: int) -> ProductKeyState:
    """The product's signing key (made the first time it is asked for) and statements."""
    vault = open_vault(store, data_dir)
    with store.read() as tx:
        record = tx.current_signing_key(product_id)
        statements = tx.key_statements(product_id)
    if record is None:
        _first_key(store, vault, data_dir, product_id)
        return product_key_state(store, data_dir, product_id)
    key = vault.unseal(product_id, record.key_id, record.sealed_private_key, record.kek_id)
    return ProductKeyState(key, statements)


def product_signing_key(store: Store, data_dir: Path, product_id: int) -> SigningKey:
    """The product's signing key, created (durably) the first time it is asked for."""
    return product_key_state(store, data_dir, product_id).key


def product_statements(store: Store, product_id: int) -> list[bytes]:
    """The product's key rotation statements, in sequence order (empty if never rotated)."""
    with store.read() as tx:
        return tx.key_statements(product_id)


# --- key rotation -------------------------------------------------------------------------


def trusted_key_ids(statements: list[bytes], current: SigningKey,
                    applied: int | None = None) -> list[str]:
    """The key ids a device trusts once it applied the first ``applied`` statements (every
    one when None), oldest first (the key that signed statement 1 is the provisioned one;
    with no statements, the current key)."""
    provisioned = parse_statement(statements[0]).signer_key_id if statements else current.key_id
    trusted = [provisioned]
    for statement in (parse_statement(s) for s in statements[:applied]):
        subject = statement.subject_key_id
        if statement.action is KeyAction.INTRODUCE and subject not in trusted:
            trusted.append(subject)
        elif statement.action is KeyAction.WITHDRAW and subject in trusted:
            trusted.remove(subject)
    return trusted


@dataclass(frozen=True)
class Rotation:
    """What one rotation did: the key that signed the statement, the new current key, the
    introducing statement's sequence number and the old keys it retired."""

    old: SigningKey
    new: SigningKey
    sequence: int
    #: Key ids withdrawn with the rotation (more than MAX_PRODUCT_KEYS were trusted).
    retired: tuple[str, ...] = ()


def _current(tx: Tx, vault: KeyVault, product_id: int) -> SigningKey:
    record = tx.current_signing_key(product_id)
    if record is None:  # pragma: no cover - the callers made the first key
        raise StoreError(f"product {product_id} has no signing key")
    return vault.unseal(product_id, record.key_id, record.sealed_private_key, record.kek_id)


def _check_sequence(statements: list[bytes], added: list[RotationStatement]) -> None:
    for offset, statement in enumerate(added, start=1):
        if statement.sequence != len(statements) + offset:  # pragma: no cover - a bug
            raise StoreError(f"key rotation statement {statement.sequence} does not follow "
                             f"statement {len(statements) + offset - 1}")


def rotate_product_key(store: Store, data_dir: Path, product_id: int) -> Rotation:
    """Introduce a new signing key, signed by the current one, and sign with it from now on.

    A product keeps at most MAX_PRODUCT_KEYS keys trusted: the oldest beyond that are
    withdrawn (signed by the new key) in the same transaction, so a device catching up on
    any number of rotations never needs more than that many keys in its trust store (which
    holds MAX_TRUSTED_KEYS). One write transaction stores the sealed new key, appends the
    statements, makes the new key current and announces the change: all of it or nothing.
    Two concurrent rotations (any processes or nodes) never take the same sequence: the
    later one collides and runs again on the statements the earlier one wrote.
    """
    vault = open_vault(store, data_dir)
    product_signing_key(store, data_dir, product_id)  # the first key, made or imported

    def rotate() -> Rotation:
        with store.write() as tx:
            current = _current(tx, vault, product_id)
            statements = tx.key_statements(product_id)
            new = generate_signing_key()
            sequence = len(statements) + 1
            added = [introduce_key(current, new.public_key, product_id=product_id,
                                   sequence=sequence)]
            trusted = [*trusted_key_ids(statements, current), new.key_id]
            retired = tuple(trusted[: max(0, len(trusted) - MAX_PRODUCT_KEYS)])
            for key_id in retired:
                added.append(withdraw_key(new, key_id, product_id=product_id,
                                          sequence=sequence + len(added)))
            _check_sequence(statements, added)
            now = now_ms()
            tx.add_signing_key(_sealed(vault, product_id, new, now))
            tx.add_key_statements(product_id, sequence, [s.to_bytes() for s in added], now)
            for statement in added[1:]:
                tx.mark_key_withdrawn(product_id, statement.subject_key_id, statement.sequence)
            tx.make_current_key(product_id, new.key_id)
            announce_key_change(tx, product_id, new.key_id, len(statements) + len(added))
        return Rotation(current, new, sequence, retired)

    return _retrying("a rotation", product_id, rotate)


def withdraw_product_key(store: Store, data_dir: Path, product_id: int, key_id: str) -> int:
    """Withdraw an old key (signed by the current key): devices stop trusting it. Returns
    the statement's sequence number."""
    vault = open_vault(store, data_dir)
    product_signing_key(store, data_dir, product_id)

    def withdraw() -> int:
        with store.write() as tx:
            current = _current(tx, vault, product_id)
            statements = tx.key_statements(product_id)
            parsed = [parse_statement(s) for s in statements]
            if key_id == current.key_id:
                raise ConflictError("the current signing key cannot be withdrawn: rotate first")
            known = {s.subject_key_id for s in parsed} | {s.signer_key_id for s in parsed}
            if key_id not in known:
                raise NotFoundError(
                    f"key {key_id} was never a signing key of product {product_id}")
            withdrawn = {s.subject_key_id for s in parsed if s.action is KeyAction.WITHDRAW}
            if key_id in withdrawn:
                raise ConflictError(f"key {key_id} is already withdrawn")
            statement = withdraw_key(current, key_id, product_id=product_id,
                                     sequence=len(statements) + 1)
            tx.add_key_statements(product_id, statement.sequence, [statement.to_bytes()],
                                  now_ms())
            tx.mark_key_withdrawn(product_id, key_id, statement.sequence)
            announce_key_change(tx, product_id, current.key_id, statement.sequence)
        return statement.sequence

    return _retrying("a withdrawal", product_id, withdraw)
