"""How many idle devices one load-generator process holds, and what each costs it:
``python -m server.bench.fleet.hold --devices N --transport tcp|udp --device-stack S``.

Provisions N devices, starts ``ota server`` and ONE load generator, and has it connect every
device (a mutual-auth handshake, then a CoAP ping answered: the server runs the session) and
hold them all, idle, until the last is up; it reports its RSS before and while holding them
(``handshakes`` round of :mod:`server.bench.fleet.loadgen`), then closes them all. Prints
one JSON object: the round's counts, the load generator's RSS per held device, the server's
RSS per session. Used for issue 14 item 8 (a load generator holds 20,000 devices).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from functools import partial
from pathlib import Path
from typing import Any

import trio

from server.bench.fleet.control import request_all, running_loadgens, running_server
from server.bench.fleet.images import prepare_installation
from server.bench.fleet.loadgen import LoadGenSpec
from server.bench.fleet.procs import rss_kib, tree_rss_kib
from server.bench.fleet.record_devices import DEVICE_STACKS


async def hold(
    devices: int,
    transport: str,
    device_stack: str,
    *,
    server_procs: int = 1,
    concurrency: int = 64,
    timeout: float = 60.0,
    work_parent: Path | None = None,
    keep_work: bool = False,
) -> dict[str, Any]:
    """Run one hold (see the module docstring); returns its figures."""
    work = Path(tempfile.mkdtemp(prefix="ota-bench-hold-", dir=work_parent))
    try:
        install = await trio.to_thread.run_sync(
            partial(prepare_installation, work, devices, 16 * 1024)
        )
        spec = LoadGenSpec(
            index=0,
            creds_dir=str(install.creds_dir),
            devices=[(device_id, transport) for device_id in install.device_ids],
            state_root=str(work / "flash"),
            firmware=[str(install.system_image), str(install.app_images[1])],
            product_id=install.product_id,
            target_version=2,
            sources=[f"127.0.1.{host}" for host in range(1, 5)],
            max_connects=concurrency,
            device_stack=device_stack,
        )
        spec_path = work / "loadgen-0.json"
        spec.dump(spec_path)
        async with running_server(install, work / "server.log", workers=server_procs) as server:
            address = list(server.tcp if transport == "tcp" else server.udp)
            async with trio.open_nursery() as nursery, running_loadgens(
                nursery, [spec_path], work, lambda _index, _event: None
            ) as gens:
                server_idle = tree_rss_kib(server.pid)
                (reply,) = await request_all(
                    gens, "handshakes", transport=transport, address=address,
                    resume=False, concurrency=concurrency, timeout=timeout,
                )  # fmt: skip
                server_after = tree_rss_kib(server.pid)
                loadgen_rss = rss_kib(gens[0].process.pid)
        held = reply["ok"]
        growth = reply["loadgen_rss_held_kib"] - reply["loadgen_rss_before_kib"]
        return {
            "devices": devices,
            "transport": transport,
            "device_stack": device_stack,
            "held": held,
            "failed": reply["failed"],
            "errors": reply["errors"],
            "connect_s": (
                round(reply["t_last"] - reply["t_first"], 2) if reply["t_last"] else None
            ),
            "loadgen_rss_before_kib": reply["loadgen_rss_before_kib"],
            "loadgen_rss_held_kib": reply["loadgen_rss_held_kib"],
            "loadgen_rss_per_device_kib": round(growth / held, 2) if held else None,
            "loadgen_rss_after_close_kib": loadgen_rss,
            "server_rss_idle_kib": server_idle,
            "server_rss_after_kib": server_after,
        }
    finally:
        if not keep_work:
            await trio.to_thread.run_sync(partial(shutil.rmtree, work, ignore_errors=True))


def main(argv: list[str] | None = None) -> None:
    """Entry point (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m server.bench.fleet.hold")
    parser.add_argument("--devices", type=int, default=5000)
    parser.add_argument("--transport", choices=("tcp", "udp"), default="udp")
    parser.add_argument("--device-stack", choices=DEVICE_STACKS, default="records")
    parser.add_argument("--server-procs", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--work-dir", type=Path, default=None)
    parser.add_argument("--keep-work", action="store_true", help="keep the scratch directory")
    args = parser.parse_args(argv)
    result = trio.run(
        partial(
            hold, args.devices, args.transport, args.device_stack,
            server_procs=args.server_procs, concurrency=args.concurrency,
            timeout=args.timeout, work_parent=args.work_dir, keep_work=args.keep_work,
        )
    )  # fmt: skip
    print(json.dumps(result))


if __name__ == "__main__":
    main()
