"""Per-product Ed25519 firmware signing keys, kept in the data directory.

``<data>/keys/product-<id>.ed25519`` holds the raw 32-byte private key (mode 0600), created
on first use and written atomically (temp file, fsync, rename, fsync of the directory), so a
crash never leaves a half-written key. Devices trust the public half (provisioning writes it
next to their credentials as ``signing-keys.txt``).

Key rotation (``ota product rotate-key`` / ``withdraw-key``, from any process, while servers
run) appends a statement to ``product-<id>.statements``; statement N must be the N-th, so each
rotation holds an exclusive ``flock`` on ``product-<id>.lock`` from reading the statements to
installing the new current key: two concurrent rotations, in threads or processes, queue
instead of both taking the same sequence number.
"""

from __future__ import annotations

import fcntl
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import msgpack

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
from server.private_files import write_private_file

KEY_SUFFIX = ".ed25519"
TRUST_FILE = "signing-keys.txt"
#: Keys a product keeps trusted: a rotation beyond this withdraws the oldest, so devices'
#: trust stores (at most otacore.signing.MAX_TRUSTED_KEYS keys) never fill up.
MAX_PRODUCT_KEYS = 16


def _tmp_suffix() -> str:
    """A temporary file suffix no other process or thread uses at the same time."""
    return f".tmp{os.getpid()}-{threading.get_ident()}"


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
    tmp = path.with_suffix(_tmp_suffix())
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


# --- key rotation -------------------------------------------------------------------------


def _statements_path(data_dir: Path, product_id: int) -> Path:
    return Path(data_dir) / "keys" / f"product-{product_id}.statements"


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(_tmp_suffix())
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


@contextmanager
def rotation_lock(data_dir: Path, product_id: int) -> Iterator[None]:
    """Hold the product's rotation lock (an exclusive flock, released when the file is
    closed, also when the process dies) for a read-modify-write of its statements."""
    path = Path(data_dir) / "keys" / f"product-{product_id}.lock"
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # blocks until the rotation holding it is done
        yield
    finally:
        os.close(fd)  # releases the lock


def _append_statements(data_dir: Path, product_id: int, statements: list[bytes],
                       *added: RotationStatement) -> None:
    """Write ``statements`` plus ``added``, which must continue their sequence, in one atomic
    write (the caller holds the rotation lock and read ``statements`` under it)."""
    for offset, statement in enumerate(added, start=1):
        if statement.sequence != len(statements) + offset:  # pragma: no cover - a bug
            raise StoreError(f"key rotation statement {statement.sequence} does not follow "
                             f"statement {len(statements) + offset - 1}")
    packed = msgpack.packb([*statements, *(statement.to_bytes() for statement in added)])
    _write_atomically(_statements_path(data_dir, product_id), packed)


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


def rotate_product_key(data_dir: Path, product_id: int) -> Rotation:
    """Introduce a new signing key, signed by the current one, and sign with it from now on.

    A product keeps at most MAX_PRODUCT_KEYS keys trusted: the oldest beyond that are
    withdrawn (signed by the new key) in the same write, so a device catching up on any
    number of rotations never needs more than that many keys in its trust store (which
    holds MAX_TRUSTED_KEYS). Atomic against other rotations (the rotation lock). Order for
    crash safety: the new key is stored under its key id first, then the statements, then it
    becomes the current key; a crash in between leaves the old key in use and, at worst,
    statements introducing a key that is kept but not yet used.
    """
    with rotation_lock(data_dir, product_id):
        current = product_signing_key(data_dir, product_id)
        statements = product_statements(data_dir, product_id)
        new = generate_signing_key()
        keys_dir = _key_path(data_dir, product_id).parent
        _write_atomically(keys_dir / f"product-{product_id}-{new.key_id}{KEY_SUFFIX}",
                          new.private_bytes())
        sequence = len(statements) + 1
        added = [introduce_key(current, new.public_key, product_id=product_id,
                               sequence=sequence)]
        trusted = [*trusted_key_ids(statements, current), new.key_id]
        retired = tuple(trusted[: max(0, len(trusted) - MAX_PRODUCT_KEYS)])
        for key_id in retired:
            added.append(withdraw_key(new, key_id, product_id=product_id,
                                      sequence=sequence + len(added)))
        _append_statements(data_dir, product_id, statements, *added)
        _write_atomically(_key_path(data_dir, product_id), new.private_bytes())
        return Rotation(current, new, sequence, retired)


def withdraw_product_key(data_dir: Path, product_id: int, key_id: str) -> int:
    """Withdraw an old key (signed by the current key): devices stop trusting it. Returns
    the statement's sequence number."""
    with rotation_lock(data_dir, product_id):
        current = product_signing_key(data_dir, product_id)
        statements = product_statements(data_dir, product_id)
        parsed = [parse_statement(s) for s in statements]
        if key_id == current.key_id:
            raise ConflictError("the current signing key cannot be withdrawn: rotate first")
        known = {s.subject_key_id for s in parsed} | {s.signer_key_id for s in parsed}
        if key_id not in known:
            raise NotFoundError(f"key {key_id} was never a signing key of product {product_id}")
        withdrawn = {s.subject_key_id for s in parsed if s.action is KeyAction.WITHDRAW}
        if key_id in withdrawn:
            raise ConflictError(f"key {key_id} is already withdrawn")
        statement = withdraw_key(current, key_id, product_id=product_id,
                                 sequence=len(statements) + 1)
        _append_statements(data_dir, product_id, statements, statement)
        return statement.sequence
