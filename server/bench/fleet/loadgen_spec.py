"""The spec of one load generator of the fleet benchmarks (``ota bench fleet`` and ``ota
bench hold``): its devices, their credentials and flashes, the firmware, source addresses.

Separate from the load-generator process (:mod:`server.bench.fleet.loadgen`) because the
runners write it (JSON) and every part of the process reads it: it is what they share.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from server.bench.fleet import BenchError
from server.bench.fleet.record_devices import DEVICE_STACKS
from server.identity import DEVICE_CERT_FILE, DEVICE_KEY_FILE
from server.transport.client import DeviceCredentials


@dataclass(frozen=True)
class LoadGenSpec:
    """Everything a load generator needs (written as JSON by the runner)."""

    index: int
    creds_dir: str
    #: (device id, transport) of each device this process runs.
    devices: list[tuple[str, str]]
    state_root: str
    firmware: list[str]
    product_id: int
    target_version: int
    #: Loopback source addresses, used in turn (ephemeral ports are per source address).
    sources: list[str]
    max_connects: int
    #: ``records``: devices over our record layers (record_devices); ``openssl``: trio's
    #: DTLSEndpoint and stdlib ssl (the emulator's devices).
    device_stack: str = "records"

    def __post_init__(self) -> None:
        if self.device_stack not in DEVICE_STACKS:
            raise BenchError(
                f"device stack must be one of {', '.join(DEVICE_STACKS)}, not {self.device_stack!r}"
            )

    def dump(self, path: Path) -> None:
        """Write the spec as JSON."""
        path.write_text(json.dumps(asdict(self)))

    @classmethod
    def load(cls, path: Path) -> LoadGenSpec:
        """Read a spec written by :meth:`dump`."""
        raw = json.loads(path.read_text())
        raw["devices"] = [(d, t) for d, t in raw["devices"]]
        return cls(**raw)

    def credentials(self, device_id: str) -> DeviceCredentials:
        """The device's certificate, key and the CA that signed the server's certificate."""
        root = Path(self.creds_dir)
        return DeviceCredentials(
            root / device_id / DEVICE_CERT_FILE, root / device_id / DEVICE_KEY_FILE, root / "ca.pem"
        )

    def source(self, position: int) -> str:
        """The source address of the device at ``position``."""
        return self.sources[position % len(self.sources)]
