"""``ota demo``: the README's main job.

Until the server and the emulated fleet exist, it demonstrates the module tooling on a
realistic pair of images: a Device OS system part and an application that depends on it.
"""

from __future__ import annotations

import os
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from otacore.errors import ModuleFormatError
from otacore.integrity import hardware_crc
from otacore.module import ModuleDependency, build_module, dependency_met, validate_module
from otacore.platforms import ModuleFunction, platform_name


def demo(
    out: Path = typer.Option(Path("demo-out"), "--out", help="Directory for the demo images."),
) -> None:
    """Build, inspect, check dependencies of and reject corrupted firmware modules."""
    console = Console()
    out.mkdir(parents=True, exist_ok=True)
    boron = 13
    system_part = build_module(
        os.urandom(400 * 1024), platform_id=boron, function=ModuleFunction.SYSTEM_PART,
        index=1, version=5003, dependencies=[ModuleDependency(ModuleFunction.BOOTLOADER, 0, 2001)],
    )
    app = build_module(
        os.urandom(96 * 1024), platform_id=boron, function=ModuleFunction.USER_PART, index=1,
        version=6, product_id=boron, product_version=2,
        dependencies=[ModuleDependency(ModuleFunction.SYSTEM_PART, 1, 5003)],
    )
    paths = {"system-part1.bin": system_part, "app-v2.bin": app}
    table = Table(title=f"Modules built for {platform_name(boron)} (platform {boron})")
    for column in ("file", "function", "version", "size", "depends on", "sha256", "valid"):
        table.add_column(column)
    for name, image in paths.items():
        (out / name).write_bytes(image)
        info = validate_module(image)
        deps = ", ".join(f"{ModuleFunction(d.function).name.lower()}:{d.index}>={d.version}"
                         for d in info.dependencies)
        table.add_row(name, ModuleFunction(info.module_function).name.lower(),
                      str(info.module_version), f"{info.size:,}", deps,
                      info.stored_sha256.hex()[:16] + "…", "yes" if info.valid else "no")
    console.print(table)

    app_dep = validate_module(app).dependencies[0]
    for installed_version in (4004, 5003):
        met = dependency_met(app_dep, [(ModuleFunction.SYSTEM_PART, 1, installed_version)])
        verdict = "can run the app" if met else "needs Device OS 5003 first"
        console.print(f"device with system part 1 v{installed_version}: {verdict}")

    corrupted = bytearray(app)
    corrupted[1000] ^= 0x40
    (out / "app-v2-corrupted.bin").write_bytes(corrupted)
    try:
        validate_module(bytes(corrupted))
    except ModuleFormatError as exc:
        console.print(f"[red]app-v2-corrupted.bin refused:[/red] {exc}")
    console.print(f"images written to {out}/ (inspect them: ota module inspect {out}/app-v2.bin)")
    console.print(f"CRC-32 engine: {'PCLMULQDQ folding' if hardware_crc() else 'tables'}")
