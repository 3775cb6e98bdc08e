"""The process's one timer heap, the lazy Flag and the updater's TransferInbox (the parts
that replaced per-session tasks and events; issue 14 item 5), under trio's MockClock."""

from __future__ import annotations

import math
from typing import cast

import pytest
import trio
import trio.testing

from otacore.transfer import TransferMessage
from server.devices.flag import Flag
from server.devices.transfer_inbox import TransferInbox
from server.transport.timers import ProcessTimers


class _Owner:
    def __init__(self, name: str, calls: list[tuple[str, float]],
                 then: float | None = None, timers: ProcessTimers | None = None) -> None:
        self.name, self.calls, self.then, self.timers = name, calls, then, timers
        self.timer_at: float | None = None

    def on_deadline(self, now: float) -> None:
        self.calls.append((self.name, now))
        if self.then is not None and self.timers is not None:
            self.timers.arm(self, self.then)
            self.then = None


def test_deadlines_fire_in_order_and_rearming_or_disarming_cancels_lazily() -> None:
    timers, calls = ProcessTimers(), []
    a, b, c = (_Owner(n, calls) for n in "abc")
    timers.arm(a, 5.0)
    timers.arm(b, 3.0)
    timers.arm(c, 4.0)
    timers.arm(a, 1.0)  # earlier: the 5.0 entry goes stale
    timers.disarm(c)
    assert len(timers) == 2
    assert timers.fire_due(2.0) == 1
    assert calls == [("a", 2.0)] and a.timer_at is None
    assert timers.fire_due(10.0) == 1  # b; the stale a@5 and c@4 are skipped
    assert calls == [("a", 2.0), ("b", 10.0)]
    assert len(timers) == 0 and timers.fired == 2


def test_arming_the_same_deadline_again_adds_nothing_and_stale_entries_are_compacted() -> None:
    timers, calls = ProcessTimers(), []
    owner = _Owner("a", calls)
    timers.arm(owner, 1.0)
    timers.arm(owner, 1.0)
    assert timers.next_deadline == 1.0
    for step in range(1000):  # a busy link re-armed on every message
        timers.arm(owner, 2.0 + step)
    assert len(timers) == 1
    assert len(timers._heap) <= 2 * 1 + 64 + 1
    timers.fire_due(math.inf)
    assert calls == [("a", math.inf)]


def test_a_failing_owner_does_not_stop_the_others(caplog: pytest.LogCaptureFixture) -> None:
    timers, calls = ProcessTimers(), []

    class Broken(_Owner):
        def on_deadline(self, now: float) -> None:
            raise RuntimeError("a bug in one session")

    timers.arm(Broken("x", calls), 1.0)
    timers.arm(_Owner("ok", calls), 2.0)
    assert timers.fire_due(3.0) == 2
    assert calls == [("ok", 3.0)]
    assert "a bug in one session" in caplog.text


async def test_the_serving_task_wakes_for_an_earlier_deadline_and_owners_may_rearm(
    autojump_clock: trio.testing.MockClock,
) -> None:
    timers, calls = ProcessTimers(), []
    start = trio.current_time()
    late = _Owner("late", calls)
    again = _Owner("again", calls, timers=timers)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(timers.run)
        timers.arm(late, start + 100)
        await trio.testing.wait_all_tasks_blocked()
        again.then = start + 20
        timers.arm(again, start + 10)  # earlier than what the task sleeps for
        await trio.sleep_until(start + 150)
        nursery.cancel_scope.cancel()
    assert calls == [("again", start + 10), ("again", start + 20), ("late", start + 100)]


async def test_a_flag_costs_no_event_until_waited_and_wakes_every_waiter() -> None:
    flag, woken = Flag(), []
    assert not flag.is_set() and flag._event is None

    async def waiter(name: str) -> None:
        await flag.wait()
        woken.append(name)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter, "a")
        nursery.start_soon(waiter, "b")
        await trio.testing.wait_all_tasks_blocked()
        assert woken == []
        flag.set()
    assert sorted(woken) == ["a", "b"] and flag.is_set()
    with trio.testing.assert_checkpoints():
        await flag.wait()  # set already: returns at once, still a checkpoint


async def test_the_transfer_inbox_is_bounded_ordered_and_loses_nothing_on_cancel() -> None:
    inbox = TransferInbox(size=2)
    first, second, third = (cast(TransferMessage, object()) for _ in range(3))
    assert inbox.put(first) and inbox.put(second)
    assert not inbox.put(third)  # full: dropped (the transfer protocol recovers it)
    assert len(inbox) == 2
    with trio.CancelScope() as scope:
        scope.cancel()
        await inbox.receive()
    assert len(inbox) == 2  # the cancelled receive took nothing
    assert await inbox.receive() is first
    assert await inbox.receive() is second
    inbox.put(third)
    inbox.clear()
    assert len(inbox) == 0
    async with trio.open_nursery() as nursery:
        got: list[TransferMessage] = []

        async def receive() -> None:
            got.append(await inbox.receive())

        nursery.start_soon(receive)
        await trio.testing.wait_all_tasks_blocked()
        inbox.put(first)
    assert got == [first]
