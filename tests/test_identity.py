"""Device identity: the installation CA, server and device certificates, provisioning, CLI."""

from __future__ import annotations

import datetime as dt
import json
import re
import stat
from collections.abc import Sequence
from pathlib import Path

import pytest
import typer
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from otacore.errors import ConflictError, NotFoundError, ValidationError
from server.authorization import ClientCertificate, DeviceIdCache, MemoryDeviceDirectory
from server.cli.device_identity_cmd import register_commands
from server.identity import (
    DEVICE_URI_PREFIX,
    CertificateRejectedError,
    InvalidDeviceIdError,
    PkiCorruptError,
    PkiMissingError,
    ProvisionedDevice,
    create_ca,
    device_id_from_certificate,
    init_pki,
    issue_device_certificate,
    load_pki,
    new_device_id,
    new_device_key,
    pki_dir,
    provision_devices,
    validate_device_id,
)


def _load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


# --- device ids --------------------------------------------------------------------------


@settings(max_examples=200)
@given(st.text(alphabet="0123456789abcdefABCDEFxyz -", max_size=30))
def test_device_id_is_exactly_24_lowercase_hex_digits(text: str) -> None:
    valid = re.fullmatch(r"[0-9a-f]{24}", text) is not None
    if valid:
        assert validate_device_id(text) == text
    else:
        with pytest.raises(InvalidDeviceIdError, match="24 lowercase hexadecimal"):
            validate_device_id(text)


@settings(max_examples=50)
@given(st.binary(min_size=12, max_size=12))
def test_any_12_bytes_make_a_device_id_in_lowercase_only(raw: bytes) -> None:
    device_id = raw.hex()
    assert validate_device_id(device_id) == device_id
    if device_id != device_id.upper():
        with pytest.raises(InvalidDeviceIdError):
            validate_device_id(device_id.upper())


def test_new_device_ids_are_valid_and_distinct() -> None:
    ids = {new_device_id() for _ in range(100)}
    assert len(ids) == 100
    assert all(validate_device_id(device_id) for device_id in ids)


# --- PKI ---------------------------------------------------------------------------------


def test_init_pki_creates_once_and_keeps_the_ca(tmp_path: Path) -> None:
    ca_dir = pki_dir(tmp_path / "data")
    first = init_pki(ca_dir, dns_names=("ota.example.com",), ip_addresses=("10.0.0.5",))
    second = init_pki(ca_dir)
    assert first.ca_cert == second.ca_cert
    assert first.server_cert == second.server_cert  # not near expiry: not reissued
    assert stat.S_IMODE(ca_dir.stat().st_mode) == 0o700
    for key in ("ca.key", "server.key"):
        assert stat.S_IMODE((ca_dir / key).stat().st_mode) == 0o600
    constraints = first.ca_cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert constraints.ca and constraints.path_length == 0
    sans = first.server_cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["ota.example.com"]
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["10.0.0.5"]
    verifier = (
        PolicyBuilder()
        .store(Store([first.ca_cert]))
        .build_server_verifier(x509.DNSName("ota.example.com"))
    )
    verifier.verify(first.server_cert, [])  # RFC 5280 profile, EKU serverAuth
    assert isinstance(first.ca_key, ec.EllipticCurvePrivateKey)
    assert isinstance(first.ca_key.curve, ec.SECP256R1)


