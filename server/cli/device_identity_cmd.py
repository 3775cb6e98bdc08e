"""``ota device`` identity commands: the installation CA, provisioning, certificate info.

The product store registers provisioned devices; it is plugged in through a
:class:`DeviceRegistrar` when the commands are attached::

    register_commands(device_app, registrar=store_registrar)
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Protocol

import typer
from cryptography import x509
from cryptography.exceptions import InvalidSignature

from otacore.errors import OtaError
from server.cli._output import fail, print_json
from server.cli._store import DbUrlOption
from server.identity import (
    CertificateRejectedError,
    ProvisionedDevice,
    certificate_serial,
    certificate_sha256,
    device_id_from_certificate,
    init_pki,
    load_pki,
    pki_dir,
    provision_devices,
)
from server.private_files import secure_data_dir
from server.store.installation import Installation


class DeviceRegistrar(Protocol):
    """Registers provisioned devices with a product in the store of an installation (its
    data directory and database URL)."""

    def check_product(self, where: Installation, product: str) -> None:
        """Raise NotFoundError (with a helpful message) if ``product`` does not exist."""
        ...

    def register(
        self, where: Installation, product: str, devices: Sequence[ProvisionedDevice]
    ) -> None:
        """Record ``devices`` as members of ``product`` (all or none)."""
        ...

    def standing(self, where: Installation, device_id: str, sha256: str) -> dict[str, object]:
        """What the store knows of this certificate and its device (registered, issued,
        seen, revoked), for ``ota device cert-info --data``."""
        ...


DataOption = Annotated[
    Path, typer.Option("--data", help="The installation's data directory (holds the CA key).")
]


def _pki_init(
    data: DataOption,
    server_name: Annotated[
        list[str] | None,
        typer.Option("--server-name", help="DNS name devices use for the server (repeatable)."),
    ] = None,
    server_ip: Annotated[
        list[str] | None,
        typer.Option("--server-ip", help="IP address devices use for the server (repeatable)."),
    ] = None,
) -> None:
    """Create the installation CA and the server certificate (keeps an existing CA)."""
    try:
        secure_data_dir(data)  # owner-only; tightens an older release's data directory
        pki = init_pki(
            pki_dir(data),
            dns_names=tuple(server_name or ("localhost",)),
            ip_addresses=tuple(server_ip or ("127.0.0.1", "::1")),
        )
    except (OtaError, ValueError, OSError) as exc:
        fail(str(exc))
    typer.echo(f"CA certificate: {pki.ca_cert_path}")
    typer.echo(f"CA SHA-256:     {certificate_sha256(pki.ca_cert)}")
    typer.echo(f"server cert:    {pki.server_cert_path}")


def _make_provision(registrar: DeviceRegistrar) -> Callable[..., None]:
    def provision(
        data: DataOption,
        product: Annotated[str, typer.Option("--product", help="Product id or slug.")],
        out: Annotated[
            Path, typer.Option("--out", help="Where to write <id>/cert.pem, key.pem, ca.pem.")
        ],
        count: Annotated[
            int | None, typer.Option("--count", min=1, help="How many new devices.")
        ] = None,
        device_id: Annotated[
            list[str] | None,
            typer.Option("--id", help="Provision this device id instead (repeatable)."),
        ] = None,
        as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
        db_url: DbUrlOption = None,
    ) -> None:
        """Create devices with their own keys and certificates and register them."""
        where = Installation(data, db_url)
        if (count is None) == (not device_id):
            fail("give either --count N or one or more --id DEVICE_ID", code=2)
        try:
            registrar.check_product(where, product)
            devices = provision_devices(pki_dir(data), device_id or count or 0, out)
        except OtaError as exc:
            fail(str(exc))
        try:
            registrar.register(where, product, devices)
        except OtaError as exc:
            for device in devices:  # unregistered keys are useless: do not leave them around
                shutil.rmtree(device.cert_path.parent, ignore_errors=True)
            fail(f"registering the devices failed, nothing was kept: {exc}")
        if as_json:
            print_json(
                [
                    {
                        "id": d.device_id,
                        "cert": str(d.cert_path),
                        "key": str(d.key_path),
                        "ca": str(d.ca_path),
                        "cert_sha256": d.cert_sha256,
                        "not_after": d.not_after.isoformat(),
                    }
                    for d in devices
                ]
            )
            return
        for d in devices:
            typer.echo(d.device_id)
        typer.echo(f"{len(devices)} devices provisioned for {product} in {out}", err=True)

    return provision


def _make_cert_info(registrar: DeviceRegistrar) -> Callable[..., None]:
    def cert_info(
        cert: Annotated[Path, typer.Argument(help="A device certificate (PEM).")],
        data: Annotated[
            Path | None,
            typer.Option(
                "--data",
                help="Also check that this installation's CA signed it, and its revocation.",
            ),
        ] = None,
        as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
        db_url: DbUrlOption = None,
    ) -> None:
        """Show which device a certificate names, its validity and fingerprint; with
        --data also whether the installation issued, saw or revoked it."""
        try:
            certificate = x509.load_pem_x509_certificate(cert.read_bytes())
        except (OSError, ValueError) as exc:
            fail(f"cannot read certificate {cert}: {exc}", code=2)
        try:
            device = device_id_from_certificate(certificate)
        except CertificateRejectedError as exc:
            fail(str(exc))
        sha256 = certificate_sha256(certificate)
        info: dict[str, object] = {
            "id": device,
            "not_before": certificate.not_valid_before_utc.isoformat(),
            "not_after": certificate.not_valid_after_utc.isoformat(),
            "sha256": sha256,
            "serial": certificate_serial(certificate),
            "issuer": certificate.issuer.rfc4514_string(),
        }
        if data is not None:
            try:
                certificate.verify_directly_issued_by(load_pki(pki_dir(data)).ca_cert)
                info["signed_by_installation_ca"] = True
            except (ValueError, TypeError, InvalidSignature):
                info["signed_by_installation_ca"] = False
            except OtaError as exc:
                fail(str(exc))
            try:
                info.update(registrar.standing(Installation(data, db_url), device, sha256))
            except (OtaError, OSError) as exc:
                fail(str(exc))
        if as_json:
            print_json(info)
            return
        for key, value in info.items():
            typer.echo(f"{key}: {value}")

    return cert_info


def register_commands(app: typer.Typer, *, registrar: DeviceRegistrar) -> None:
    """Attach ``pki-init``, ``provision`` and ``cert-info`` to the ``ota device`` group."""
    app.command("pki-init")(_pki_init)
    app.command("provision")(_make_provision(registrar))
    app.command("cert-info")(_make_cert_info(registrar))
