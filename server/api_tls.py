"""The REST API's TLS credentials (``ota server --api-cert FILE --api-key FILE``).

Hypercorn loads the certificate chain and the key itself, deep inside its serving task,
where a wrong file would surface as ``[SSL] PEM lib (_ssl.c:...)``. The server checks them
first, with :func:`check_api_credentials`, and refuses to start with a message naming the
file and the fix: a missing or unreadable file, a file that is no PEM certificate or key,
an encrypted key (there is nobody to ask for its password), a key that does not belong to
the certificate, a certificate whose extended key usage forbids TLS servers, and a key that
every user of the machine may read. A group-readable key (Debian's ``ssl-cert`` group), a
certificate that has expired or expires within :data:`EXPIRY_WARNING_DAYS`, are logged as
warnings: the device listeners do not depend on the API's certificate.
"""

from __future__ import annotations

import datetime as dt
import grp
import ipaddress
import logging
import os
import re
import ssl
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID

from otacore.errors import ConflictError, ValidationError
from server.identity import init_pki, issue_server_certificate, new_device_key, pki_dir
from server.private_files import make_private_dir, secure_data_dir, write_private_file

log = logging.getLogger("ota.server")

#: A certificate ending within this many days is logged as a warning at each start.
EXPIRY_WARNING_DAYS = 30


class ApiCertificateError(ValidationError):
    """The API's certificate or key cannot serve HTTPS (the message names the file)."""


@dataclass(frozen=True)
class ApiCredentials:
    """What the server learnt of its API certificate while checking it."""

    cert_path: Path
    key_path: Path
    subject: str
    #: The DNS names and IP addresses of its subjectAltName extension.
    names: tuple[str, ...]
    not_after: dt.datetime
    #: Warnings an operator should see (also logged by :func:`check_api_credentials`).
    warnings: tuple[str, ...] = ()


