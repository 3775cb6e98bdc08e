"""The runner's handles on its children: the ``ota server`` process and the load
generators (requests, replies and progress events over their pipes)."""

from __future__ import annotations

import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import trio

from server.bench.fleet import BenchError
from server.bench.fleet.images import Installation
from server.bench.fleet.lines import JsonLines
from server.bench.fleet.procs import PIPE, child_env, log_tail, running_process
from server.transport import SessionLimits


@dataclass
class ServerProcess:
    """A running ``ota server``."""

    pid: int
    api_url: str
    tcp: tuple[str, int]
    udp: tuple[str, int]
    #: Where its output goes (its log lines, its workers' too).
    log_path: Path | None = None


class LoadGenHandle:
    """The runner's end of one load generator's pipes: requests, replies and events."""

    def __init__(
        self, index: int, process: trio.Process, on_event: Callable[[int, dict[str, Any]], None]
    ) -> None:
        assert process.stdin is not None and process.stdout is not None
        self.index = index
        self.process = process
        self.lines = JsonLines(process.stdout, process.stdin)
        self.on_event = on_event
        self.log_path: Path | None = None
        self._next_id = 0
        self._pending: dict[int, tuple[trio.Event, list[dict[str, Any]]]] = {}
        self._gone = False

    async def request(self, command: str, **fields: Any) -> dict[str, Any]:
        """Send a command and wait for its reply; BenchError if it failed."""
        if self._gone:
            raise BenchError(f"load generator {self.index} has exited: {self._log()}")
        self._next_id += 1
        done, slot = trio.Event(), cast(list[dict[str, Any]], [])
        self._pending[self._next_id] = (done, slot)
        await self.lines.write({"id": self._next_id, "cmd": command, **fields})
        await done.wait()
        reply = slot[0]
        if "error" in reply:
            raise BenchError(f"{command}: {reply['error']}")
        return reply

    async def read_loop(self) -> None:
        """Dispatch replies and events until the process closes its stdout."""
        try:
            while (message := await self.lines.read()) is not None:
                if "reply" in message:
                    pending = self._pending.pop(int(message["reply"]), None)
                    if pending is not None:
                        pending[1].append(message)
                        pending[0].set()
                elif "event" in message:
                    self.on_event(self.index, message)
        finally:
            self._gone = True
            for done, slot in self._pending.values():
                slot.append({"error": f"load generator {self.index} exited: {self._log()}"})
                done.set()
            self._pending.clear()

    def _log(self) -> str:
        return log_tail(self.log_path, 5) if self.log_path else ""


async def request_all(
    gens: list[LoadGenHandle],
    command: str,
    per_gen: Callable[[int], dict[str, Any]] | None = None,
    **fields: Any,
) -> list[dict[str, Any]]:
    """The same command to every load generator at once; replies in generator order."""
    replies: list[dict[str, Any]] = [{} for _ in gens]

    async def one(gen: LoadGenHandle) -> None:
        extra = per_gen(gen.index) if per_gen else {}
        replies[gen.index] = await gen.request(command, **fields, **extra)

    async with trio.open_nursery() as nursery:
        for gen in gens:
            nursery.start_soon(one, gen)
    return replies


#: Received bytes that count as progress (keep-alive pings alone do not).
PROGRESS_BYTES = 64 * 1024


@dataclass
class FleetProgress:
    """What the load generators' progress events say, summed."""

    gens: int
    online: list[int] = field(default_factory=list)
    received: list[int] = field(default_factory=list)
    updated: dict[str, float] = field(default_factory=dict)
    outcomes: dict[int, dict[str, int]] = field(default_factory=dict)
    crashed: dict[str, str] = field(default_factory=dict)
    peak: int = 0
    changed: trio.Event = field(default_factory=trio.Event)
    #: When devices last came online, updated, or received PROGRESS_BYTES more.
    advanced_at: float = 0.0
    _marks: tuple[int, int, int] = (0, 0, 0)

    def __post_init__(self) -> None:
        self.online = [0] * self.gens
        self.received = [0] * self.gens
        self.advanced_at = time.monotonic()

    def on_event(self, index: int, event: dict[str, Any]) -> None:
        """A progress event from load generator ``index``."""
        if event.get("event") != "progress":
            return
        self.online[index] = int(event["online"])
        self.received[index] = int(event["bytes"])
        self.updated.update({device: float(t) for device, t in event["updated"]})
        self.outcomes[index] = event.get("outcomes") or {}
        self.crashed.update(event.get("crashed") or {})
        self.peak = max(self.peak, self.online_total)
        online, updated, received = self._marks
        now_received = sum(self.received)
        if (
            self.online_total > online
            or len(self.updated) > updated
            or now_received >= received + PROGRESS_BYTES
        ):
            self.advanced_at = time.monotonic()
            self._marks = (self.online_total, len(self.updated), now_received)
        self.changed.set()

    @property
    def online_total(self) -> int:
        """Devices online now."""
        return sum(self.online)

    @property
    def failed_total(self) -> int:
        """Devices whose update ended in a rollback or failure."""
        return sum(sum(counts.values()) for counts in self.outcomes.values())

    async def wait_until(
        self,
        condition: Callable[[], bool],
        timeout: float,
        tick: Callable[[], None],
        *,
        stall: float,
    ) -> str:
        """Wait for ``condition``: "done"; "timeout" after ``timeout`` seconds; "stalled"
        when nothing advanced for ``stall`` seconds (no device came online or updated, and
        the devices received under PROGRESS_BYTES)."""
        deadline = time.monotonic() + timeout
        self.advanced_at = time.monotonic()
        self._marks = (self.online_total, len(self.updated), sum(self.received))
        while not condition():
            now = time.monotonic()
            if now >= deadline:
                return "timeout"
            if now - self.advanced_at >= stall:
                return "stalled"
            with trio.move_on_after(min(1.0, deadline - now)):
                await self.changed.wait()
                self.changed = trio.Event()
            tick()
        return "done"


