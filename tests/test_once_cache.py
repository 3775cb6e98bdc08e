"""OnceCache: one computation per key, concurrent askers share it, cancellation retries."""

from __future__ import annotations

import trio

from server.devices.once_cache import OnceCache


async def test_concurrent_askers_share_one_computation_and_the_cache_is_bounded() -> None:
    cache: OnceCache[str, int] = OnceCache(entries=2)
    calls: list[str] = []
    results: list[int] = []

    async def compute(key: str) -> int:
        calls.append(key)
        await trio.sleep(0.01)
        return len(calls)

    async def ask(key: str) -> None:
        results.append(await cache.get(key, lambda: compute(key)))

    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(ask, "a")
    assert calls == ["a"] and results == [1] * 5
    await cache.get("b", lambda: compute("b"))
    await cache.get("c", lambda: compute("c"))  # evicts "a", the least recently used
    assert await cache.get("a", lambda: compute("a")) == 4
    assert calls == ["a", "b", "c", "a"]


async def test_a_cancelled_computation_lets_the_next_asker_compute() -> None:
    cache: OnceCache[str, str] = OnceCache(entries=4)
    started = trio.Event()

    async def slow() -> str:
        started.set()
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    async def fast() -> str:
        return "done"

    async with trio.open_nursery() as nursery:
        nursery.start_soon(cache.get, "k", slow)
        await started.wait()
        nursery.cancel_scope.cancel()
    assert await cache.get("k", fast) == "done"
