"""``ota admin api-cert``: a certificate for the HTTPS API from the installation CA.

A self-hosted installation needs no outside CA: the CA that signs the device endpoint's
and the devices' certificates (``<data>/pki``) signs the API's too, and clients trust its
``ca.pem`` (``ota --ca-file``, ``OTA_CA_FILE``, Node's ``NODE_EXTRA_CA_CERTS``, a browser's
authorities list).
"""

from __future__ import annotations

from pathlib import Path

import typer

from otacore.errors import OtaError
from server.api_tls import API_CERT_MAX_DAYS, issue_api_certificate
from server.cli._output import fail, print_json


def api_cert(
    data: Path = typer.Option(..., "--data", help="The installation's data directory (holds "
                              "the CA; created with the CA when missing)."),
    host: list[str] = typer.Option(
        ..., "--host", metavar="NAME",
        help="A DNS name or IP address clients use to reach the API (repeatable), e.g. "
        "--host ota.example.com --host 192.0.2.10.",
    ),
    cert: Path | None = typer.Option(
        None, "--cert", metavar="FILE", help="Where to write the certificate (default: "
        "<data>/pki/api.pem)."),
    key: Path | None = typer.Option(
        None, "--key", metavar="FILE", help="Where to write the private key, mode 0600 "
        "(default: <data>/pki/api.key)."),
    days: int = typer.Option(API_CERT_MAX_DAYS, "--days",
                             help=f"Days the certificate is valid (at most {API_CERT_MAX_DAYS})."),
    replace: bool = typer.Option(False, "--replace",
                                 help="Replace an existing certificate and key (renewal)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Issue a TLS server certificate for the API from the installation CA, over a new key,
    and print how to serve HTTPS with it and how clients trust it."""
    try:
        issued = issue_api_certificate(data, host, cert_path=cert, key_path=key, days=days,
                                       replace=replace)
    except (OtaError, OSError) as exc:
        fail(str(exc))
    if as_json:
        print_json({"cert": str(issued.cert_path), "key": str(issued.key_path),
                    "ca": str(issued.ca_path), "names": list(issued.names),
                    "not_after": issued.not_after.isoformat()})
        return
    typer.echo(f"certificate: {issued.cert_path} (for {', '.join(issued.names)}, valid until "
               f"{issued.not_after:%Y-%m-%d})")
    typer.echo(f"key:         {issued.key_path}")
    typer.echo(f"CA:          {issued.ca_path}")
    typer.echo(f"serve it:    ota server --data {data} --api-cert {issued.cert_path} "
               f"--api-key {issued.key_path}")
    typer.echo("clients trust the CA: copy ca.pem to them, then ota --ca-file ca.pem ... (or "
               "OTA_CA_FILE=ca.pem), NODE_EXTRA_CA_CERTS=ca.pem for Node.js")
