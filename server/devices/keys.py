"""Per-product Ed25519 firmware signing keys, kept in the data directory.

``<data>/keys/product-<id>.ed25519`` holds the raw 32-byte private key (mode 0600), created
on first use and written atomically (temp file, fsync, rename, fsync of the directory), so a
crash never leaves a half-written key. Devices trust the public half (provisioning writes it
next to their credentials as ``signing-keys.txt``).
"""

from __future__ import annotations

import os
from pathlib import Path

import msgpack

from otacore.errors import NotFoundError
from otacore.signing import (
    SigningKey,
    generate_signing_key,
    introduce_key,
    parse_statement,
    withdraw_key,
)

KEY_SUFFIX = ".ed25519"
TRUST_FILE = "signing-keys.txt"


def _key_path(data_dir: Path, product_id: int) -> Path:
    return Path(data_dir) / "keys" / f"product-{product_id}{KEY_SUFFIX}"


def product_signing_key(data_dir: Path, product_id: int) -> SigningKey:
    """The product's signing key, created (durably) the first time it is asked for."""
    path = _key_path(data_dir, product_id)
    try:
        return SigningKey.from_private_bytes(path.read_bytes())
    except FileNotFoundError:
        pass
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = generate_signing_key()
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, key.private_bytes())
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)  # never replaces a key another process created meanwhile
    except FileExistsError:
        os.unlink(tmp)
        return SigningKey.from_private_bytes(path.read_bytes())
    os.unlink(tmp)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return key


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
    path.write_text("".join(lines))
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


# --- key rotation -------------------------------------------------------------------------


def _statements_path(data_dir: Path, product_id: int) -> Path:
    return Path(data_dir) / "keys" / f"product-{product_id}.statements"


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def product_statements(data_dir: Path, product_id: int) -> list[bytes]:
    """The product's key rotation statements, in sequence order (empty if never rotated)."""
    try:
        raw = _statements_path(data_dir, product_id).read_bytes()
    except FileNotFoundError:
        return []
    statements: list[bytes] = msgpack.unpackb(raw)
    return statements


def _append_statement(data_dir: Path, product_id: int, statement: bytes) -> None:
    statements = [*product_statements(data_dir, product_id), statement]
    _write_atomically(_statements_path(data_dir, product_id), msgpack.packb(statements))


def rotate_product_key(data_dir: Path, product_id: int) -> SigningKey:
    """Introduce a new signing key, signed by the current one, and sign with it from now on.

    Order for crash safety: the new key is stored under its key id first, then the
    statement, then it becomes the current key; a crash in between leaves the old key in use
    and, at worst, a statement introducing a key that is kept but not yet used.
    """
    current = product_signing_key(data_dir, product_id)
    sequence = len(product_statements(data_dir, product_id)) + 1
    new = generate_signing_key()
    keys_dir = _key_path(data_dir, product_id).parent
    _write_atomically(keys_dir / f"product-{product_id}-{new.key_id}{KEY_SUFFIX}",
                      new.private_bytes())
    statement = introduce_key(current, new.public_key, product_id=product_id, sequence=sequence)
    _append_statement(data_dir, product_id, statement.to_bytes())
    _write_atomically(_key_path(data_dir, product_id), new.private_bytes())
    return new


def withdraw_product_key(data_dir: Path, product_id: int, key_id: str) -> None:
    """Withdraw an old key (signed by the current key): devices stop trusting it."""
    current = product_signing_key(data_dir, product_id)
    introduced = {parse_statement(s).subject_key_id for s in product_statements(data_dir,
                                                                             product_id)}
    if key_id == current.key_id:
        raise NotFoundError("the current signing key cannot be withdrawn: rotate first")
    if key_id not in introduced and not any(
        parse_statement(s).signer_key_id == key_id
        for s in product_statements(data_dir, product_id)
    ):
        raise NotFoundError(f"key {key_id} was never a signing key of product {product_id}")
    sequence = len(product_statements(data_dir, product_id)) + 1
    statement = withdraw_key(current, key_id, product_id=product_id, sequence=sequence)
    _append_statement(data_dir, product_id, statement.to_bytes())
