"""TLS 1.2 / DTLS 1.2 record keys: the AEAD suites the server speaks and the key block.

After OpenSSL has finished a DTLS 1.2 handshake, the session's record keys are derived here
from its master secret and the two hello randoms with the TLS 1.2 PRF (RFC 5246 section 5),
so that the records can be sealed and opened without the OpenSSL object.

Extended master secret (RFC 7627) changes only how the master secret is computed; the key
block is derived from it the same way (RFC 7627 section 4 leaves RFC 5246 6.3 unchanged), and
OpenSSL hands out the master secret it actually uses, so both kinds of session work here.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Final

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import hmac as crypto_hmac
from cryptography.hazmat.primitives.ciphers.aead import AESCCM, AESGCM, ChaCha20Poly1305

from otacore.errors import RecordError, UnsupportedCipherSuiteError

#: The DTLS 1.2 master secret is always 48 bytes (RFC 5246 section 8.1).
MASTER_SECRET_SIZE: Final = 48
#: ClientHello.random and ServerHello.random are 32 bytes each (RFC 5246 section 7.4.1.2).
RANDOM_SIZE: Final = 32
_KEY_EXPANSION_LABEL: Final = b"key expansion"


class NonceStyle(enum.IntEnum):
    """How a record's AEAD nonce is built from the fixed IV and the 64-bit epoch||seq."""

    #: 4-byte salt || 8-byte explicit nonce carried in the record (RFC 5288 section 3 for GCM,
    #: RFC 6655 section 3 / RFC 7251 for CCM and CCM-8).
    EXPLICIT = 1
    #: 12-byte IV XOR (0^32 || epoch||seq), nothing carried in the record (RFC 7905 section 2).
    XOR = 2


class AeadKind(enum.IntEnum):
    """Which `cryptography` AEAD seals the records."""

    AES_GCM = 1
    CHACHA20_POLY1305 = 2
    AES_CCM = 3


@dataclass(frozen=True, slots=True)
class CipherSuite:
    """One AEAD cipher suite, as far as the record layer is concerned."""

    #: The IANA code point (RFC 8422, RFC 7905, RFC 7251 registries).
    code: int
    #: OpenSSL's name, as ``SSL.Connection.get_cipher_name()`` returns it.
    openssl_name: str
    aead: AeadKind
    key_size: int
    #: The fixed IV the key block provides: 4 (salt) or 12 (ChaCha20-Poly1305).
    fixed_iv_size: int
    nonce_style: NonceStyle
    tag_size: int
    #: The PRF's hash (RFC 5246 section 5: SHA-256 unless the suite says otherwise).
    prf_hash: str

    #: Bytes of nonce carried in front of each record's ciphertext (8 or 0), and the
    #: ciphertext bytes a record adds to its plaintext; derived, plain fields for speed.
    explicit_nonce_size: int = field(init=False)
    overhead: int = field(init=False)

    def __post_init__(self) -> None:
        explicit = 8 if self.nonce_style is NonceStyle.EXPLICIT else 0
        object.__setattr__(self, "explicit_nonce_size", explicit)
        object.__setattr__(self, "overhead", explicit + self.tag_size)

    def make_aead(self, key: bytes) -> AESGCM | ChaCha20Poly1305 | AESCCM:
        """A `cryptography` AEAD object for ``key``."""
        if len(key) != self.key_size:
            raise RecordError(
                f"{self.openssl_name} needs a {self.key_size}-byte key, got {len(key)}"
            )
        if self.aead is AeadKind.AES_GCM:
            return AESGCM(key)
        if self.aead is AeadKind.CHACHA20_POLY1305:
            return ChaCha20Poly1305(key)
        return AESCCM(key, tag_length=self.tag_size)


