"""The console page-load benchmark's own code (bench/console/pages.py), on a small seeded
fleet: every page it measures answers 200 with timings from both the server side and the
browser; the device list's filters, found through the page's own filter form, return
exactly the seeded devices they select (server-side filtering); the last page holds the
remainder; the results render as a table. Timings are recorded, never asserted here (the
10,000-device figures are the benchmark's, bench/results/console-pages.md).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import TYPE_CHECKING

from bench.console.pages import markdown_table, run_bench

if TYPE_CHECKING:
    from playwright.sync_api import Browser

DEVICES = 300


def test_the_page_benchmark_measures_every_console_page(browser: Browser, tmp_path: Path
                                                        ) -> None:
    seed = random.SystemRandom().randrange(2**32)
    print(f"seed {seed}")
    results = run_bench(tmp_path, devices=DEVICES, samples=3, browser_samples=1, warmup=1,
                        seed=seed, browser=browser)
    pages = {page["name"]: page for page in results["pages"]}
    failed = {name: page["status"] for name, page in pages.items() if page["status"] != 200}
    assert failed == {}, f"pages not measured: {failed}; filters: {results['filters']}"
    expected = {"products index", "device list", "device page", "groups", "firmware list",
                "firmware/release view", "rollouts", "events", "audit",
                "device list, last page"} | {
        f"device list, {label}" for label in
        ("Group", "Version", "Online", "Development", "Locked", "Update status")}
    assert set(pages) == expected, results["filters"]
    for page in pages.values():
        assert page["server"]["count"] == 3 and page["server"]["median"] > 0, page
        assert page["browser_load"]["count"] == 1 and page["browser_load"]["median"] > 0, page
    per_page = pages["device list"]["rows"]
    assert 0 < per_page < DEVICES, "the device list is not paged"
    seeded = results["seeded"]

    def shown(count: int) -> int:  # the first page of a filtered list
        return min(count, per_page)

    # The filters select on the server: the seeded counts, no more and no less. Online:
    # none (seeded devices never connect; the embedded store's server starts them offline).
    assert pages["device list, Development"]["rows"] == shown(seeded["development"])
    assert pages["device list, Locked"]["rows"] == shown(seeded["locked"])
    assert pages["device list, Group"]["rows"] == shown(seeded["groups"]["north"])
    assert pages["device list, Version"]["rows"] == shown(seeded["updated"])
    assert pages["device list, Online"]["rows"] == 0
    assert pages["device list, last page"]["rows"] == DEVICES - per_page * (
        (DEVICES - 1) // per_page)
    table = markdown_table(results)
    assert table.count("\n| ") == len(expected) + 2  # header, separator, a row per page
    assert f"{DEVICES:,} devices (seed {seed})" in table
