"""Signed firmware manifests and the device's trust store (Ed25519, RFC 8032).

Every product has one or more Ed25519 signing keys. For each firmware the server signs a
*manifest* naming the exact file (SHA-256 and size) and what it is (platform, module function,
index and version, dependencies, product id and product firmware version). A device checks the
signature against the keys of its :class:`TrustStore` before it applies anything, and then
checks the downloaded file against the manifest (:func:`verify_firmware`).

Encodings are fixed big-endian binary layouts (``MANIFEST_HEADER``, ``SIGNED_HEADER``,
``STATEMENT_HEADER``, ``TRUST_HEADER`` below) with no optional or reorderable fields, so a
manifest always encodes to the same bytes; Ed25519 signatures are deterministic (RFC 8032
section 5.1.6), so a signed manifest is reproducible byte for byte. Decoders accept exactly one
encoding of each value and reject trailing bytes. Each signature covers a context string plus
the body, so a manifest signature can never pass for a statement signature (domain separation).

Key ids are the first 8 bytes of SHA-256 over the raw 32-byte public key, as 16 hex digits.
Downgrade authorisations, signed by the same keys under their own context, are in
:mod:`otacore.downgrade`.
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import astuple, dataclass, field, replace
from dataclasses import fields as dataclass_fields
from enum import IntEnum
from functools import lru_cache
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from otacore.errors import ModuleFormatError, OtaError
from otacore.module import ModuleDependency, validate_module

FORMAT_VERSION = 1
MANIFEST_MAGIC = b"OTAM"
SIGNED_MAGIC = b"OTAS"
STATEMENT_MAGIC = b"OTAK"
TRUST_MAGIC = b"OTAT"
SIGNATURE_SIZE = 64
PUBLIC_KEY_SIZE = 32
KEY_ID_SIZE = 8
#: A module prefix holds two dependencies and prefix extensions may add a few more.
MAX_DEPENDENCIES = 8
#: A trust store never needs many keys; the bound keeps a corrupt count from allocating.
MAX_TRUSTED_KEYS = 64

#: magic, format, sha256, size u32, platform u16, function u8, index u8, module version u16,
#: product id u32, product firmware version u32, key id [8], dependency count u8
MANIFEST_HEADER = struct.Struct(">4sB32sIHBBHII8sB")
#: each dependency after the manifest header: function u8, index u8, version u16
DEPENDENCY = struct.Struct(">BBH")
#: magic, format, body length u16; then the body and a 64-byte signature
SIGNED_HEADER = struct.Struct(">4sBH")
#: magic, format, action u8, product id u32, sequence u64, signer key id [8]; then the subject
#: (public key [32] or key id [8]) and a 64-byte signature
STATEMENT_HEADER = struct.Struct(">4sBBIQ8s")
#: magic, format, product id u32, sequence u64, key count u16; then public keys, CRC-32
TRUST_HEADER = struct.Struct(">4sBIQH")

_MANIFEST_CONTEXT = b"otacloud firmware manifest v1\x00"
_STATEMENT_CONTEXT = b"otacloud key rotation statement v1\x00"


# --- errors -------------------------------------------------------------------------------


class ManifestFormatError(ModuleFormatError):
    """A signed manifest is malformed: wrong magic, version, length or field value."""


class StatementFormatError(ModuleFormatError):
    """A key rotation statement is malformed."""


class TrustStoreFormatError(ModuleFormatError):
    """A persisted trust store is malformed or corrupt."""


class FirmwareMismatchError(ModuleFormatError):
    """A firmware file is not the one its manifest names (size or SHA-256 differ)."""


class SignatureError(OtaError):
    """A signature does not verify with the key it names."""


class UnknownKeyError(SignatureError):
    """The signing key is not (or no longer) in the device's trust store."""


class WrongProductError(SignatureError):
    """A manifest or statement is for another product than this trust store."""


class KeyRotationError(OtaError):
    """A key rotation statement is validly signed but cannot be applied."""


class ReplayedStatementError(KeyRotationError):
    """The statement's sequence number was already used (a replay or a duplicate)."""


class StatementOutOfOrderError(KeyRotationError):
    """The statement skips sequence numbers: earlier statements must be applied first."""


class LastKeyError(KeyRotationError):
    """Withdrawing this key would leave the trust store empty."""


