"""What ``ota bench fleet`` runs: :class:`BenchOptions` and the checks of its values.

Separate from the runner because the command line, the runner and every phase
(:mod:`server.bench.fleet.phases`) read the options, and only this module checks them (the
limits of a load generator's and a server process's descriptors included).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from server.bench.fleet import BenchError
from server.bench.fleet.nodes import check_db_url
from server.bench.fleet.record_devices import DEVICE_STACKS, DeviceStack
from server.emulator.fleet import TransportChoice, transports_for

ReleaseKind = Literal["full", "delta"]


@dataclass(frozen=True)
class BenchOptions:
    """What to run (see ``ota bench fleet --help``)."""

    devices: int
    transport: TransportChoice = "both"
    release: ReleaseKind = "full"
    procs: int = 2
    #: Server processes (``ota server --workers``) per node: main plus workers on its ports.
    server_procs: int = field(default_factory=lambda: len(os.sched_getaffinity(0)))
    #: Server nodes: separate ``ota server`` processes on one database.
    nodes: int = 1
    #: The database the nodes share (``ota server --db-url``); None: the embedded SQLite
    #: store of the prepared data directory (its file URL when there are several nodes);
    #: ``pg`` (THROWAWAY_POSTGRESQL): a throwaway PostgreSQL cluster the run starts.
    db_url: str | None = None
    out_dir: Path = Path("bench-fleet-out")
    app_size: int = 128 * 1024
    #: Bare handshakes in flight per load generator.
    handshake_concurrency: int = 32
    #: Emulated devices handshaking at once per load generator.
    max_connects: int = 32
    online_timeout: float = 600.0
    release_timeout: float = 900.0
    #: Give up waiting (online, release) after this long without any progress.
    stall_timeout: float = 120.0
    #: Run the bare handshake rounds (full and resumed).
    handshakes: bool = True
    #: The load generators' device sessions: our record layers, or OpenSSL's (record_devices).
    device_stack: DeviceStack = "records"
    nginx: bool = True
    nginx_workers: int = 1
    profile: bool = False
    #: Parent of the scratch directory (store, credentials, device flashes).
    work_parent: Path | None = None
    keep_work: bool = False

    def __post_init__(self) -> None:
        if self.devices < 1 or self.procs < 1 or self.server_procs < 1 or self.nodes < 1:
            raise BenchError("--devices, --procs, --server-procs and --nodes must be at least 1")
        if self.db_url is not None:
            check_db_url(self.db_url)
        if self.procs > self.devices:
            raise BenchError(f"--procs {self.procs} is more than --devices {self.devices}")
        if -(-self.devices // self.procs) > 19_000:
            raise BenchError(
                "a load generator holds one descriptor per device and a process may open "
                "20,000: use more --procs"
            )
        tcp_sessions = sum(kind == "tcp" for kind in transports_for(self.transport, self.devices))
        # SessionLimits.max_sessions: one descriptor per session, per server process (the
        # kernel spreads connections over the processes by hash: only roughly evenly).
        if tcp_sessions > 19_000 * self.server_procs * self.nodes:
            raise BenchError(
                f"{tcp_sessions} TCP devices: one server process holds at most 19,000 TCP "
                "sessions (20,000 descriptors); use more --server-procs or --nodes"
            )
        if self.release not in ("full", "delta"):
            raise BenchError(f"--release must be full or delta, not {self.release!r}")
        transports_for(self.transport, 1)  # raises on an unknown transport
        if self.device_stack not in DEVICE_STACKS:
            raise BenchError(
                f"--device-stack must be one of {', '.join(DEVICE_STACKS)}, "
                f"not {self.device_stack!r}"
            )
