"""Page loads of the operators' console with 10,000 devices in the store (issue 17: under
300 ms, server-side paging and filtering).

A real ``ota server`` process on a fresh SQLite store holding a product of N seeded devices
(bench/console/seed.py: groups, two versions mid-release, development and locked devices,
updates in flight), firmware v1 and v2 uploaded through the REST API and v2 released to the
product. Then, for each page:

* **server**: the time from sending the request to the last byte of the page, measured by
  an httpx client with the console's session cookie (signed in with an API token, as a
  browser does), on loopback: ``samples`` requests after ``warmup`` ones; median and p95.
* **browser**: a headless Chromium (tests/browser.py) loads the page ``browser_samples``
  times; the Navigation Timing entry of each load gives the full load (``loadEventEnd``,
  from the navigation's start: request, HTML, CSS, scripts such as htmx, layout) and the
  time to the first byte; median and p95.

Pages: the products index; the device list unfiltered, with each filter (Group, Version,
Online, Development, Locked, Update status: the query string the page's own filter form
makes, found by filling it in the browser) and its last page (from the "Next" link's
paging parameter); a device page; groups; the firmware list; the firmware/release view;
rollouts; events; the audit log. A page that answers other than 200 is recorded with its
status and no timings.

Run (from the repository root; ~2 minutes for 10,000 devices)::

    .venv/bin/python -m bench.console.pages [--devices 10000] [--samples 40]
        [--browser-samples 10] [--seed N] [--store sqlite|postgresql]
        [--out bench/results/console-pages.json]

It writes the JSON results, a Markdown table beside them (``.md``) and, with matplotlib
(the ``bench`` extra), a bar chart (``.png``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import random
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import httpx

from bench.console.seed import SeedPlan, seed_devices
from server.store.installation import Installation
from tests.browser import (
    REPO,
    VIEWPORT,
    app_image,
    chromium,
    prepare_installation,
    start_ota_server,
)

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

#: The issue's goal for a page load.
GOAL_MS = 300.0
DEFAULT_OUT = Path("bench/results/console-pages.json")
#: A page's table rows, without a "nothing matches" row (one cell spanning the columns).
TABLE_ROWS = "table tbody tr:not(:has(td[colspan]))"
#: The filters of the device list, by label (the console contract), and the choices made
#: in each, by preference: a select takes the first option whose value or text is one of
#: them (else its first real option); a checkbox is checked; a text field gets the first.
DEVICE_FILTERS: dict[str, tuple[str, ...]] = {
    "Group": ("north",),
    "Version": ("2", "v2"),
    "Online": ("yes", "true", "online", "1"),
    "Development": ("yes", "true", "development", "1"),
    "Locked": ("yes", "true", "locked", "1"),
    "Update status": ("pending", "updating"),
}


class _HiddenInputs(HTMLParser):
    """The hidden inputs (name -> value) of an HTML page: the login form's CSRF fields."""

    def __init__(self) -> None:
        super().__init__()
        self.fields: dict[str, str] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        if tag == "input" and found.get("type") == "hidden" and found.get("name"):
            self.fields[str(found["name"])] = found.get("value") or ""


class ConsoleSignInError(RuntimeError):
    """The console did not accept the sign-in (its answer is in the message)."""


def console_client(api_url: str, token: str) -> httpx.Client:
    """An httpx client signed in to the console with an API token, as a browser signs in
    (the login page's hidden fields and cookies, then the form's POST)."""
    client = httpx.Client(base_url=api_url, timeout=30, follow_redirects=True)
    try:
        page = client.get("/console/login")
        parser = _HiddenInputs()
        parser.feed(page.text)
        answer = client.post("/console/login", data={**parser.fields, "token": token})
        if page.status_code != 200 or answer.status_code != 200 \
                or "/console/login" in str(answer.url):
            raise ConsoleSignInError(f"console sign-in failed: {page.status_code}, then "
                                     f"{answer.status_code} {answer.url} {answer.text[:300]}")
    except BaseException:
        client.close()
        raise
    return client


