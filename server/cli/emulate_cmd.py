"""``ota device emulate``: run provisioned devices as emulated Particle devices.

Attach with ``device_app.command("emulate")(emulate_cmd.emulate)``. Each device keeps a
persistent simulated flash under ``--state`` (``<state>/<device id>/``), connects to the
device endpoint over TLS (``tcp``), DTLS (``udp``) or alternately both, and takes the updates
the server offers. Without ``--state`` the flash lives in a temporary directory removed at
exit. A fresh flash is programmed with the ``--firmware`` modules and a trust store of the
``--trust-key`` public keys for ``--product-id`` (default: the keys and product that
``ota device provision`` wrote into ``--creds/signing-keys.txt``). ``--until-version`` makes
the run end once every device runs that product firmware version (for scripts and CI).

``--server`` may be given several times, one per node of an installation: devices spread over
the endpoints (each device starts at the same one every run) and fail over to the others
like a device with several DNS answers (see :mod:`server.emulator.endpoints`); the progress
lines and the final summary count the devices online at each endpoint.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Annotated, cast

import trio
import typer

from otacore.device.emulated import DevicePhase, DeviceStatus
from otacore.errors import OtaError
from otacore.module import validate_module
from otacore.signing import TrustStore
from server.cli._output import fail, print_json
from server.devices.keys import (
    TRUST_FILE,
    read_trust_file,
    read_trust_product,
    read_trust_sequence,
)
from server.emulator.endpoints import Endpoint
from server.emulator.fleet import (
    EmulatedFleet,
    FleetSettings,
    FleetSummary,
    TransportChoice,
    platform_of,
)
from server.transport.server import DEFAULT_DEVICE_PORT

#: Beyond this many devices, per-device lines give way to periodic summaries.
VERBOSE_LIMIT = 20


def parse_server(text: str) -> tuple[str, int]:
    """``HOST:PORT``, ``[IPv6]:PORT`` or ``HOST`` (port 5684) as (host, port)."""
    host, port_text = text, str(DEFAULT_DEVICE_PORT)
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"expected [IPv6]:PORT, got {text!r}")
            port_text = rest[1:]
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    port_ok = port_text.isascii() and port_text.isdigit() and 0 < int(port_text) < 65536
    if not host or not port_ok:
        raise ValueError(f"server must be HOST:PORT with a port 1-65535, got {text!r}")
    return host, int(port_text)


def trust_store_of(
    keys: list[str], product_id: int | None, sequence: int = 0
) -> TrustStore | None:
    """The trust store for ``--trust-key`` hex public keys (None when no key is given)."""
    if not keys:
        return None
    if product_id is None:
        raise ValueError("--trust-key needs --product-id (the product the keys sign for)")
    publics = []
    for key in keys:
        try:
            raw = bytes.fromhex(key)
        except ValueError:
            raw = b""
        if len(raw) != 32:
            raise ValueError(f"--trust-key {key!r} is not an Ed25519 public key (64 hex digits)")
        publics.append(raw)
    return TrustStore.initial(product_id, publics, sequence)


def _describe(status: DeviceStatus, endpoint: str | None = None) -> str:
    versions = " ".join(f"{m.function}/{m.index}:v{m.version}" for m in status.modules)
    text = f"{status.device_id} {status.phase.value:<11} {versions}"
    if status.transport:
        text += f" [{status.transport}" + (f" {endpoint}]" if endpoint else "]")
    if status.last_result is not None:
        result = status.last_result
        text += f" last update: {result.status} v{result.version}"
    if status.last_error:
        text += f" ({status.last_error})"
    return text


def emulate(
    creds: Annotated[
        Path, typer.Option("--creds", help="Directory of provisioned devices (ca.pem, <id>/).")
    ],
    transport: Annotated[
        str, typer.Option("--transport", help="tcp (TLS), udp (DTLS) or both (alternating).")
    ] = "tcp",
    count: Annotated[
        int | None, typer.Option("--count", min=1, help="Run the first N devices found.")
    ] = None,
    state: Annotated[
        Path | None, typer.Option("--state", help="Root of the devices' persistent flash.")
    ] = None,
    firmware: Annotated[
        list[Path] | None,
        typer.Option("--firmware", help="Module a fresh device starts with (repeatable)."),
    ] = None,
    server: Annotated[
        list[str] | None,
        typer.Option(
            "--server",
            help=f"Device endpoint as HOST:PORT (default 127.0.0.1:{DEFAULT_DEVICE_PORT}); "
            "repeat for the nodes of an installation: devices spread over them and fail over.",
        ),
    ] = None,
    trust_key: Annotated[
        list[str] | None,
        typer.Option(
            "--trust-key",
            help="Product signing public key, hex (repeatable; default: CREDS/signing-keys.txt).",
        ),
    ] = None,
    product_id: Annotated[
        int | None, typer.Option("--product-id", help="Product the trust keys belong to.")
    ] = None,
    heartbeat: Annotated[
        float | None, typer.Option("--heartbeat", help="Publish a heartbeat every N seconds.")
    ] = None,
    keepalive: Annotated[
        float, typer.Option("--keepalive", help="Ping the server after N idle seconds.")
    ] = 30.0,
    connect_timeout: Annotated[
        float,
        typer.Option(
            "--connect-timeout",
            min=0.1,
            help="Seconds a connection and handshake may take before the device gives up "
            "(and tries its next --server).",
        ),
    ] = 10.0,
    max_connects: Annotated[
        int, typer.Option("--max-connects", min=1, help="Handshakes in progress at most.")
    ] = 32,
    no_fsync: Annotated[
        bool, typer.Option("--no-fsync", help="Skip fsync on flash writes (benchmarks).")
    ] = False,
    duration: Annotated[
        float | None, typer.Option("--duration", help="Stop after N seconds (default: Ctrl-C).")
    ] = None,
    until_version: Annotated[
        int | None,
        typer.Option(
            "--until-version",
            min=0,
            help="Exit once every device is online running this product firmware version "
            "(exit status 1 if --duration passes first).",
        ),
    ] = None,
    json_output: Annotated[
        bool, typer.Option("--json", help="Print every device's final status as JSON.")
    ] = False,
) -> None:
    """Run provisioned devices as emulated devices that take OTA updates from the server."""
    if transport not in ("tcp", "udp", "both"):
        fail(f"--transport must be tcp, udp or both, not {transport!r}")
    try:
        endpoints = tuple(
            Endpoint(parse_server(text))
            for text in server or [f"127.0.0.1:{DEFAULT_DEVICE_PORT}"]
        )
        keys = list(trust_key or [])
        sequence = 0
        trust_file = creds / TRUST_FILE
        if not keys and trust_file.is_file():  # written by `ota device provision`
            keys = [key.hex() for key in read_trust_file(trust_file)]
            sequence = read_trust_sequence(trust_file)
            product_id = _product_of_trust_file(trust_file, product_id)
        store = trust_store_of(keys, product_id, sequence)
        images = tuple(path.read_bytes() for path in firmware or [])
        for path, image in zip(firmware or [], images, strict=True):
            try:
                validate_module(image)
            except OtaError as exc:
                raise ValueError(f"{path} is not a valid module: {exc}") from exc
        if images:
            platform_of(images)
        settings = FleetSettings(
            endpoints=endpoints,
            firmware=images,
            trust_store=store,
            fsync=not no_fsync,
            max_concurrent_connects=max_connects,
            connect_timeout=connect_timeout,
            keepalive_interval=keepalive,
            heartbeat_interval=heartbeat,
            progress_interval=2.0,
        )
    except (OSError, ValueError, OtaError) as exc:
        fail(str(exc))
    with tempfile.TemporaryDirectory(prefix="ota-emulator-") as scratch:
        root = state if state is not None else Path(scratch)
        if state is None:
            typer.echo(f"flash state in {root} (removed at exit; --state keeps it)", err=True)
        try:
            fleet = EmulatedFleet.from_credentials(
                creds, root, settings, count=count, transport=cast(TransportChoice, transport)
            )
        except (OSError, OtaError) as exc:
            fail(str(exc))
        verbose = len(fleet.members) <= VERBOSE_LIMIT
        several = len(fleet.endpoints) > 1

        def describe(status: DeviceStatus) -> str:
            endpoint = fleet.endpoint_of(status.device_id).name if several else None
            return _describe(status, endpoint)

        if verbose:
            fleet.on_status = lambda status: typer.echo(describe(status))
        else:
            fleet.on_progress = lambda summary: typer.echo(summary.line())
        try:
            final, reached = trio.run(_run, fleet, duration, until_version)
        except BaseException as raised:  # trio wraps errors and Ctrl-C in exception groups
            if _first(raised, KeyboardInterrupt) is not None:  # Ctrl-C: the run's usual end
                final, reached = fleet.summary(), until_version is None
            elif (error := _first(raised, OtaError)) is not None:
                fail(str(error))
            else:
                raise
        typer.echo(final.line())
        if json_output:
            print_json(
                [
                    _status_json(status) | {"endpoint": fleet.endpoint_of(status.device_id).name}
                    for status in fleet.statuses()
                ]
            )
        if not reached:
            running = _running_version(fleet, until_version)
            fail(
                f"{running} of {len(fleet.members)} devices run version {until_version} "
                f"after {duration} s"
            )


def _first(raised: BaseException, kind: type[BaseException]) -> BaseException | None:
    """``raised`` if it is a ``kind``, else the first ``kind`` in it when it is a (nested)
    exception group, else None."""
    found: BaseException | None = raised
    if isinstance(raised, BaseExceptionGroup):
        found = raised.split(kind)[0]
        while isinstance(found, BaseExceptionGroup):
            found = found.exceptions[0]
    return found if isinstance(found, kind) else None


def _product_of_trust_file(trust_file: Path, product_id: int | None) -> int:
    """The product whose keys ``trust_file`` holds; ``product_id`` (``--product-id``) must
    agree with it, and is needed only for files that do not name their product."""
    recorded = read_trust_product(trust_file)
    if recorded is None and product_id is None:
        raise ValueError(
            f"{trust_file} does not name the product its keys sign for (an older "
            "`ota device provision` wrote it): pass --product-id"
        )
    if recorded is not None and product_id is not None and recorded != product_id:
        raise ValueError(
            f"{trust_file} holds the signing keys of product {recorded}, not of "
            f"--product-id {product_id}"
        )
    return recorded if recorded is not None else cast(int, product_id)


def _running_version(fleet: EmulatedFleet, version: int | None) -> int:
    """Devices online (not downloading or applying) and running product ``version``."""
    return sum(
        status.phase is DevicePhase.ONLINE and status.product_version == version
        for status in fleet.statuses()
    )


async def _run(
    fleet: EmulatedFleet, duration: float | None, until_version: int | None
) -> tuple[FleetSummary, bool]:
    """Run the fleet for ``duration`` seconds (forever when None) or, with
    ``until_version``, until every device runs it; the summary and whether it was reached."""
    reached = until_version is None
    async with trio.open_nursery() as nursery:
        await nursery.start(fleet.run)
        with trio.move_on_after(float("inf") if duration is None else duration):
            if until_version is None:
                await trio.sleep_forever()
            # Polled: one pass over the fleet per check, however many status changes.
            while _running_version(fleet, until_version) < len(fleet.members):
                await trio.sleep(0.2)
            reached = True
        nursery.cancel_scope.cancel()
    return fleet.summary(), reached


def _status_json(status: DeviceStatus) -> dict[str, object]:
    result = status.last_result
    return {
        "device_id": status.device_id,
        "phase": status.phase.value,
        "transport": status.transport,
        "modules": [
            {"function": m.function, "index": m.index, "version": m.version, "slot": m.slot}
            for m in status.modules
        ],
        "product_version": status.product_version,
        "system_version": status.system_version,
        "bytes_received": status.bytes_received,
        "bytes_total": status.bytes_total,
        "last_result": None
        if result is None
        else {"version": result.version, "status": result.status, "detail": result.detail},
        "last_error": status.last_error,
        "boots": status.boots,
        "sessions": status.sessions,
        "updates_enabled": status.updates_enabled,
        "updates_pending": status.updates_pending,
        "reset_pending": status.reset_pending,
    }