@asynccontextmanager
async def running_server(
    install: Installation,
    log_path: Path,
    *,
    workers: int = 1,
    extra_args: Sequence[str] = (),
    data_dir: Path | None = None,
) -> AsyncIterator[ServerProcess]:
    """``ota server --workers N`` on free ports over the prepared data directory (or
    ``data_dir``: a node's copy of it); its worker processes are children of ``pid``;
    ``extra_args`` go last (e.g. more ``--device-limit NAME=VALUE``, ``--db-url``)."""
    data_dir = install.data_dir if data_dir is None else data_dir
    argv = [
        sys.executable,
        "-m",
        "server.cli.main",
        "server",
        "--data",
        str(data_dir),
        "--api-port",
        "0",
        "--device-port",
        "0",
        "--workers",
        str(workers),
        # Each load generator's loopback address stands for thousands of devices (like a
        # carrier-grade NAT): lift the per-address admission bounds to the process-wide ones.
        "--device-limit",
        f"max_pending_per_address={SessionLimits().max_sessions}",
        "--device-limit",
        f"max_handshakes_per_address={SessionLimits().max_handshakes}",
        *extra_args,
    ]
    async with running_process(
        argv, log_path=log_path, stdout=PIPE, cwd=data_dir, env=child_env(), grace=15.0
    ) as process:
        assert process.stdout is not None
        found: dict[str, str] = {}
        text = ""
        with trio.move_on_after(60.0):
            while not {"API", "TLS", "DTLS"} <= found.keys():
                chunk = await process.stdout.receive_some(4096)
                if not chunk:
                    break
                text += chunk.decode(errors="replace")
                for line in text.splitlines():
                    words = line.split()
                    if line.startswith("ota server: API listening on"):
                        found["API"] = words[-1]
                    elif line.startswith("ota server: devices on"):
                        found[words[-2]] = words[-1]
        if not {"API", "TLS", "DTLS"} <= found.keys():
            raise BenchError(f"the server did not start: {text.strip()} {log_tail(log_path)}")

        def address(text: str) -> tuple[str, int]:
            host, _, port = text.rpartition(":")
            return host, int(port)

        yield ServerProcess(
            process.pid, found["API"], address(found["TLS"]), address(found["DTLS"]), log_path
        )


@asynccontextmanager
async def running_loadgens(
    nursery: trio.Nursery,
    specs: list[Path],
    out_dir: Path,
    on_event: Callable[[int, dict[str, Any]], None],
) -> AsyncIterator[list[LoadGenHandle]]:
    """Start one load generator per spec; they are stopped when the block ends."""
    async with AsyncExitStack() as stack:
        gens = []
        for index, spec in enumerate(specs):
            log = out_dir / f"loadgen-{index}.log"
            process = await stack.enter_async_context(
                running_process(
                    [sys.executable, "-m", "server.bench.fleet.loadgen", str(spec)],
                    log_path=log,
                    stdin=PIPE,
                    stdout=PIPE,
                    cwd=out_dir,
                    env=child_env(),
                    grace=5.0,
                )
            )
            gen = LoadGenHandle(index, process, on_event)
            gen.log_path = log
            nursery.start_soon(gen.read_loop)
            gens.append(gen)
        yield gens
        with trio.move_on_after(10.0):
            await request_all(gens, "quit")