class SelfWithdrawalError(KeyRotationError):
    """A key may only be withdrawn by a statement signed by another trusted key."""


# --- keys -----------------------------------------------------------------------------------


def key_id_of(public_key: bytes) -> str:
    """Key id of a raw Ed25519 public key: first 8 bytes of its SHA-256, as hex."""
    if len(public_key) != PUBLIC_KEY_SIZE:
        raise ValueError(f"an Ed25519 public key is {PUBLIC_KEY_SIZE} bytes, not {len(public_key)}")
    return hashlib.sha256(public_key).digest()[:KEY_ID_SIZE].hex()


def _key_id_bytes(key_id: str) -> bytes:
    try:
        raw = bytes.fromhex(key_id)
    except ValueError:
        raw = b""
    if len(raw) != KEY_ID_SIZE or key_id != raw.hex():
        raise ValueError(f"key id must be {2 * KEY_ID_SIZE} lowercase hex digits, not {key_id!r}")
    return raw


@lru_cache(maxsize=1024)
def _load_public(public_key: bytes) -> Ed25519PublicKey:
    return Ed25519PublicKey.from_public_bytes(public_key)


@dataclass(frozen=True)
class SigningKey:
    """A product's Ed25519 signing key with its raw public key and key id."""

    private_key: Ed25519PrivateKey = field(repr=False, compare=False)
    public_key: bytes
    key_id: str

    @classmethod
    def from_private_bytes(cls, raw: bytes) -> SigningKey:
        """Load a key from its 32-byte raw private form (as :meth:`private_bytes` returns)."""
        if len(raw) != 32:
            raise ValueError(f"an Ed25519 private key is 32 bytes, not {len(raw)}")
        private = Ed25519PrivateKey.from_private_bytes(raw)
        public = private.public_key().public_bytes_raw()
        return cls(private, public, key_id_of(public))

    def private_bytes(self) -> bytes:
        """The 32-byte raw private key, for the server's key storage."""
        return self.private_key.private_bytes_raw()

    def sign(self, message: bytes) -> bytes:
        """Ed25519 signature (64 bytes) of ``message``."""
        return self.private_key.sign(message)


def generate_signing_key() -> SigningKey:
    """A new random Ed25519 signing key."""
    return SigningKey.from_private_bytes(Ed25519PrivateKey.generate().private_bytes_raw())


def _verify(public_key: bytes, signature: bytes, message: bytes) -> bool:
    try:
        _load_public(public_key).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True


# --- manifests ------------------------------------------------------------------------------


def _check_magic(
    what: str, magic: bytes, version: int, expected: bytes, error: type[Exception]
) -> None:
    if magic != expected:
        raise error(f"not a {what}: magic {magic!r}, expected {expected!r}")
    if version != FORMAT_VERSION:
        raise error(f"{what} format {version} is not supported (this device reads 1)")


def _check_range(name: str, value: int, bits: int, error: type[Exception]) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < (1 << bits):
        raise error(f"{name} {value!r} does not fit in an unsigned {bits}-bit field")


