"""Signing keys of an older release's data directory, imported into the store once.

Releases before store revision 0009 kept each product's keys in ``<data>/keys``:
``product-<id>.ed25519`` (the current private key, raw 32 bytes), ``product-<id>-<key
id>.ed25519`` (each key a rotation introduced) and ``product-<id>.statements`` (msgpack list
of the rotation statements). :func:`import_key_files` (a device-serving server's start, and
the first use of a product's key by any command) copies them into the store, sealed:

* a product the store holds no key for gets the files' keys and statements, the files'
  current key as its current key (idempotent: a second import finds the key and stops);
* a product the store holds keys for is never overwritten: the files must agree with the
  store (their current key one the store knows, their statements a prefix of the store's:
  the store may be newer, after rotations since). Anything else is a
  :class:`KeyFilesMismatchError` naming the file, both key ids and what to do: the nodes'
  data directories diverged, and signing with either key would silently strand the devices
  provisioned with the other.

The files stay where they are after the import: a node of a rolling upgrade still on the
older release reads them, a downgrade (revision 0009's downgrade drops the tables) finds
them, and they are no secret the data directory did not hold before. Once every node runs
this release they can be deleted (``<data>/keys/product-*``; keep ``signing-keys.kek``).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import msgpack

from otacore.errors import ConflictError, OtaError
from otacore.signing import KeyAction, SigningKey, parse_statement
from server.devices.key_vault import KeyVault, open_vault
from server.fleet.base import now_ms
from server.store import Store
from server.store.errors import StoreConflictError
from server.store.tx_keys import SealedKeyRecord, announce_key_change

log = logging.getLogger("ota.keys")

_KEY_FILE = re.compile(r"product-(\d+)\.ed25519")
_ROTATED_KEY_FILE = re.compile(r"product-(\d+)-([0-9a-f]{16})\.ed25519")


class KeyFilesMismatchError(ConflictError):
    """A product's key files in the data directory disagree with the keys in the store."""


class KeyFilesError(OtaError):
    """A product's key files cannot be read (truncated, not a key, not statements)."""


@dataclass(frozen=True)
class KeyFiles:
    """One product's key files as an older release wrote them."""

    current: SigningKey
    #: Every key the files hold, the current one included.
    keys: list[SigningKey]
    statements: list[bytes]
    path: Path


def _keys_dir(data_dir: Path) -> Path:
    return Path(data_dir) / "keys"


def read_key_files(data_dir: Path, product_id: int) -> KeyFiles | None:
    """The product's key files, None when it has none."""
    keys_dir = _keys_dir(data_dir)
    path = keys_dir / f"product-{product_id}.ed25519"
    try:
        current = SigningKey.from_private_bytes(path.read_bytes())
    except FileNotFoundError:
        return None
    except ValueError as exc:
        raise KeyFilesError(f"{path} is not a raw Ed25519 private key ({exc})") from None
    keys = {current.key_id: current}
    for rotated in sorted(keys_dir.glob(f"product-{product_id}-*.ed25519")):
        match = _ROTATED_KEY_FILE.fullmatch(rotated.name)
        if match is None or int(match.group(1)) != product_id:
            continue
        try:
            key = SigningKey.from_private_bytes(rotated.read_bytes())
        except ValueError as exc:
            raise KeyFilesError(f"{rotated} is not a raw Ed25519 private key ({exc})") from None
        keys.setdefault(key.key_id, key)
    statements_path = keys_dir / f"product-{product_id}.statements"
    try:
        raw = statements_path.read_bytes()
    except FileNotFoundError:
        statements: list[bytes] = []
    else:
        try:
            statements = [bytes(s) for s in msgpack.unpackb(raw)]
            for statement in statements:
                parse_statement(statement)
        except (ValueError, TypeError, OtaError, msgpack.UnpackException) as exc:
            raise KeyFilesError(
                f"{statements_path} is not a list of key rotation statements ({exc})") from None
    return KeyFiles(current, list(keys.values()), statements, path)


def product_ids_with_key_files(data_dir: Path) -> list[int]:
    """Products with a current key file in the data directory."""
    keys_dir = _keys_dir(data_dir)
    if not keys_dir.is_dir():
        return []
    return sorted(int(m.group(1)) for p in keys_dir.iterdir()
                  if (m := _KEY_FILE.fullmatch(p.name)) is not None)


def _check_agrees(files: KeyFiles, product_id: int, known: set[str], current: str,
                  stored: list[bytes]) -> None:
    """Raise KeyFilesMismatchError unless the store holds what the files hold (or more)."""
    if files.current.key_id not in known:
        raise KeyFilesMismatchError(
            f"product {product_id}: {files.path} holds signing key {files.current.key_id}, "
            f"but the store signs with key {current} and never held "
            f"{files.current.key_id}: this node's data directory diverged from the "
            "installation's (keys rotated on one node only, before the keys moved into the "
            "store). Devices trust the store's key if they were provisioned or updated "
            "through another node: then move this node's keys/product-"
            f"{product_id}* files away and start it again; otherwise restore the store's "
            "keys from the node whose files are right"
        )
    if stored[: len(files.statements)] != files.statements:
        raise KeyFilesMismatchError(
            f"product {product_id}: the key rotation statements in {files.path.parent} "
            f"({len(files.statements)}) are not the store's first {len(files.statements)} "
            f"(the store holds {len(stored)}): the nodes rotated separately; move this "
            f"node's keys/product-{product_id}* files away if the store's keys are right"
        )


def import_product_key_files(store: Store, vault: KeyVault, data_dir: Path,
                             product_id: int) -> bool:
    """Import one product's key files (module docstring); True when it stored them now,
    False when there are none, the store held the product's keys already (and agrees), or
    the product no longer exists."""
    files = read_key_files(data_dir, product_id)
    if files is None:
        return False
    now = now_ms()
    try:
        with store.write() as tx:
            held = tx.signing_keys(product_id)
            if held:
                current = next((r.key_id for r in held if r.current), "?")
                _check_agrees(files, product_id, {r.key_id for r in held},
                              current, tx.key_statements(product_id))
                return False
            if tx.get_product(product_id) is None:
                log.info("key files of product %d in %s are not imported: the store has no "
                         "such product (deleted)", product_id, files.path.parent)
                return False
            withdrawn = {parse_statement(s).subject_key_id: parse_statement(s).sequence
                         for s in files.statements
                         if parse_statement(s).action is KeyAction.WITHDRAW}
            for key in files.keys:
                tx.add_signing_key(SealedKeyRecord(
                    product_id, key.key_id, key.public_key, vault.seal(product_id, key),
                    vault.kek_id, False, withdrawn.get(key.key_id), now))
            tx.make_current_key(product_id, files.current.key_id)
            tx.add_key_statements(product_id, 1, files.statements, now)
            announce_key_change(tx, product_id, files.current.key_id, len(files.statements))
    except StoreConflictError:  # another process imported them at the same moment
        return False
    log.info("imported product %d's signing key %s and %d rotation statements from %s into "
             "the store (sealed); the files stay for nodes still on an older release",
             product_id, files.current.key_id, len(files.statements), files.path.parent)
    return True


def import_key_files(store: Store, data_dir: Path) -> list[int]:
    """Import every product's key files from ``data_dir`` (module docstring); the products
    imported now. KeyFilesMismatchError when files and store disagree (nothing of that
    product changes; products before it in id order are imported)."""
    product_ids = product_ids_with_key_files(data_dir)
    if not product_ids:
        return []
    vault = open_vault(store, data_dir)
    return [product_id for product_id in product_ids
            if import_product_key_files(store, vault, data_dir, product_id)]
