"""Downgrade authorisations: the signed, expiring, device-bound permission to install an
application older than the one a device has run (Ed25519, RFC 8032).

A device keeps an anti-rollback *floor*: the product firmware version of the last application
it committed (``otacore.device.RollbackGuard``). A signed manifest whose product version is
below the floor is a rollback, and a replayed old manifest is exactly that; the device refuses
it unless the offer also carries a :class:`DowngradeAuthorization` that

* verifies with a key of the device's trust store, for the device's product (domain-separated:
  its signature covers ``_CONTEXT`` plus the body, so no manifest or key rotation statement
  signature can pass for one);
* names this device, the exact image (SHA-256) and its product version;
* was issued for a device at or above the device's current floor (``from_version``), so an
  authorisation issued before the device moved on to a newer version cannot take it back;
* is newer than the last authorisation the device used (``issued_at_ms`` strictly
  increases: each one is used once, as Uptane ECUs never accept a signed time earlier than
  one they have seen);
* has not expired on the device's wall clock. A device without a clock cannot see expiry;
  it takes the newest ``issued_at_ms`` it has accepted as a lower bound of the time, refuses
  what expired before that, and relies on the one-time and ``from_version`` rules above.

This is the idea of TUF's and Uptane's expiring, versioned metadata, narrowed to the one
thing that needs it here: the server (director) signs a short-lived authorisation for one
device when an operator locks or flashes it to an older version.

The encoding is one fixed big-endian layout (``LAYOUT``) followed by the 64-byte signature,
with format number 1; decoders accept exactly one encoding and reject trailing bytes.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

from otacore.errors import ModuleFormatError, OtaError
from otacore.signing import (
    KEY_ID_SIZE,
    SIGNATURE_SIZE,
    Manifest,
    SignatureError,
    SigningKey,
    TrustStore,
    UnknownKeyError,
    WrongProductError,
    _key_id_bytes,
    _verify,
)

FORMAT_VERSION = 1
MAGIC = b"OTAD"
DEVICE_ID_SIZE = 12
#: magic, format, product id u32, device id [12], image SHA-256 [32], from version u32,
#: to version u32, issued at u64, expires at u64 (Unix milliseconds), signer key id [8]
LAYOUT = struct.Struct(">4sBI12s32sIIQQ8s")
SIZE = LAYOUT.size + SIGNATURE_SIZE
_CONTEXT = b"otacloud downgrade authorisation v1\x00"


class DowngradeFormatError(ModuleFormatError):
    """A downgrade authorisation is malformed (magic, format, length or a field)."""


class DowngradeRefusedError(OtaError):
    """A valid downgrade authorisation does not cover this install on this device now."""


class DowngradeExpiredError(DowngradeRefusedError):
    """The authorisation's lifetime is over (or ended before a time the device has seen)."""


class DowngradeReplayError(DowngradeRefusedError):
    """The authorisation is not newer than one the device already used."""


class DowngradeMismatchError(DowngradeRefusedError):
    """The authorisation names another device, image, version or starting version."""


