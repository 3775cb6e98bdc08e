"""Device identity: the installation CA, the server certificate and per-device certificates.

Every installation keeps one certificate authority (CA) in ``<data dir>/pki``. The CA signs:

* the server's certificate (EKU serverAuth), which devices verify with ``ca.pem``;
* one certificate per device (EKU clientAuth) over the device's own ECDSA P-256 key. The device
  id (24 lowercase hex digits) is the subject CN and a URI SAN ``urn:otacloud:device:<id>``.

The TLS/DTLS layers let OpenSSL check the chain, the validity period and the key usage; after
the handshake :func:`device_id_from_certificate` names the device and a
:class:`server.authorization.DeviceDirectory` says whether it belongs to a product and the
certificate is not revoked. The CA key never leaves the data dir: :func:`provision_devices`
writes only the CA *certificate* next to the device keys.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from otacore.errors import AuthError, ConflictError, NotFoundError, StoreError, ValidationError
from server.private_files import make_private_dir, secure_data_dir, write_private_file

#: Device ids are 12 bytes written as 24 lowercase hex digits (Particle's format).
DEVICE_ID_PATTERN = re.compile(r"[0-9a-f]{24}")
#: URI SAN prefix naming a device in its certificate.
DEVICE_URI_PREFIX = "urn:otacloud:device:"
#: Subdirectory of the data dir that holds the CA and the server credentials.
PKI_DIRNAME = "pki"

CA_CERT_FILE = "ca.pem"
CA_KEY_FILE = "ca.key"
SERVER_CERT_FILE = "server.pem"
SERVER_KEY_FILE = "server.key"
DEVICE_CERT_FILE = "cert.pem"
DEVICE_KEY_FILE = "key.pem"

CA_VALID_DAYS = 20 * 365
SERVER_VALID_DAYS = 825
#: Devices live long and rarely rotate keys; their certificates never outlive the CA.
DEVICE_VALID_DAYS = 15 * 365
#: Backdate notBefore a little so a device whose clock lags slightly still accepts it.
CLOCK_SKEW = dt.timedelta(minutes=5)


class InvalidDeviceIdError(ValidationError):
    """A device id is not 24 lowercase hexadecimal digits."""


class PkiMissingError(NotFoundError):
    """The installation has no CA yet (run ``ota device pki-init`` or provision a device)."""


class PkiCorruptError(StoreError):
    """The files in the PKI directory cannot be read or do not belong together."""


class CertificateRejectedError(AuthError):
    """A certificate chains to the CA but does not name exactly one valid device id."""


def validate_device_id(device_id: str) -> str:
    """Return ``device_id`` if it is 24 lowercase hex digits, else raise InvalidDeviceIdError."""
    if not isinstance(device_id, str) or DEVICE_ID_PATTERN.fullmatch(device_id) is None:
        raise InvalidDeviceIdError(
            f"device id {device_id!r} must be exactly 24 lowercase hexadecimal digits"
        )
    return device_id


def new_device_id() -> str:
    """A fresh random device id (96 random bits)."""
    return secrets.token_hex(12)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write_private(path: Path, data: bytes) -> None:
    """Create ``path`` with mode 0600 from the start (never world-readable, never replaced)."""
    write_private_file(path, data, exclusive=True)


def _write_replaceable(path: Path, data: bytes) -> None:
    """Write ``path`` atomically (temporary file + rename), owner-only (0600) like every
    file of the data directory and of a device's credentials."""
    write_private_file(path, data)


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def certificate_sha256(cert: x509.Certificate) -> str:
    """The SHA-256 fingerprint of the DER certificate, as lowercase hex."""
    return cert.fingerprint(hashes.SHA256()).hex()


def certificate_serial(cert: x509.Certificate) -> str:
    """The certificate's serial number as lowercase hex (RFC 5280 section 4.1.2.2: at
    most 20 octets, so at most 40 digits)."""
    return format(cert.serial_number, "x")


