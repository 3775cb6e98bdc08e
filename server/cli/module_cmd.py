"""``ota module``: inspect and create Particle firmware module images."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from otacore.device import make_test_marker
from otacore.errors import ModuleFormatError
from otacore.module import ModuleDependency, build_module, check_integrity, parse_module
from otacore.platforms import ModuleFunction
from server.cli._output import fail, print_json

app = typer.Typer(help="Inspect and create firmware module images.", no_args_is_help=True)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        fail(f"cannot read {path}: {exc.strerror or exc}", code=2)


def _parse_function(text: str) -> int:
    if text.isascii() and text.isdigit():
        return int(text)
    try:
        return int(ModuleFunction[text.upper().replace("-", "_")])
    except KeyError:
        names = ", ".join(f.name.lower() for f in ModuleFunction)
        fail(f"unknown module function {text!r} (use a number or one of: {names})", code=2)


def _parse_dependency(text: str) -> ModuleDependency:
    parts = text.split(":")
    if len(parts) != 3:
        fail(f"dependency {text!r} must be FUNCTION:INDEX:VERSION, e.g. system_part:1:5003", 2)
    function = _parse_function(parts[0])
    try:
        return ModuleDependency(function, int(parts[1]), int(parts[2]))
    except ValueError:
        fail(f"dependency {text!r}: index and version must be integers", code=2)


@app.command()
def inspect(
    file: Path = typer.Argument(..., help="Module image to inspect."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    prefix_offset: int = typer.Option(
        0, "--prefix-offset", help="Offset of module_info_t (e.g. 0x184 = 388 on Photon)."
    ),
) -> None:
    """Show a module's metadata and check its CRC-32, SHA-256 and size limit."""
    image = _read(file)
    try:
        info = parse_module(image, prefix_offset)
    except ModuleFormatError as exc:
        fail(str(exc))
    problem = info.problem()
    if as_json:
        obj = info.to_json()
        if problem:
            obj["error"] = problem
        print_json(obj)
    elif not problem:
        table = Table(show_header=False, box=None)
        for key, value in info.to_json().items():
            table.add_row(key, str(value))
        Console().print(table)
    if problem:
        fail(problem)


@app.command()
def create(
    input_file: Path = typer.Argument(..., metavar="RAW", help="Raw binary (the module body)."),
    output: Path = typer.Argument(..., metavar="OUT", help="Where to write the module image."),
    platform_id: int = typer.Option(..., "--platform-id", help="Platform id, e.g. 13 (Boron)."),
    function: str = typer.Option("user_part", "--function", help="Module function (name or 0-9)."),
    index: int = typer.Option(1, "--index", help="Module index."),
    version: int = typer.Option(..., "--version", help="Module version."),
    product_id: int | None = typer.Option(None, "--product-id", help="Product id (suffix)."),
    product_version: int | None = typer.Option(
        None, "--product-version", help="Product firmware version (suffix)."
    ),
    dependency: list[str] = typer.Option(
        [], "--dependency", help="FUNCTION:INDEX:VERSION, at most twice."
    ),
    start_address: int | None = typer.Option(None, "--start-address", help="Load address."),
    prefix_offset: int = typer.Option(0, "--prefix-offset", help="Offset of the prefix."),
    emulated_self_test: str = typer.Option(
        "pass", "--emulated-self-test",
        help="pass, or fail: emulated devices (ota emulate) that boot the image fail its "
        "self-test and roll back by themselves, to rehearse a rollout's failure policy.",
    ),
) -> None:
    """Build a valid module image from a raw binary and its metadata."""
    raw = _read(input_file)
    choice = emulated_self_test.strip().lower()
    if choice not in ("pass", "fail"):
        fail(f"--emulated-self-test must be pass or fail, not {emulated_self_test!r}")
    if choice == "fail":
        # The emulator's test marker (otacore.device): the trial boot fails its self-test
        # at once and the device goes back to the image it ran, as a real one would.
        raw += make_test_marker(selftest_fail_after=0)
    deps = [_parse_dependency(text) for text in dependency]
    if product_version is not None and product_id is None:
        product_id = platform_id  # Device OS 4+: the product id field holds the platform id
    try:
        image = build_module(
            raw,
            platform_id=platform_id,
            function=_parse_function(function),
            index=index,
            version=version,
            product_id=product_id,
            product_version=product_version,
            dependencies=deps,
            start_address=start_address,
            prefix_offset=prefix_offset,
        )
        check_integrity(parse_module(image, prefix_offset))
    except (ModuleFormatError, ValueError) as exc:
        fail(str(exc))
    output.write_bytes(image)
    typer.echo(f"wrote {output} ({len(image)} bytes)")