def _read(path: Path, what: str, option: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ApiCertificateError(f"the API {what} {path} does not exist ({option})") from None
    except IsADirectoryError:
        raise ApiCertificateError(f"the API {what} {path} is a directory, not a PEM file "
                                  f"({option})") from None
    except PermissionError:
        raise ApiCertificateError(
            f"cannot read the API {what} {path}: permission denied to user {_user()} "
            f"({option}; give this user read access to it)") from None
    except OSError as exc:
        raise ApiCertificateError(f"cannot read the API {what} {path}: "
                                  f"{exc.strerror or exc} ({option})") from None


def _user() -> str:
    try:
        import pwd

        return pwd.getpwuid(os.geteuid()).pw_name
    except (KeyError, ImportError):
        return str(os.geteuid())


def _group(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def _public_der(public_key: object) -> bytes:
    return public_key.public_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _load_key(path: Path, data: bytes) -> PrivateKeyTypes:
    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError:  # cryptography: "Password was not given but private key is encrypted"
        raise ApiCertificateError(
            f"the API key {path} is encrypted; the server cannot ask for its password: "
            f"decrypt it (openssl pkey -in {path} -out NEW_FILE) and keep the new file "
            "readable by the server's user only") from None
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise ApiCertificateError(
            f"the API key {path} is not a PEM private key (--api-key): {exc}") from None


def _names(cert: x509.Certificate) -> tuple[str, ...]:
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return ()
    dns = sans.get_values_for_type(x509.DNSName)
    ips = [str(address) for address in sans.get_values_for_type(x509.IPAddress)]
    return (*dns, *ips)


def _check_usage(path: Path, cert: x509.Certificate) -> None:
    try:
        usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return  # no EKU: any purpose (RFC 5280 section 4.2.1.12)
    if ExtendedKeyUsageOID.SERVER_AUTH not in usages and (
            ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE not in usages):
        raise ApiCertificateError(
            f"the API certificate {path} is not for TLS servers (its extended key usage lacks "
            "serverAuth, so clients refuse it): issue one with `ota admin api-cert`")


def _key_mode_warning(path: Path) -> str | None:
    """Refuse a key anyone may read; the warning for a group-readable one (else None)."""
    info = path.stat()
    mode = stat.S_IMODE(info.st_mode)
    if mode & (stat.S_IROTH | stat.S_IWOTH):
        access = "readable" if mode & stat.S_IROTH else "writable"
        raise ApiCertificateError(
            f"the API key {path} is {access} by every user of this machine (mode {mode:04o}): "
            f"chmod 600 {path} (or 640 with a group of the server's user)")
    if mode & stat.S_IRGRP:
        return (f"the API key {path} is readable by the members of group {_group(info.st_gid)} "
                f"(mode {mode:04o}); make it 0600 unless they must read it")
    return None


def check_api_credentials(cert_path: Path | str, key_path: Path | str, *,
                          now: dt.datetime | None = None) -> ApiCredentials:
    """Check that the API can serve HTTPS with this certificate chain and key, or raise
    ApiCertificateError saying what is wrong and how to fix it (see the module docstring).
    Logs (and returns) the warnings."""
    cert_path, key_path = Path(cert_path), Path(key_path)
    cert_data = _read(cert_path, "certificate", "--api-cert")
    key_data = _read(key_path, "key", "--api-key")
    try:
        chain = x509.load_pem_x509_certificates(cert_data)
    except ValueError:
        raise ApiCertificateError(
            f"the API certificate {cert_path} holds no PEM certificate (--api-cert: the "
            "server's certificate first, then any intermediate CA certificates)") from None
    warnings: list[str] = []
    mode_warning = _key_mode_warning(key_path)
    if mode_warning:
        warnings.append(mode_warning)
    key = _load_key(key_path, key_data)
    leaf = chain[0]
    if _public_der(leaf.public_key()) != _public_der(key.public_key()):
        raise ApiCertificateError(
            f"the API key {key_path} does not belong to the certificate {cert_path} (their "
            "public keys differ): give the key the certificate was issued for")
    _check_usage(cert_path, leaf)
    try:  # what hypercorn will do: any other problem shows now, not in its serving task
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(str(cert_path), str(key_path))
    except ssl.SSLError as exc:
        raise ApiCertificateError(f"OpenSSL cannot use the API certificate {cert_path} with "
                                  f"the key {key_path}: {exc.reason or exc}") from None
    now = now or dt.datetime.now(dt.UTC)
    not_after = leaf.not_valid_after_utc
    if not_after <= now:
        warnings.append(f"the API certificate {cert_path} expired on {not_after:%Y-%m-%d}: "
                        "clients refuse it; issue a new one")
    elif not_after - now < dt.timedelta(days=EXPIRY_WARNING_DAYS):
        warnings.append(f"the API certificate {cert_path} expires on {not_after:%Y-%m-%d}; "
                        "issue a new one and restart")
    if leaf.not_valid_before_utc > now:
        warnings.append(f"the API certificate {cert_path} is not valid before "
                        f"{leaf.not_valid_before_utc:%Y-%m-%d %H:%M} UTC (check the clock)")
    for warning in warnings:
        log.warning("%s", warning)
    return ApiCredentials(cert_path, key_path, leaf.subject.rfc4514_string(), _names(leaf),
                          not_after, tuple(warnings))


# -- issuing a certificate from the installation CA ------------------------------------------

#: Where ``ota admin api-cert`` writes, inside the data directory's PKI directory.
API_CERT_FILE = "api.pem"
API_KEY_FILE = "api.key"
#: Longest validity Apple's clients accept for a TLS server certificate from a private CA
#: (825 days); the installation CA is private.
API_CERT_MAX_DAYS = 825
#: A DNS name of a certificate: letters, digits and hyphens per label (RFC 1123 section 2.1),
#: optionally a wildcard first label (RFC 6125 section 6.4.3).
_DNS_NAME = re.compile(r"(\*\.)?([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*"
                       r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


def split_hosts(hosts: Sequence[str]) -> tuple[list[str], list[str]]:
    """``--host`` values as (DNS names, IP addresses); ValidationError for anything else."""
    dns_names: list[str] = []
    ip_addresses: list[str] = []
    for host in hosts:
        host = host.strip().rstrip(".")
        try:
            ip_addresses.append(str(ipaddress.ip_address(host.strip("[]"))))
            continue
        except ValueError:
            pass
        if len(host) > 253 or _DNS_NAME.fullmatch(host) is None:
            raise ValidationError(f"--host {host!r} is neither a DNS name (e.g. ota.example.com) "
                                  "nor an IP address")
        dns_names.append(host.lower())
    if not dns_names and not ip_addresses:
        raise ValidationError("give at least one --host: each name or address clients use to "
                              "reach the API")
    return dns_names, ip_addresses


@dataclass(frozen=True)
class IssuedApiCertificate:
    """What :func:`issue_api_certificate` wrote."""

    cert_path: Path
    key_path: Path
    ca_path: Path
    names: tuple[str, ...]
    not_after: dt.datetime


def issue_api_certificate(data_dir: Path, hosts: Sequence[str], *,
                          cert_path: Path | None = None, key_path: Path | None = None,
                          days: int = API_CERT_MAX_DAYS,
                          replace: bool = False) -> IssuedApiCertificate:
    """Issue a certificate for the API from the installation CA in ``data_dir`` (created as
    ``ota device pki-init`` does when absent), for the DNS names and IP addresses
    ``hosts``, over a new ECDSA P-256 key. Writes the key (0600) and the certificate to
    ``cert_path``/``key_path`` (default: ``<data>/pki/api.pem`` and ``api.key``); refuses
    to replace existing files unless ``replace`` (ConflictError)."""
    if not 1 <= days <= API_CERT_MAX_DAYS:
        raise ValidationError(f"--days must be between 1 and {API_CERT_MAX_DAYS}, not {days}")
    dns_names, ip_addresses = split_hosts(hosts)
    secure_data_dir(data_dir)
    pki = init_pki(pki_dir(data_dir))
    cert_path = Path(cert_path) if cert_path is not None else pki.directory / API_CERT_FILE
    key_path = Path(key_path) if key_path is not None else pki.directory / API_KEY_FILE
    if not replace:
        for path in (cert_path, key_path):
            if path.exists():
                raise ConflictError(f"{path} exists; give --replace to issue a new certificate "
                                    "and key in its place")
    key = new_device_key()  # P-256, as the CA's: every TLS 1.2 and 1.3 client speaks it
    cert = issue_server_certificate(pki.ca_cert, pki.ca_key, key.public_key(),
                                    dns_names=dns_names, ip_addresses=ip_addresses,
                                    valid_days=days, common_name="otacloud API")
    for path in (cert_path, key_path):
        make_private_dir(path.parent)
    write_private_file(key_path, key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    # The certificate is no secret, but lives next to its key: owner-only as well.
    write_private_file(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    return IssuedApiCertificate(cert_path, key_path, pki.ca_cert_path,
                                (*dns_names, *ip_addresses), cert.not_valid_after_utc)
