"""The API's certificate and key are checked before the server starts (issue 17 item 4):
a wrong file is refused with a message naming it and the fix, never a traceback; and
``ota admin api-cert`` issues a certificate from the installation CA.

Real files, real keys (``cryptography``), the real ``ota`` commands in their own processes.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from otacore.errors import ConflictError, ValidationError
from server.api_tls import (
    ApiCertificateError,
    check_api_credentials,
    issue_api_certificate,
    split_hosts,
)
from server.identity import load_pki, pki_dir
from tests.ota_server_process import REPO


@pytest.fixture
def issued(tmp_path: Path) -> tuple[Path, Path, Path]:
    """(data dir, cert, key) of a certificate for localhost issued from a new CA."""
    data = tmp_path / "data"
    result = issue_api_certificate(data, ["localhost", "127.0.0.1", "::1"])
    return data, result.cert_path, result.key_path


def test_api_cert_issues_a_server_certificate_from_the_installation_ca(
        issued: tuple[Path, Path, Path]) -> None:
    data, cert_path, key_path = issued
    assert (cert_path, key_path) == (pki_dir(data) / "api.pem", pki_dir(data) / "api.key")
    assert key_path.stat().st_mode & 0o777 == 0o600
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    ca = load_pki(pki_dir(data)).ca_cert
    cert.verify_directly_issued_by(ca)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "::1"]
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.SERVER_AUTH]
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert dt.timedelta(days=825) <= lifetime <= dt.timedelta(days=825, minutes=10)
    credentials = check_api_credentials(cert_path, key_path)
    assert credentials.names == ("localhost", "127.0.0.1", "::1")
    assert credentials.warnings == ()


def test_api_cert_refuses_to_replace_unless_asked(issued: tuple[Path, Path, Path]) -> None:
    data, cert_path, key_path = issued
    before = key_path.read_bytes()
    with pytest.raises(ConflictError, match="give --replace"):
        issue_api_certificate(data, ["localhost"])
    assert key_path.read_bytes() == before
    renewed = issue_api_certificate(data, ["ota.example.com"], replace=True, days=30)
    assert key_path.read_bytes() != before
    assert renewed.names == ("ota.example.com",)
    check_api_credentials(cert_path, key_path)  # the new pair belongs together


@pytest.mark.parametrize("hosts, message", [
    ([], "at least one --host"),
    (["bad host"], "neither a DNS name"),
    (["-leading.example"], "neither a DNS name"),
    (["a" * 64 + ".example"], "neither a DNS name"),
])
def test_api_cert_refuses_names_no_certificate_can_hold(hosts: list[str], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        split_hosts(hosts)


def test_hosts_split_into_names_and_addresses() -> None:
    assert split_hosts(["OTA.Example.com.", "*.fleet.example", "[2001:db8::1]", "192.0.2.1"]) \
        == (["ota.example.com", "*.fleet.example"], ["2001:db8::1", "192.0.2.1"])


def test_a_missing_file_is_named(issued: tuple[Path, Path, Path], tmp_path: Path) -> None:
    _, cert_path, key_path = issued
    with pytest.raises(ApiCertificateError, match=r"certificate .*nope.pem does not exist "
                       r"\(--api-cert\)"):
        check_api_credentials(tmp_path / "nope.pem", key_path)
    with pytest.raises(ApiCertificateError, match=r"key .*nope.key does not exist"):
        check_api_credentials(cert_path, tmp_path / "nope.key")
    with pytest.raises(ApiCertificateError, match="is a directory"):
        check_api_credentials(tmp_path, key_path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every file: run as another user")
def test_an_unreadable_key_names_the_user(issued: tuple[Path, Path, Path]) -> None:
    _, cert_path, key_path = issued
    key_path.chmod(0)
    with pytest.raises(ApiCertificateError, match="permission denied to user"):
        check_api_credentials(cert_path, key_path)


def test_a_key_of_another_certificate_is_refused(issued: tuple[Path, Path, Path]) -> None:
    data, cert_path, _ = issued
    device_key = pki_dir(data) / "server.key"  # the device endpoint's key
    with pytest.raises(ApiCertificateError, match="does not belong to the certificate"):
        check_api_credentials(cert_path, device_key)


def test_a_key_every_user_may_read_is_refused_a_group_readable_one_warned(
        issued: tuple[Path, Path, Path], caplog: pytest.LogCaptureFixture) -> None:
    _, cert_path, key_path = issued
    key_path.chmod(0o644)
    with pytest.raises(ApiCertificateError, match=r"readable by every user .*mode 0644.*"
                       r"chmod 600"):
        check_api_credentials(cert_path, key_path)
    key_path.chmod(0o640)
    with caplog.at_level(logging.WARNING, logger="ota.server"):
        credentials = check_api_credentials(cert_path, key_path)
    assert "readable by the members of group" in credentials.warnings[0]
    assert credentials.warnings[0] in caplog.text


def test_files_that_are_not_pem_are_refused(issued: tuple[Path, Path, Path],
                                            tmp_path: Path) -> None:
    _, cert_path, key_path = issued
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    junk.chmod(0o600)
    with pytest.raises(ApiCertificateError, match="holds no PEM certificate"):
        check_api_credentials(junk, key_path)
    with pytest.raises(ApiCertificateError, match="is not a PEM private key"):
        check_api_credentials(cert_path, junk)


def test_an_encrypted_key_is_refused_with_how_to_decrypt_it(
        issued: tuple[Path, Path, Path], tmp_path: Path) -> None:
    _, cert_path, key_path = issued
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret")))
    encrypted.chmod(0o600)
    with pytest.raises(ApiCertificateError, match=r"is encrypted.*openssl pkey"):
        check_api_credentials(cert_path, encrypted)


def test_a_client_certificate_is_refused(tmp_path: Path) -> None:
    """A device's certificate (EKU clientAuth) cannot serve HTTPS: clients refuse it."""
    from server.identity import init_pki, issue_device_certificate, new_device_key

    pki = init_pki(tmp_path / "pki")
    key = new_device_key()
    cert = issue_device_certificate(pki.ca_cert, pki.ca_key, "0123456789abcdef01234567",
                                    key.public_key())
    cert_path, key_path = tmp_path / "device.pem", tmp_path / "device.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    with pytest.raises(ApiCertificateError, match="lacks serverAuth"):
        check_api_credentials(cert_path, key_path)


