"""The error hierarchy shared by the whole project.

Errors are raised at the edge (parsers, validators, the store) with a message an operator
or a device developer can act on. Subsystems derive their specific errors from these bases.
"""

from __future__ import annotations


class OtaError(Exception):
    """Base of every error this project raises on purpose."""


# --- firmware module images ------------------------------------------------------------


class ModuleFormatError(OtaError):
    """A firmware module image is malformed or fails an integrity check."""


class TruncatedModuleError(ModuleFormatError):
    """The image is shorter than its prefix and suffix need."""


class SuffixSizeError(ModuleFormatError):
    """The suffix_size field is outside the range the format allows."""


class AddressRangeError(ModuleFormatError):
    """module_end_address - module_start_address disagrees with the image length."""


class UnknownFunctionError(ModuleFormatError):
    """module_function is not one of the known module functions."""


class CrcMismatchError(ModuleFormatError):
    """The stored CRC-32 does not match the image."""


class Sha256MismatchError(ModuleFormatError):
    """The stored SHA-256 does not match the image."""


class ModuleTooLargeError(ModuleFormatError):
    """The image is larger than its function allows on its platform."""


class PrefixExtensionError(ModuleFormatError):
    """The prefix extension records (flag 0x10) are malformed."""


# --- protocols ----------------------------------------------------------------------------


class ProtocolError(OtaError):
    """A peer sent bytes or messages that violate the protocol."""


class PayloadSchemaError(ProtocolError):
    """A message payload (msgpack) does not match its schema."""


# --- record layers (otacore.records) ---------------------------------------------------


class RecordError(ProtocolError):
    """A TLS or DTLS record could not be sealed or opened."""


class RecordAuthenticationError(RecordError):
    """A record failed to open: wrong key, tampered, truncated or garbled (RFC 6347 4.1.2.7
    says a DTLS receiver discards it silently; over TLS it is fatal, RFC 8446 5.2)."""


class RecordReplayError(RecordError):
    """A DTLS record's sequence number was already received or is left of the replay
    window (RFC 6347 4.1.2.6); the record is discarded."""


class RecordOverflowError(RecordError):
    """A record is larger than the protocol allows (RFC 8446 5.1/5.2, RFC 6347 4.1)."""


class PeerAlertError(RecordError):
    """The peer sent a fatal alert or close_notify; the session is over."""


class RecordProtocolViolationError(RecordError):
    """The peer broke a TLS 1.3 record-layer rule (an unexpected record or message type, a
    malformed alert or KeyUpdate); the session is closed with the alert the message names."""


class RecordHandoverError(RecordError):
    """A handshake failed, or its record keys and sequence state could not be taken over
    from OpenSSL (not finished, not the expected protocol version, output not collected, or
    the DTLS handshake's datagrams were not tracked)."""


class UnsupportedCipherSuiteError(RecordError):
    """The negotiated cipher suite is not one the record layer seals; restrict the OpenSSL
    context's cipher list to the suites in ``otacore.records.tls12_keys.SUITES``."""


class RecordSequenceExhaustedError(RecordError):
    """A DTLS write sequence number would pass 2^48 - 1 (RFC 6347 4.1): the session must end
    and the device handshake again; sealing more would reuse an AEAD nonce."""


class RecordLayerClosedError(RecordError):
    """A record was to be sealed on a session that is already closed (by us or the peer)."""


class RecordStateFormatError(RecordError):
    """Saved record-layer state is truncated, of an unknown format version, or corrupt."""


# --- deltas ---------------------------------------------------------------------------------


class DeltaError(OtaError):
    """A binary patch cannot be made or applied."""


class PatchFormatError(DeltaError):
    """A patch is malformed, truncated or corrupt."""


class PatchBaseMismatchError(DeltaError):
    """A patch was applied to a base image it was not made for."""


# --- control plane -----------------------------------------------------------------------


class StoreError(OtaError):
    """The durable store failed or holds inconsistent state."""


class ValidationError(OtaError):
    """A request is well-formed but breaks a rule (upload, release, lock, ...)."""


class NotFoundError(OtaError):
    """A named product, device, group, firmware or token does not exist."""


class ConflictError(OtaError):
    """The request conflicts with existing state (for example a duplicate version)."""


class AuthError(OtaError):
    """Missing, invalid, expired or revoked credentials."""


class PermissionDeniedError(AuthError):
    """The credentials are valid but their role may not do this."""