def test_load_pki_reports_missing_and_mismatched_files(tmp_path: Path) -> None:
    ca_dir = pki_dir(tmp_path)
    with pytest.raises(PkiMissingError, match="pki-init"):
        load_pki(ca_dir)
    init_pki(ca_dir)
    (ca_dir / "server.key").unlink()
    (ca_dir / "server.key").write_bytes(
        new_device_key().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(PkiCorruptError, match=r"server\.key does not match"):
        load_pki(ca_dir)
    (ca_dir / "ca.pem").write_text("not a certificate")
    with pytest.raises(PkiCorruptError, match="cannot read certificate"):
        load_pki(ca_dir)


# --- provisioning ------------------------------------------------------------------------


def test_provision_writes_keys_certificates_and_only_the_ca_certificate(tmp_path: Path) -> None:
    ca_dir = pki_dir(tmp_path / "data")
    out = tmp_path / "out"
    devices = provision_devices(ca_dir, 3, out)
    pki = load_pki(ca_dir)
    assert len({d.device_id for d in devices}) == 3
    assert (out / "ca.pem").read_bytes() == (ca_dir / "ca.pem").read_bytes()
    ca_key_pem = (ca_dir / "ca.key").read_bytes()
    verifier = PolicyBuilder().store(Store([pki.ca_cert])).build_client_verifier()
    for device in devices:
        assert device.cert_path == out / device.device_id / "cert.pem"
        assert device.ca_path == out / "ca.pem"
        assert stat.S_IMODE(device.key_path.stat().st_mode) == 0o600
        cert = _load(device.cert_path)
        key = serialization.load_pem_private_key(device.key_path.read_bytes(), password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        assert isinstance(key.curve, ec.SECP256R1)
        assert cert.public_key() == key.public_key()
        common_name = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
        assert common_name == device.device_id
        verified = verifier.verify(cert, [])  # chain, dates, EKU clientAuth (RFC 5280)
        assert verified.subjects == [
            x509.UniformResourceIdentifier(DEVICE_URI_PREFIX + device.device_id)
        ]
        assert device_id_from_certificate(cert) == device.device_id
        assert device.not_after == cert.not_valid_after_utc
        assert device.not_after <= pki.ca_cert.not_valid_after_utc
    # The CA key never leaves the data dir.
    for path in out.rglob("*"):
        if path.is_file():
            assert path.read_bytes() != ca_key_pem
            assert path.name in {"ca.pem", "cert.pem", "key.pem"}


def test_provision_given_ids_and_refusals(tmp_path: Path) -> None:
    ca_dir = pki_dir(tmp_path / "data")
    out = tmp_path / "out"
    ids = [new_device_id(), new_device_id()]
    devices = provision_devices(ca_dir, ids, out)
    assert [d.device_id for d in devices] == ids
    with pytest.raises(ConflictError, match="refusing to overwrite"):
        provision_devices(ca_dir, [ids[0]], out)
    with pytest.raises(ValidationError, match="listed twice"):
        provision_devices(ca_dir, [ids[1] + "", ids[1]], tmp_path / "other")
    with pytest.raises(InvalidDeviceIdError):
        provision_devices(ca_dir, ["E00FCE68" * 3], tmp_path / "other")
    with pytest.raises(ValidationError, match="at least 1"):
        provision_devices(ca_dir, 0, tmp_path / "other")
    with pytest.raises(ValidationError, match="must not be the CA directory"):
        provision_devices(ca_dir, 1, ca_dir)
    assert not (tmp_path / "other").exists()


def test_issue_device_certificate_checks_its_inputs(tmp_path: Path) -> None:
    ca_cert, ca_key = create_ca()
    with pytest.raises(ValidationError, match="P-256"):
        issue_device_certificate(
            ca_cert,
            ca_key,
            new_device_id(),
            ec.generate_private_key(ec.SECP384R1()).public_key(),
        )
    now = dt.datetime.now(dt.UTC)
    with pytest.raises(ValidationError, match="end after it starts"):
        issue_device_certificate(
            ca_cert,
            ca_key,
            new_device_id(),
            new_device_key().public_key(),
            not_after=now - dt.timedelta(days=1),
        )


# --- naming the device from a certificate ----------------------------------------------


def _custom_cert(
    ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
    common_name: str,
    uris: Sequence[str],
    *,
    is_ca: bool = False,
) -> x509.Certificate:
    ca_cert, ca_key = ca
    key = new_device_key()
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    )
    if uris:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]),
            critical=False,
        )
    return builder.sign(ca_key, hashes.SHA256())


@pytest.mark.parametrize(
    ("common_name", "uris", "is_ca", "message"),
    [
        ("{id}", [], False, "no urn:otacloud:device:<id> URI SAN"),
        ("{id}", ["urn:otacloud:device:{other}"], False, "name different devices"),
        ("{id}", ["urn:otacloud:device:{id}", "urn:otacloud:device:{other}"], False, "exactly one"),
        ("{id}", ["urn:example:{id}"], False, "exactly one"),
        ("NOT-HEX", ["urn:otacloud:device:NOT-HEX"], False, "24 lowercase hexadecimal"),
        ("{id}", ["urn:otacloud:device:{id}"], True, "CA certificate"),
    ],
)
def test_certificates_that_name_no_single_device_are_rejected(
    common_name: str, uris: list[str], is_ca: bool, message: str
) -> None:
    ids = {"id": new_device_id(), "other": new_device_id()}
    cert = _custom_cert(
        create_ca(), common_name.format(**ids), [u.format(**ids) for u in uris], is_ca=is_ca
    )
    with pytest.raises(CertificateRejectedError, match=message):
        device_id_from_certificate(cert)


def test_device_id_cache_remembers_results_and_rejections(tmp_path: Path) -> None:
    (device,) = provision_devices(pki_dir(tmp_path), 1, tmp_path / "out")
    der = _load(device.cert_path).public_bytes(serialization.Encoding.DER)
    cache = DeviceIdCache(capacity=2)
    assert cache.device_id(der) == device.device_id
    presented = cache.certificate(der)
    assert presented.device_id == device.device_id
    assert presented.sha256 == device.cert_sha256
    assert presented.serial == device.cert_serial
    assert presented.not_after_ms == int(device.not_after.timestamp() * 1000)
    for garbage in (b"", b"\x30\x03\x02\x01\x01", der[:-10]):
        with pytest.raises(CertificateRejectedError, match="cannot be parsed"):
            cache.device_id(garbage)
    assert len(cache._entries) == 2  # bounded