#: The suites the record layer seals: the server's DTLS_CIPHERS, plus AES-128-CCM-8, which
#: RFC 7252 section 9.1.3.3 names for CoAP. All are ECDHE-ECDSA; only the record part matters.
SUITES: Final[tuple[CipherSuite, ...]] = (
    CipherSuite(0xC02B, "ECDHE-ECDSA-AES128-GCM-SHA256", AeadKind.AES_GCM, 16, 4,
                NonceStyle.EXPLICIT, 16, "sha256"),
    CipherSuite(0xC02C, "ECDHE-ECDSA-AES256-GCM-SHA384", AeadKind.AES_GCM, 32, 4,
                NonceStyle.EXPLICIT, 16, "sha384"),  # RFC 5289 section 3.2: SHA-384 PRF
    CipherSuite(0xCCA9, "ECDHE-ECDSA-CHACHA20-POLY1305", AeadKind.CHACHA20_POLY1305, 32, 12,
                NonceStyle.XOR, 16, "sha256"),
    CipherSuite(0xC0AC, "ECDHE-ECDSA-AES128-CCM", AeadKind.AES_CCM, 16, 4,
                NonceStyle.EXPLICIT, 16, "sha256"),
    CipherSuite(0xC0AE, "ECDHE-ECDSA-AES128-CCM8", AeadKind.AES_CCM, 16, 4,
                NonceStyle.EXPLICIT, 8, "sha256"),  # RFC 7251 section 2: 8-byte tag
)  # fmt: skip
_BY_NAME: Final = {suite.openssl_name: suite for suite in SUITES}
_BY_CODE: Final = {suite.code: suite for suite in SUITES}


def suite_named(openssl_name: str) -> CipherSuite:
    """The suite OpenSSL calls ``openssl_name``; UnsupportedCipherSuiteError if not sealed here."""
    try:
        return _BY_NAME[openssl_name]
    except KeyError:
        known = ", ".join(_BY_NAME)
        raise UnsupportedCipherSuiteError(
            f"cipher suite {openssl_name!r} is not one the record layer seals ({known}); "
            "restrict the OpenSSL context's cipher list to these"
        ) from None


def suite_with_code(code: int) -> CipherSuite:
    """The suite with IANA code point ``code`` (used when restoring a saved session)."""
    try:
        return _BY_CODE[code]
    except KeyError:
        raise UnsupportedCipherSuiteError(f"unknown cipher suite code 0x{code:04X}") from None


def _hmac(hash_name: str, key: bytes, data: bytes) -> bytes:
    algorithm: hashes.HashAlgorithm = hashes.SHA384() if hash_name == "sha384" else hashes.SHA256()
    mac = crypto_hmac.HMAC(key, algorithm)
    mac.update(data)
    return mac.finalize()


def tls12_prf(hash_name: str, secret: bytes, label: bytes, seed: bytes, size: int) -> bytes:
    """PRF(secret, label, seed) of RFC 5246 section 5, ``size`` bytes: P_<hash>(secret,
    label + seed), HMAC from `cryptography`. ``hash_name``: "sha256" or "sha384"."""
    if hash_name not in ("sha256", "sha384"):
        raise RecordError(f"TLS 1.2 PRF hash must be sha256 or sha384, not {hash_name!r}")
    labelled_seed = label + seed
    output = bytearray()
    a_i = labelled_seed  # A(0) = seed
    while len(output) < size:
        a_i = _hmac(hash_name, secret, a_i)  # A(i) = HMAC_hash(secret, A(i-1))
        output += _hmac(hash_name, secret, a_i + labelled_seed)
    return bytes(output[:size])


@dataclass(frozen=True, slots=True)
class TrafficKeys:
    """The AEAD keys and fixed IVs of both directions (RFC 5246 section 6.3)."""

    suite: CipherSuite
    client_write_key: bytes = field(repr=False)  # never in logs
    server_write_key: bytes = field(repr=False)
    client_write_iv: bytes = field(repr=False)
    server_write_iv: bytes = field(repr=False)


def derive_traffic_keys(
    suite: CipherSuite, master_secret: bytes, client_random: bytes, server_random: bytes
) -> TrafficKeys:
    """The key block of RFC 5246 section 6.3, split for an AEAD suite.

    key_block = PRF(master_secret, "key expansion", server_random + client_random), read as
    client_write_MAC_key, server_write_MAC_key (empty for AEAD suites), client_write_key,
    server_write_key, client_write_IV, server_write_IV.
    """
    if len(master_secret) != MASTER_SECRET_SIZE:
        raise RecordError(f"a TLS 1.2 master secret has 48 bytes, got {len(master_secret)}")
    if len(client_random) != RANDOM_SIZE or len(server_random) != RANDOM_SIZE:
        raise RecordError("the client and server randoms must be 32 bytes each")
    key, iv = suite.key_size, suite.fixed_iv_size
    block = tls12_prf(
        suite.prf_hash,
        master_secret,
        _KEY_EXPANSION_LABEL,
        server_random + client_random,  # server first here (RFC 5246 6.3), unlike the master secret
        2 * (key + iv),
    )
    return TrafficKeys(
        suite=suite,
        client_write_key=block[:key],
        server_write_key=block[key : 2 * key],
        client_write_iv=block[2 * key : 2 * key + iv],
        server_write_iv=block[2 * key + iv :],
    )
