"""Device-session writes: one transaction per call vs group commit, on a real SQLite file.

Run: .venv/bin/python -m pytest bench/test_bench_group_commit.py --benchmark-enable
--benchmark-only -q -s

Each round starts 1,000 concurrent session writes, one per provisioned device, in a fresh
trio run: ``record_device_hello`` (the heaviest: 5 statements plus its savepoint's two),
``record_describe`` (4), ``record_update_progress`` (1, sent every 32 KiB of a transfer) or
``set_reset_pending`` (1), on a store in WAL mode with synchronous=FULL (the server's
settings) under the server's default 8-thread store limiter. The baseline is the same Fleet
with ``_run_grouped`` replaced by what the session methods did before group commit: one
worker-thread call and one durable transaction per call (``_run`` around ``store.write()``).
Both run in the same session (group "session-writes-1000") so the table shows their ratio;
the grouped tests also record calls/s for both and the ratio in ``extra_info`` (and print
them with ``-s``).

``test_session_reads`` times the reads a session makes, 1,000 concurrent calls per round on a
product with a released firmware: ``target_for_device`` (at every update check: 3 queries,
device with product and groups, releases with their firmware, pending flash),
``load_ota_memory`` (a session whose presence write left none) and ``authorize_device`` (at
every handshake: 3 queries); they are grouped reads (``Store.group_read``: concurrent reads
share one worker-thread hop and one read transaction). ``test_session_reads_one_hop_each``
runs them as before group read, one worker-thread hop and one read transaction per call
(``OneHopPerReadFleet``), in the same group so the table shows the ratio.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trio

from otacore.module import build_module
from otacore.platforms import ModuleFunction
from server.authorization import ClientCertificate
from server.events import EventBus
from server.fleet import SYSTEM_ACTOR, Fleet
from server.fleet.base import Outcome
from server.store import Store, Tx

_T = TypeVar("_T")
CALLS = 1_000
#: Seconds per round of each variant, filled as the tests run (for the ratio).
MEANS: dict[str, float] = {}


class OneTransactionPerCallFleet(Fleet):
    """The fleet as it was before group commit: each session write in its own thread call
    and its own durable transaction."""

    async def _run_grouped(self, fn: Callable[[Tx], Outcome]) -> Any:
        def work() -> Outcome:
            with self.store.write() as tx:
                return fn(tx)

        return await self._run(work)


class OneHopPerReadFleet(Fleet):
    """The fleet as it was before group read: each hot read in its own worker-thread call
    and its own read transaction."""

    async def _read_grouped(self, fn: Callable[[Tx], _T]) -> _T:
        def work() -> _T:
            with self.store.read() as tx:
                return fn(tx)

        return await self._read(work)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    opened = Store.open_dir(tmp_path / "data", pool_size=8)
    yield opened
    opened.close()


def provision(store: Store) -> list[str]:
    product = Fleet(store, EventBus()).create_product_sync(SYSTEM_ACTOR, "Bench", 13)
    ids = [f"{i:024x}" for i in range(1, CALLS + 1)]
    with store.write() as tx:
        for device_id in ids:
            tx.insert_device(device_id, product.id, 0)
    return ids


def release_firmware(store: Store, product_id: int, version: int = 3) -> None:
    """Upload a small product firmware ``version`` and make it the product default."""
    image = build_module(
        hashlib.shake_256(b"bench").digest(4096),
        platform_id=13,
        function=ModuleFunction.USER_PART,
        version=6,
        product_id=13,
        product_version=version,
    )

    async def main() -> None:
        fleet = Fleet(store, EventBus())
        await fleet.upload_firmware(SYSTEM_ACTOR, product_id, image, version=version, title="b")
        await fleet.release_firmware(
            SYSTEM_ACTOR, product_id, version, product_default=True, force=True
        )

    trio.run(main)


async def hello(fleet: Fleet, device_id: str, n: int) -> None:
    """The heaviest session write: a handshake."""
    await fleet.record_device_hello(
        device_id, platform_id=13, product_version=n % 7, system_version=5000
    )


async def describe(fleet: Fleet, device_id: str, n: int) -> None:
    """The modules a device reports after its hello (they change every other round)."""
    modules = [
        {"function": 4, "index": 1, "version": 5000 + n % 2, "size": 600_000},
        {"function": 5, "index": 1, "version": n % 7, "size": 90_000},
    ]
    await fleet.record_describe(device_id, modules)


async def progress(fleet: Fleet, device_id: str, n: int) -> None:
    """Transfer progress, persisted every 32 KiB during an update."""
    await fleet.record_update_progress(
        device_id,
        sha256="ab" * 32,
        version=3,
        transfer="delta",
        bytes_done=32_768 * (n % 5),
        bytes_total=200_000,
    )


async def reset_pending(fleet: Fleet, device_id: str, n: int) -> None:
    """A thin session write: where the per-transaction cost shows most."""
    await fleet.set_reset_pending(device_id, n % 2 == 0)


CALL_KINDS = {
    "hello": hello,
    "describe": describe,
    "progress": progress,
    "reset_pending": reset_pending,
}


async def target(fleet: Fleet, device_id: str, n: int) -> None:
    """The read at every update check."""
    await fleet.target_for_device(device_id)


async def ota_memory(fleet: Fleet, device_id: str, n: int) -> None:
    """The OTA engine's per-device memory, loaded when a session starts."""
    await fleet.load_ota_memory(device_id)


