"""Established DTLS sessions saved across a graceful restart, sealed at rest.

On graceful shutdown the UDP endpoint hands each established session over as a
:class:`SavedDtlsSession` (peer address, device certificate, the record layer's
``to_bytes()`` state); :class:`SessionVault` writes them all to one file, sealed with
AES-256-GCM under a key file of the data directory (created 0600), atomically. On start the
vault reads the file and deletes it *before* anything is restored: a record state restored
twice would seal under the same nonces twice (RFC 5116 3: a GCM nonce must never repeat
under one key), so even a crash right after the restore must not find the file again.

The file format (version 1)::

    MAGIC(8) | version(1) | nonce(12) | AES-GCM(key, nonce, plaintext, aad)

``aad`` is the magic, the version and the SHA-256 of the installation's CA certificate:
a file from another installation (or another key) fails to open. The plaintext is JSON:
``{"created": unix time, "sessions": [...]}``; each session says when it last had traffic,
and one idle for longer than ``max_age`` is dropped (its device has probably gone).

Anything wrong with the file (truncated, tampered, foreign, of another version, too old)
is logged and ignored: the devices then handshake again, as after a crash.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from otacore.errors import OtaError
from server.authorization import ClientCertificate
from server.private_files import write_private_file

__all__ = [
    "SAVED_SESSIONS_FILE",
    "SESSION_VAULT_KEY_FILE",
    "SavedDtlsSession",
    "SavedSessionsError",
    "SessionVault",
]

log = logging.getLogger("otacloud.devices")

#: The sealed file of saved DTLS sessions, and the key that seals it (both 0600).
SAVED_SESSIONS_FILE: Final = "dtls-sessions.sealed"
SESSION_VAULT_KEY_FILE: Final = "session-vault.key"
_MAGIC: Final = b"OTADTLSS"
FORMAT_VERSION: Final = 1
_NONCE_SIZE: Final = 12
_KEY_SIZE: Final = 32
_HEADER_SIZE: Final = len(_MAGIC) + 1 + _NONCE_SIZE


class SavedSessionsError(OtaError):
    """The saved-sessions file cannot be used (truncated, tampered, foreign, unknown
    version, malformed); the message says which. Its sessions are not restored."""


@dataclass(frozen=True, slots=True)
class SavedDtlsSession:
    """One established DTLS session as saved at shutdown."""

    #: The peer's socket address as recvfrom reported it ((host, port) or IPv6's 4-tuple).
    address: tuple[Any, ...]
    #: The device's certificate as its handshake presented it (re-authorized on restore).
    certificate: ClientCertificate
    #: True if the session's handshake was a resumption.
    resumed: bool
    #: ``DtlsRecordLayer.to_bytes()``: keys, epochs, sequence numbers, replay window.
    record_state: bytes
    #: Unix time of the session's last traffic.
    last_activity: float
    #: What the session's handler chose to save (opaque here; empty if nothing).
    handler_state: bytes = b""

    @property
    def device_id(self) -> str:
        """The device id the certificate names."""
        return self.certificate.device_id

    def to_json(self) -> dict[str, Any]:
        """This session as a JSON object (bytes in base64)."""
        cert = self.certificate
        return {
            "address": list(self.address),
            "certificate": [cert.device_id, cert.sha256, cert.serial, cert.not_after_ms],
            "resumed": self.resumed,
            "record_state": base64.b64encode(self.record_state).decode("ascii"),
            "last_activity": self.last_activity,
            "handler_state": base64.b64encode(self.handler_state).decode("ascii"),
        }

    @classmethod
    def from_json(cls, item: object) -> SavedDtlsSession:
        """Parse :meth:`to_json`'s output; SavedSessionsError if it is not one."""
        try:
            assert isinstance(item, dict)
            address = item["address"]
            assert isinstance(address, list) and len(address) in (2, 4)
            assert isinstance(address[0], str) and all(isinstance(p, int) for p in address[1:])
            device_id, sha256, serial, not_after_ms = item["certificate"]
            assert isinstance(device_id, str) and isinstance(sha256, str)
            assert isinstance(serial, str) and isinstance(not_after_ms, int)
            assert isinstance(item["resumed"], bool)
            assert isinstance(item["last_activity"], (int, float))
            return cls(
                address=tuple(address),
                certificate=ClientCertificate(device_id, sha256, serial, not_after_ms),
                resumed=item["resumed"],
                record_state=base64.b64decode(item["record_state"], validate=True),
                last_activity=float(item["last_activity"]),
                handler_state=base64.b64decode(item["handler_state"], validate=True),
            )
        except (AssertionError, KeyError, TypeError, ValueError) as exc:
            raise SavedSessionsError(f"a saved session entry is malformed ({exc!r})") from None