def _presented(device_id: str, n: int = 0) -> ClientCertificate:
    return ClientCertificate(device_id, f"{n:064x}", f"{n:x}", 0)


async def test_memory_directory_authorizes_registered_unrevoked_certificates() -> None:
    known, unknown = new_device_id(), new_device_id()
    directory = MemoryDeviceDirectory([known])
    assert await directory.authorize(_presented(known))
    assert not await directory.authorize(_presented(unknown))
    directory.revoke(known)
    assert not await directory.authorize(_presented(known))
    directory.remove(known)
    directory.add(known)  # removing and adding again does not lift a revocation
    assert not await directory.authorize(_presented(known))
    assert not await directory.authorize(_presented(known, 1))  # nor a never-seen certificate
    directory.issue(known, f"{2:064x}")  # re-provisioning does
    assert await directory.authorize(_presented(known, 2))
    assert not await directory.authorize(_presented(known))
    directory.reinstate(known)  # and so does an explicit reinstate, for every certificate
    assert await directory.authorize(_presented(known))
    assert await directory.authorize(_presented(known, 1))


# --- CLI -----------------------------------------------------------------------------------


class _ProductsInMemory:
    """A registrar backed by a dict (the store's registrar is wired by the server CLI)."""

    def __init__(self, products: set[str], fail_register: bool = False) -> None:
        self.products = products
        self.members: dict[str, list[str]] = {}
        self.fail_register = fail_register

    def check_product(self, data_dir: Path, product: str) -> None:
        if product not in self.products:
            raise NotFoundError(f"product {product!r} does not exist")

    def register(self, data_dir: Path, product: str, devices: Sequence[ProvisionedDevice]) -> None:
        if self.fail_register:
            raise ConflictError("device already belongs to another product")
        self.members.setdefault(product, []).extend(d.device_id for d in devices)

    def standing(self, data_dir: Path, device_id: str, sha256: str) -> dict[str, object]:
        registered = any(device_id in ids for ids in self.members.values())
        return {"device_registered": registered}


def _cli(registrar: _ProductsInMemory) -> typer.Typer:
    app = typer.Typer()
    register_commands(app, registrar=registrar)
    return app


def test_cli_provision_registers_devices(tmp_path: Path) -> None:
    registrar = _ProductsInMemory({"widget"})
    data, out = tmp_path / "data", tmp_path / "out"
    runner = CliRunner()
    result = runner.invoke(
        _cli(registrar),
        [
            *("provision", "--data", str(data), "--product", "widget"),
            *("--count", "2", "--out", str(out), "--json"),
        ],
    )
    assert result.exit_code == 0, result.output
    listed = json.loads(result.stdout)
    assert [entry["id"] for entry in listed] == registrar.members["widget"]
    assert all(Path(entry["key"]).exists() for entry in listed)
    assert (data / "pki" / "ca.key").exists() and not (out / "ca.key").exists()

    info = runner.invoke(
        _cli(registrar), ["cert-info", listed[0]["cert"], "--data", str(data), "--json"]
    )
    assert info.exit_code == 0, info.output
    shown = json.loads(info.stdout)
    assert shown["id"] == listed[0]["id"]
    assert shown["signed_by_installation_ca"] is True
    assert shown["sha256"] == listed[0]["cert_sha256"]
    assert shown["device_registered"] is True


def test_cli_provision_refusals_leave_no_keys(tmp_path: Path) -> None:
    data, out = tmp_path / "data", tmp_path / "out"
    runner = CliRunner()
    args = ["provision", "--data", str(data), "--count", "1", "--out", str(out)]
    unknown = runner.invoke(_cli(_ProductsInMemory({"widget"})), [*args, "--product", "gadget"])
    assert unknown.exit_code == 1
    assert "product 'gadget' does not exist" in unknown.output
    assert not out.exists()

    failing = _ProductsInMemory({"widget"}, fail_register=True)
    refused = runner.invoke(_cli(failing), [*args, "--product", "widget"])
    assert refused.exit_code == 1
    assert "nothing was kept" in refused.output
    assert [p.name for p in out.iterdir()] == ["ca.pem"]

    both = runner.invoke(_cli(failing), [*args, "--product", "widget", "--id", new_device_id()])
    assert both.exit_code == 2


def test_cli_pki_init_and_foreign_certificate(tmp_path: Path) -> None:
    runner = CliRunner()
    app = _cli(_ProductsInMemory(set()))
    result = runner.invoke(app, ["pki-init", "--data", str(tmp_path / "a")])
    assert result.exit_code == 0, result.output
    assert "CA SHA-256" in result.output
    (foreign,) = provision_devices(pki_dir(tmp_path / "b"), 1, tmp_path / "b-out")
    info = runner.invoke(
        app, ["cert-info", str(foreign.cert_path), "--data", str(tmp_path / "a"), "--json"]
    )
    assert info.exit_code == 0, info.output
    assert json.loads(info.stdout)["signed_by_installation_ca"] is False