@dataclass(frozen=True)
class Manifest:
    """What the server vouches for: one exact firmware file and its module metadata.

    ``key_id`` names the signing key; :func:`sign_manifest` fills it in.
    """

    sha256: bytes
    size: int
    platform_id: int
    module_function: int
    module_index: int
    module_version: int
    product_id: int
    product_version: int
    dependencies: tuple[ModuleDependency, ...] = ()
    key_id: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "dependencies", tuple(self.dependencies))
        if not isinstance(self.sha256, bytes) or len(self.sha256) != 32:
            raise ManifestFormatError("manifest SHA-256 must be 32 bytes")
        for name, value, bits in (
            ("firmware size", self.size, 32),
            ("platform id", self.platform_id, 16),
            ("module function", self.module_function, 8),
            ("module index", self.module_index, 8),
            ("module version", self.module_version, 16),
            ("product id", self.product_id, 32),
            ("product firmware version", self.product_version, 32),
        ):
            _check_range(name, value, bits, ManifestFormatError)
        if len(self.dependencies) > MAX_DEPENDENCIES:
            raise ManifestFormatError(
                f"manifest lists {len(self.dependencies)} dependencies; at most "
                f"{MAX_DEPENDENCIES} are allowed"
            )
        for dep in self.dependencies:
            _check_range("dependency function", dep.function, 8, ManifestFormatError)
            _check_range("dependency index", dep.index, 8, ManifestFormatError)
            _check_range("dependency version", dep.version, 16, ManifestFormatError)
            if dep.function == 0:
                raise ManifestFormatError("a manifest dependency cannot have function 0 (none)")

    @property
    def module_key(self) -> tuple[int, int]:
        """(function, index): the module slot pair this firmware goes into."""
        return (self.module_function, self.module_index)

    def encode(self) -> bytes:
        """The canonical body bytes (the signed part); needs a ``key_id``."""
        try:
            key_id = _key_id_bytes(self.key_id)
        except ValueError as exc:
            raise ManifestFormatError(f"cannot encode an unsigned manifest: {exc}") from None
        scalars = astuple(self)[:8]  # sha256 .. product_version, in layout order
        header = MANIFEST_HEADER.pack(
            MANIFEST_MAGIC, FORMAT_VERSION, *scalars, key_id, len(self.dependencies)
        )
        deps = b"".join(DEPENDENCY.pack(d.function, d.index, d.version) for d in self.dependencies)
        return header + deps

    @classmethod
    def decode(cls, body: bytes) -> Manifest:
        """Parse canonical body bytes; raises ManifestFormatError on any deviation."""
        if len(body) < MANIFEST_HEADER.size:
            raise ManifestFormatError(f"manifest of {len(body)} bytes is truncated")
        fields = MANIFEST_HEADER.unpack_from(body)
        _check_magic("manifest", fields[0], fields[1], MANIFEST_MAGIC, ManifestFormatError)
        key_id, dep_count = fields[10], fields[11]
        expected = MANIFEST_HEADER.size + dep_count * DEPENDENCY.size
        if dep_count > MAX_DEPENDENCIES or len(body) != expected:
            raise ManifestFormatError(
                f"manifest declares {dep_count} dependencies, so it must be {expected} bytes, "
                f"not {len(body)}"
            )
        deps = tuple(
            ModuleDependency(*DEPENDENCY.unpack_from(body, MANIFEST_HEADER.size + i * 4))
            for i in range(dep_count)
        )
        names = [f.name for f in dataclass_fields(cls)[:8]]  # sha256 .. product_version
        scalars: dict[str, Any] = dict(zip(names, fields[2:10], strict=True))
        return cls(**scalars, dependencies=deps, key_id=key_id.hex())


def manifest_for_module(
    image: bytes, *, product_id: int, product_version: int | None = None
) -> Manifest:
    """The (unsigned) manifest of a valid module image for ``product_id``.

    ``product_version`` defaults to the product version in the module suffix; when both are
    given they must agree.
    """
    info = validate_module(image)
    if product_version is None:
        if info.product_version is None:
            raise ManifestFormatError(
                "the module has no product data; pass the product firmware version explicitly"
            )
        product_version = info.product_version
    elif info.product_version is not None and info.product_version != product_version:
        raise ManifestFormatError(
            f"the module says product firmware version {info.product_version} but "
            f"{product_version} was requested"
        )
    meta = (info.platform_id, info.module_function, info.module_index, info.module_version)
    sha = hashlib.sha256(image).digest()
    return Manifest(sha, len(image), *meta, product_id, product_version, info.dependencies)


@dataclass(frozen=True)
class SignedManifest:
    """A manifest with its signature; :meth:`to_bytes` is what travels to the device."""

    manifest: Manifest
    signature: bytes

    def to_bytes(self) -> bytes:
        """The envelope: header, canonical body, signature."""
        body = self.manifest.encode()
        return SIGNED_HEADER.pack(SIGNED_MAGIC, FORMAT_VERSION, len(body)) + body + self.signature


def sign_manifest(key: SigningKey, manifest: Manifest) -> SignedManifest:
    """Sign ``manifest`` with ``key`` (its ``key_id`` is set to the key's id)."""
    manifest = replace(manifest, key_id=key.key_id)
    return SignedManifest(manifest, key.sign(_MANIFEST_CONTEXT + manifest.encode()))