class SessionVault:
    """The sealed saved-sessions file of one installation (see the module docstring).

    ``directory``: where the file and its key live (inside the data directory).
    ``installation``: bytes naming the installation (the CA certificate's SHA-256), bound
    into the file so that one copied from another installation is refused.
    ``max_age``: seconds; sessions idle for longer when the file is read are dropped.
    """

    def __init__(self, directory: Path, installation: bytes, *, max_age: float) -> None:
        if max_age <= 0:
            raise ValueError(f"the saved-session max age must be positive, got {max_age}")
        self.directory = Path(directory)
        self.installation = installation
        self.max_age = max_age

    @property
    def path(self) -> Path:
        """The sealed file."""
        return self.directory / SAVED_SESSIONS_FILE

    @property
    def key_path(self) -> Path:
        """The key file (32 random bytes, 0600)."""
        return self.directory / SESSION_VAULT_KEY_FILE

    def _aad(self) -> bytes:
        return _MAGIC + bytes([FORMAT_VERSION]) + self.installation

    def _key(self, *, create: bool) -> bytes | None:
        """The vault key; made (0600, never replaced) if ``create`` and missing."""
        try:
            key = self.key_path.read_bytes()
        except FileNotFoundError:
            if not create:
                return None
            # FileExistsError: made meanwhile by another process; use that one.
            with contextlib.suppress(FileExistsError):
                write_private_file(self.key_path, secrets.token_bytes(_KEY_SIZE), exclusive=True)
            key = self.key_path.read_bytes()
        if len(key) != _KEY_SIZE:
            raise SavedSessionsError(
                f"{self.key_path} holds {len(key)} bytes, not a {_KEY_SIZE}-byte key; delete "
                "it (saved sessions are then lost, devices handshake again)"
            )
        return key

    def save(self, sessions: list[SavedDtlsSession], *, now: float | None = None) -> int:
        """Seal ``sessions`` into the file (atomically replacing any older one); returns the
        file's size in bytes. Blocking file I/O: run it in a thread."""
        key = self._key(create=True)
        assert key is not None
        body = json.dumps(
            {
                "created": time.time() if now is None else now,
                "sessions": [session.to_json() for session in sessions],
            },
            separators=(",", ":"),
        ).encode()
        nonce = secrets.token_bytes(_NONCE_SIZE)  # a fresh key-nonce pair per file
        sealed = AESGCM(key).encrypt(nonce, body, self._aad())
        data = _MAGIC + bytes([FORMAT_VERSION]) + nonce + sealed
        write_private_file(self.path, data)
        return len(data)

    def take(self, *, now: float | None = None) -> list[SavedDtlsSession]:
        """Read the file and delete it before returning (so its states are restored at
        most once, even if the process dies right after); the sessions still young enough.
        A missing file gives []; an unusable one is logged, deleted, and gives [] (one that
        cannot be read at all is logged and left where it is).
        Blocking file I/O: run it in a thread."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return []
        except OSError as exc:  # e.g. a directory in its place, or unreadable
            log.warning("saved DTLS sessions in %s not restored (devices handshake again): "
                        "cannot read it: %s", self.path, exc)  # fmt: skip
            return []
        self.path.unlink(missing_ok=True)
        _fsync_directory(self.directory)  # the deletion is durable before any restore
        try:
            return self._open(data, time.time() if now is None else now)
        except SavedSessionsError as exc:
            log.warning("saved DTLS sessions in %s not restored (devices handshake again): %s",
                        self.path, exc)  # fmt: skip
            return []

    def _open(self, data: bytes, now: float) -> list[SavedDtlsSession]:
        if len(data) < _HEADER_SIZE + 16:
            raise SavedSessionsError(f"the file is truncated ({len(data)} bytes)")
        if data[: len(_MAGIC)] != _MAGIC:
            raise SavedSessionsError("the file is not a saved-sessions file (wrong magic)")
        version = data[len(_MAGIC)]
        if version != FORMAT_VERSION:
            raise SavedSessionsError(
                f"the file has format version {version}; this server reads {FORMAT_VERSION}"
            )
        key = self._key(create=False)
        if key is None:
            raise SavedSessionsError(f"its key {self.key_path} is missing")
        nonce = data[len(_MAGIC) + 1 : _HEADER_SIZE]
        try:
            body = AESGCM(key).decrypt(nonce, data[_HEADER_SIZE:], self._aad())
        except InvalidTag:
            raise SavedSessionsError(
                "the file fails authentication: tampered, truncated, or written by another "
                "installation or under another key"
            ) from None
        try:
            document = json.loads(body)
            created = float(document["created"])
            items = document["sessions"]
            assert isinstance(items, list)
        except (AssertionError, KeyError, TypeError, ValueError) as exc:
            raise SavedSessionsError(f"the file's content is malformed ({exc!r})") from None
        if now - created > self.max_age:
            raise SavedSessionsError(
                f"the file was written {now - created:.0f} s ago, longer than the "
                f"{self.max_age:g} s max age"
            )
        sessions = [SavedDtlsSession.from_json(item) for item in items]
        young = [s for s in sessions if now - s.last_activity <= self.max_age]
        if len(young) < len(sessions):
            log.info("dropped %d saved DTLS sessions idle for more than %g s",
                     len(sessions) - len(young), self.max_age)  # fmt: skip
        return young


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
