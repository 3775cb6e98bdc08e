"""The stored event history on both store backends (the ``store`` fixture): recorded once
per installation (two processes' relays and recorders on two ``Store`` objects of one
database), private events kept, data cut to Particle's limit, a full writer buffer dropping
and counting, pruning by age and per device in bounded batches (a settable clock, no
sleeps), and the settings an operator gives."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
import sqlalchemy as sa
import trio
import trio.testing

from otacore.errors import ValidationError
from otacore.messages import EVENT_DATA_MAX_BYTES
from server.app import worker_specs
from server.config_file import load_server_config
from server.event_history import EventRecorder, HistorySettings, prune_once
from server.events import Event, EventBus, EventSource
from server.metrics import REGISTRY
from server.relay import EventRelay, RelaySettings
from server.store import Store
from server.store.schema import event_history, event_log
from server.store.tx_event_history import count_rows, read_history, record_events
from server.workers import WorkerSettings, WorkerSpec

D1 = "0123456789abcdef01234567"
D2 = "89abcdef0123456789abcdef"
FAST_RELAY = RelaySettings(flush_interval=0.01, poll_interval=0.02,
                           missed_notification_poll=0.2)
FAST_HISTORY = HistorySettings(history_flush_interval=0.01)


def stored(store: Store, product_id: int, device_id: str | None = None) -> list[Event]:
    """The product's (device's) stored events, oldest first."""
    with store.read() as tx:
        rows = read_history(tx.conn, product_id=product_id, device_id=device_id, limit=1000)
    return [row.event for row in reversed(rows)]


async def test_each_event_is_stored_once_by_the_process_that_published_it(
    store: Store, reopen: Callable[..., Store]
) -> None:
    other = reopen()
    buses = (EventBus(), EventBus())
    relays = (EventRelay(store, buses[0], "node-a:main-1", settings=FAST_RELAY),
              EventRelay(other, buses[1], "node-b:main-1", settings=FAST_RELAY))
    recorders = (EventRecorder(store, buses[0], FAST_HISTORY),
                 EventRecorder(other, buses[1], FAST_HISTORY))
    published = [
        Event("temp", "21.5", product_id=7, device_id=D1, coreid=D1, public=False,
              source=EventSource.DEVICE),
        Event("particle/product/firmware/released", '{"version": 3}', product_id=7),
        Event("ota/installation/note", "no product, no device"),  # not kept
    ]
    async with trio.open_nursery() as nursery:
        for relay, recorder in zip(relays, recorders, strict=True):
            await nursery.start(recorder.run)
            await nursery.start(relay.run)
        with buses[1].subscribe(buffer=16) as at_b:
            for event in published:
                buses[0].publish(event)
            # Node B received all three through the relay (published there, relayed=True).
            with trio.fail_after(20):
                received = [await at_b.receive.receive() for _ in published]
        assert [e.name for e in received] == [e.name for e in published]
        # B answers one of them with an event of its own.
        buses[1].publish(Event("spark/status", "online", product_id=7, device_id=D2,
                               coreid=D2))
        for recorder in recorders:
            await recorder.drain()
        nursery.cancel_scope.cancel()
    rows = stored(store, 7)
    assert [(e.name, e.device_id) for e in rows] == [
        ("temp", D1), ("particle/product/firmware/released", None), ("spark/status", D2)]
    assert rows[0].public is False and rows[0].source is EventSource.DEVICE  # private kept
    assert recorders[0].stats.recorded == 2 and recorders[1].stats.recorded == 1
    with store.read() as tx:
        assert count_rows(tx.conn) == 3


async def test_a_stopping_process_stores_what_it_published_last(store: Store) -> None:
    bus = EventBus()
    # A flush interval of an hour: only the last write on the way out can store it.
    recorder = EventRecorder(store, bus, HistorySettings(history_flush_interval=3600.0))
    async with trio.open_nursery() as nursery:
        await nursery.start(recorder.run)
        bus.publish(Event("spark/status", "offline", product_id=1, device_id=D1))
        assert recorder.waiting == 1
        nursery.cancel_scope.cancel()
    assert bus.recorder is None
    assert [e.data for e in stored(store, 1)] == ["offline"]


async def test_drain_waits_for_a_write_the_writer_has_already_taken(store: Store) -> None:
    # Regression (CI of stop 25): drain() returned as soon as the buffer was empty, while
    # the run loop's batch was still being written, so a "nothing changed" snapshot taken
    # after it could see the history row land later.
    bus = EventBus()
    recorder = EventRecorder(store, bus, FAST_HISTORY)
    holding, release = threading.Event(), threading.Event()

    def hold_the_writer() -> None:
        with store.write():
            holding.set()
            release.wait(30)

    counts: list[int] = []

    async def drain_then_count() -> None:
        await recorder.drain()
        counts.append(len(stored(store, 1)))

    async with trio.open_nursery() as nursery:
        await nursery.start(recorder.run)
        nursery.start_soon(trio.to_thread.run_sync, hold_the_writer)
        await trio.to_thread.run_sync(holding.wait)
        bus.publish(Event("spark/status", "online", product_id=1, device_id=D1))
        with trio.fail_after(20):
            while recorder.waiting:  # the run loop took it; its write waits for ours
                await trio.sleep(0.01)
        nursery.start_soon(drain_then_count)
        await trio.testing.wait_all_tasks_blocked()
        release.set()
        with trio.fail_after(20):
            while not counts:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert counts == [1]


def test_data_is_cut_to_particles_limit_and_marked(store: Store) -> None:
    long_text = "é" * 1000  # 2,000 bytes of UTF-8: cut on a character boundary
    with store.write() as tx:
        record_events(tx.conn, [Event("x" * 300, long_text, product_id=1, device_id=D1),
                                Event("short", "ok", product_id=1, device_id=D1)])
        rows = read_history(tx.conn, product_id=1)
    assert [(r.event.name, r.data_cut) for r in rows] == [("short", False), ("x" * 200, True)]
    cut = rows[1].event.data
    assert cut is not None and cut == "é" * (EVENT_DATA_MAX_BYTES // 2)


def test_a_full_writer_buffer_drops_new_events_and_counts_them(store: Store) -> None:
    before = REGISTRY.get_sample_value("ota_event_history_dropped_total") or 0.0
    recorder = EventRecorder(store, EventBus(), HistorySettings(history_buffer=3))
    for n in range(5):
        recorder.record(Event("n", str(n), product_id=1, device_id=D1))
    recorder.record(Event("not kept", "no product or device"))  # neither kept nor dropped
    assert recorder.waiting == 3 and recorder.stats.dropped == 2
    after = REGISTRY.get_sample_value("ota_event_history_dropped_total")
    assert after == before + 2

    async def drain() -> None:
        await recorder.drain()

    trio.run(drain)
    assert [e.data for e in stored(store, 1)] == ["0", "1", "2"]  # the oldest were kept


def test_pruning_goes_by_age_then_by_rows_per_device_in_bounded_batches(store: Store) -> None:
    now = 1_800_000_000_000
    day = 86_400_000
    settings = HistorySettings(history_retention=7 * 86_400, history_per_device=3,
                               history_prune_batch=2)
    old = [Event("old", str(n), product_id=1, device_id=D2, published_at=now - 8 * day + n)
           for n in range(5)]
    recent = [Event("new", str(n), product_id=1, device_id=D1, published_at=now - day + n)
              for n in range(6)]
    product_only = [Event("product", str(n), product_id=1, published_at=now - day + n)
                    for n in range(4)]
    with store.write() as tx:
        record_events(tx.conn, old + recent + product_only)
    result = prune_once(store, settings, clock=lambda: now)
    # 5 expired (3 batches of at most 2), 3 of D1's 6 beyond its newest 3; product-only
    # events are bounded by age only.
    assert (result.expired, result.excess) == (5, 3)
    assert [e.data for e in stored(store, 1, D1)] == ["3", "4", "5"]
    assert stored(store, 1, D2) == []
    assert len(stored(store, 1)) == 3 + 4
    # Nothing more to do: a second pass deletes nothing.
    again = prune_once(store, settings, clock=lambda: now)
    assert (again.expired, again.excess) == (0, 0)
    # A week later everything has expired.
    later = prune_once(store, settings, clock=lambda: now + 7 * day)
    assert later.expired == 7 and stored(store, 1) == []


def test_reading_pages_newest_first_by_id_and_filters_by_exact_prefix(store: Store) -> None:
    names = ["spark/status", "Spark/other", "temp", "spark/flash/status", "temp_2", "te%mp"]
    with store.write() as tx:
        record_events(tx.conn, [Event(name, str(n), product_id=2, device_id=D1)
                                for n, name in enumerate(names)])
        record_events(tx.conn, [Event("temp", "other product", product_id=3, device_id=D2)])
        newest = read_history(tx.conn, product_id=2, limit=2)
        older = read_history(tx.conn, product_id=2, before_id=newest[-1].id, limit=10)
        spark = read_history(tx.conn, product_id=2, name_prefix="spark/")
        percent = read_history(tx.conn, product_id=2, name_prefix="te%")
        underscore = read_history(tx.conn, product_id=2, name_prefix="temp_")
    assert [r.event.name for r in newest] == ["te%mp", "temp_2"]
    assert [r.event.name for r in older] == ["spark/flash/status", "temp", "Spark/other",
                                             "spark/status"]
    assert [r.event.name for r in spark] == ["spark/flash/status", "spark/status"]  # case kept
    assert [r.event.name for r in percent] == ["te%mp"]  # no LIKE wildcards
    assert [r.event.name for r in underscore] == ["temp_2"]


def test_the_bounds_are_operator_settings(tmp_path: Path) -> None:
    config_file = tmp_path / "ota.toml"
    config_file.write_text("[events]\nhistory_retention = 3600\nhistory_per_device = 50\n")
    config = load_server_config(config_file, {"server": {"data_dir": str(tmp_path)},
                                              "events": {"history_buffer": 100}})
    assert config.history == HistorySettings(history_retention=3600, history_per_device=50,
                                             history_buffer=100)
    config = replace(config, workers=2, device_port=0)

    class Bound:
        tcp_address = ("127.0.0.1", 1)
        udp_address = ("127.0.0.1", 2)

    (spec,) = worker_specs(config, Bound())  # type: ignore[arg-type]
    # What a worker rebuilds from its spec line is what the main process runs.
    assert WorkerSettings.from_spec(WorkerSpec.from_json(spec.to_json())).history == \
        config.history
    for bad in ({"history_per_device": 0}, {"history_retention": -1.0},
                {"history_buffer": True}, {"history_flush_interval": float("nan")}):
        with pytest.raises(ValidationError):
            HistorySettings(**bad)  # type: ignore[arg-type]


def assert_stored_once(store: Store, device_ids: list[str], killed: int = 0) -> None:
    """Check the history against the relay's log (which holds every process's events, each
    row naming its process): no event stored twice (a relayed copy repeats every field);
    each process's events stored by that process (the main process never records relayed
    events, so a worker's are there only if the worker recorded them); every device's
    ``spark/status`` among them. Only ``killed`` processes (SIGKILLed: no last write) may
    have lost their last events. Used by the multi-process end-to-end test
    (tests/test_multiprocess_server.py) once its processes have stopped."""
    columns = ("name", "device_id", "product_id", "published_at")
    with store.read() as tx:
        logged = tx.conn.execute(
            sa.select(event_log.c.origin, *(event_log.c[name] for name in columns))
            .where(sa.or_(event_log.c.device_id.is_not(None),
                          event_log.c.product_id.is_not(None)))).all()
        kept = Counter(tuple(row) for row in tx.conn.execute(
            sa.select(*(event_history.c[name] for name in columns))).all())
    origin_of = {tuple(row)[1:]: row.origin for row in logged}
    log_counts = Counter(tuple(row)[1:] for row in logged)
    extra = sorted((kept - log_counts).elements())
    assert not extra, f"{len(extra)} stored twice or never published, e.g. {extra[:5]}"
    missing = log_counts - kept
    origins = {row.origin for row in logged}
    stored_origins = {origin_of[key] for key in kept}
    assert stored_origins == origins, f"no event of {origins - stored_origins} stored"
    lost_by = {origin_of[key] for key in missing}
    assert len(lost_by) <= killed, f"events of {lost_by} not stored: {sorted(missing)[:5]}"
    online = {key[1] for key in kept if key[0] == "spark/status"}
    assert set(device_ids) <= online, sorted(set(device_ids) - online)
