"""Per-product Ed25519 firmware signing keys, kept in the data directory.

``<data>/keys/product-<id>.ed25519`` holds the raw 32-byte private key (mode 0600), created
on first use and written atomically (temp file, fsync, rename, fsync of the directory), so a
crash never leaves a half-written key. Devices trust the public half (provisioning writes it
next to their credentials as ``signing-keys.txt``).
"""

from __future__ import annotations

import os
from pathlib import Path

from otacore.signing import SigningKey, generate_signing_key

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


def write_trust_file(out_dir: Path, keys: list[SigningKey]) -> Path:
    """Write the public keys devices should trust, one hex key per line."""
    path = Path(out_dir) / TRUST_FILE
    path.write_text("".join(f"{key.public_key.hex()}\n" for key in keys))
    return path


def read_trust_file(path: Path) -> list[bytes]:
    """Public keys (raw 32 bytes) listed in a trust file."""
    keys = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keys.append(bytes.fromhex(line))
    return keys