def _leaf_builder(
    subject: x509.Name,
    ca_cert: x509.Certificate,
    public_key: ec.EllipticCurvePublicKey,
    not_before: dt.datetime,
    not_after: dt.datetime,
    usage: x509.ObjectIdentifier,
) -> x509.CertificateBuilder:
    """Builder for an end-entity certificate with the extensions RFC 5280 section 4.2 expects."""
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(min(not_after, ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        # OpenSSL checks the purpose: a server certificate cannot log in as a device.
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
    )


def create_ca(
    common_name: str | None = None,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A new self-signed P-256 CA that may sign end-entity certificates only (pathlen 0)."""
    key = _new_key()
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "otacloud"),
            x509.NameAttribute(
                NameOID.COMMON_NAME,
                common_name or f"otacloud installation CA {secrets.token_hex(4)}",
            ),
        ]
    )
    now = _now()
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + dt.timedelta(days=CA_VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    return cert, key


def issue_server_certificate(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    public_key: ec.EllipticCurvePublicKey,
    *,
    dns_names: Sequence[str] = ("localhost",),
    ip_addresses: Sequence[str] = ("127.0.0.1", "::1"),
    valid_days: int = SERVER_VALID_DAYS,
    common_name: str = "otacloud device endpoint",
) -> x509.Certificate:
    """Sign a server certificate (EKU serverAuth, SANs for the given names): the device
    endpoint's, or the API's (``ota admin api-cert``)."""
    sans: list[x509.GeneralName] = [x509.DNSName(name) for name in dns_names]
    sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ip_addresses]
    if not sans:
        raise ValidationError("the server certificate needs at least one DNS name or IP address")
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = _now()
    builder = _leaf_builder(
        subject,
        ca_cert,
        public_key,
        now - CLOCK_SKEW,
        now + dt.timedelta(days=valid_days),
        ExtendedKeyUsageOID.SERVER_AUTH,
    ).add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(ca_key, hashes.SHA256())


def issue_device_certificate(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    device_id: str,
    public_key: ec.EllipticCurvePublicKey,
    *,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
) -> x509.Certificate:
    """Sign a device certificate: CN and URI SAN name ``device_id``, EKU clientAuth.

    ``not_before``/``not_after`` default to now (minus clock skew) and ``DEVICE_VALID_DAYS``
    from now; ``not_after`` is clipped to the CA's own expiry.
    """
    validate_device_id(device_id)
    if not isinstance(public_key, ec.EllipticCurvePublicKey) or not isinstance(
        public_key.curve, ec.SECP256R1
    ):
        raise ValidationError("device keys must be ECDSA P-256 (secp256r1) keys")
    now = _now()
    start = not_before if not_before is not None else now - CLOCK_SKEW
    end = not_after if not_after is not None else now + dt.timedelta(days=DEVICE_VALID_DAYS)
    if end <= start:
        raise ValidationError("a device certificate must end after it starts")
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)])
    builder = _leaf_builder(
        subject, ca_cert, public_key, start, end, ExtendedKeyUsageOID.CLIENT_AUTH
    ).add_extension(
        x509.SubjectAlternativeName(
            [x509.UniformResourceIdentifier(DEVICE_URI_PREFIX + device_id)]
        ),
        critical=False,
    )
    return builder.sign(ca_key, hashes.SHA256())


def device_id_from_certificate(cert: x509.Certificate) -> str:
    """The device id a certificate names, or CertificateRejectedError.

    The CN and the ``urn:otacloud:device:`` URI SAN must both be present, agree, and hold a
    valid device id; the certificate must not be a CA. Chain, validity dates and EKU are
    OpenSSL's job during the handshake; this only names the device.
    """
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        if constraints.ca:
            raise CertificateRejectedError("a CA certificate cannot identify a device")
    except x509.ExtensionNotFound:
        pass
    common_names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(common_names) != 1 or not isinstance(common_names[0].value, str):
        raise CertificateRejectedError("the certificate subject must have exactly one CN")
    common_name = common_names[0].value
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise CertificateRejectedError(
            f"the certificate has no {DEVICE_URI_PREFIX}<id> URI SAN"
        ) from None
    uris = [
        uri[len(DEVICE_URI_PREFIX) :]
        for uri in sans.get_values_for_type(x509.UniformResourceIdentifier)
        if uri.startswith(DEVICE_URI_PREFIX)
    ]
    if len(uris) != 1:
        raise CertificateRejectedError(
            f"the certificate must carry exactly one {DEVICE_URI_PREFIX}<id> URI SAN"
        )
    if uris[0] != common_name:
        raise CertificateRejectedError(
            f"the certificate CN {common_name!r} and URI SAN {uris[0]!r} name different devices"
        )
    try:
        return validate_device_id(common_name)
    except InvalidDeviceIdError as exc:
        raise CertificateRejectedError(str(exc)) from None


@dataclass(frozen=True)
class InstallationPki:
    """The CA and the server credentials of one installation, as loaded from ``directory``."""

    directory: Path
    ca_cert: x509.Certificate
    ca_key: ec.EllipticCurvePrivateKey
    server_cert: x509.Certificate

    @property
    def ca_cert_path(self) -> Path:
        """PEM file of the CA certificate (what devices verify the server with)."""
        return self.directory / CA_CERT_FILE

    @property
    def server_cert_path(self) -> Path:
        """PEM file of the server certificate followed by nothing else (the CA is the root)."""
        return self.directory / SERVER_CERT_FILE

    @property
    def server_key_path(self) -> Path:
        """PEM file (0600) of the server's private key."""
        return self.directory / SERVER_KEY_FILE


def pki_dir(data_dir: Path) -> Path:
    """Where an installation keeps its PKI inside its data directory."""
    return Path(data_dir) / PKI_DIRNAME


def _load_cert(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as exc:
        raise PkiCorruptError(f"cannot read certificate {path}: {exc}") from None


def _load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except FileNotFoundError:
        raise
    except (OSError, ValueError, TypeError) as exc:
        raise PkiCorruptError(f"cannot read private key {path}: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PkiCorruptError(f"{path} is not an ECDSA key")
    return key


def load_pki(ca_dir: Path) -> InstallationPki:
    """Load the CA and server certificate from ``ca_dir`` (PkiMissingError if absent)."""
    ca_dir = Path(ca_dir)
    try:
        ca_cert = _load_cert(ca_dir / CA_CERT_FILE)
        ca_key = _load_key(ca_dir / CA_KEY_FILE)
        server_cert = _load_cert(ca_dir / SERVER_CERT_FILE)
        server_key = _load_key(ca_dir / SERVER_KEY_FILE)
    except FileNotFoundError as exc:
        raise PkiMissingError(
            f"no installation CA in {ca_dir} ({Path(exc.filename).name} is missing); "
            "run `ota device pki-init` first"
        ) from None
    if ca_cert.public_key() != ca_key.public_key():
        raise PkiCorruptError(f"{ca_dir / CA_KEY_FILE} does not match {ca_dir / CA_CERT_FILE}")
    if server_cert.public_key() != server_key.public_key():
        raise PkiCorruptError(
            f"{ca_dir / SERVER_KEY_FILE} does not match {ca_dir / SERVER_CERT_FILE}"
        )
    try:
        server_cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise PkiCorruptError(f"the server certificate was not signed by this CA: {exc}") from None
    return InstallationPki(ca_dir, ca_cert, ca_key, server_cert)


def init_pki(
    ca_dir: Path,
    *,
    dns_names: Sequence[str] = ("localhost",),
    ip_addresses: Sequence[str] = ("127.0.0.1", "::1"),
) -> InstallationPki:
    """Load the installation's PKI from ``ca_dir``, creating the CA and server cert if absent.

    An existing CA is never replaced (every device certificate depends on it). The server
    certificate is (re)issued when missing or within 30 days of expiry.
    """
    ca_dir = secure_data_dir(ca_dir)  # 0700, its files 0600 (tightened if older)
    if not (ca_dir / CA_CERT_FILE).exists():
        if (ca_dir / CA_KEY_FILE).exists():
            raise PkiCorruptError(f"{ca_dir / CA_KEY_FILE} exists without {CA_CERT_FILE}")
        ca_cert, ca_key = create_ca()
        _write_private(ca_dir / CA_KEY_FILE, _key_pem(ca_key))
        _write_replaceable(ca_dir / CA_CERT_FILE, _cert_pem(ca_cert))
    ca_cert = _load_cert(ca_dir / CA_CERT_FILE)
    ca_key = _load_key(ca_dir / CA_KEY_FILE)
    server_cert_path = ca_dir / SERVER_CERT_FILE
    renew = not server_cert_path.exists() or (
        _load_cert(server_cert_path).not_valid_after_utc - _now() < dt.timedelta(days=30)
    )
    if renew:
        server_key_path = ca_dir / SERVER_KEY_FILE
        server_key_path.unlink(missing_ok=True)
        server_key = _new_key()
        _write_private(server_key_path, _key_pem(server_key))
        cert = issue_server_certificate(
            ca_cert,
            ca_key,
            server_key.public_key(),
            dns_names=dns_names,
            ip_addresses=ip_addresses,
        )
        _write_replaceable(server_cert_path, _cert_pem(cert))
    return load_pki(ca_dir)


@dataclass(frozen=True)
class ProvisionedDevice:
    """One device created by :func:`provision_devices` and where its files are."""

    device_id: str
    cert_path: Path
    key_path: Path
    ca_path: Path
    cert_sha256: str
    not_after: dt.datetime
    #: The certificate's serial number (hex), recorded with its fingerprint when issued.
    cert_serial: str = ""


def provision_devices(
    ca_dir: Path,
    device_ids_or_count: int | Iterable[str],
    out_dir: Path,
) -> list[ProvisionedDevice]:
    """Create device keys and certificates signed by the CA in ``ca_dir``.

    ``device_ids_or_count`` is either a number of devices (random ids) or the ids to use.
    Writes ``out_dir/<id>/cert.pem``, ``out_dir/<id>/key.pem`` (0600) and ``out_dir/ca.pem``
    (the CA certificate, for devices to verify the server). The CA is created in ``ca_dir``
    if it does not exist yet; its key is never written to ``out_dir``. Refuses to overwrite
    an existing device directory (ConflictError) and validates every id before writing.
    """
    if isinstance(device_ids_or_count, int):
        if device_ids_or_count < 1:
            raise ValidationError("the device count must be at least 1")
        device_ids = [new_device_id() for _ in range(device_ids_or_count)]
    else:
        device_ids = [validate_device_id(d) for d in device_ids_or_count]
        if not device_ids:
            raise ValidationError("no device ids given")
    if len(set(device_ids)) != len(device_ids):
        raise ValidationError("the same device id is listed twice")
    out_dir = Path(out_dir)
    if Path(ca_dir).resolve() == out_dir.resolve():
        raise ValidationError("the output directory must not be the CA directory")
    for device_id in device_ids:
        if (out_dir / device_id).exists():
            raise ConflictError(f"{out_dir / device_id} already exists; refusing to overwrite keys")
    pki = init_pki(ca_dir)
    make_private_dir(out_dir)  # device private keys go below it
    ca_path = out_dir / CA_CERT_FILE
    _write_replaceable(ca_path, _cert_pem(pki.ca_cert))
    provisioned: list[ProvisionedDevice] = []
    for device_id in device_ids:
        key = _new_key()
        cert = issue_device_certificate(pki.ca_cert, pki.ca_key, device_id, key.public_key())
        device_dir = out_dir / device_id
        device_dir.mkdir(mode=0o700)
        os.chmod(device_dir, 0o700)  # whatever the umask
        key_path = device_dir / DEVICE_KEY_FILE
        cert_path = device_dir / DEVICE_CERT_FILE
        _write_private(key_path, _key_pem(key))
        _write_replaceable(cert_path, _cert_pem(cert))
        provisioned.append(
            ProvisionedDevice(
                device_id=device_id,
                cert_path=cert_path,
                key_path=key_path,
                ca_path=ca_path,
                cert_sha256=certificate_sha256(cert),
                not_after=cert.not_valid_after_utc,
                cert_serial=certificate_serial(cert),
            )
        )
    return provisioned


def write_device_credentials(
    directory: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey
) -> tuple[Path, Path]:
    """Write ``cert.pem`` and ``key.pem`` (0600) into a new ``directory``; return their paths."""
    directory = Path(directory)
    if directory.exists():
        raise FileExistsError(f"{directory} already exists; refusing to overwrite keys")
    make_private_dir(directory)
    cert_path, key_path = directory / DEVICE_CERT_FILE, directory / DEVICE_KEY_FILE
    _write_private(key_path, _key_pem(key))
    _write_replaceable(cert_path, _cert_pem(cert))
    return cert_path, key_path


def new_device_key() -> ec.EllipticCurvePrivateKey:
    """A fresh ECDSA P-256 private key, as every device holds."""
    return _new_key()
