"""What a console device-list page costs with 10,000 devices in the store: the whole HTTP
round trip (session check, count, page, statuses, groups, rendering) against a real server
on its embedded SQLite store, unfiltered and under the filters that touch the most rows
(update status: the precedence rules in SQL, per device).

Run: .venv/bin/python -m pytest bench/test_bench_console_devices.py --benchmark-enable
--benchmark-only -q

The fleet: 10,000 devices, a third in one of four groups, versions 1-4 reported, a product
default release and two group releases, 5% locked, 5% development, 2% updating, 3% with a
failed last update. The issue asks for pages under 300 ms; each test asserts its median is.
"""

from __future__ import annotations

import random
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
import trio

from server.store import schema as t

DEVICES = 10_000
GROUPS = ("north", "south", "east", "west")
#: The issue's page-load limit.
LIMIT_SECONDS = 0.300


@dataclass
class Console:
    """A client signed in to the bench server's console."""

    client: httpx.Client


def _populate(store: Any, seed: int) -> None:
    """The bench fleet (see the module docstring), inserted in bulk."""
    rng = random.Random(seed)
    with store.write() as tx:
        product = tx.insert_product(slug="bench", name="Bench", platform_id=13,
                                    description="", now=1)
        groups = [tx.insert_group(product.id, name, description="", color="#336699", now=1)
                  for name in GROUPS]
        tx.set_release(product.id, None, version=3, intelligent=False, actor="b", now=2)
        tx.set_release(product.id, groups[0].id, version=4, intelligent=True, actor="b", now=2)
        tx.set_release(product.id, groups[1].id, version=2, intelligent=False, actor="b", now=2)
        devices, members, updates = [], [], []
        for n in range(DEVICES):
            device_id = f"{n:024x}"
            roll = rng.random()
            devices.append({
                "id": device_id, "product_id": product.id, "name": f"unit-{n}", "notes": "",
                "development": roll < 0.05,
                "desired_firmware_version": 2 if 0.05 <= roll < 0.10 else None,
                "flash_requested": False, "firmware_updates_forced": False,
                "firmware_updates_enabled": True, "updates_pending": False,
                "reset_pending": False, "online": rng.random() < 0.6, "certs_revoked": False,
                "platform_id": 13, "firmware_version": rng.choice([1, 2, 3, 4]),
                "system_version": 5000, "created_at": 1, "updated_at": 1,
                "last_update_status": "failed" if 0.10 <= roll < 0.13 else None,
                "last_update_error": "image refused" if 0.10 <= roll < 0.13 else None,
                "last_heard_at": 1_700_000_000_000,
            })
            if rng.random() < 1 / 3:
                members.append({"device_id": device_id, "group_id": rng.choice(groups).id})
            if 0.13 <= roll < 0.15:
                updates.append({"device_id": device_id, "sha256": "ab" * 32, "version": 3,
                                "transfer": "delta", "bytes_done": 1000, "bytes_total": 9000,
                                "status": "in_progress", "started_at": 1, "updated_at": 1})
        tx.conn.execute(sa.insert(t.devices), devices)
        tx.conn.execute(sa.insert(t.device_groups), members)
        tx.conn.execute(sa.insert(t.device_updates), updates)


@pytest.fixture(scope="module")
def console(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Console]:
    """A real server (hypercorn on trio, in a thread) with the bench fleet, and a client
    signed in to its console."""
    from server.app import ServerConfig, serve

    seed = random.randrange(2**32)
    print(f"bench fleet seed {seed}")
    config = ServerConfig(data_dir=Path(tmp_path_factory.mktemp("console-bench")), api_port=0,
                          device_port=None, store_threads=4, graceful_timeout=0.5)
    ready: dict[str, Any] = {}
    started = threading.Event()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            handle = await nursery.start(serve, config)
            await trio.to_thread.run_sync(_populate, handle.store, seed)
            grant = handle.fleet.create_api_token_sync("owner")
            ready.update(handle=handle, token=grant.access_token,
                         trio_token=trio.lowlevel.current_trio_token())
            started.set()

    thread = threading.Thread(target=trio.run, args=(main,), daemon=True)
    thread.start()
    assert started.wait(120), "the server did not start"
    with httpx.Client(base_url=ready["handle"].api_url, timeout=30) as client:
        login = client.get("/console/login")
        csrf = re.search(r'name="login_csrf" value="([^"]+)"', login.text)
        assert csrf is not None
        signed = client.post("/console/login", data={"login_csrf": csrf.group(1),
                                                     "token": ready["token"]})
        assert signed.status_code == 303
        yield Console(client)
    trio.from_thread.run_sync(ready["handle"].shutdown.set, trio_token=ready["trio_token"])
    thread.join(10)


def _fetch(client: httpx.Client, url: str) -> Callable[[], httpx.Response]:
    def run() -> httpx.Response:
        answer = client.get(url)
        assert answer.status_code == 200, answer.text[:300]
        return answer
    return run


def _within_limit(benchmark: Any) -> None:
    """The median round trip is under the issue's limit (the median: a loaded machine's
    outliers say nothing about the page)."""
    median = benchmark.stats.stats.median
    assert median < LIMIT_SECONDS, f"the page's median was {median * 1000:.0f} ms"


@pytest.mark.parametrize("query", [
    "", "page=150", "status=pending", "status=up_to_date&group=north", "status=failed",
    "online=yes&version=3&locked=no",
])
def test_device_list_page(benchmark, console: Console, query: str) -> None:  # type: ignore[no-untyped-def]
    benchmark.group = "console-device-list-10k"
    url = f"/console/products/bench/devices?{query}"
    answer = benchmark(_fetch(console.client, url))
    assert 1 <= answer.text.count('<tr data-device-id="') <= 50  # a full page (or the last)
    _within_limit(benchmark)


def test_device_page(benchmark, console: Console) -> None:  # type: ignore[no-untyped-def]
    benchmark.group = "console-device-page-10k"
    url = f"/console/products/bench/devices/{7:024x}"
    benchmark(_fetch(console.client, url))
    _within_limit(benchmark)