def browser_sign_in(page: Page, api_url: str, token: str) -> None:
    """Sign the browser in with an API token (the "Access token" field)."""
    page.goto(f"{api_url}/console/login")
    page.get_by_label("Access token").fill(token)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(lambda url: "/console/login" not in url)


@dataclass
class Timings:
    """Milliseconds of repeated loads of one page."""

    samples: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, float | int]:
        ordered = sorted(self.samples)
        if not ordered:
            return {"count": 0}
        p95 = ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)]
        return {"count": len(ordered), "median": round(statistics.median(ordered), 2),
                "p95": round(p95, 2), "min": round(ordered[0], 2),
                "max": round(ordered[-1], 2)}


@dataclass
class PageResult:
    """One page's measurements."""

    name: str
    path: str
    status: int
    bytes: int = 0
    rows: int | None = None
    server: dict[str, float | int] = field(default_factory=dict)
    browser_load: dict[str, float | int] = field(default_factory=dict)
    browser_first_byte: dict[str, float | int] = field(default_factory=dict)
    note: str = ""


def measure_server(client: httpx.Client, path: str, *, samples: int, warmup: int
                   ) -> tuple[int, int, Timings]:
    """(status, page bytes, timings) of ``samples`` GETs of ``path`` after ``warmup``."""
    timings = Timings()
    status, size = 0, 0
    for n in range(warmup + samples):
        started = time.perf_counter()
        response = client.get(path)
        body = response.content  # the whole page, read
        elapsed = (time.perf_counter() - started) * 1000
        status, size = response.status_code, len(body)
        if status != 200:
            return status, size, timings
        if n >= warmup:
            timings.samples.append(elapsed)
    return status, size, timings


#: The Navigation Timing entry of the page's load, once its load event ended.
NAVIGATION_JS = """() => new Promise((resolve) => {
  const done = () => {
    const n = performance.getEntriesByType('navigation')[0];
    if (!n || n.loadEventEnd === 0) { setTimeout(done, 10); return; }
    resolve({load: n.loadEventEnd - n.startTime, firstByte: n.responseStart - n.startTime,
             dom: n.domContentLoadedEventEnd - n.startTime, status: n.responseStatus || 0});
  };
  done();
})"""


def measure_browser(page: Page, url: str, *, samples: int) -> tuple[Timings, Timings]:
    """(full load, first byte) of ``samples`` navigations of the browser to ``url``."""
    load, first_byte = Timings(), Timings()
    page.goto(url)  # warm: the browser's cache holds the static assets, as an operator's
    for _ in range(samples):
        page.goto(url, wait_until="load")
        entry = page.evaluate(NAVIGATION_JS)
        load.samples.append(float(entry["load"]))
        first_byte.samples.append(float(entry["firstByte"]))
    return load, first_byte


def device_list_urls(page: Page, base: str) -> tuple[dict[str, str], str]:
    """The device list's URL for each filter of :data:`DEVICE_FILTERS` (what its form makes
    when that one filter is set and "Filter" pressed), and the notes of what was chosen."""
    urls: dict[str, str] = {}
    notes = []
    for label, wanted in DEVICE_FILTERS.items():
        page.goto(base)
        control = page.get_by_label(label, exact=True)
        if control.count() != 1:
            notes.append(f"no control labelled {label!r}")
            continue
        kind = control.evaluate("el => el.tagName + ':' + (el.type || '')").upper()
        if kind.startswith("SELECT"):
            options: list[dict[str, str]] = control.evaluate(
                "el => [...el.options].map(o => ({value: o.value, text: o.text}))")
            real = [o for o in options if o["value"]]
            match = [o for choice in wanted for o in real
                     if choice in (o["value"].lower(), o["text"].strip().lower())] or real
            if not match:
                notes.append(f"{label}: no option")
                continue
            control.select_option(value=match[0]["value"])
            notes.append(f"{label}={match[0]['value']}")
        elif kind.endswith(":CHECKBOX") or kind.endswith(":RADIO"):
            control.check()
            notes.append(f"{label} checked")
        else:
            control.fill(wanted[0])
            notes.append(f"{label}={wanted[0]}")
        page.get_by_role("button", name="Filter").click()
        page.wait_for_load_state()
        parts = urlsplit(page.url)
        urls[label] = parts.path + (f"?{parts.query}" if parts.query else "")
    return urls, "; ".join(notes)