async def authorize(fleet: Fleet, device_id: str, n: int) -> None:
    """The read at every handshake (a certificate already seen: no write)."""
    certificate = ClientCertificate(device_id, f"{n:064x}", f"{n:x}", 2**40)
    assert await fleet.authorize_device(certificate)


READ_KINDS = {"target": target, "load_ota_memory": ota_memory, "authorize": authorize}


def run_round(
    fleet_type: type[Fleet], call: Callable[[Fleet, str, int], Any], store: Store, ids: list[str]
) -> None:
    """CALLS concurrent calls, one per device, in a fresh trio run (limiter and bus belong to
    the run)."""

    async def main() -> None:
        fleet = fleet_type(store, EventBus(), limiter=trio.CapacityLimiter(8))
        async with trio.open_nursery() as nursery:
            for n, device_id in enumerate(ids):
                nursery.start_soon(call, fleet, device_id, n)

    trio.run(main)


def _record(benchmark: Any, name: str) -> None:
    mean = benchmark.stats.stats.mean
    MEANS[name] = mean
    benchmark.extra_info["calls"] = CALLS
    benchmark.extra_info["calls_per_s"] = round(CALLS / mean)


@pytest.mark.parametrize("kind", list(CALL_KINDS))
@pytest.mark.benchmark(group="session-writes-1000")
def test_one_transaction_per_call(benchmark: Any, store: Store, kind: str) -> None:
    ids = provision(store)
    call = CALL_KINDS[kind]
    benchmark.pedantic(run_round, (OneTransactionPerCallFleet, call, store, ids), rounds=3)
    _record(benchmark, f"baseline-{kind}")


@pytest.mark.parametrize("kind", list(CALL_KINDS))
@pytest.mark.benchmark(group="session-writes-1000")
def test_group_commit(benchmark: Any, store: Store, kind: str) -> None:
    ids = provision(store)
    call = CALL_KINDS[kind]
    before = (store.group_commit.batches, store.group_commit.operations)
    benchmark.pedantic(run_round, (Fleet, call, store, ids), rounds=3)
    _record(benchmark, f"grouped-{kind}")
    batches = store.group_commit.batches - before[0]
    per_tx = round((store.group_commit.operations - before[1]) / batches, 1)
    benchmark.extra_info["ops_per_transaction"] = per_tx
    baseline = MEANS.get(f"baseline-{kind}")
    if baseline is not None:
        ratio = baseline / MEANS[f"grouped-{kind}"]
        benchmark.extra_info["baseline_calls_per_s"] = round(CALLS / baseline)
        benchmark.extra_info["speedup_vs_baseline"] = round(ratio, 2)
        print(
            f"\n{kind} x{CALLS}: one tx per call {CALLS / baseline:.0f}/s, group commit "
            f"{CALLS / MEANS[f'grouped-{kind}']:.0f}/s, ratio {ratio:.2f}x, "
            f"{per_tx} ops per transaction"
        )


def _prepare_reads(store: Store) -> list[str]:
    ids = provision(store)
    with store.read() as tx:
        product = tx.get_product("bench")
    assert product is not None
    release_firmware(store, product.id)
    run_round(Fleet, authorize, store, ids)  # record the certificates as seen: reads only
    return ids


@pytest.mark.parametrize("kind", list(READ_KINDS))
@pytest.mark.benchmark(group="session-reads-1000")
def test_session_reads_one_hop_each(benchmark: Any, store: Store, kind: str) -> None:
    ids = _prepare_reads(store)
    benchmark.pedantic(run_round, (OneHopPerReadFleet, READ_KINDS[kind], store, ids), rounds=3)
    _record(benchmark, f"read-one-hop-{kind}")
    print(f"\n{kind} x{CALLS}, one hop each: {CALLS / MEANS[f'read-one-hop-{kind}']:.0f}/s")


@pytest.mark.parametrize("kind", list(READ_KINDS))
@pytest.mark.benchmark(group="session-reads-1000")
def test_session_reads(benchmark: Any, store: Store, kind: str) -> None:
    ids = _prepare_reads(store)
    before = (store.group_read.batches, store.group_read.operations)
    benchmark.pedantic(run_round, (Fleet, READ_KINDS[kind], store, ids), rounds=3)
    _record(benchmark, f"read-{kind}")
    batches = store.group_read.batches - before[0]
    per_hop = round((store.group_read.operations - before[1]) / batches, 1)
    benchmark.extra_info["reads_per_hop"] = per_hop
    line = f"\n{kind} x{CALLS}, grouped: {CALLS / MEANS[f'read-{kind}']:.0f}/s, {per_hop} per hop"
    baseline = MEANS.get(f"read-one-hop-{kind}")
    if baseline is not None:
        ratio = baseline / MEANS[f"read-{kind}"]
        benchmark.extra_info["speedup_vs_one_hop_each"] = round(ratio, 2)
        line += f", {ratio:.2f}x one hop each"
    print(line)
