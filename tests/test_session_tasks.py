"""An idle session is a record, not a task tree (issue 14 item 5): counted with trio's own
task introspection on a real server with real TLS 1.3 / DTLS 1.2 devices.

The counts are properties of the code (which tasks exist once every session is idle), never
of the machine's speed: each test waits for the condition "no session has an on-demand task
and every updater has handled its kicks", then walks the server's task tree.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest
import trio

from otacore.coap import Code, Message, MessageType
from otacore.messages import (
    Dependency,
    Direction,
    Event,
    ModuleDescription,
    ServerEvent,
    from_message,
    to_message,
)
from otacore.protocol.link import RequestReceived
from server.devices.plane import DevicePlane
from server.devices.session import MAX_QUEUED_REQUESTS, SHUTDOWN_EVENT
from server.devices.tuning import DeviceTuning
from server.store import Store
from server.transport import CloseReason, SessionLimits
from tests.device_client import LinkDevice, is_request_to
from tests.device_server import DeviceServerKit, start_device_server

#: Idle sessions per test (the second batch must add exactly as many tasks as the first).
BATCH = 3
#: Tasks a live TLS session may hold once idle: its connection's task, which reads.
TASKS_PER_IDLE_TLS_SESSION = 1
#: Tasks a live DTLS session may hold once idle: none (the endpoint's reader calls it).
TASKS_PER_IDLE_DTLS_SESSION = 0


def _modules() -> list[ModuleDescription]:
    return [
        ModuleDescription(4, 1, 5003, 0, 600_000, bytes(range(32)), (Dependency(2, 0, 2001),)),
        ModuleDescription(5, 1, 7, 0, 90_000, bytes(32), (Dependency(4, 1, 5003),)),
    ]


def _server_tasks() -> Counter[str]:
    """Every task under the server's own task (``server.app.serve``), by name."""
    root = trio.lowlevel.current_root_task()
    stack, server = [root], None
    while stack and server is None:
        task = stack.pop()
        if task.name == "server.app.serve":
            server = task
        for nursery in task.child_nurseries:
            stack.extend(nursery.child_tasks)
    assert server is not None, "the server's task was not found"
    names: Counter[str] = Counter()
    stack = [server]
    while stack:
        task = stack.pop()
        names[task.name] += 1
        for nursery in task.child_nurseries:
            stack.extend(nursery.child_tasks)
    return names


def _plane(kit: DeviceServerKit) -> DevicePlane:
    plane = kit.handle.devices
    assert plane is not None
    return plane


async def _until_idle(plane: DevicePlane, device_ids: list[str]) -> None:
    """Wait (a condition, bounded) until every listed device has a live session with no
    on-demand task, whose updater has handled every kick."""
    with trio.fail_after(30):
        while True:
            handlers = [plane.live.get(device_id) for device_id in device_ids]
            if all(
                handler is not None and handler.task_count == 0
                and handler.updater is not None and handler.updater.memory_loaded.is_set()
                and handler.updater.handled.value >= handler.updater.kicks
                for handler in handlers
            ):
                return
            await trio.sleep(0.01)


async def _connect_idle(kit: DeviceServerKit, device_ids: list[str], transport: str
                        ) -> list[LinkDevice]:
    devices = []
    for device_id in device_ids:
        device = await LinkDevice.connect(kit.creds_dir, device_id, transport,
                                          kit.address(transport))
        assert (await device.hello()).code == Code.CHANGED
        assert (await device.describe(_modules())).code == Code.CHANGED
        devices.append(device)
    await _until_idle(_plane(kit), device_ids)
    return devices


@pytest.mark.parametrize(("transport", "per_session"), [
    ("tcp", TASKS_PER_IDLE_TLS_SESSION), ("udp", TASKS_PER_IDLE_DTLS_SESSION)])
async def test_idle_sessions_add_a_fixed_number_of_tasks_each(
    nursery: trio.Nursery, tmp_path: Path, transport: str, per_session: int
) -> None:
    kit = await start_device_server(nursery, tmp_path, count=2 * BATCH)
    first, second = kit.device_ids[:BATCH], kit.device_ids[BATCH:]
    devices = await _connect_idle(kit, first, transport)
    after_first = _server_tasks()
    devices += await _connect_idle(kit, second, transport)
    after_second = _server_tasks()
    added = after_second - after_first
    print("tasks added by", BATCH, "idle", transport, "sessions:", dict(added))
    assert sum(added.values()) == BATCH * per_session
    assert sum((after_first - after_second).values()) == 0
    for handler in _plane(kit).live.values():
        assert handler.task_count == 0
    for device in devices:
        await device.aclose()