def _check_u(name: str, value: int, bits: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < (1 << bits):
        raise DowngradeFormatError(f"{name} {value!r} does not fit in an unsigned {bits}-bit field")


@dataclass(frozen=True)
class DowngradeAuthorization:
    """Device ``device_id`` (24 hex digits) of product ``product_id`` may install the image
    ``sha256`` of product version ``to_version`` while its floor is at most ``from_version``,
    from ``issued_at_ms`` until ``expires_at_ms`` (Unix time in milliseconds). ``key_id``
    names the signer."""

    product_id: int
    device_id: str
    sha256: bytes
    from_version: int
    to_version: int
    issued_at_ms: int
    expires_at_ms: int
    key_id: str = ""

    def __post_init__(self) -> None:
        try:
            raw_id = bytes.fromhex(self.device_id)
        except (TypeError, ValueError):
            raw_id = b""
        if len(raw_id) != DEVICE_ID_SIZE or raw_id.hex() != self.device_id:
            raise DowngradeFormatError(
                f"device id must be {2 * DEVICE_ID_SIZE} lowercase hex digits, "
                f"not {self.device_id!r}"
            )
        if not isinstance(self.sha256, bytes) or len(self.sha256) != 32:
            raise DowngradeFormatError("the image SHA-256 must be 32 bytes")
        for name, value, bits in (
            ("product id", self.product_id, 32),
            ("from version", self.from_version, 32),
            ("to version", self.to_version, 32),
            ("issued at", self.issued_at_ms, 64),
            ("expires at", self.expires_at_ms, 64),
        ):
            _check_u(name, value, bits)
        if self.to_version >= self.from_version:
            raise DowngradeFormatError(
                f"version {self.to_version} is not older than {self.from_version}: "
                "that is no downgrade"
            )
        if self.expires_at_ms <= self.issued_at_ms:
            raise DowngradeFormatError("a downgrade authorisation must expire after it is issued")

    def encode(self) -> bytes:
        """The canonical body (the signed part); needs a ``key_id``."""
        try:
            key_id = _key_id_bytes(self.key_id)
        except ValueError as exc:
            raise DowngradeFormatError(f"cannot encode an unsigned authorisation: {exc}") from None
        return LAYOUT.pack(
            MAGIC, FORMAT_VERSION, self.product_id, bytes.fromhex(self.device_id), self.sha256,
            self.from_version, self.to_version, self.issued_at_ms, self.expires_at_ms, key_id,
        )


@dataclass(frozen=True)
class SignedDowngrade:
    """An authorisation with its signature; :meth:`to_bytes` travels with an offer."""

    authorization: DowngradeAuthorization
    signature: bytes

    def to_bytes(self) -> bytes:
        """Body then signature (``SIZE`` bytes)."""
        return self.authorization.encode() + self.signature


def authorize_downgrade(
    key: SigningKey,
    manifest: Manifest,
    *,
    device_id: str,
    from_version: int,
    issued_at_ms: int,
    lifetime_ms: int,
) -> SignedDowngrade:
    """Sign a downgrade of ``device_id`` from ``from_version`` to the application
    ``manifest`` names, valid ``lifetime_ms`` milliseconds from ``issued_at_ms``."""
    if isinstance(lifetime_ms, bool) or not isinstance(lifetime_ms, int) or lifetime_ms < 1:
        raise ValueError(f"a downgrade authorisation lives at least 1 ms, not {lifetime_ms!r}")
    authorization = DowngradeAuthorization(
        manifest.product_id, device_id, manifest.sha256, from_version,
        manifest.product_version, issued_at_ms, issued_at_ms + lifetime_ms, key.key_id,
    )
    return SignedDowngrade(authorization, key.sign(_CONTEXT + authorization.encode()))


def parse_downgrade(data: bytes) -> SignedDowngrade:
    """Parse an authorisation without checking its signature (DowngradeFormatError)."""
    data = bytes(data)
    if len(data) != SIZE:
        raise DowngradeFormatError(
            f"a downgrade authorisation is {SIZE} bytes, not {len(data)}"
        )
    fields = LAYOUT.unpack_from(data)
    magic, version = fields[0], fields[1]
    if magic != MAGIC:
        raise DowngradeFormatError(f"not a downgrade authorisation: magic {magic!r}")
    if version != FORMAT_VERSION:
        raise DowngradeFormatError(
            f"downgrade authorisation format {version} is not supported (this device reads 1)"
        )
    (product_id, device_id, sha256, from_version, to_version, issued_at_ms, expires_at_ms,
     key_id) = fields[2:]
    assert len(key_id) == KEY_ID_SIZE
    authorization = DowngradeAuthorization(
        product_id, device_id.hex(), sha256, from_version, to_version, issued_at_ms,
        expires_at_ms, key_id.hex(),
    )
    return SignedDowngrade(authorization, data[LAYOUT.size :])


def verify_downgrade(data: bytes, trust_store: TrustStore) -> DowngradeAuthorization:
    """Parse an authorisation and verify its signature against ``trust_store``.

    Raises DowngradeFormatError, UnknownKeyError, SignatureError or WrongProductError.
    """
    signed = parse_downgrade(data)
    authorization = signed.authorization
    public = trust_store.public_key(authorization.key_id)
    if public is None:
        raise UnknownKeyError(
            f"the downgrade authorisation is signed by key {authorization.key_id}, which this "
            "device does not trust"
        )
    if not _verify(public, signed.signature, _CONTEXT + authorization.encode()):
        raise SignatureError(
            f"the downgrade authorisation's signature does not verify with key "
            f"{authorization.key_id}"
        )
    if authorization.product_id != trust_store.product_id:
        raise WrongProductError(
            f"the downgrade authorisation is for product {authorization.product_id}, this "
            f"device belongs to product {trust_store.product_id}"
        )
    return authorization


def check_downgrade(
    authorization: DowngradeAuthorization,
    manifest: Manifest,
    *,
    device_id: str,
    floor: int,
    last_issued_at_ms: int,
    now: float | None,
) -> None:
    """Raise DowngradeRefusedError unless ``authorization`` (already verified) lets this
    device (``device_id``, anti-rollback ``floor``, last authorisation used issued at
    ``last_issued_at_ms``) install ``manifest`` at wall-clock time ``now`` (Unix seconds;
    None: the device has no clock, see the module docstring)."""
    if authorization.device_id != device_id:
        raise DowngradeMismatchError(
            f"the downgrade authorisation is for device {authorization.device_id}, not this "
            f"device {device_id}"
        )
    if (authorization.sha256, authorization.to_version) != (
        manifest.sha256, manifest.product_version
    ):
        raise DowngradeMismatchError(
            f"the downgrade authorisation names version {authorization.to_version} image "
            f"{authorization.sha256.hex()[:16]}..., the offer version "
            f"{manifest.product_version} image {manifest.sha256.hex()[:16]}..."
        )
    if authorization.from_version < floor:
        raise DowngradeMismatchError(
            f"the downgrade authorisation was issued for a device at version "
            f"{authorization.from_version}; this device has since run version {floor}"
        )
    if authorization.issued_at_ms <= last_issued_at_ms:
        raise DowngradeReplayError(
            f"the downgrade authorisation issued at {authorization.issued_at_ms} ms is not newer "
            f"than the last one this device used ({last_issued_at_ms} ms): each is used once"
        )
    # Without a clock, the newest signed time the device accepted is the best "now" it has.
    now_ms = float(last_issued_at_ms) if now is None else now * 1000.0
    if not math.isfinite(now_ms) or now_ms >= authorization.expires_at_ms:
        raise DowngradeExpiredError(
            f"the downgrade authorisation expired at {authorization.expires_at_ms} ms (Unix "
            f"time); this device's time is {now_ms:.0f} ms: ask the server for a new one "
            "(lock or flash the device again)"
        )