def last_page_path(page: Page, base: str, total: int) -> str | None:
    """The device list's last page: the "Next" link's paging parameter set to the last
    page (``page=N``) or offset (``offset=K``), from the rows one page shows."""
    page.goto(base)
    rows = page.locator(TABLE_ROWS).count()
    following = page.get_by_role("link", name="Next")
    if rows == 0 or following.count() == 0:
        return None
    href = following.first.get_attribute("href") or ""
    parts = urlsplit(href)
    query = dict(parse_qsl(parts.query))
    pages = math.ceil(total / rows)
    for name, value in query.items():
        if name in ("page", "p") and value == "2":
            query[name] = str(pages)
            break
        if name in ("offset", "start", "skip") and value == str(rows):
            query[name] = str((pages - 1) * rows)
            break
    else:
        return None
    path = parts.path or urlsplit(base).path
    return f"{path}?{urlencode(query)}"


def _upload_and_release(api: httpx.Client, product: int) -> None:
    """Firmware v1 and v2 of the product; v2 released to the whole product."""
    for version in (1, 2):
        response = api.post(
            f"/v1/products/{product}/firmware",
            data={"version": str(version), "title": f"Release {version}",
                  "description": f"Application v{version}"},
            files={"binary": (f"app-v{version}.bin", app_image(product, version),
                              "application/octet-stream")},
        )
        response.raise_for_status()
    response = api.put(f"/v1/products/{product}/firmware/release",
                       json={"version": 2, "product_default": True, "intelligent": False,
                             "force": True})
    response.raise_for_status()