def parse_signed_manifest(data: bytes) -> SignedManifest:
    """Parse a signed manifest envelope without checking the signature."""
    data = bytes(data)
    if len(data) < SIGNED_HEADER.size + SIGNATURE_SIZE:
        raise ManifestFormatError(f"signed manifest of {len(data)} bytes is truncated")
    magic, version, body_len = SIGNED_HEADER.unpack_from(data)
    _check_magic("signed manifest", magic, version, SIGNED_MAGIC, ManifestFormatError)
    if len(data) != SIGNED_HEADER.size + body_len + SIGNATURE_SIZE:
        raise ManifestFormatError(
            f"signed manifest declares a {body_len}-byte body, so it must be "
            f"{SIGNED_HEADER.size + body_len + SIGNATURE_SIZE} bytes, not {len(data)}"
        )
    body = data[SIGNED_HEADER.size : SIGNED_HEADER.size + body_len]
    return SignedManifest(Manifest.decode(body), data[SIGNED_HEADER.size + body_len :])


def verify_manifest(signed_bytes: bytes, trust_store: TrustStore) -> Manifest:
    """Parse a signed manifest and verify it against ``trust_store``; return the manifest.

    Raises ManifestFormatError (malformed), UnknownKeyError (signer not trusted),
    SignatureError (bad signature) or WrongProductError (another product's manifest).
    """
    signed = parse_signed_manifest(signed_bytes)
    manifest = signed.manifest
    public = trust_store.public_key(manifest.key_id)
    if public is None:
        raise UnknownKeyError(
            f"firmware manifest is signed by key {manifest.key_id}, which this device does not "
            f"trust (trusted: {', '.join(trust_store.key_ids)}); it may have been withdrawn"
        )
    if not _verify(public, signed.signature, _MANIFEST_CONTEXT + manifest.encode()):
        raise SignatureError(
            f"firmware manifest signature does not verify with key {manifest.key_id}: the "
            "manifest was altered or signed by another key"
        )
    if manifest.product_id != trust_store.product_id:
        raise WrongProductError(
            f"firmware manifest is for product {manifest.product_id}, this device belongs to "
            f"product {trust_store.product_id}"
        )
    return manifest


def verify_firmware(image_bytes: bytes, manifest: Manifest) -> None:
    """Raise FirmwareMismatchError unless ``image_bytes`` is the file ``manifest`` names."""
    if len(image_bytes) != manifest.size:
        raise FirmwareMismatchError(
            f"firmware file is {len(image_bytes)} bytes but its manifest says {manifest.size}"
        )
    digest = hashlib.sha256(image_bytes).digest()
    if digest != manifest.sha256:
        raise FirmwareMismatchError(
            f"firmware SHA-256 {digest.hex()} differs from the signed {manifest.sha256.hex()}: "
            "the file is corrupt or not the one released"
        )


# --- key rotation -------------------------------------------------------------------------


class KeyAction(IntEnum):
    """What a key rotation statement does."""

    INTRODUCE = 1
    WITHDRAW = 2


@dataclass(frozen=True)
class RotationStatement:
    """A trusted key's signed order to add (INTRODUCE) or remove (WITHDRAW) a key.

    ``subject`` is the new raw public key (INTRODUCE) or the withdrawn key id (WITHDRAW).
    """

    action: KeyAction
    product_id: int
    sequence: int
    signer_key_id: str
    subject: bytes
    signature: bytes = b""

    @property
    def subject_key_id(self) -> str:
        """Key id of the key introduced or withdrawn."""
        if self.action is KeyAction.INTRODUCE:
            return key_id_of(self.subject)
        return self.subject.hex()

    def signed_part(self) -> bytes:
        """The bytes the signature covers (header and subject)."""
        signer = _key_id_bytes(self.signer_key_id)
        fields = (self.action, self.product_id, self.sequence, signer)
        return STATEMENT_HEADER.pack(STATEMENT_MAGIC, FORMAT_VERSION, *fields) + self.subject

    def to_bytes(self) -> bytes:
        """The statement as sent to devices."""
        return self.signed_part() + self.signature


def _make_statement(
    signer: SigningKey, action: KeyAction, subject: bytes, product_id: int, sequence: int
) -> RotationStatement:
    _check_range("product id", product_id, 32, ValueError)
    _check_range("sequence number", sequence, 64, ValueError)
    if sequence == 0:
        raise ValueError("statement sequence numbers start at 1 (0 is the provisioned store)")
    unsigned = RotationStatement(action, product_id, sequence, signer.key_id, bytes(subject))
    signature = signer.sign(_STATEMENT_CONTEXT + unsigned.signed_part())
    return replace(unsigned, signature=signature)


