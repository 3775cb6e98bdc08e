"""TLS 1.3 cipher suites and the record-protection part of the key schedule (RFC 8446 7).

Only what a record layer needs once the handshake is over: the traffic keys derived from a
traffic secret (7.3), the next-generation secret for KeyUpdate (7.2), and the suites the
device endpoint may negotiate. HKDF-Expand itself is `cryptography`'s; this module only
builds the HkdfLabel structure (7.1) around it.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Protocol

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESCCM, AESGCM, ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

from otacore.errors import RecordError

__all__ = [
    "SUITES",
    "SUITES_BY_CODE",
    "Aead",
    "CipherSuite",
    "hkdf_expand_label",
    "next_traffic_secret",
    "suite_named",
    "traffic_key_and_iv",
]

#: RFC 8446 5.3: the per-record nonce is as long as the IV, and every suite here uses 12.
IV_LENGTH = 12


class Aead(Protocol):
    """What the record layer uses of a `cryptography` AEAD object."""

    def encrypt(self, nonce: bytes, data: bytes, associated_data: bytes | None) -> bytes: ...

    def decrypt(self, nonce: bytes, data: bytes, associated_data: bytes | None) -> bytes: ...


@dataclass(frozen=True, slots=True)
class CipherSuite:
    """One TLS 1.3 cipher suite (RFC 8446 B.4): its AEAD, key length and hash."""

    #: The IANA code point (B.4), also how a serialised session names its suite.
    code: int
    #: The name as OpenSSL reports it (``SSL_get_cipher_name``) and as RFC 8446 spells it.
    name: str
    key_length: int
    #: The hash of the suite's HKDF; its length is the traffic secrets' length (7.1).
    hash_name: str
    #: AEAD tag length: 8 for AES-128-CCM-8, 16 otherwise.
    tag_length: int

    def hash_algorithm(self) -> hashes.HashAlgorithm:
        """A fresh instance of the suite's hash."""
        return hashes.SHA384() if self.hash_name == "sha384" else hashes.SHA256()

    @property
    def hash_length(self) -> int:
        """Length of the suite's traffic secrets (Hash.length in RFC 8446 7.1)."""
        return 48 if self.hash_name == "sha384" else 32

    def aead(self, key: bytes) -> Aead:
        """The AEAD object for ``key``."""
        if self.code in (0x1301, 0x1302):
            return AESGCM(key)
        if self.code == 0x1303:
            return ChaCha20Poly1305(key)
        return AESCCM(key, tag_length=self.tag_length)


#: The five TLS 1.3 suites (RFC 8446 B.4). The device endpoint offers OpenSSL's default
#: three (the two AES-GCM and ChaCha20-Poly1305); the CCM ones are here for devices whose
#: hardware has only AES-CCM, should the endpoint enable them.
SUITES: tuple[CipherSuite, ...] = (
    CipherSuite(0x1301, "TLS_AES_128_GCM_SHA256", 16, "sha256", 16),
    CipherSuite(0x1302, "TLS_AES_256_GCM_SHA384", 32, "sha384", 16),
    CipherSuite(0x1303, "TLS_CHACHA20_POLY1305_SHA256", 32, "sha256", 16),
    CipherSuite(0x1304, "TLS_AES_128_CCM_SHA256", 16, "sha256", 16),
    CipherSuite(0x1305, "TLS_AES_128_CCM_8_SHA256", 16, "sha256", 8),
)
SUITES_BY_CODE: dict[int, CipherSuite] = {suite.code: suite for suite in SUITES}
_SUITES_BY_NAME: dict[str, CipherSuite] = {suite.name: suite for suite in SUITES}


def suite_named(name: str) -> CipherSuite:
    """The suite OpenSSL names ``name``; RecordError for a suite this layer cannot run."""
    try:
        return _SUITES_BY_NAME[name]
    except KeyError:
        raise RecordError(
            f"cipher suite {name!r} is not a TLS 1.3 suite this record layer supports "
            f"(supported: {', '.join(_SUITES_BY_NAME)})"
        ) from None


def hkdf_expand_label(
    suite: CipherSuite, secret: bytes, label: bytes, context: bytes, length: int
) -> bytes:
    """HKDF-Expand-Label (RFC 8446 7.1) with the suite's hash."""
    full_label = b"tls13 " + label
    # struct HkdfLabel { uint16 length; opaque label<7..255>; opaque context<0..255>; }
    hkdf_label = (
        struct.pack("!HB", length, len(full_label)) + full_label + bytes((len(context),)) + context
    )
    return HKDFExpand(suite.hash_algorithm(), length, hkdf_label).derive(secret)


def traffic_key_and_iv(suite: CipherSuite, secret: bytes) -> tuple[bytes, bytes]:
    """The write key and IV of a traffic secret (RFC 8446 7.3)."""
    key = hkdf_expand_label(suite, secret, b"key", b"", suite.key_length)
    iv = hkdf_expand_label(suite, secret, b"iv", b"", IV_LENGTH)
    return key, iv


def next_traffic_secret(suite: CipherSuite, secret: bytes) -> bytes:
    """application_traffic_secret_N+1 after a KeyUpdate (RFC 8446 7.2)."""
    return hkdf_expand_label(suite, secret, b"traffic upd", b"", suite.hash_length)