async def test_an_idle_dtls_session_holds_its_idle_deadline_and_a_request_its_retransmission(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """Over DTLS the session's idle deadline and the link's retransmission both live in
    the process's one timer heap (no timer task per session): idle, only the idle deadline
    is armed; a request to the device arms the link's, and its answer disarms it."""
    kit = await start_device_server(nursery, tmp_path, count=1)
    (device_id,) = kit.device_ids
    (device,) = await _connect_idle(kit, [device_id], "udp")
    plane = _plane(kit)
    handler = plane.live[device_id]
    session = handler.session
    assert session.detached
    assert len(plane.timers) == 1 and handler.timer_at is None
    assert session.timer_at is not None  # its idle deadline
    async with trio.open_nursery() as inner:
        inner.start_soon(handler.send_event, "note", "x")
        with trio.fail_after(10):
            while handler.timer_at is None:
                await trio.sleep(0.01)
        assert len(plane.timers) == 2
        event = await device.wait_for(is_request_to(["e", "note"]))
        assert isinstance(event, RequestReceived)
        device.link.respond(event.message, Message(MessageType.ACK, Code.CHANGED),
                            trio.current_time())
        await device.flush()  # the answer: send_event returns, the link has no CON left
    assert handler.timer_at is None and len(plane.timers) == 1
    await device.aclose()


@pytest.mark.parametrize("transport", ["tcp", "udp"])
async def test_an_idle_session_times_out_by_the_process_timers(
    nursery: trio.Nursery, tmp_path: Path, transport: str
) -> None:
    """The idle deadline of every session (with no task over DTLS, its reader's over TLS)
    is served by the process's one timer heap: the session closes (IDLE), its device goes
    offline, its end runs and leaves no task."""
    kit = await start_device_server(nursery, tmp_path, count=1,
                                    device_limits=SessionLimits(idle_timeout=1.0))
    (device_id,) = kit.device_ids
    before = _server_tasks()
    (device,) = await _connect_idle(kit, [device_id], transport)
    plane = _plane(kit)
    session = plane.live[device_id].session
    assert session.timer_at is not None and len(plane.timers) == 1
    server = kit.handle.device_server
    assert server is not None
    with trio.fail_after(20):
        while plane.live.get(device_id) is not None or server.host.live[transport]:
            await trio.sleep(0.05)
    assert server.stats.closed[(transport, CloseReason.IDLE)] == 1
    assert len(plane.timers) == 0
    assert sum((_server_tasks() - before).values()) == 0
    await device.aclose()


@pytest.mark.parametrize("transport", ["tcp", "udp"])
async def test_a_torn_down_server_still_records_its_idle_devices_offline(
    tmp_path: Path, transport: str
) -> None:
    """Cancelling the server (no graceful shutdown) ends sessions with no task as it ends
    a session's task: the device is recorded offline before the store closes."""
    async with trio.open_nursery() as server_nursery:
        kit = await start_device_server(server_nursery, tmp_path, count=1)
        (device_id,) = kit.device_ids
        (device,) = await _connect_idle(kit, [device_id], transport)
        with kit.handle.fleet.store.read() as tx:
            assert tx.get_device_online(device_id) == (kit.product_id, True)
        server_nursery.cancel_scope.cancel()
    store = Store.open_dir(kit.data_dir, pool_size=1)
    try:
        with store.read() as tx:
            assert tx.get_device_online(device_id) == (kit.product_id, False)
    finally:
        store.close()
    await device.aclose()


async def test_a_task_less_session_drops_requests_beyond_its_queue_and_serves_the_rest_in_order(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """A DTLS session with no task cannot make the endpoint's reader wait for its request
    worker: requests beyond MAX_QUEUED_REQUESTS are dropped (the device resends a CON, RFC
    7252 4.2), the others are served one at a time in arrival order by one worker task,
    which then ends."""
    kit = await start_device_server(nursery, tmp_path, count=1)
    (device_id,) = kit.device_ids
    (device,) = await _connect_idle(kit, [device_id], "udp")
    handler = _plane(kit).live[device_id]
    sent = MAX_QUEUED_REQUESTS + 4
    with kit.handle.bus.subscribe(device_id=device_id, name_prefix="seq/") as events:
        for index in range(sent):  # no checkpoint: all queued before the worker runs
            message = to_message(Event(f"seq/{index:02d}", "x", 60), Direction.TO_CLOUD)
            handler._queue_request_nowait(
                replace(message, message_id=5000 + index, token=index.to_bytes(2, "big")))
        assert handler.requests_dropped == sent - MAX_QUEUED_REQUESTS
        assert handler.task_count == 1  # one worker for the whole queue
        seen = []
        with trio.fail_after(20):
            while len(seen) < MAX_QUEUED_REQUESTS:
                seen.append((await events.receive.receive()).name)
    assert seen == [f"seq/{index:02d}" for index in range(MAX_QUEUED_REQUESTS)]
    await _until_idle(_plane(kit), [device_id])
    await device.aclose()


async def test_graceful_shutdown_tells_a_task_less_dtls_device_when_to_come_back(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """A DTLS session with no task still gets the farewell at a graceful shutdown (its end
    runs in a task started then): the going-away NON with the hold-off, then close_notify,
    and the device is recorded offline. (With saving on, the default, the session is saved
    for the next process instead: tests/test_device_session_restart.py.)"""
    kit = await start_device_server(nursery, tmp_path, count=1,
                                    device_tuning=DeviceTuning(save_dtls_sessions=False))
    (device_id,) = kit.device_ids
    (device,) = await _connect_idle(kit, [device_id], "udp")
    assert _plane(kit).live[device_id].session.detached
    kit.handle.shutdown.set()
    event = await device.wait_for(lambda e: isinstance(e, RequestReceived))
    assert isinstance(event, RequestReceived)
    assert event.message.type is MessageType.NON
    notice = from_message(event.message, Direction.TO_DEVICE)
    assert isinstance(notice, ServerEvent) and notice.name == SHUTDOWN_EVENT
    assert json.loads(notice.data)["hold_off"] == DeviceTuning().shutdown_hold_off
    await device.wait_closed()  # close_notify: the channel ends
    store = Store.open_dir(kit.data_dir, pool_size=1)
    try:
        with store.read() as tx:
            assert tx.get_device_online(device_id) == (kit.product_id, False)
    finally:
        store.close()