def introduce_key(
    signer: SigningKey, new_public_key: bytes, *, product_id: int, sequence: int
) -> RotationStatement:
    """A statement, signed by a trusted key, adding ``new_public_key`` to the trust store."""
    key_id_of(new_public_key)  # checks the length
    return _make_statement(signer, KeyAction.INTRODUCE, new_public_key, product_id, sequence)


def withdraw_key(
    signer: SigningKey, key_id: str, *, product_id: int, sequence: int
) -> RotationStatement:
    """A statement, signed by another trusted key, removing ``key_id`` from the trust store."""
    subject = _key_id_bytes(key_id)
    return _make_statement(signer, KeyAction.WITHDRAW, subject, product_id, sequence)


def parse_statement(data: bytes) -> RotationStatement:
    """Parse a key rotation statement without checking its signature."""
    data = bytes(data)
    if len(data) < STATEMENT_HEADER.size:
        raise StatementFormatError(f"key rotation statement of {len(data)} bytes is truncated")
    magic, version, action, product_id, sequence, signer = STATEMENT_HEADER.unpack_from(data)
    _check_magic("key rotation statement", magic, version, STATEMENT_MAGIC, StatementFormatError)
    if action not in KeyAction._value2member_map_:
        raise StatementFormatError(f"unknown key rotation action {action} (1 add, 2 withdraw)")
    if sequence == 0:
        raise StatementFormatError("key rotation statement has sequence number 0")
    subject_size = PUBLIC_KEY_SIZE if action == KeyAction.INTRODUCE else KEY_ID_SIZE
    expected = STATEMENT_HEADER.size + subject_size + SIGNATURE_SIZE
    if len(data) != expected:
        raise StatementFormatError(
            f"{KeyAction(action).name.lower()} statement must be {expected} bytes, not {len(data)}"
        )
    subject = data[STATEMENT_HEADER.size : expected - SIGNATURE_SIZE]
    signature = data[expected - SIGNATURE_SIZE :]
    return RotationStatement(
        KeyAction(action), product_id, sequence, signer.hex(), subject, signature
    )


