"""The key-encryption key (KEK) that seals the products' signing keys in the store.

The products' Ed25519 private keys live in the store (``product_signing_keys``), never in
clear: each is sealed with AES-256-GCM under the installation's KEK, a 32-byte random key in
``<data>/keys/signing-keys.kek`` (0600, created once, never replaced). Every node of an
installation needs the same KEK, as it needs the same CA: both are copied with the data
directory when a node is set up (README, "Running several nodes"). The database alone (a
database backup, a replica, a stolen dump) therefore holds no usable signing key.

A sealed key is ``version(1) | nonce(12) | AES-256-GCM(kek, nonce, private key, aad)``,
with ``aad`` naming the product and the key id, so a sealed key copied onto another
product's row, or under another key id, fails to open (RFC 5116 section 3: associated
data is authenticated, not encrypted). Each seal draws a fresh random nonce; a KEK seals
one key per rotation, far below the 2**32 random nonces NIST SP 800-38D 8.3 allows.

Each row also names the KEK that sealed it by a fingerprint (``kek_id``, never the key), so a
node holding another KEK says which one it lacks instead of failing on every key.
"""

from __future__ import annotations

import contextlib
import hashlib
import secrets
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from otacore.errors import OtaError
from otacore.signing import SigningKey
from server.private_files import make_private_dir, write_private_file
from server.store import Store

#: The KEK file, relative to the data directory.
KEK_FILE: Final = Path("keys") / "signing-keys.kek"
_KEK_SIZE: Final = 32
_NONCE_SIZE: Final = 12
_SEAL_VERSION: Final = 1
_AAD_MAGIC: Final = b"OTAPKEY"
_KEK_ID_CONTEXT: Final = b"otacloud product signing key KEK id\x00"


class KeyVaultError(OtaError):
    """The KEK is missing, malformed, or not the one that sealed a stored key; the message
    says which file and what to do."""


def kek_path(data_dir: Path) -> Path:
    """Where the data directory keeps its KEK."""
    return Path(data_dir) / KEK_FILE


@dataclass(frozen=True)
class KeyVault:
    """Seals and opens products' signing keys under one KEK (see the module docstring)."""

    path: Path
    kek: bytes

    @property
    def kek_id(self) -> str:
        """The KEK's fingerprint (16 hex digits; SHA-256 of a context and the key), stored
        next to each sealed key: it tells which KEK is needed, and reveals nothing of it."""
        return hashlib.sha256(_KEK_ID_CONTEXT + self.kek).hexdigest()[:16]

    @classmethod
    def load(cls, data_dir: Path) -> KeyVault | None:
        """The data directory's KEK, None when it has none yet."""
        path = kek_path(data_dir)
        try:
            kek = path.read_bytes()
        except FileNotFoundError:
            return None
        if len(kek) != _KEK_SIZE:
            raise KeyVaultError(
                f"{path} holds {len(kek)} bytes, not a {_KEK_SIZE}-byte key-encryption key: "
                "copy the file from another node of this installation (or from a backup of "
                "its data directory)"
            )
        return cls(path, kek)

    @classmethod
    def create(cls, data_dir: Path) -> KeyVault:
        """The data directory's KEK, made (32 random bytes, 0600) when missing; a KEK is
        never replaced (one made meanwhile by another process wins)."""
        existing = cls.load(data_dir)
        if existing is not None:
            return existing
        path = kek_path(data_dir)
        make_private_dir(path.parent)
        with contextlib.suppress(FileExistsError):
            write_private_file(path, secrets.token_bytes(_KEK_SIZE), exclusive=True)
        made = cls.load(data_dir)
        assert made is not None
        return made

    @staticmethod
    def _aad(product_id: int, key_id: str) -> bytes:
        return _AAD_MAGIC + struct.pack(">BQ", _SEAL_VERSION, product_id) + key_id.encode()

    def seal(self, product_id: int, key: SigningKey) -> bytes:
        """``key``'s private half sealed for product ``product_id``."""
        nonce = secrets.token_bytes(_NONCE_SIZE)
        sealed = AESGCM(self.kek).encrypt(nonce, key.private_bytes(),
                                          self._aad(product_id, key.key_id))
        return bytes([_SEAL_VERSION]) + nonce + sealed

    def unseal(self, product_id: int, key_id: str, sealed: bytes, kek_id: str) -> SigningKey:
        """Open a key :meth:`seal` made; KeyVaultError when this KEK did not seal it, or
        the sealed bytes were changed (or moved to another product or key id)."""
        if kek_id != self.kek_id:
            raise KeyVaultError(
                f"product {product_id}'s signing key {key_id} is sealed under key-encryption "
                f"key {kek_id}, but this node's {self.path} is key {self.kek_id}: copy "
                f"{KEK_FILE} from a node of this installation that signs (every node needs "
                "the same data directory keys, like the CA), then restart this node"
            )
        sealed = bytes(sealed)
        if len(sealed) < 1 + _NONCE_SIZE + 16 or sealed[0] != _SEAL_VERSION:
            raise KeyVaultError(
                f"product {product_id}'s signing key {key_id} is not a sealed key of "
                f"version {_SEAL_VERSION} ({len(sealed)} bytes): restore the store from a backup"
            )
        nonce = sealed[1 : 1 + _NONCE_SIZE]
        try:
            raw = AESGCM(self.kek).decrypt(nonce, sealed[1 + _NONCE_SIZE :],
                                           self._aad(product_id, key_id))
        except InvalidTag:
            raise KeyVaultError(
                f"product {product_id}'s sealed signing key {key_id} fails authentication "
                f"under {self.path}: the row was altered or copied from another product or "
                "installation; restore the store from a backup"
            ) from None
        key = SigningKey.from_private_bytes(raw)
        if key.key_id != key_id:  # pragma: no cover - the AAD binds the key id already
            raise KeyVaultError(f"product {product_id}'s key {key_id} opens as {key.key_id}")
        return key


def open_vault(store: Store, data_dir: Path) -> KeyVault:
    """The data directory's KEK, made on first use; KeyVaultError when it is missing
    although the store holds keys sealed under a KEK (a node set up without copying the
    data directory's keys: a new KEK would seal keys no other node can open)."""
    vault = KeyVault.load(data_dir)
    if vault is not None:
        return vault
    with store.read() as tx:
        sealed_under = tx.any_kek_id()
    if sealed_under is not None:
        raise KeyVaultError(
            f"{kek_path(data_dir)} is missing, but the store holds signing keys sealed under "
            f"key-encryption key {sealed_under}: copy it from another node of this "
            "installation (or from a backup of its data directory) before signing anything"
        )
    return KeyVault.create(data_dir)