def run_bench(root: Path, *, devices: int, samples: int, browser_samples: int, warmup: int,
              seed: int, log: Callable[[str], None] = print,
              browser: Browser | None = None, db_url: str | None = None) -> dict[str, Any]:
    """Seed, start the server, measure every page; the results as a JSON-able dict.
    ``browser``: a running Playwright Chromium to use (one thread runs one Playwright);
    without it one is launched for the run. ``db_url``: an empty PostgreSQL database for
    the store (default: SQLite in the scratch data directory)."""
    started = time.monotonic()
    load_at_start = [round(x, 2) for x in os.getloadavg()]  # other work on the machine
    product, _, token = prepare_installation(root, devices=0, db_url=db_url)
    store = Installation(root / "data", db_url).open_store()
    try:
        seeded = seed_devices(store, product, SeedPlan(count=devices, seed=seed),
                              now=int(time.time() * 1000))
    finally:
        store.close()
    log(f"seeded {devices} devices (seed {seed}) in {time.monotonic() - started:.1f} s")
    server = start_ota_server(root / "data", root / "server.log",
                              *(["--db-url", db_url] if db_url else []))
    try:
        api_url = server.api_url
        with httpx.Client(base_url=api_url, timeout=60,
                          headers={"Authorization": f"Bearer {token}"}) as api:
            _upload_and_release(api, product)
        pages: dict[str, str] = {
            "products index": "/console/",
            "device list": f"/console/products/{product}/devices",
        }
        with ExitStack() as stack:
            if browser is None:
                browser = stack.enter_context(chromium())
            page = _signed_in_page(browser, api_url, token)
            filters, filter_notes = device_list_urls(
                page, f"{api_url}/console/products/{product}/devices")
            log(f"device list filters: {filter_notes}")
            pages.update({f"device list, {label}": url for label, url in filters.items()})
            last = last_page_path(page, f"{api_url}/console/products/{product}/devices",
                                  devices)
            if last is not None:
                pages["device list, last page"] = last
            middle = seeded.device_ids[len(seeded.device_ids) // 2]
            pages.update({
                "device page": f"/console/products/{product}/devices/{middle}",
                "groups": f"/console/products/{product}/groups",
                "firmware list": f"/console/products/{product}/firmware",
                "firmware/release view": f"/console/products/{product}/firmware/2",
                "rollouts": f"/console/products/{product}/rollouts",
                "events": f"/console/products/{product}/events",
                "audit": f"/console/products/{product}/audit",
            })
            results = []
            client = console_client(api_url, token)  # open already: closed below
            try:
                for name, path in pages.items():
                    status, size, server_times = measure_server(
                        client, path, samples=samples, warmup=warmup)
                    result = PageResult(name, path, status, size, server=server_times.summary())
                    if status == 200:
                        load, first_byte = measure_browser(page, api_url + path,
                                                           samples=browser_samples)
                        result.browser_load = load.summary()
                        result.browser_first_byte = first_byte.summary()
                        result.rows = page.locator(TABLE_ROWS).count()
                    else:
                        result.note = f"answered {status}"
                    log(_line(result))
                    results.append(result)
            finally:
                client.close()
                page.context.close()
            chromium_version = browser.version
    finally:
        server.stop()
    return {
        "benchmark": "console page loads",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "goal_ms": GOAL_MS,
        "devices": devices,
        "seed": seed,
        "samples": samples,
        "browser_samples": browser_samples,
        "seeded": {"updated": len(seeded.updated), "development": len(seeded.development),
                   "locked": len(seeded.locked), "in_flight": len(seeded.in_flight),
                   "groups": {name: len(ids) for name, ids in seeded.groups.items()}},
        "filters": filter_notes,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "chromium": chromium_version,
                    "store": "postgresql" if db_url else "sqlite", "server_workers": 1,
                    "load_average_at_start": load_at_start,
                    "load_average_at_end": [round(x, 2) for x in os.getloadavg()]},
        "code": _git_head(),
        "pages": [asdict(result) for result in results],
        "seconds": round(time.monotonic() - started, 1),
    }