@dataclass(frozen=True)
class TrustStore:
    """The keys a device accepts firmware from, for one product, and the last statement applied.

    Immutable: :meth:`apply` returns the new store, which the device persists atomically
    (server.emulator.flash) before acting on it.
    """

    product_id: int
    keys: Mapping[str, bytes]  # key id -> raw public key
    sequence: int = 0

    def __post_init__(self) -> None:
        _check_range("product id", self.product_id, 32, TrustStoreFormatError)
        _check_range("sequence number", self.sequence, 64, TrustStoreFormatError)
        keys = dict(self.keys)
        if not keys:
            raise TrustStoreFormatError("a trust store must hold at least one key")
        if len(keys) > MAX_TRUSTED_KEYS:
            raise TrustStoreFormatError(f"a trust store holds at most {MAX_TRUSTED_KEYS} keys")
        for key_id, public in keys.items():
            if len(public) != PUBLIC_KEY_SIZE or key_id_of(public) != key_id:
                raise TrustStoreFormatError(f"trusted key {key_id} does not match its public key")
        object.__setattr__(self, "keys", dict(sorted(keys.items())))

    @classmethod
    def initial(
        cls, product_id: int, public_keys: Iterable[bytes], sequence: int = 0
    ) -> TrustStore:
        """The store a device is provisioned with; ``sequence`` is the product's current one."""
        return cls(product_id, {key_id_of(p): bytes(p) for p in public_keys}, sequence)

    @property
    def key_ids(self) -> tuple[str, ...]:
        """Trusted key ids, sorted."""
        return tuple(self.keys)

    def public_key(self, key_id: str) -> bytes | None:
        """The raw public key for ``key_id``, or None when it is not trusted."""
        return self.keys.get(key_id)

    def __contains__(self, key_id: object) -> bool:
        return key_id in self.keys

    def apply(self, statement: RotationStatement | bytes) -> TrustStore:
        """Verify ``statement`` and return the store after it.

        The statement must be for this product, carry exactly the next sequence number (older
        ones are replays; later ones need the gap filled first), and be signed by a key
        trusted now. Introducing a key already trusted, or withdrawing one already gone,
        only advances the sequence. A key cannot withdraw itself nor the last key.
        """
        if not isinstance(statement, RotationStatement):
            statement = parse_statement(statement)
        if statement.product_id != self.product_id:
            raise WrongProductError(
                f"key rotation statement is for product {statement.product_id}, this trust "
                f"store is for product {self.product_id}"
            )
        if statement.sequence <= self.sequence:
            raise ReplayedStatementError(
                f"key rotation statement {statement.sequence} was already applied (this store "
                f"is at statement {self.sequence}); refusing a replay"
            )
        if statement.sequence != self.sequence + 1:
            raise StatementOutOfOrderError(
                f"key rotation statement {statement.sequence} arrived but this store is at "
                f"{self.sequence}: apply statement {self.sequence + 1} first"
            )
        signer_public = self.public_key(statement.signer_key_id)
        if signer_public is None:
            raise UnknownKeyError(
                f"key rotation statement {statement.sequence} is signed by key "
                f"{statement.signer_key_id}, which this device does not trust"
            )
        if not _verify(
            signer_public, statement.signature, _STATEMENT_CONTEXT + statement.signed_part()
        ):
            raise SignatureError(
                f"key rotation statement {statement.sequence} has a bad signature for key "
                f"{statement.signer_key_id}"
            )
        keys = dict(self.keys)
        subject = statement.subject_key_id
        if statement.action is KeyAction.INTRODUCE:
            keys[subject] = statement.subject
            if len(keys) > MAX_TRUSTED_KEYS:
                raise KeyRotationError(
                    f"introducing key {subject} would exceed {MAX_TRUSTED_KEYS} trusted keys; "
                    "withdraw old keys first"
                )
        elif subject in keys:
            if len(keys) == 1:
                raise LastKeyError(
                    f"refusing to withdraw key {subject}: it is the only trusted key; "
                    "introduce its replacement first"
                )
            if subject == statement.signer_key_id:
                raise SelfWithdrawalError(
                    f"key {subject} cannot withdraw itself; another trusted key must sign"
                )
            del keys[subject]
        return TrustStore(self.product_id, keys, statement.sequence)

    def catch_up(self, statements: Iterable[RotationStatement | bytes]) -> TrustStore:
        """Apply, in sequence order, those ``statements`` this store has not applied yet."""
        parsed = [s if isinstance(s, RotationStatement) else parse_statement(s) for s in statements]
        store = self
        for statement in sorted(parsed, key=lambda s: s.sequence):
            if statement.sequence > store.sequence:
                store = store.apply(statement)
        return store

    def to_bytes(self) -> bytes:
        """Persistent form: header, public keys, CRC-32 of everything before it."""
        body = TRUST_HEADER.pack(
            TRUST_MAGIC, FORMAT_VERSION, self.product_id, self.sequence, len(self.keys)
        ) + b"".join(self.keys.values())
        return body + struct.pack(">I", zlib.crc32(body))

    @classmethod
    def from_bytes(cls, data: bytes) -> TrustStore:
        """Parse :meth:`to_bytes` output; raises TrustStoreFormatError when corrupt."""
        data = bytes(data)
        if len(data) < TRUST_HEADER.size + 4:
            raise TrustStoreFormatError(f"trust store of {len(data)} bytes is truncated")
        magic, version, product_id, sequence, count = TRUST_HEADER.unpack_from(data)
        _check_magic("trust store", magic, version, TRUST_MAGIC, TrustStoreFormatError)
        if len(data) != TRUST_HEADER.size + count * PUBLIC_KEY_SIZE + 4:
            raise TrustStoreFormatError(
                f"trust store declares {count} keys but is {len(data)} bytes long"
            )
        (crc,) = struct.unpack_from(">I", data, len(data) - 4)
        if zlib.crc32(data[:-4]) != crc:
            raise TrustStoreFormatError("trust store CRC-32 mismatch: the stored copy is corrupt")
        start = TRUST_HEADER.size
        publics = [data[start + i * 32 : start + (i + 1) * 32] for i in range(count)]
        store = cls.initial(product_id, publics, sequence)
        if len(store.keys) != count:
            raise TrustStoreFormatError("trust store lists the same key twice")
        return store
