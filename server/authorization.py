"""Who may connect: the certificate a device presented, and the rule that admits it.

After OpenSSL has checked a client certificate's chain, dates and purpose, the handshake
path names the certificate (:class:`ClientCertificate`: the device it names, its SHA-256
fingerprint and serial, via the :class:`DeviceIdCache`) and asks a
:class:`DeviceDirectory` whether it may connect. The rule (:func:`may_connect`) is about
certificates, not device rows:

* the device must be registered with a product;
* a revoked certificate is refused, whatever the device row says;
* once a device is revoked, every certificate known for it then (issued or seen) is
  revoked, and only certificates issued for it *later* (re-provisioning) are accepted, so a
  certificate the server had never recorded cannot bring the device back either. An
  explicit reinstate lifts the device's revocation.

The product store implements the directory (``server.fleet``); :class:`MemoryDeviceDirectory`
implements the same rule in memory for development servers, tests and benchmarks.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from cryptography import x509

from server.identity import (
    CertificateRejectedError,
    certificate_serial,
    device_id_from_certificate,
    validate_device_id,
)


@dataclass(frozen=True, slots=True)
class ClientCertificate:
    """A device certificate as a handshake presented it."""

    #: The device id the certificate names.
    device_id: str
    #: SHA-256 of the DER certificate, lowercase hex: what revocation is keyed on.
    sha256: str
    #: Serial number, lowercase hex.
    serial: str
    #: notAfter, epoch milliseconds.
    not_after_ms: int

    @classmethod
    def of(cls, cert: x509.Certificate, der: bytes | None = None) -> ClientCertificate:
        """Name ``cert`` (CertificateRejectedError if it names no valid device id)."""
        if der is None:
            from cryptography.hazmat.primitives.serialization import Encoding

            der = cert.public_bytes(Encoding.DER)
        return cls(
            device_id=device_id_from_certificate(cert),
            sha256=hashlib.sha256(der).hexdigest(),
            serial=certificate_serial(cert),
            not_after_ms=int(cert.not_valid_after_utc.timestamp() * 1000),
        )


@dataclass(frozen=True, slots=True)
class KnownCertificate:
    """What the server has recorded about one certificate."""

    #: Issued by this installation's CA through the server (``ota device provision``).
    issued: bool
    revoked: bool


def may_connect(
    known: KnownCertificate | None, *, registered: bool, device_revoked: bool
) -> bool:
    """The admission rule (see the module docstring): ``known`` is what is recorded about
    the presented certificate (None: never seen nor issued), ``registered`` whether the
    device belongs to a product, ``device_revoked`` whether the device is under a
    revocation that no reinstate has lifted."""
    if not registered:
        return False
    if known is not None and known.revoked:
        return False
    if device_revoked:  # only a certificate issued after the revocation brings it back
        return known is not None and known.issued
    return True


class DeviceIdCache:
    """Maps DER client certificates to :class:`ClientCertificate`\\s, remembering the last
    ``capacity`` results.

    Parsing a certificate costs tens of microseconds per handshake; a reconnecting fleet
    presents the same certificates again and again. Rejections are cached too. It holds no
    authorization state (revocation is the directory's, asked at every handshake), so a
    revocation takes effect at the next handshake whatever is cached here.
    """

    __slots__ = ("_capacity", "_entries")

    def __init__(self, capacity: int = 50_000) -> None:
        self._capacity = capacity
        # A plain dict keeps insertion order: re-inserting on a hit makes it an LRU, with
        # less memory per entry than an OrderedDict.
        self._entries: dict[bytes, ClientCertificate | CertificateRejectedError] = {}

    def certificate(self, der: bytes) -> ClientCertificate:
        """The certificate ``der`` as a :class:`ClientCertificate` (CertificateRejectedError
        if it names no device or cannot be parsed)."""
        key = hashlib.sha256(der).digest()
        entry = self._entries.pop(key, None)
        if entry is None:
            try:
                entry = ClientCertificate.of(x509.load_der_x509_certificate(der), der)
            except CertificateRejectedError as exc:
                entry = exc
            except ValueError as exc:
                entry = CertificateRejectedError(f"the client certificate cannot be parsed: {exc}")
            if len(self._entries) >= self._capacity:
                del self._entries[next(iter(self._entries))]
        self._entries[key] = entry
        if isinstance(entry, CertificateRejectedError):
            raise entry
        return entry

    def device_id(self, der: bytes) -> str:
        """The device id named by DER certificate ``der`` (CertificateRejectedError if none)."""
        return self.certificate(der).device_id


@runtime_checkable
class DeviceDirectory(Protocol):
    """Who may connect: the product store implements this."""

    async def authorize(self, certificate: ClientCertificate) -> bool:
        """True if the certificate's device is registered with a product and
        :func:`may_connect` admits the certificate (asked at every handshake)."""
        ...


class MemoryDeviceDirectory:
    """A DeviceDirectory held in memory (development servers, tests, benchmarks), with the
    same rule as the store: revocation is per certificate and survives ``remove``/``add``."""

    def __init__(self, device_ids: Iterable[str] = ()) -> None:
        self._registered: set[str] = {validate_device_id(d) for d in device_ids}
        #: sha256 -> (device id, issued, revoked)
        self._certificates: dict[str, tuple[str, bool, bool]] = {}
        self._revoked_devices: set[str] = set()

    def add(self, device_id: str) -> None:
        """Register ``device_id`` with a product (a revocation stays in force)."""
        self._registered.add(validate_device_id(device_id))

    def remove(self, device_id: str) -> None:
        """Unregister ``device_id`` (its certificates' revocations are kept)."""
        self._registered.discard(device_id)

    def issue(self, device_id: str, sha256: str) -> None:
        """Record a certificate issued for ``device_id`` (re-provisioning after a
        revocation is the way back)."""
        self._certificates[sha256] = (validate_device_id(device_id), True, False)

    def revoke(self, device_id: str) -> None:
        """Revoke every certificate known for ``device_id``, and any it presents later
        that was not issued after this."""
        device_id = validate_device_id(device_id)
        self._revoked_devices.add(device_id)
        for sha256, (owner, issued, _) in list(self._certificates.items()):
            if owner == device_id:
                self._certificates[sha256] = (owner, issued, True)

    def reinstate(self, device_id: str) -> None:
        """Lift ``device_id``'s revocation (its certificates are accepted again)."""
        self._revoked_devices.discard(device_id)
        for sha256, (owner, issued, _) in list(self._certificates.items()):
            if owner == device_id:
                self._certificates[sha256] = (owner, issued, False)

    async def authorize(self, certificate: ClientCertificate) -> bool:
        """Apply :func:`may_connect`; an admitted certificate is remembered as seen."""
        entry = self._certificates.get(certificate.sha256)
        known = None if entry is None else KnownCertificate(issued=entry[1], revoked=entry[2])
        allowed = may_connect(
            known,
            registered=certificate.device_id in self._registered,
            device_revoked=certificate.device_id in self._revoked_devices,
        )
        if allowed and entry is None:
            self._certificates[certificate.sha256] = (certificate.device_id, False, False)
        return allowed