def _git_head() -> str:
    """The checkout's commit (``+dirty`` with uncommitted changes), or "" outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True, cwd=REPO).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True, cwd=REPO).stdout
    except (OSError, subprocess.CalledProcessError):
        return ""
    return head + ("+dirty" if dirty.strip() else "")


def _signed_in_page(browser: Browser, api_url: str, token: str) -> Page:
    context = browser.new_context(viewport=VIEWPORT)  # type: ignore[arg-type]
    page = context.new_page()
    browser_sign_in(page, api_url, token)
    return page


def _line(result: PageResult) -> str:
    server, load = result.server, result.browser_load
    if result.status != 200:
        return f"{result.name:<32} {result.status} {result.path}"
    return (f"{result.name:<32} server median {server.get('median')} ms p95 {server.get('p95')}"
            f" | browser load median {load.get('median')} ms p95 {load.get('p95')}"
            f" | {result.bytes} bytes")


def markdown_table(results: dict[str, Any]) -> str:
    """The results as a Markdown table (milliseconds)."""
    machine = results.get("machine", {})
    lines = [
        f"Console page loads, {results['devices']:,} devices (seed {results['seed']}), "
        f"{results['date']}; server: {results['samples']} requests, browser: "
        f"{results['browser_samples']} loads per page; goal {results['goal_ms']:.0f} ms.",
        f"Code {results.get('code', '')[:12] or 'unknown'}; {machine.get('cpus')} CPUs, "
        f"load average {machine.get('load_average_at_start')} at the start, "
        f"{machine.get('load_average_at_end')} at the end; Chromium "
        f"{machine.get('chromium')}, {machine.get('store')} store, one server process. "
        "Milliseconds.",
        *([f"Note: {results['note']}"] if results.get("note") else []),
        "",
        "| page | status | server median | server p95 | browser load median "
        "| browser load p95 | first byte median | rows | KiB |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for page in results["pages"]:
        server, load, first = page["server"], page["browser_load"], page["browser_first_byte"]
        lines.append(
            f"| {page['name']} | {page['status']} | {server.get('median', '')} | "
            f"{server.get('p95', '')} | {load.get('median', '')} | {load.get('p95', '')} | "
            f"{first.get('median', '')} | {page['rows'] if page['rows'] is not None else ''} "
            f"| {page['bytes'] / 1024:.1f} |")
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], out: Path) -> bool:
    """A bar chart of the medians and p95s (False without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    measured = [p for p in results["pages"] if p["status"] == 200]
    names = [p["name"] for p in measured]
    figure, axis = plt.subplots(figsize=(10, 0.45 * len(names) + 1.5))
    ys = range(len(names))
    for offset, key, label in ((-0.2, "server", "server"),
                               (0.2, "browser_load", "browser full load")):
        medians = [p[key].get("median", 0) for p in measured]
        p95s = [p[key].get("p95", 0) for p in measured]
        bars = axis.barh([y + offset for y in ys], medians, height=0.4, label=f"{label} median")
        axis.errorbar(p95s, [y + offset for y in ys], fmt="|", color=bars.patches[0]
                      .get_facecolor() if bars.patches else "k", markersize=8)
    axis.axvline(results["goal_ms"], color="red", linestyle="--", label="goal 300 ms")
    axis.set_yticks(list(ys), names)
    axis.invert_yaxis()
    axis.set_xlabel("milliseconds (bars: median; ticks: p95)")
    store = results.get("machine", {}).get("store", "")
    axis.set_title(f"Console page loads, {results['devices']:,} devices, {store} store")
    axis.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(out, dpi=100)
    plt.close(figure)
    return True


def main(argv: list[str] | None = None) -> None:
    """``python -m bench.console.pages``: run the benchmark and save its results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--samples", type=int, default=40, help="requests per page")
    parser.add_argument("--browser-samples", type=int, default=10, help="loads per page")
    parser.add_argument("--warmup", type=int, default=3, help="requests not counted")
    parser.add_argument("--seed", type=int, default=None, help="seed of the fleet's values")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results JSON file")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="parent of the scratch data directory (default: the system's)")
    parser.add_argument("--store", choices=("sqlite", "postgresql"), default="sqlite",
                        help="postgresql: a throwaway PostgreSQL cluster holds the store "
                        "(server/store/pg_cluster.py; needs the postgresql package)")
    parser.add_argument("--note", default="", help="a remark saved with the results "
                        "(what was measured, e.g. which branches)")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**32)
    print(f"seed {seed}")
    with tempfile.TemporaryDirectory(prefix="ota-console-bench-", dir=args.work_dir) as tmp, \
            ExitStack() as stack:
        db_url = None
        if args.store == "postgresql":
            from server.store.pg_cluster import PgCluster, create_database

            cluster = stack.enter_context(PgCluster.start())  # under /tmp: its user reads it
            db_url = create_database(cluster.url(), "ota_console_bench")
        results = run_bench(Path(tmp), devices=args.devices, samples=args.samples,
                            browser_samples=args.browser_samples, warmup=args.warmup,
                            seed=seed, db_url=db_url)
    if args.note:
        results["note"] = args.note
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    table = markdown_table(results)
    args.out.with_suffix(".md").write_text(table)
    print(table)
    if plot(results, args.out.with_suffix(".png")):
        print(f"chart: {args.out.with_suffix('.png')}")
    slow = [p["name"] for p in results["pages"]
            if p["status"] == 200 and max(p["server"].get("median", 0),
                                          p["browser_load"].get("median", 0)) >= GOAL_MS]
    missing = [p["name"] for p in results["pages"] if p["status"] != 200]
    print(f"results: {args.out}; over {GOAL_MS:.0f} ms: {slow or 'none'}; "
          f"not measured: {missing or 'none'}")


if __name__ == "__main__":
    main()