def test_an_expired_or_expiring_certificate_is_warned_about(
        issued: tuple[Path, Path, Path]) -> None:
    _, cert_path, key_path = issued
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=810)
    assert "expires on" in check_api_credentials(cert_path, key_path, now=later).warnings[0]
    much_later = dt.datetime.now(dt.UTC) + dt.timedelta(days=900)
    assert "expired on" in check_api_credentials(cert_path, key_path,
                                                 now=much_later).warnings[0]


def test_a_chain_file_with_an_intermediate_is_accepted(tmp_path: Path) -> None:
    """The certificate file may carry the chain after the server's certificate."""
    data = tmp_path / "data"
    issued = issue_api_certificate(data, ["localhost"])
    chain = tmp_path / "chain.pem"
    chain.write_bytes(issued.cert_path.read_bytes() + issued.ca_path.read_bytes())
    assert check_api_credentials(chain, issued.key_path).names == ("localhost",)
    other = tmp_path / "other.key"
    other.write_bytes(ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    other.chmod(0o600)
    with pytest.raises(ApiCertificateError, match="does not belong"):
        check_api_credentials(chain, other)


def _ota(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "server.cli.main", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120, check=False)


def test_the_commands_issue_check_and_refuse(tmp_path: Path) -> None:
    data = tmp_path / "data"
    made = _ota("admin", "api-cert", "--data", str(data), "--host", "localhost", "--host",
                "127.0.0.1")
    assert made.returncode == 0, made.stderr
    cert, key = pki_dir(data) / "api.pem", pki_dir(data) / "api.key"
    assert f"--api-cert {cert} --api-key {key}" in made.stdout
    again = _ota("admin", "api-cert", "--data", str(data), "--host", "localhost")
    assert again.returncode == 1 and "give --replace" in again.stderr

    ok = _ota("server", "--data", str(data), "--api-cert", str(cert), "--api-key", str(key),
              "--check")
    assert ok.returncode == 0, ok.stderr
    assert "configuration OK: API on https://127.0.0.1:8080" in ok.stdout

    wrong_key = str(pki_dir(data) / "server.key")
    refused = _ota("server", "--data", str(data), "--api-cert", str(cert), "--api-key",
                   wrong_key, "--check")
    assert refused.returncode == 1
    assert "does not belong to the certificate" in refused.stderr

    half = _ota("server", "--data", str(data), "--api-cert", str(cert), "--check")
    assert half.returncode == 2 and "needs both api.cert and api.key" in half.stderr

    # Starting for real: refused before anything listens, one line, no traceback.
    started = _ota("server", "--data", str(data), "--api-port", "0", "--device-port", "-1",
                   "--api-cert", str(cert), "--api-key", wrong_key)
    assert started.returncode == 1
    assert started.stderr.strip().splitlines()[-1].startswith(
        "error: cannot run the server: the API key")
    assert "Traceback" not in started.stderr
    assert "API listening" not in started.stdout


def test_plain_http_beyond_this_machine_is_warned_about(tmp_path: Path) -> None:
    from server.app import ServerConfig, plain_http_warning

    def config(**fields: object) -> ServerConfig:
        return ServerConfig(data_dir=tmp_path, **fields)  # type: ignore[arg-type]

    for loopback in ("127.0.0.1", "::1", "localhost", "127.0.0.5"):
        assert plain_http_warning(config(host=loopback)) is None
    for exposed in ("0.0.0.0", "::", "192.0.2.1", "ota.example.com"):
        warning = plain_http_warning(config(host=exposed))
        assert warning is not None and "clear text" in warning and "--api-cert" in warning
    assert plain_http_warning(config(host="0.0.0.0", api_cert="c.pem", api_key="k.pem")) is None
